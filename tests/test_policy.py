"""ChunkPolicy contract: shapes, determinism given the noise, save/load round trip for every
policy kind, device agreement, and clear errors for malformed observations."""

import json

import pytest
import torch

from conftest import DEVICES, POLICY_KINDS, random_obs, tiny_policy
from dpolicy.errors import CheckpointError, ShapeError
from dpolicy.policy import ChunkPolicy


@pytest.mark.parametrize("net,process,sampler", POLICY_KINDS)
def test_shapes_and_noise_determinism(net, process, sampler):
    pol = tiny_policy(net, process, sampler).eval()
    obs = random_obs(5)
    noise = torch.randn(5, 8, 3, generator=torch.Generator().manual_seed(3))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731 - DDPM also draws per-step noise
    a = pol.act(obs, noise=noise, generator=g())
    assert a.shape == (5, 8, 3)
    assert torch.equal(a, pol.act(obs, noise=noise.clone(), generator=g()))
    other = pol.act(obs, noise=-noise, generator=g())
    if process == "regression":  # the MSE baseline ignores the noise: one chunk per observation
        assert torch.equal(a, other)
    else:
        assert not torch.allclose(a, other)
    assert pol.act(obs, noise=noise, steps=2, generator=g()).shape == (5, 8, 3)


@pytest.mark.parametrize("net,process,sampler", POLICY_KINDS)
def test_save_load_round_trip_gives_identical_actions(tmp_path, net, process, sampler):
    pol = tiny_policy(net, process, sampler).eval()
    pol.metadata = {"env_args": {"env_name": "x", "env_type": "gymnasium", "env_kwargs": {}}}
    pol.save(tmp_path / "p")
    loaded = ChunkPolicy.from_checkpoint(tmp_path / "p")
    obs, noise = random_obs(3), torch.randn(3, 8, 3)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(pol.act(obs, noise=noise, generator=g()), loaded.act(obs, noise=noise, generator=g()))
    assert loaded.metadata == pol.metadata
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert meta["format"] == "dpolicy-policy" and meta["shapes"]["action"] == [8, 3]
    assert meta["shapes"]["obs"] == {"pos": [2, 2], "vel": [2, 3]}


@pytest.mark.parametrize("device", DEVICES)
def test_actions_agree_across_devices(tmp_path, device):
    pol = tiny_policy("unet", "flow", "euler").eval()
    pol.save(tmp_path / "p")
    moved = ChunkPolicy.from_checkpoint(tmp_path / "p", device=device)
    obs, noise = random_obs(4), torch.randn(4, 8, 3)
    ref = pol.act(obs, noise=noise)
    # full fp32 on the GPU: Hopper/Ampere convolutions default to TF32, whose 10-bit mantissa moves actions by ~1e-4
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out = moved.act({k: v.to(device) for k, v in obs.items()}, noise=noise.to(device)).cpu()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert torch.allclose(ref, out, atol=1e-4)


def test_normalization_happens_once_in_act():
    pol = tiny_policy().eval()
    obs = random_obs(64)
    chunk = pol.act(obs, noise=torch.zeros(64, 8, 3))
    lo, hi = pol.normalizer.action.unnormalize(-torch.ones(3)), pol.normalizer.action.unnormalize(torch.ones(3))
    # clip_sample keeps the normalized chunk in [-1, 1], so the unnormalized chunk stays in the data range
    assert (chunk >= lo - 1e-4).all() and (chunk <= hi + 1e-4).all()


@pytest.mark.parametrize("bad,match", [
    ({"pos": torch.zeros(2, 2, 2)}, "missing"),
    ({"pos": torch.zeros(2, 2, 2), "vel": torch.zeros(2, 2, 4)}, "'vel' has shape"),
    ({"pos": torch.zeros(2, 3, 2), "vel": torch.zeros(2, 3, 3)}, "'pos' has shape"),
    ({"pos": torch.zeros(2, 2, 2), "vel": torch.zeros(3, 2, 3)}, "batch size"),
    ({"pos": torch.zeros(2, 2), "vel": torch.zeros(2, 2, 3)}, "'pos' has shape"),
])
def test_malformed_observations_name_the_culprit(bad, match):
    with pytest.raises(ShapeError, match=match):
        tiny_policy().act(bad)


def test_wrong_noise_shape_is_rejected():
    with pytest.raises(ShapeError, match="noise has shape"):
        tiny_policy().act(random_obs(2), noise=torch.zeros(2, 7, 3))


def test_corrupt_and_foreign_checkpoints_are_rejected(tmp_path):
    pol = tiny_policy()
    pol.save(tmp_path / "p")
    with pytest.raises(CheckpointError, match="does not exist"):
        ChunkPolicy.from_checkpoint(tmp_path / "nope")
    w = tmp_path / "p" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        ChunkPolicy.from_checkpoint(tmp_path / "p")
    pol.save(tmp_path / "q")
    (tmp_path / "q" / "meta.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="does not describe a dpolicy policy"):
        ChunkPolicy.from_checkpoint(tmp_path / "q")
    pol.save(tmp_path / "r")
    (tmp_path / "r" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ChunkPolicy.from_checkpoint(tmp_path / "r")
    pol.save(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "s" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version"):
        ChunkPolicy.from_checkpoint(tmp_path / "s")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete dpolicy checkpoint"):
        ChunkPolicy.from_checkpoint(tmp_path / "empty")


def test_weights_not_matching_config_are_rejected(tmp_path):
    tiny_policy("mlp").save(tmp_path / "a")
    big = tiny_policy("unet")
    big.save(tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").replace(tmp_path / "b" / "model.safetensors")
    with pytest.raises(CheckpointError, match="does not match its config"):
        ChunkPolicy.from_checkpoint(tmp_path / "b")


@pytest.mark.parametrize("device", DEVICES)
def test_act_takes_numpy_arrays_and_lists_on_any_device(tmp_path, device):
    import numpy as np

    pol = tiny_policy().eval()
    pol.save(tmp_path / "p")
    moved = ChunkPolicy.from_checkpoint(tmp_path / "p", device=device)
    obs, noise = random_obs(3), torch.randn(3, 8, 3)
    ref = pol.act(obs, noise=noise)
    as_np = {k: v.numpy().astype(np.float64) for k, v in obs.items()}
    out = moved.act(as_np, noise=noise.numpy())
    assert out.device.type == torch.device(device).type and torch.allclose(ref, out.cpu(), atol=1e-5)
    as_list = {k: v.tolist() for k, v in obs.items()}
    assert torch.allclose(ref, moved.act(as_list, noise=noise.tolist()).cpu(), atol=1e-5)
    mixed = {"pos": as_np["pos"], "vel": obs["vel"].to(device)}
    assert torch.allclose(ref, moved.act(mixed, noise=noise.to(device)).cpu(), atol=1e-5)


@pytest.mark.parametrize("key,value", [("pos", float("nan")), ("vel", float("inf")), ("vel", -float("inf"))])
@pytest.mark.parametrize("as_numpy", [False, True])
def test_non_finite_observations_are_rejected_naming_the_key(key, value, as_numpy):
    obs = random_obs(2)
    obs[key][1, -1, 0] = value
    if as_numpy:
        obs = {k: v.numpy() for k, v in obs.items()}
    with pytest.raises(ShapeError, match=f"observation '{key}' holds NaN or infinite values"):
        tiny_policy().act(obs)


@pytest.mark.parametrize("as_numpy", [False, True])
def test_non_finite_noise_is_rejected(as_numpy):
    noise = torch.randn(2, 8, 3)
    noise[0, 3, 1] = float("nan")
    with pytest.raises(ShapeError, match="noise holds NaN or infinite values"):
        tiny_policy().act(random_obs(2), noise=noise.numpy() if as_numpy else noise)


def test_observations_that_are_not_numeric_arrays_name_the_key():
    with pytest.raises(ShapeError, match="observation 'vel' is a list that is not a numeric array"):
        tiny_policy().act({"pos": torch.zeros(2, 2, 2), "vel": [[["a", "b", "c"]] * 2] * 2})
    with pytest.raises(ShapeError, match="observation 'pos' is a list that is not a numeric array .*inhomogeneous"):
        tiny_policy().act({"pos": [[1.0, 2.0], [3.0]], "vel": torch.zeros(1, 2, 3)})
    with pytest.raises(ShapeError, match="observation 'pos' has shape"):
        tiny_policy().act({"pos": [[1.0, 2.0], [3.0, 4.0]], "vel": torch.zeros(1, 2, 3)})
    with pytest.raises(ShapeError, match="noise has shape"):
        tiny_policy().act(random_obs(2), noise=[0.0, 1.0])
