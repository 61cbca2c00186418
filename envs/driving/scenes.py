"""Procedural driving scenes held as batched tensors: roads, drivable area, lanes, logged agents.

Every scene is built from one integer seed in the ego frame at t = 0 (ego at the origin heading +x).
A scene has a reference road (a polyline with curves), ``n_lanes`` lanes of 3.5 m to the left of
the right edge, optionally a merge lane that ends (its taper shrinks the drivable area) and
optionally a crossing road (an intersection band with crossing traffic). Other vehicles follow
their lanes with an IDM car-following model, some change lane on a smooth profile, and their
futures are logged at 10 Hz for 4 s; the scorer replays them non-reactively.

Drivable area is stored in the road's Frenet frame (lateral bounds per station) plus the crossing
band; ``boundary_polygon`` turns it into a polygon for drawing and export.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

DT = 0.1            # simulation step (s)
HORIZON = 40        # simulation steps (4 s)
LANE_W = 3.5
STATION_STEP = 2.0  # m between road polyline vertices
N_STATIONS = 96     # road from -20 m to 170 m
S0 = -20.0
MAX_AGENTS = 8
AGENT_LEN, AGENT_WID = 4.6, 1.9
EGO_LEN, EGO_WID = 4.6, 1.9
SPLITS = {"train": 0, "val": 1_000_000, "test": 2_000_000}


@dataclass
class Scenes:
    """A batch of B scenes; every field is a tensor whose first axis is B."""

    road: torch.Tensor        # (B, P, 3) reference polyline x, y, heading
    left: torch.Tensor        # (B, P) left drivable bound (m, lateral offset from reference)
    right: torch.Tensor       # (B, P) right drivable bound (negative)
    lane_offsets: torch.Tensor  # (B, NL) lateral offset of each lane centre (NaN where absent)
    lane_end: torch.Tensor    # (B, NL) station where a lane ends (inf if it does not)
    route_lane: torch.Tensor  # (B,) index of the lane the route follows
    cross: torch.Tensor       # (B, 4) crossing road: station, half width, enabled flag, angle
    ego_v: torch.Tensor       # (B,) ego speed at t = 0 (m/s)
    ego_d: torch.Tensor       # (B,) ego lateral offset at t = 0
    speed_limit: torch.Tensor  # (B,)
    agents: torch.Tensor      # (B, A, T+1, 3) logged agent poses x, y, heading at 10 Hz
    agent_v: torch.Tensor     # (B, A, T+1) logged agent speeds
    agent_valid: torch.Tensor  # (B, A) bool
    agent_size: torch.Tensor  # (B, A, 2) length, width
    seeds: torch.Tensor       # (B,)

    @property
    def batch(self) -> int:
        return self.road.shape[0]

    @property
    def device(self) -> torch.device:
        return self.road.device

    def to(self, device) -> "Scenes":
        return Scenes(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def index(self, idx) -> "Scenes":
        return Scenes(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


def split_seeds(split: str, n: int, start: int = 0) -> list[int]:
    """Seeds of the ``split`` (train / val / test); the splits never overlap."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}.")
    if n < 0 or start < 0 or start + n > 1_000_000:
        raise ValueError(f"split range start={start}, n={n} must lie in [0, 1000000).")
    return [SPLITS[split] + start + i for i in range(n)]


def _road(rng, limit: float) -> np.ndarray:
    """Reference polyline: straight, then up to two constant-curvature arcs."""
    s = S0 + STATION_STEP * np.arange(N_STATIONS)
    kappa = np.zeros(N_STATIONS)
    for _ in range(rng.integers(0, 3)):
        a, length = rng.uniform(0, 120), rng.uniform(30, 80)
        k = rng.choice([-1, 1]) * rng.uniform(0.2, 0.7) * 3.0 / limit**2  # lateral accel under 2.1 m/s^2
        kappa[(s > a) & (s < a + length)] += k
    h = np.concatenate([[0.0], np.cumsum(kappa[:-1] * STATION_STEP)])
    h -= h[np.searchsorted(s, 0.0)]
    x = np.concatenate([[0.0], np.cumsum(np.cos(h[:-1]) * STATION_STEP)])
    y = np.concatenate([[0.0], np.cumsum(np.sin(h[:-1]) * STATION_STEP)])
    return np.stack([x, y, h], -1)


def frenet_to_xy(road: np.ndarray, s: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Points at station ``s`` and lateral offset ``d`` (left positive) of a (P, 3) road, numpy."""
    st = S0 + STATION_STEP * np.arange(len(road))
    x, y = np.interp(s, st, road[:, 0]), np.interp(s, st, road[:, 1])
    h = np.interp(s, st, np.unwrap(road[:, 2]))
    return np.stack([x - np.sin(h) * d, y + np.cos(h) * d, h], -1)


def _idm(v, gap, dv, v0, a_max=1.5, b=2.0, s0=2.0, T=1.4):
    s_star = s0 + np.maximum(v * T + v * dv / (2 * math.sqrt(a_max * b)), 0)
    return a_max * (1 - (v / max(v0, 0.1)) ** 4 - (s_star / np.maximum(gap, 0.1)) ** 2)


def _one_scene(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    limit = float(rng.choice([13.9, 16.7, 22.2]))
    road = _road(rng, limit)
    st = S0 + STATION_STEP * np.arange(N_STATIONS)
    n_lanes = int(rng.integers(2, 4))
    kind = rng.choice(["plain", "merge", "intersection"], p=[0.4, 0.3, 0.3])
    NL = 4
    offsets = np.full(NL, np.nan)
    offsets[:n_lanes] = LANE_W * (np.arange(n_lanes) + 0.5)
    lane_end = np.full(NL, np.inf)
    right = np.zeros(N_STATIONS)
    left = np.full(N_STATIONS, n_lanes * LANE_W)
    ego_lane = int(rng.integers(0, n_lanes))
    route_lane = ego_lane
    if kind == "merge":  # an extra lane on the right that tapers out between s_end and s_end + 30
        s_end = rng.uniform(25, 55)
        offsets[n_lanes] = -LANE_W * 0.5
        lane_end[n_lanes] = s_end
        taper = np.clip((st - s_end) / 30.0, 0, 1)
        right = -LANE_W * (1 - taper)
        if rng.random() < 0.7:
            ego_lane, route_lane = n_lanes, 0
    cross = np.zeros(4)
    if kind == "intersection":
        cross = np.array([rng.uniform(35, 70), rng.uniform(5, 8), 1.0, rng.uniform(-0.3, 0.3)])
    ego_v = float(rng.uniform(0.5, 1.0) * limit)
    ego_d = float(offsets[ego_lane]) + float(rng.normal(0, 0.15))
    road[:, :2] -= frenet_to_xy(road, np.array([0.0]), np.array([ego_d]))[0, :2]  # ego at the origin

    # agents on lanes, IDM car following along their lane, with optional lane changes
    T = HORIZON
    agents = np.zeros((MAX_AGENTS, T + 1, 3))
    agent_v = np.zeros((MAX_AGENTS, T + 1))
    valid = np.zeros(MAX_AGENTS, bool)
    n_agents = int(rng.integers(2, MAX_AGENTS - 1))
    lanes_all = [i for i in range(NL) if not np.isnan(offsets[i])]
    s_agents, lane_of, v_agents, vdes = [], [], [], []
    for _ in range(n_agents):
        for _try in range(20):
            lane = int(rng.choice(lanes_all))
            s = rng.uniform(-15, 110)
            if lane_end[lane] < np.inf and s > lane_end[lane] - 5:
                continue
            if lane == ego_lane and -12 < s < 14:  # leave the ego room
                continue
            if all(not (lo == lane and abs(s - so) < 12) for so, lo in zip(s_agents, lane_of)):
                break
        else:
            continue
        s_agents.append(s); lane_of.append(lane)
        vd = limit * rng.uniform(0.4, 1.05)
        if lane == ego_lane and s > 0 and rng.random() < 0.3:
            vd = limit * rng.uniform(0.0, 0.4)  # a slow leader the ego must handle
        vdes.append(vd)
        v_agents.append(vd * rng.uniform(0.8, 1.0))
    na = len(s_agents)
    s_a, v_a = np.array(s_agents, float), np.array(v_agents, float)
    d_from = np.array([offsets[l] for l in lane_of]) if na else np.zeros(0)
    d_to = d_from.copy()
    lc_start = np.full(na, np.inf)
    for i in range(na):
        lane = lane_of[i]
        cands = [l for l in lanes_all if abs(l - lane) == 1 and lane_end[l] == np.inf]
        if lane_end[lane] < np.inf and cands:
            d_to[i] = offsets[cands[0]]; lc_start[i] = rng.uniform(0, 2.0)
        elif cands and rng.random() < 0.2:
            d_to[i] = offsets[int(rng.choice(cands))]; lc_start[i] = rng.uniform(0, 2.0)
    vdes_a = np.array(vdes, float)
    for t in range(T + 1):
        frac = np.clip((t * DT - lc_start) / 3.0, 0, 1)
        d = d_from + (d_to - d_from) * (1 - np.cos(np.pi * frac)) / 2
        xyh = frenet_to_xy(road, s_a, d)
        dd = (d_to - d_from) * np.pi / 6.0 * np.sin(np.pi * frac) * ((frac > 0) & (frac < 1))
        xyh[:, 2] += np.arctan2(dd, np.maximum(v_a, 0.5))
        agents[:na, t] = xyh
        agent_v[:na, t] = v_a
        # IDM leader: nearest agent ahead within 2 m laterally
        acc = np.zeros(na)
        for i in range(na):
            ahead = (s_a > s_a[i]) & (np.abs(d - d[i]) < 2.0)
            if ahead.any():
                j = np.where(ahead)[0][np.argmin(s_a[ahead])]
                acc[i] = _idm(v_a[i], s_a[j] - s_a[i] - AGENT_LEN, v_a[i] - v_a[j], vdes_a[i])
            else:
                acc[i] = _idm(v_a[i], 1e3, 0.0, vdes_a[i])
        acc = np.clip(acc, -4.0, 2.0)
        s_a = s_a + np.maximum(v_a * DT + 0.5 * acc * DT * DT, 0)
        v_a = np.maximum(v_a + acc * DT, 0)
    valid[:na] = True
    # crossing traffic: vehicles on the crossing road, crossing before or after the ego arrives
    if kind == "intersection":
        n_cross = int(rng.integers(1, 3))
        p = frenet_to_xy(road, np.array([cross[0]]), np.array([n_lanes * LANE_W / 2]))[0]
        ang = p[2] + np.pi / 2 + cross[3]
        for k in range(n_cross):
            if na + k >= MAX_AGENTS:
                break
            direction = rng.choice([-1, 1])
            v = rng.uniform(6, 12)
            t_cross = rng.uniform(-1.0, 6.0)  # time at which it passes the centre
            tt = np.arange(T + 1) * DT
            r = direction * v * (tt - t_cross)
            h = ang + (0 if direction > 0 else np.pi)
            agents[na + k, :, 0] = p[0] + np.cos(ang) * r
            agents[na + k, :, 1] = p[1] + np.sin(ang) * r
            agents[na + k, :, 2] = h
            agent_v[na + k] = v
            valid[na + k] = True
    size = np.tile([AGENT_LEN, AGENT_WID], (MAX_AGENTS, 1))
    return dict(road=road, left=left, right=right, lane_offsets=offsets, lane_end=lane_end,
                route_lane=route_lane, cross=cross, ego_v=ego_v, ego_d=ego_d, speed_limit=limit,
                agents=agents, agent_v=agent_v, agent_valid=valid, agent_size=size, seeds=seed)


def generate_scenes(seeds, device="cpu") -> Scenes:
    """Scenes for the given integer seeds, as float32 tensors on ``device``."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("generate_scenes needs at least one seed.")
    parts = [_one_scene(s) for s in seeds]
    out = {}
    for k in parts[0]:
        a = np.stack([np.asarray(p[k]) for p in parts])
        dtype = torch.bool if a.dtype == bool else (torch.long if k in ("route_lane", "seeds") else torch.float32)
        out[k] = torch.as_tensor(a, dtype=dtype, device=device)
    return Scenes(**out)


def boundary_polygon(scenes: Scenes, i: int) -> np.ndarray:
    """Drivable-area polygon of scene ``i`` along the road (left edge then right edge reversed)."""
    road = scenes.road[i].cpu().numpy()
    st = S0 + STATION_STEP * np.arange(len(road))
    l = frenet_to_xy(road, st, scenes.left[i].cpu().numpy())[:, :2]
    r = frenet_to_xy(road, st, scenes.right[i].cpu().numpy())[:, :2]
    return np.concatenate([l, r[::-1]])


def road_points(road: torch.Tensor, s: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Batched Frenet -> (x, y, heading): road (B, P, 3), s and d (B, ...) -> (B, ..., 3)."""
    B, P, _ = road.shape
    shape = s.shape
    s, d = s.reshape(B, -1), d.reshape(B, -1)
    u = ((s - S0) / STATION_STEP).clamp(0, P - 1.001)
    i0 = u.floor().long()
    w = (u - i0)[..., None]
    heading = torch.atan2(torch.sin(road[..., 2]), torch.cos(road[..., 2]))
    vec = torch.stack([road[..., 0], road[..., 1], torch.cos(heading), torch.sin(heading)], -1)
    g = lambda idx: vec.gather(1, idx[..., None].expand(-1, -1, 4))  # noqa: E731
    a, b = g(i0), g(i0 + 1)
    v = a * (1 - w) + b * w
    extra = (s - (S0 + STATION_STEP * (P - 1))).clamp(min=0)[..., None] - (S0 - s).clamp(min=0)[..., None]
    h = torch.atan2(v[..., 3], v[..., 2])
    x = v[..., 0] + torch.cos(h) * extra[..., 0] - torch.sin(h) * d
    y = v[..., 1] + torch.sin(h) * extra[..., 0] + torch.cos(h) * d
    return torch.stack([x, y, h], -1).reshape(*shape, 3)
