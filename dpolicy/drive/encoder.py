"""Observation encoders shared by the driving planners: the scene as context tokens.

``flat``    (``SceneEncoder``): ego + route + drivable edges flattened into one MLP token, every agent one
            token; observations from ``envs.driving.observe``: ego (B, 4), route (B, 16, 2), bounds
            (B, 16, 4), agents (B, A, 7).
``vector``, ``vector_mlp`` (``VectorEncoder``, VectorNet / PlanTF style): every map polyline (lane centrelines, the route
            lane, drivable edges, the crossing road) through a small PointNet (point MLP + max; ``vector``) or
            an MLP over its ordered points (``vector_mlp``), every track (the ego and each
            agent with 1 s of history) through an MLP, then a transformer over all tokens; observations
            from ``envs.driving.observe_vector``. The ego enters only as a track of past poses, with no
            ego-status vector, and ``ego_dropout`` can hide even that history in training (PlanTF's state
            dropout), so the planner cannot lean on the ego state alone.

Both return ``tokens(obs) -> (B, N, d) tokens, (B, N) validity``; ``ENCODERS`` builds them by name.
"""

from __future__ import annotations

import torch
from torch import nn

from dpolicy.errors import ConfigError, ShapeError
from dpolicy_envs.driving.vector import F_AGENT, F_MAP, HISTORY, N_MAP, POINTS

OBS_SHAPES = {"ego": (4,), "route": (16, 2), "bounds": (16, 4), "agents": (None, 7)}


VECTOR_SHAPES = {"map": (N_MAP, POINTS, F_MAP), "map_valid": (N_MAP, POINTS), "tracks": (None, HISTORY, F_AGENT),
                 "tracks_valid": (None,)}


def check_obs(obs: dict, shapes: dict = OBS_SHAPES) -> None:
    missing = set(shapes) - set(obs)
    if missing:
        raise ShapeError(f"observation is missing key(s) {sorted(missing)}.")
    B = obs[next(iter(shapes))].shape[0]
    for k, shp in shapes.items():
        v = obs[k]
        if v.dim() != len(shp) + 1 or v.shape[0] != B or any(s is not None and s != d for s, d in zip(shp, v.shape[1:])):
            raise ShapeError(f"observation {k!r} must have shape (B, {', '.join('*' if s is None else str(s) for s in shp)}), got {tuple(v.shape)}.")
        if v.is_floating_point() and not torch.isfinite(v).all():
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

    def tokens(self, obs: dict, gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.forward(obs)
        return c, torch.ones(c.shape[:2], dtype=torch.bool, device=c.device)

    def pooled(self, obs: dict) -> torch.Tensor:
        """A single context vector (B, 2d): the scene token and the mean of the agent tokens."""
        c = self.forward(obs)
        return torch.cat([c[:, 0], c[:, 1:].mean(1)], -1)


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.LayerNorm(h), nn.GELU(), nn.Linear(h, o))


def _masked_max(h: torch.Tensor, valid: torch.Tensor, dim: int) -> torch.Tensor:
    """Max over ``dim`` of the valid entries; 0 where none is valid."""
    out = h.masked_fill(~valid[..., None], float("-inf")).amax(dim)
    return torch.where(torch.isfinite(out), out, torch.zeros_like(out))


class VectorEncoder(nn.Module):
    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4, ego_dropout: float = 0.0, polyline: str = "pointnet"):
        super().__init__()
        if not 0 <= ego_dropout < 1:
            raise ConfigError(f"ego_dropout={ego_dropout} must lie in [0, 1).")
        if polyline not in ("pointnet", "mlp"):
            raise ConfigError(f"polyline encoder {polyline!r} is unknown; choose pointnet or mlp.")
        self.polyline = polyline
        # pointnet: a shared point MLP, max over the valid points (order-free); mlp: one MLP over the polyline's
        # ordered points and their validity flags (keeps the exact geometry a linear map can read off)
        self.point = _mlp(F_MAP, d, d) if polyline == "pointnet" else _mlp(POINTS * (F_MAP + 1), 2 * d, d)
        self.track = _mlp(HISTORY * F_AGENT, 2 * d, d)
        self.kind = nn.Parameter(torch.zeros(3, d))  # map polyline, agent track, ego track
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.ego_dropout = ego_dropout

    def tokens(self, obs: dict, gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """obs (``observe_vector``) -> tokens (B, N_MAP + 1 + A, d), validity (B, N)."""
        check_obs(obs, VECTOR_SHAPES)
        pts, pv = obs["map"], obs["map_valid"]
        if self.polyline == "pointnet":
            # one PointNet stage; VectorNet's second stage (the pooled feature fed back to every point) doubled
            # the encoder's cost on CPU
            map_tok = _masked_max(self.point(pts), pv, 2) + self.kind[0]
        else:
            m = pv[..., None].float()
            map_tok = self.point(torch.cat([pts * m, m], -1).flatten(2)) + self.kind[0]
        tr = obs["tracks"]
        if self.training and self.ego_dropout > 0:  # hide the ego's past: only its pose now (the origin) is left
            drop = torch.rand(tr.shape[0], device=tr.device, generator=gen) < self.ego_dropout
            keep = torch.ones_like(tr)
            keep[:, 0, :-1] = (~drop).float()[:, None, None]
            keep[:, 0, -1, 4] = (~drop).float()                                   # its speed now, too
            tr = tr * keep
        trk = self.track(tr.flatten(2))
        trk = trk + torch.where(torch.arange(trk.shape[1], device=trk.device)[:, None] == 0, self.kind[2], self.kind[1])
        x = torch.cat([map_tok, trk], 1)
        valid = torch.cat([pv.any(-1), obs["tracks_valid"]], 1)
        return self.norm(self.body(x, src_key_padding_mask=~valid)), valid


ENCODERS = ("flat", "vector", "vector_mlp")  # vector: PointNet per polyline; vector_mlp: an MLP per polyline


def make_encoder(kind: str, d: int, layers: int = 2, heads: int = 4, ego_dropout: float = 0.0) -> nn.Module:
    if kind == "flat":
        return SceneEncoder(d)
    if kind in ("vector", "vector_mlp"):
        return VectorEncoder(d, layers, heads, ego_dropout, "pointnet" if kind == "vector" else "mlp")
    raise ConfigError(f"encoder {kind!r} is unknown; choose from {', '.join(ENCODERS)}.")
