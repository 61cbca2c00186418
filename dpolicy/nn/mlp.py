"""Residual MLP denoiser over the flattened chunk (the DPPO / DSRL ``DiffusionMLP`` design).

Cheap and strong for short chunks of low-dimensional actions; the default CPU network.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from dpolicy.nn.embeddings import time_mlp


class ResidualBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.Mish(), nn.Linear(dim, dim))

    def forward(self, x):
        return x + self.net(x)


class ResidualMLP(nn.Module):
    """``(x (B,Tp,Da), t (B,), cond (B,Dc)) -> (B,Tp,Da)``."""

    def __init__(self, action_dim: int, horizon: int, cond_dim: int, hidden: int = 256, depth: int = 3, time_dim: int = 32):
        super().__init__()
        self.horizon, self.action_dim = horizon, action_dim
        self.time = time_mlp(time_dim, time_dim)
        self.inp = nn.Linear(horizon * action_dim + time_dim + cond_dim, hidden)
        self.blocks = nn.Sequential(*[ResidualBlock(hidden) for _ in range(depth)])
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Mish(), nn.Linear(hidden, horizon * action_dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = torch.cat([rearrange(x, "b t a -> b (t a)"), self.time(t), cond], dim=-1)
        h = self.out(self.blocks(self.inp(h)))
        return rearrange(h, "b (t a) -> b t a", t=self.horizon)
