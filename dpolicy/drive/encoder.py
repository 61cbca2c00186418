"""Observation encoder shared by the driving planners: the scene as a few context tokens.

ego + route + drivable edges -> one token; every agent -> one token. Shapes follow
``envs.driving.observe``: ego (B, 4), route (B, 16, 2), bounds (B, 16, 4), agents (B, A, 7).
"""

from __future__ import annotations

import torch
from torch import nn

from dpolicy.errors import ShapeError

OBS_SHAPES = {"ego": (4,), "route": (16, 2), "bounds": (16, 4), "agents": (None, 7)}


def check_obs(obs: dict) -> None:
    missing = set(OBS_SHAPES) - set(obs)
    if missing:
        raise ShapeError(f"observation is missing key(s) {sorted(missing)}.")
    B = obs["ego"].shape[0]
    for k, shp in OBS_SHAPES.items():
        v = obs[k]
        if v.dim() != len(shp) + 1 or v.shape[0] != B or any(s is not None and s != d for s, d in zip(shp, v.shape[1:])):
            raise ShapeError(f"observation {k!r} must have shape (B, {', '.join('*' if s is None else str(s) for s in shp)}), got {tuple(v.shape)}.")
        if not torch.isfinite(v).all():
            raise ShapeError(f"observation {k!r} contains NaN or infinite values.")


class SceneEncoder(nn.Module):
    def __init__(self, d: int = 64):
        super().__init__()
        self.scene = nn.Sequential(nn.Linear(4 + 32 + 64, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.agent = nn.Sequential(nn.Linear(7, d), nn.GELU(), nn.Linear(d, d))
        self.kind = nn.Parameter(torch.zeros(2, d))

    def forward(self, obs: dict) -> torch.Tensor:
        """obs -> context tokens (B, 1 + A, d)."""
        check_obs(obs)
        B = obs["ego"].shape[0]
        s = torch.cat([obs["ego"], obs["route"].reshape(B, -1), obs["bounds"].reshape(B, -1)], -1)
        return torch.cat([self.scene(s)[:, None] + self.kind[0], self.agent(obs["agents"]) + self.kind[1]], 1)

    def pooled(self, obs: dict) -> torch.Tensor:
        """A single context vector (B, 2d): the scene token and the mean of the agent tokens."""
        c = self.forward(obs)
        return torch.cat([c[:, 0], c[:, 1:].mean(1)], -1)
