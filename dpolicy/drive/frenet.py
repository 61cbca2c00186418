"""Plans in the route's frame: station along the route lane's centreline and lateral offset from it.

A token planner that writes its waypoints in the ego frame has to learn the road's curvature to follow a lane,
and a plan halfway between two it has seen (two lanes, two speeds) can leave the road. In the route frame the
same plans are simple: holding the route lane is a constant lateral offset, a lane change is a ramp in it,
and a speed profile is a station sequence; a blend of two lane-following plans still follows the lanes.

The frame is read from the vectorized observation alone (``observe_vector``): the route lane's polyline, its
points 5 m apart at known stations along the road (-10 m to 95 m), each with the lane's direction there.
Between points the position and direction are interpolated linearly (as the scene's own road is), beyond the
ends the end directions are followed. ``from_route`` is exact; ``to_route`` inverts it by Newton steps on the
station, so a plan round-trips to within hundredths of a millimetre on the scenes' gentle curves. Coordinates
are taken relative to the ego's own projection (the origin of the ego frame), so a plan starts at (0, 0) in both
frames. The stations are those ``observe_vector`` lays its map points at (uniform, 5 m apart); an observation
built another way would be misread.
"""

from __future__ import annotations

import torch

from dpolicy.errors import ConfigError, ShapeError
from dpolicy_envs.driving.vector import MAP_TYPES, POINTS, POS_SCALE, SEGMENTS, SPACING

FRAMES = ("ego", "route")  # the frames a planner can write its plans in
ROUTE_COLUMN = 4 + MAP_TYPES.index("route")  # the route lane's one-hot column among a map point's features
NEWTON_STEPS = 6


def route_polyline(obs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The route lane in metres: points (B, P, 2), unit directions (B, P, 2) and their stations (P,)."""
    if "map" not in obs or "map_valid" not in obs:
        raise ShapeError("the route frame reads the vectorized observation (keys map, map_valid); "
                         f"this one has {sorted(obs)}.")
    m = obs["map"]
    B, M = m.shape[:2]
    S = len(SEGMENTS)
    is_route = m[:, :, 0, ROUTE_COLUMN] > 0.5                                   # (B, M)
    if not (is_route.sum(1) == S).all():
        raise ShapeError(f"every scene's map must hold the route lane in {S} polylines; counts "
                         f"{sorted(set(is_route.sum(1).tolist()))}.")
    # the route's segments in map order (the lowest row first): key = flag * M - row index
    key = is_route.float() * M - torch.arange(M, device=m.device)
    rows = key.topk(S, 1).indices                                               # (B, S), ascending rows
    seg = m.gather(1, rows[:, :, None, None].expand(B, S, POINTS, m.shape[-1]))  # (B, S, P, F)
    st = torch.tensor(SEGMENTS, device=m.device)[:, None] + SPACING * torch.arange(POINTS, device=m.device)
    keep = torch.ones(S, POINTS, dtype=torch.bool, device=m.device)
    keep[1:, 0] = st[1:, 0] > st[:-1, -1]         # a segment's first point repeats the last one of the segment before
    seg, st = seg[:, keep], st[keep]
    pts = seg[..., :2] * POS_SCALE
    tan = torch.nn.functional.normalize(seg[..., 2:4], dim=-1)
    return pts, tan, st


def _at(frame, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centreline point and unit direction at stations ``sigma`` (B, K): (B, K, 2) each."""
    pts, tan, st = frame
    P = st.shape[0]
    u = ((sigma - st[0]) / (st[1] - st[0])).clamp(0, P - 1.001)
    i0 = u.floor().long()
    w = (u - i0)[..., None]
    g = lambda z, i: z.gather(1, i[..., None].expand(-1, -1, 2))  # noqa: E731
    base = g(pts, i0) * (1 - w) + g(pts, i0 + 1) * w
    t = torch.nn.functional.normalize(g(tan, i0) * (1 - w) + g(tan, i0 + 1) * w, dim=-1)
    extra = (sigma - st[-1]).clamp(min=0) - (st[0] - sigma).clamp(min=0)      # beyond the ends: along the end direction
    return base + t * extra[..., None], t


def from_route(frame, sd: torch.Tensor) -> torch.Tensor:
    """(station, lateral offset) (B, K, 2) -> ego-frame points (B, K, 2); left of the lane is positive."""
    c, t = _at(frame, sd[..., 0])
    n = torch.stack([-t[..., 1], t[..., 0]], -1)
    return c + sd[..., 1:2] * n


def to_route(frame, xy: torch.Tensor) -> torch.Tensor:
    """Ego-frame points (B, K, 2) -> (station, lateral offset) (B, K, 2), the inverse of ``from_route``."""
    pts, _, st = frame
    # a start on the nearest chord, then Newton steps on the station (the offset along the direction vanishes)
    a, b = pts[:, None, :-1], pts[:, None, 1:]
    ab = b - a
    q = xy[:, :, None]
    f = (((q - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp(min=1e-9)).clamp(0, 1)
    j = (q - a - f[..., None] * ab).norm(dim=-1).argmin(-1)                    # (B, K)
    sigma = st[j] + f.gather(2, j[..., None])[..., 0] * (st[1] - st[0])
    for _ in range(NEWTON_STEPS):
        c, t = _at(frame, sigma)
        sigma = sigma + ((xy - c) * t).sum(-1)
    c, t = _at(frame, sigma)
    n = torch.stack([-t[..., 1], t[..., 0]], -1)
    return torch.stack([sigma, ((xy - c) * n).sum(-1)], -1)


def ego_relative(frame, xy: torch.Tensor) -> torch.Tensor:
    """Ego-frame plans (B, K, 2) -> route-frame coordinates relative to the ego's own (the ego frame's origin)."""
    origin = to_route(frame, torch.zeros_like(xy[:, :1]))
    return to_route(frame, xy) - origin


def from_ego_relative(frame, rel: torch.Tensor) -> torch.Tensor:
    """The inverse of ``ego_relative``."""
    origin = to_route(frame, torch.zeros_like(rel[:, :1]))
    return from_route(frame, rel + origin)


def check_frame(frame: str, who: str) -> str:
    """``frame`` if it is one of ``FRAMES``, else a ConfigError naming ``who`` (the setting or class that holds it)."""
    if frame not in FRAMES:
        raise ConfigError(f"{who} frame {frame!r} is unknown; choose {' or '.join(FRAMES)}.")
    return frame


def _route_of(obs: dict | None, batch: int):
    """The route frame of ``obs``, checked to hold one scene per plan of a ``batch``."""
    if obs is None:
        raise ConfigError("a route-frame planner needs the scenes' observation (obs) to encode or decode plans.")
    frame = route_polyline(obs)
    if frame[0].shape[0] != batch:
        raise ShapeError(f"{batch} plans but an observation of {frame[0].shape[0]} scenes.")
    return frame


def to_frame(frame: str, obs: dict | None, traj: torch.Tensor) -> torch.Tensor:
    """Ego-frame plans (B, K, 2) written in a planner's ``frame``: as they are (ego), or ``ego_relative`` (route)."""
    return traj if frame == "ego" else ego_relative(_route_of(obs, traj.shape[0]), traj)


def from_frame(frame: str, obs: dict | None, x: torch.Tensor) -> torch.Tensor:
    """The inverse of ``to_frame``."""
    return x if frame == "ego" else from_ego_relative(_route_of(obs, x.shape[0]), x)
