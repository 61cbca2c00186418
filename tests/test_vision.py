"""Image encoders: shapes, parameter sharing, crop and colour-jitter augmentation, the spatial
softmax, loading local resnet18 weights, gradients and torch.export."""

import pytest
import torch

from conftest import DEVICES
from dpolicy.config import VisionConfig
from dpolicy.errors import ConfigError, ShapeError
from dpolicy.nn import ImageEncoder, build_image_encoder
from dpolicy.nn.vision import ResNet18Backbone, SpatialSoftmax, color_jitter, image_memory


def images(shapes, n=4, seed=0, dtype=torch.uint8):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randint(0, 256, (n, *s), generator=g).to(dtype) for k, s in shapes.items()}


def gen(seed, device="cpu"):
    return torch.Generator(device).manual_seed(seed)


def coordinate_image(n, h, w):
    """Channel 0 holds each pixel's row, channel 1 its column: a crop reveals its own offset."""
    rows = torch.arange(h)[:, None].expand(h, w)
    cols = torch.arange(w)[None, :].expand(h, w)
    img = torch.stack([rows, cols, torch.zeros(h, w, dtype=torch.long)], -1).to(torch.uint8)
    return img.expand(n, h, w, 3).contiguous()


def crop_offsets(enc, img, generator=None):
    (x,) = enc.preprocess({"cam": img}, generator)
    rows, cols = (x[:, 0] * 255).round().long(), (x[:, 1] * 255).round().long()
    top, left = rows[:, 0, 0], cols[:, 0, 0]
    s = x.shape[-1]
    assert torch.equal(rows, top[:, None, None] + torch.arange(s)[None, :, None].expand(-1, s, s))
    assert torch.equal(cols, left[:, None, None] + torch.arange(s)[None, None, :].expand(-1, s, s))
    return top, left


@pytest.mark.parametrize("cams", [1, 2])
@pytest.mark.parametrize("share", [False, True])
def test_output_shape_and_dtype(cams, share):
    shapes = {f"cam{i}": (40, 36, 3) for i in range(cams)}
    enc = build_image_encoder(VisionConfig(crop=32, keypoints=5, share=share), shapes)
    assert isinstance(enc, ImageEncoder) and enc.keys == list(shapes) and enc.out_dim == 10 * cams
    for mode in (enc.train(), enc.eval()):
        out = mode(images(shapes, n=3))
        assert out.shape == (3, 10 * cams) and out.dtype == torch.float32 and torch.isfinite(out).all()
    hist = {k: v.reshape(3, 1, *v.shape[1:]).expand(3, 2, *v.shape[1:]) for k, v in images(shapes, n=3).items()}
    assert enc(hist).shape == (3, 2, 10 * cams)  # (B, To, H, W, C) histories keep their leading dims


def test_shared_backbone_has_one_set_of_parameters():
    shapes = {"a": (32, 32, 3), "b": (32, 32, 3)}
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    one = count(build_image_encoder(VisionConfig(crop=0), {"a": (32, 32, 3)}))
    assert count(build_image_encoder(VisionConfig(crop=0, share=True), shapes)) == one
    assert count(build_image_encoder(VisionConfig(crop=0, share=False), shapes)) == 2 * one


def test_shared_backbone_serves_cameras_of_different_sizes():
    shapes = {"wrist": (40, 40, 3), "scene": (64, 56, 3)}
    enc = build_image_encoder(VisionConfig(crop=32, share=True, keypoints=4), shapes).eval()
    both = enc(images(shapes))
    assert both.shape == (4, 16)
    alone = build_image_encoder(VisionConfig(crop=0, share=True, keypoints=4), {"scene": (32, 32, 3)})
    alone.load_state_dict(enc.state_dict())
    assert torch.allclose(both[:, 8:], alone({"scene": images(shapes)["scene"][:, 16:48, 12:44]}), atol=1e-6)


def test_train_crops_lie_inside_the_image_and_differ_per_sample():
    h, w, s = 24, 20, 12
    enc = build_image_encoder(VisionConfig(crop=s), {"cam": (h, w, 3)}).train()
    top, left = crop_offsets(enc, coordinate_image(256, h, w), gen(0))
    assert top.min() == 0 and top.max() == h - s and left.min() == 0 and left.max() == w - s
    assert len(set(zip(top.tolist(), left.tolist()))) > 30


def test_eval_takes_the_centre_crop():
    h, w, s = 24, 19, 12
    enc = build_image_encoder(VisionConfig(crop=s), {"cam": (h, w, 3)}).eval()
    top, left = crop_offsets(enc, coordinate_image(5, h, w))
    assert (top == (h - s) // 2).all() and (left == (w - s) // 2).all()
    no_crop = build_image_encoder(VisionConfig(crop=0), {"cam": (h, w, 3)}).train()
    (x,) = no_crop.preprocess({"cam": coordinate_image(2, h, w)}, gen(0))
    assert x.shape == (2, 3, h, w)


def test_float_input_equals_uint8_and_is_left_untouched():
    shapes = {"cam": (30, 30, 3)}
    enc = build_image_encoder(VisionConfig(crop=24, color_jitter=0.2), shapes)
    u8 = images(shapes)
    f32 = {k: v.float() for k, v in u8.items()}
    before = f32["cam"].clone()
    assert torch.equal(enc.eval()(u8), enc(f32))
    assert torch.equal(enc.train()(u8, gen(3)), enc(f32, gen(3)))
    assert torch.equal(f32["cam"], before)


def test_generator_replays_training_augmentation_and_eval_is_deterministic():
    shapes = {"a": (30, 30, 3), "b": (28, 30, 3)}
    enc = build_image_encoder(VisionConfig(crop=24, color_jitter=0.3), shapes)
    x = images(shapes, n=8)
    enc.train()
    assert torch.equal(enc(x, gen(7)), enc(x, gen(7)))
    assert not torch.equal(enc(x, gen(7)), enc(x, gen(8)))
    enc.eval()
    assert torch.equal(enc(x), enc(x)) and torch.equal(enc(x, gen(1)), enc(x, gen(2)))


def test_color_jitter_only_while_training():
    shapes = {"cam": (30, 30, 3)}
    plain = build_image_encoder(VisionConfig(crop=24), shapes)
    jit = build_image_encoder(VisionConfig(crop=24, color_jitter=0.4), shapes)
    x = images(shapes, n=8)
    assert torch.equal(plain.eval().preprocess(x)[0], jit.eval().preprocess(x)[0])
    (a,), (b,) = plain.train().preprocess(x, gen(0)), jit.train().preprocess(x, gen(0))
    assert not torch.allclose(a, b) and b.min() >= 0 and b.max() <= 1


def test_color_jitter_factors_are_per_sample_and_bounded():
    # on a uniform grey image contrast and saturation change nothing: the output is the brightness factor
    x = torch.full((64, 3, 4, 4), 0.25)
    out = color_jitter(x, 0.5, gen(0))
    f = out[:, 0, 0, 0] / 0.25
    assert torch.allclose(out, f[:, None, None, None] * 0.25 * torch.ones_like(x))
    assert f.min() >= 0.5 - 1e-6 and f.max() <= 1.5 + 1e-6 and f.std() > 0.1


def test_spatial_softmax_of_a_one_hot_map_is_that_pixels_position():
    h, w = 5, 7
    maps = torch.zeros(2, 3, h, w)
    spots = [[(0, 0), (4, 6), (2, 3)], [(1, 5), (3, 1), (4, 0)]]
    for n, row in enumerate(spots):
        for k, (r, c) in enumerate(row):
            maps[n, k, r, c] = 60.0
    out = SpatialSoftmax()(maps)
    want = torch.tensor([[(-1 + 2 * c / (w - 1), -1 + 2 * r / (h - 1)) for r, c in row] for row in spots]).reshape(2, 6)
    assert torch.allclose(out, want, atol=1e-5)
    assert torch.allclose(SpatialSoftmax()(torch.zeros(1, 1, h, w)), torch.zeros(1, 2), atol=1e-6)  # flat map: the centre


def test_crop_larger_than_an_image_is_a_config_error():
    with pytest.raises(ConfigError, match=r"policy\.vision\.crop=40.*'small'.*32x48"):
        build_image_encoder(VisionConfig(crop=40), {"big": (64, 64, 3), "small": (32, 48, 3)})


def test_wrong_or_missing_camera_is_a_shape_error():
    enc = build_image_encoder(VisionConfig(crop=16), {"cam": (20, 20, 3)})
    with pytest.raises(ShapeError, match="'cam'"):
        enc({"other": torch.zeros(1, 20, 20, 3)})
    with pytest.raises(ShapeError, match=r"\(1, 20, 21, 3\)"):
        enc({"cam": torch.zeros(1, 20, 21, 3)})


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    for cfg, shapes in [(VisionConfig(crop=24, color_jitter=0.2), {"a": (28, 28, 3), "b": (28, 32, 3)}),
                        (VisionConfig(encoder="resnet18", crop=0, keypoints=4), {"a": (64, 64, 3)})]:
        enc = build_image_encoder(cfg, shapes).train()
        out = enc(images(shapes, n=2), gen(0))
        (out * torch.randn_like(out)).sum().backward()
        dead = [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not dead, dead


def torchvision_file(tmp_path, backbone, suffix=".pt"):
    """``backbone``'s tensors as torchvision saves a resnet18: BatchNorm statistics and the fc included."""
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    for name, m in backbone.named_modules():
        if isinstance(m, torch.nn.GroupNorm):
            c = m.num_channels
            state.update({f"{name}.running_mean": torch.randn(c), f"{name}.running_var": torch.rand(c) + 0.5,
                          f"{name}.num_batches_tracked": torch.tensor(100)})
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_pretrained_resnet_loads_loudly_into_every_backbone(tmp_path, capsys, suffix):
    torch.manual_seed(1)
    source = ResNet18Backbone()
    path = torchvision_file(tmp_path, source, suffix)
    shapes = {"a": (40, 40, 3), "b": (40, 40, 3)}
    enc = build_image_encoder(VisionConfig(encoder="resnet18", crop=32, pretrained=str(path)), shapes)
    line = capsys.readouterr().out
    assert "vision: loaded 60 tensors" in line and str(path) in line and "40 GroupNorm affine" in line
    assert "60 BatchNorm running stats ignored" in line and "fc dropped" in line
    for net in enc.nets:
        for k, v in source.state_dict().items():
            assert torch.equal(net.backbone.state_dict()[k], v), k
    assert not any("running" in k or k.startswith("fc") for k in enc.state_dict())
    (x,) = enc.eval().preprocess({"a": torch.zeros(1, 40, 40, 3), "b": torch.zeros(1, 40, 40, 3)})[:1]
    assert torch.allclose(x[0, :, 0, 0], -torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225]))
    rebuilt = build_image_encoder(VisionConfig(encoder="resnet18", crop=32, pretrained="/nowhere.pt"), shapes,
                                  load_pretrained=False)  # a checkpoint's own weights follow
    assert capsys.readouterr().out == "" and rebuilt.normalize


def test_pretrained_mismatch_missing_or_unreadable_file_is_a_config_error(tmp_path):
    shapes = {"cam": (40, 40, 3)}
    build = lambda p: build_image_encoder(VisionConfig(encoder="resnet18", crop=32, pretrained=str(p)), shapes)  # noqa: E731
    with pytest.raises(ConfigError, match="no such file"):
        build(tmp_path / "absent.pt")
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a weights file")
    with pytest.raises(ConfigError, match="garbage.pth.*cannot be read"):
        build(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, foreign)
    with pytest.raises(ConfigError, match="foreign.pt.*does not match"):
        build(foreign)
    state = ResNet18Backbone().state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    shaped = tmp_path / "shaped.pt"
    torch.save(state, shaped)
    with pytest.raises(ConfigError, match=r"shaped.pt.*layer2\.0\.conv1\.weight \(128, 64, 5, 5\)"):
        build(shaped)
    with pytest.raises(ConfigError, match=r"RGB.*'depth': \[40, 40, 1\]"):
        build_image_encoder(VisionConfig(encoder="resnet18", crop=32, pretrained=str(shaped)), {"depth": (40, 40, 1)})


def test_conv_encoder_exports():
    shapes = {"a": (36, 36, 3), "b": (40, 36, 3)}
    enc = build_image_encoder(VisionConfig(crop=32, color_jitter=0.2), shapes).eval()
    x = images(shapes, n=2)
    prog = torch.export.export(enc, (x,))
    assert torch.allclose(prog.module()(x), enc(x), atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_augmentation_runs_on_the_input_device(device):
    shapes = {"cam": (30, 30, 3)}
    enc = build_image_encoder(VisionConfig(crop=24, color_jitter=0.3), shapes).to(device).train()
    x = {k: v.to(device) for k, v in images(shapes).items()}
    out = enc(x, gen(0, device))
    assert out.device.type == device and torch.equal(out, enc(x, gen(0, device)))


def test_memory_and_description():
    shapes = {"a": (84, 84, 3), "b": (64, 48, 1)}
    assert image_memory(shapes) == 84 * 84 * 3 + 64 * 48
    enc = build_image_encoder(VisionConfig(crop=40, keypoints=8), shapes)
    text = enc.describe()
    assert "\n" not in text and "conv" in text and "32 features" in text
    assert f"{sum(p.numel() for p in enc.parameters()):,} params" in text
