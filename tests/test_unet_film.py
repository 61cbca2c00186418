"""The U-Net's FiLM modulation switch (net.film): each mode computes its formula, the default is
the original residual form, and a policy built with a non-default mode saves and loads."""

import dataclasses

import pytest
import torch

from conftest import random_obs, tiny_policy_cfg
from dpolicy.config import NetConfig, from_dict
from dpolicy.errors import ConfigError
from dpolicy.nn.unet1d import ConditionalUnet1D, FiLMResBlock


@pytest.mark.parametrize("mode", ["residual", "plain", "bias"])
def test_film_block_computes_its_formula(mode):
    torch.manual_seed(0)
    blk = FiLMResBlock(4, 6, cond_dim=5, kernel=3, n_groups=2, film=mode)
    x, c = torch.randn(2, 4, 8), torch.randn(2, 5)
    f = blk.film(c)[..., None]
    h = blk.block1(x)
    if mode == "bias":
        assert f.shape[1] == 6
        mod = h + f
    else:
        scale, bias = f.chunk(2, dim=1)
        mod = h * ((1 + scale) if mode == "residual" else scale) + bias
    assert torch.allclose(blk(x, c), blk.block2(mod) + blk.skip(x))


def test_default_is_residual_and_modes_differ():
    assert NetConfig().film == "residual"
    assert from_dict(NetConfig, {"type": "unet"}).film == "residual"  # configs saved before the switch load unchanged
    x, t, c = torch.randn(3, 16, 2), torch.rand(3) * 100, torch.randn(3, 10)
    outs = {}
    for mode in ("residual", "plain", "bias"):
        torch.manual_seed(0)
        outs[mode] = ConditionalUnet1D(2, 10, (16, 32), 5, 8, 16, film=mode)(x, t, c)
    torch.manual_seed(0)
    assert torch.equal(ConditionalUnet1D(2, 10, (16, 32), 5, 8, 16)(x, t, c), outs["residual"])
    assert not torch.allclose(outs["residual"], outs["plain"])
    n = {m: sum(p.numel() for p in ConditionalUnet1D(2, 10, (16, 32), 5, 8, 16, film=m).parameters()) for m in outs}
    assert n["residual"] == n["plain"] > n["bias"]


def test_unknown_film_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="net.film"):
        NetConfig(type="unet", film="scale")


def test_policy_with_plain_film_round_trips(tmp_path, demos):
    from dpolicy.data.windows import WindowDataset
    from dpolicy.policy import ChunkPolicy

    cfg = tiny_policy_cfg("unet")
    cfg = dataclasses.replace(cfg, net=dataclasses.replace(cfg.net, film="plain"))
    torch.manual_seed(0)
    pol = ChunkPolicy(cfg, WindowDataset(demos, cfg.obs_keys, cfg.To, cfg.Tp).fit_normalizer()).eval()
    pol.metadata = {"env_args": {"env_name": "x", "env_type": "gymnasium", "env_kwargs": {}}}
    pol.save(tmp_path / "p")
    loaded = ChunkPolicy.from_checkpoint(tmp_path / "p")
    assert loaded.cfg.net.film == "plain"
    obs, noise = random_obs(3), torch.randn(3, 8, 3)
    assert torch.equal(pol.act(obs, noise=noise), loaded.act(obs, noise=noise))
