"""Shared fixtures: tiny synthetic demos and tiny policies, made fresh in tmp_path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpolicy.config import NetConfig, PolicyConfig, ProcessConfig, VisionConfig
from dpolicy.data import Demo, WindowDataset

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# every (net, process, sampler) combination a policy can be built with
POLICY_KINDS = [("mlp", "diffusion", "ddim"), ("mlp", "diffusion", "ddpm"), ("mlp", "flow", "euler"),
                ("mlp", "flow", "heun"), ("unet", "diffusion", "ddim"), ("unet", "flow", "euler"),
                ("mlp", "regression", "direct"), ("mlp", "edm", "heun"), ("unet", "edm", "euler")]


def make_demos(n_demos=6, length=30, seed=0):
    rng = np.random.default_rng(seed)
    demos = []
    for _ in range(n_demos):
        pos = np.cumsum(rng.normal(scale=0.1, size=(length, 2)), 0).astype(np.float32)
        vel = rng.normal(size=(length, 3)).astype(np.float32)
        acts = np.tanh(np.concatenate([pos, vel[:, :1]], 1)).astype(np.float32)
        demos.append(Demo(obs={"pos": pos, "vel": vel}, actions=acts, states=rng.normal(size=(length, 4))))
    return demos


def tiny_policy_cfg(net="mlp", process="diffusion", sampler="ddim", To=2, Tp=8, Ta=4, steps=5):
    return PolicyConfig(obs_keys=["pos", "vel"], obs_dims={"pos": 2, "vel": 3}, action_dim=3, To=To, Tp=Tp, Ta=Ta,
                        net=NetConfig(type=net, hidden=32, depth=1, down_dims=[16, 32], time_dim=16),
                        process=ProcessConfig(type=process, sampler=sampler, eta=1.0 if sampler == "ddpm" else 0.0,
                                              train_steps=20, steps=steps))


def tiny_policy(net="mlp", process="diffusion", sampler="ddim", demos=None, seed=0, **kw):
    from dpolicy.policy import ChunkPolicy

    torch.manual_seed(seed)
    cfg = tiny_policy_cfg(net, process, sampler, **kw)
    data = WindowDataset(demos or make_demos(), cfg.obs_keys, cfg.To, cfg.Tp)
    return ChunkPolicy(cfg, data.fit_normalizer())


def random_obs(batch=4, To=2, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return {"pos": torch.randn(batch, To, 2, generator=g).to(device), "vel": torch.randn(batch, To, 3, generator=g).to(device)}


@pytest.fixture
def demos():
    return make_demos()


# a toy camera task: the action is where a bright pixel sits in a 16 x 16 image, plus a position vector
H, W = 16, 16


def image_demos(n=4, length=20, seed=0):
    """A toy task: the action is where a bright pixel sits in the image, plus a position vector."""
    rng = np.random.default_rng(seed)
    demos = []
    for _ in range(n):
        img = rng.integers(0, 40, (length, H, W, 3), dtype=np.uint8)
        rows, cols = rng.integers(0, H, length), rng.integers(0, W, length)
        img[np.arange(length), rows, cols] = 255
        pos = rng.normal(size=(length, 2)).astype(np.float32)
        actions = np.stack([rows / H, cols / W], 1).astype(np.float32)
        demos.append(Demo(obs={"pos": pos, "cam": img}, actions=actions))
    return demos


def image_policy(process="diffusion", To=2, share=False, seed=0):
    from dpolicy.train.bc import build_policy

    torch.manual_seed(seed)
    data = WindowDataset(image_demos(), ["pos", "cam"], To=To, Tp=4, seed=seed)
    cfg = PolicyConfig(To=To, Tp=4, Ta=2, net=NetConfig(type="mlp", hidden=32, depth=1),
                       process=ProcessConfig(type=process, steps=3, sampler="euler" if process == "flow" else "ddim"),
                       vision=VisionConfig(crop=12, keypoints=4, channels=[8], share=share))
    return build_policy(cfg, data), data
