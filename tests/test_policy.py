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
    out = moved.act({k: v.to(device) for k, v in obs.items()}, noise=noise.to(device)).cpu()
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
