"""Sinusoidal embedding of the (continuous) denoising time, shared by every denoiser."""

import math

import torch
from torch import nn


class SinusoidalTimeEmbedding(nn.Module):
    """(B,) float times -> (B, dim) features. Times are on a ~[0, 100] scale (processes rescale)."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"time embedding dim must be even, got {dim}.")
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * self.freqs[None]
        return torch.cat([args.sin(), args.cos()], dim=-1)


def time_mlp(dim: int, out: int) -> nn.Sequential:
    """Embedding followed by the 2-layer Mish MLP used by Diffusion Policy and DPPO."""
    return nn.Sequential(SinusoidalTimeEmbedding(dim), nn.Linear(dim, dim * 4), nn.Mish(), nn.Linear(dim * 4, out))
