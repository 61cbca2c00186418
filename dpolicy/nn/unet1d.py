"""1-D conditional U-Net over the chunk's time axis (the Diffusion Policy CNN design).

Residual blocks of Conv1d -> GroupNorm -> Mish, conditioned by FiLM (a per-channel scale and
bias computed from the time embedding concatenated with the observation features). ``film`` picks
the modulation: "residual" ``h * (1 + scale) + bias`` (the default), "plain" ``h * scale + bias``
(Diffusion Policy's and LeRobot's form) or "bias" (``h + bias``, no scale modulation). Two
residual blocks per level, strided-conv downsampling, transposed-conv upsampling with skip
connections. Chunk lengths that do not divide by 2**levels are padded and cropped, so any Tp works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dpolicy.nn.embeddings import time_mlp


def _groups(channels: int, n_groups: int) -> int:
    # GroupNorm needs channels % groups == 0; fall back to the largest divisor not above n_groups.
    g = min(n_groups, channels)
    while channels % g:
        g -= 1
    return g


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, n_groups: int):
        super().__init__(nn.Conv1d(cin, cout, kernel, padding=kernel // 2), nn.GroupNorm(_groups(cout, n_groups), cout), nn.Mish())


FILM_MODES = ("residual", "plain", "bias")


class FiLMResBlock(nn.Module):
    """Two conv blocks; FiLM (scale, bias) from ``cond`` modulates the first block's output."""

    def __init__(self, cin: int, cout: int, cond_dim: int, kernel: int, n_groups: int, film: str = "residual"):
        super().__init__()
        if film not in FILM_MODES:
            raise ValueError(f"film={film!r} is not one of {FILM_MODES}.")
        self.film_mode = film
        self.block1 = ConvBlock(cin, cout, kernel, n_groups)
        self.block2 = ConvBlock(cout, cout, kernel, n_groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, cout if film == "bias" else 2 * cout))
        self.skip = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        f = self.film(cond)[..., None]
        if self.film_mode == "bias":
            h = self.block1(x) + f
        else:
            scale, bias = f.chunk(2, dim=1)
            h = self.block1(x) * (scale if self.film_mode == "plain" else 1 + scale) + bias
        return self.block2(h) + self.skip(x)


class ConditionalUnet1D(nn.Module):
    """``(x (B,Tp,Da), t (B,), cond (B,Dc)) -> (B,Tp,Da)``."""

    def __init__(self, action_dim: int, cond_dim: int, down_dims=(64, 128, 256), kernel_size: int = 5,
                 n_groups: int = 8, time_dim: int = 64, film: str = "residual"):
        super().__init__()
        self.time = time_mlp(time_dim, time_dim)
        c = time_dim + cond_dim
        block = lambda a, b: FiLMResBlock(a, b, c, kernel_size, n_groups, film)  # noqa: E731
        dims = [action_dim, *down_dims]
        self.levels = len(down_dims) - 1
        self.down = nn.ModuleList()
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(down_dims) - 1
            self.down.append(nn.ModuleList([
                block(a, b), block(b, b),
                nn.Identity() if last else nn.Conv1d(b, b, 3, stride=2, padding=1)]))
        mid = down_dims[-1]
        self.mid = nn.ModuleList([block(mid, mid) for _ in range(2)])
        self.up = nn.ModuleList()
        for a, b in reversed(list(zip(down_dims[:-1], down_dims[1:]))):
            self.up.append(nn.ModuleList([
                block(2 * b, a), block(a, a),
                nn.ConvTranspose1d(a, a, 4, stride=2, padding=1)]))
        self.final = nn.Sequential(ConvBlock(down_dims[0], down_dims[0], kernel_size, n_groups),
                                   nn.Conv1d(down_dims[0], action_dim, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        tp = x.shape[1]
        mult = 2 ** self.levels
        pad = (-tp) % mult
        h = rearrange(x, "b t a -> b a t")
        if pad:
            h = F.pad(h, (0, pad), mode="replicate")
        c = torch.cat([self.time(t), cond], dim=-1)
        skips = []
        for res1, res2, down in self.down:
            h = res2(res1(h, c), c)
            skips.append(h)
            h = down(h)
        for res in self.mid:
            h = res(h, c)
        skips.pop(0)  # the full-resolution skip is unused: each up level joins the skip of its own input scale
        for res1, res2, up in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            h = up(res2(res1(h, c), c))
        out = self.final(h)[..., :tp]
        return rearrange(out, "b a t -> b t a")
