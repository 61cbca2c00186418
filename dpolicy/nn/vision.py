"""Image encoders for policies that read cameras: ``enc({key: (N,H,W,C) 0..255}) -> (N, out_dim)``.

The Diffusion Policy recipe: every camera frame is cropped (a random crop per sample while
training, the centre crop at inference), optionally colour-jittered, run through a convolutional
backbone and reduced by a spatial softmax to ``keypoints`` expected (x, y) positions in [-1, 1];
the features of all cameras are concatenated. Augmentation runs inside ``forward`` on the input's
device, so a GPU batch is never copied back for it and the same ``generator`` replays the same crops.

Two backbones: "conv", a few stride-2 conv stages small enough to train on a CPU, and "resnet18",
Diffusion Policy's ResNet-18 with GroupNorm in place of BatchNorm (BatchNorm statistics drift with
the small, highly correlated batches of behaviour cloning). The ResNet keeps torchvision's parameter
names, so a local torchvision-layout weights file loads onto it (``cfg.pretrained``, never downloaded).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dpolicy.errors import ConfigError, ShapeError
from dpolicy.nn.unet1d import _groups

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def image_memory(shapes: dict) -> int:
    """Bytes of one frame of every camera, stored as uint8 (what a replay buffer or history holds)."""
    return sum(int(h) * int(w) * int(c) for h, w, c in shapes.values())


def crop_images(x: torch.Tensor, size: int, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(N,H,W,C) -> (N,C,size,size)``: a random window per sample when ``train``, else the centre one.

    The random crop indexes a strided view of every window (no copy) with one (top, left) pair per
    sample, so it is a single gather on any device and batch size. Crop and layout change run on
    the uint8 frames, before the float conversion, moving a quarter of the bytes.
    """
    n, h, w, _ = x.shape
    if train:
        top = torch.randint(0, h - size + 1, (n,), device=x.device, generator=generator)
        left = torch.randint(0, w - size + 1, (n,), device=x.device, generator=generator)
        return x.unfold(1, size, 1).unfold(2, size, 1)[torch.arange(n, device=x.device), top, left]
    top, left = (h - size) // 2, (w - size) // 2
    return x[:, top:top + size, left:left + size].permute(0, 3, 1, 2)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != 3:
        return x.mean(1, keepdim=True)
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b)[:, None]


def color_jitter(x: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample brightness, contrast and saturation factors in [1 - s, 1 + s] on ``(N,C,H,W)`` in [0, 1].

    Applied in that order, each clamped to [0, 1] like torchvision's ColorJitter; saturation needs
    RGB and is skipped for other channel counts.
    """
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    f = torch.rand(3, x.shape[0], 1, 1, 1, device=x.device, generator=generator, dtype=x.dtype) * (hi - lo) + lo
    x = (x * f[0]).clamp(0, 1)
    mean = _gray(x).mean((1, 2, 3), keepdim=True)
    x = ((x - mean) * f[1] + mean).clamp(0, 1)
    if x.shape[1] == 3:
        gray = _gray(x)
        x = ((x - gray) * f[2] + gray).clamp(0, 1)
    return x


class SpatialSoftmax(nn.Module):
    """``(N,K,H,W) maps -> (N,2K)``: each map's softmax-weighted mean (x, y) position in [-1, 1].

    robomimic's keypoint reduction, with a learnable temperature (stored as its log, so it stays
    positive). Positions are computed from the map's own size, so one module serves cameras of any size.
    """

    def __init__(self):
        super().__init__()
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        n, k, h, w = maps.shape
        p = torch.softmax(maps.float().reshape(n, k, h * w) * torch.exp(-self.log_temperature), -1).reshape(n, k, h, w)
        xs = torch.linspace(-1, 1, w, device=maps.device)
        ys = torch.linspace(-1, 1, h, device=maps.device)
        x = (p.sum(2) * xs).sum(-1)
        y = (p.sum(3) * ys).sum(-1)
        return torch.stack([x, y], -1).reshape(n, 2 * k)


class ConvBackbone(nn.Sequential):
    """Stride-2 3x3 conv -> GroupNorm -> ReLU stages; each halves the resolution."""

    def __init__(self, in_channels: int, channels: list[int]):
        layers, c = [], in_channels
        for out in channels:
            layers += [nn.Conv2d(c, out, 3, stride=2, padding=1), nn.GroupNorm(_groups(out, 8), out), nn.ReLU(inplace=True)]
            c = out
        super().__init__(*layers)
        self.out_channels = c


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock with GroupNorm (channels // 16 groups) under the ``bn`` names."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.GroupNorm(cout // 16, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.GroupNorm(cout // 16, cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(cout // 16, cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.downsample is None else self.downsample(x)))


class ResNet18Backbone(nn.Module):
    """ResNet-18 up to ``layer4`` (no pooling, no fc); ``state_dict`` names are torchvision's minus BN statistics."""

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.GroupNorm(4, 64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c = 64
        for i, (out, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)]):
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(c, out, stride), BasicBlock(out, out, 1)))
            c = out
        self.out_channels = c
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class KeypointNet(nn.Module):
    """``(N,C,H,W) in [0,1] -> (N, 2 * keypoints)``: backbone, 1x1 conv to keypoint maps, spatial softmax."""

    def __init__(self, backbone: nn.Module, keypoints: int):
        super().__init__()
        self.backbone = backbone
        self.keypoints = nn.Conv2d(backbone.out_channels, keypoints, 1)
        self.softmax = SpatialSoftmax()

    def forward(self, x):
        return self.softmax(self.keypoints(self.backbone(x)))


def _read_weights(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"policy.vision.pretrained={str(path)!r}: no such file (weights are never downloaded; "
                          f"give a local torchvision-layout resnet18 state_dict).")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, pickle and zip each raise their own kinds for a bad file
        raise ConfigError(f"policy.vision.pretrained={str(path)!r} cannot be read ({type(e).__name__}: {e}); "
                          f"expected safetensors or a torch state_dict (.pt/.pth).") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"policy.vision.pretrained={str(path)!r} does not hold a state_dict of tensors.")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _map_resnet_weights(state: dict, backbone: ResNet18Backbone, path: Path) -> tuple[dict, int, int, bool]:
    """The file's tensors for ``backbone`` (BatchNorm statistics and fc dropped); each must be there with its shape."""
    target = backbone.state_dict()
    stats = [k for k in state if k.rsplit(".", 1)[-1] in _BN_STATS]
    fc = [k for k in state if k.startswith("fc.")]
    kept = {k: v for k, v in state.items() if k not in stats and k not in fc}
    missing = [k for k in target if k not in kept]
    unexpected = [k for k in kept if k not in target]
    wrong = [f"{k} {tuple(kept[k].shape)} vs {tuple(target[k].shape)}" for k in target
             if k in kept and kept[k].shape != target[k].shape]
    if missing or unexpected or wrong:
        raise ConfigError(f"policy.vision.pretrained={str(path)!r} does not match the resnet18 backbone: "
                          f"missing {missing[:4]}{'...' if len(missing) > 4 else ''} ({len(missing)}), "
                          f"unexpected {unexpected[:4]} ({len(unexpected)}), wrong shapes {wrong[:4]} ({len(wrong)}).")
    gn = sum(1 for k in kept if isinstance(backbone.get_submodule(k.rsplit(".", 1)[0]), nn.GroupNorm))
    return kept, gn, len(stats), bool(fc)


class ImageEncoder(nn.Module):
    """``forward({key: (N,H,W,C)}, generator) -> (N, out_dim)`` float32; leading dims beyond N are kept.

    Images are uint8, or float holding 0..255 values (an observation history). ``keys`` follow the
    order of ``shapes``; ``out_dim`` is ``2 * keypoints`` per camera. With ``cfg.share`` one network
    serves every camera (cameras whose crops have one size run as one batch), else each has its own.
    """

    def __init__(self, cfg, shapes: dict, load_pretrained: bool = True):
        super().__init__()
        if not shapes:
            raise ConfigError("the image encoder needs at least one camera (policy.image_shapes is empty).")
        self.keys = [str(k) for k in shapes]
        self.shapes = {str(k): tuple(int(n) for n in v) for k, v in shapes.items()}
        for k, (h, w, c) in self.shapes.items():
            if cfg.crop > min(h, w):
                raise ConfigError(f"policy.vision.crop={cfg.crop} is larger than camera {k!r}'s {h}x{w} image "
                                  f"(H x W); choose a crop <= {min(h, w)} or 0 for none.")
        chans = {c for _, _, c in self.shapes.values()}
        if cfg.share and len(chans) > 1:
            raise ConfigError(f"policy.vision.share=true needs one channel count for every camera; "
                              f"policy.image_shapes has {sorted(chans)}.")
        self.encoder, self.share, self.crop = cfg.encoder, bool(cfg.share), int(cfg.crop)
        self.jitter, self.n_keypoints = float(cfg.color_jitter), int(cfg.keypoints)
        self.out_dim = 2 * self.n_keypoints * len(self.keys)

        def make(c):
            backbone = ResNet18Backbone(c) if cfg.encoder == "resnet18" else ConvBackbone(c, list(cfg.channels))
            return KeypointNet(backbone, self.n_keypoints)

        self.nets = nn.ModuleList([make(c) for _, _, c in (list(self.shapes.values())[:1] if self.share
                                                          else self.shapes.values())])
        self.normalize = cfg.encoder == "resnet18" and cfg.pretrained is not None
        if self.normalize:  # pretrained weights expect ImageNet statistics
            if chans != {3}:
                raise ConfigError(f"policy.vision.pretrained needs RGB cameras (C = 3); policy.image_shapes has "
                                  f"{ {k: list(v) for k, v in self.shapes.items() if v[2] != 3} }.")
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)
            if load_pretrained:
                self.load_pretrained(cfg.pretrained)

    def load_pretrained(self, path) -> None:
        """Load a torchvision-layout resnet18 file into every backbone, loudly; any mismatch is a ConfigError."""
        path = Path(path)
        state = _read_weights(path)
        kept, gn, stats, fc = _map_resnet_weights(state, self.nets[0].backbone, path)
        for net in self.nets:
            net.backbone.load_state_dict(kept)
        where = "the shared resnet18 backbone" if len(self.nets) == 1 else f"each of {len(self.nets)} resnet18 backbones"
        print(f"vision: loaded {len(kept)} tensors from {path} into {where} ({gn} GroupNorm affine from BatchNorm "
              f"weights; {stats} BatchNorm running stats ignored; {'fc dropped' if fc else 'no fc'})", flush=True)

    def preprocess(self, images: dict, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Each camera's ``(M,C,h,w)`` float input to its network (M: all leading dims flattened)."""
        out = []
        for k in self.keys:
            if k not in images:
                raise ShapeError(f"the image encoder needs camera {k!r}; got {sorted(images)}.")
            x = images[k]
            if tuple(x.shape[-3:]) != self.shapes[k] or x.dim() < 4:
                raise ShapeError(f"camera {k!r} image has shape {tuple(x.shape)}; expected (N, {', '.join(map(str, self.shapes[k]))}).")
            x = x.reshape(-1, *self.shapes[k])
            # channels-last: the frames' own (H, W, C) order, so the crop's copy reads rows, and the convolutions'
            # CPU kernels (oneDNN) run 15-25% faster on it than on planar channels (same values up to float rounding)
            x = (crop_images(x, self.crop, self.training, generator) if self.crop else x.permute(0, 3, 1, 2)).contiguous(
                memory_format=torch.channels_last)
            x = x / 255.0 if x.dtype == torch.uint8 else x.float() / 255.0  # uint8 / float is one float32 kernel
            if self.training and self.jitter > 0:
                x = color_jitter(x, self.jitter, generator)
            if self.normalize:
                x = (x - self.mean) / self.std
            out.append(x)
        return out

    def forward(self, images: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        lead = images[self.keys[0]].shape[:-3] if self.keys[0] in images else ()
        xs = self.preprocess(images, generator)
        if self.share and len({x.shape[1:] for x in xs}) == 1:
            feats = self.nets[0](torch.cat(xs)).chunk(len(xs))
        else:
            feats = [self.nets[0 if self.share else i](x) for i, x in enumerate(xs)]
        return torch.cat(feats, -1).reshape(*lead, self.out_dim)

    def describe(self) -> str:
        cams = ", ".join(f"{k} {h}x{w}x{c}" for k, (h, w, c) in self.shapes.items())
        n = sum(p.numel() for p in self.parameters())
        return (f"{self.encoder} encoder ({'shared' if self.share else 'one per camera'}) over {len(self.keys)} "
                f"camera(s) [{cams}], crop {self.crop or 'none'}, {n:,} params, {self.out_dim} features per frame")


def build_image_encoder(cfg, shapes: dict, load_pretrained: bool = True) -> ImageEncoder:
    """The encoder ``cfg`` (a VisionConfig) names for cameras ``shapes`` ({key: (H, W, C)}).

    ``load_pretrained=False`` skips reading ``cfg.pretrained`` (keeping its ImageNet normalization):
    for rebuilding an encoder whose trained weights come from a checkpoint instead.
    """
    return ImageEncoder(cfg, shapes, load_pretrained)
