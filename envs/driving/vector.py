"""The vectorized planner observation: the scene as polylines in the ego frame (VectorNet / PlanTF style).

    map        (B, M, 8, F_MAP)  M = 19 polylines of 8 points 5 m apart: every lane centreline and the
                                 left / right drivable edges in three segments each (10 m behind the ego
                                 to 95 m ahead), and the crossing road's centreline (+-35 m)
    map_valid  (B, M, 8) bool    points that exist (absent lanes, lane points past the lane's end, a
                                 scene without a crossing road are invalid)
    tracks     (B, 1 + A, H, F_AGENT)  the ego first, then every agent slot, at t = -1.0, -0.8, ..., 0 s
    tracks_valid (B, 1 + A) bool

Map point features: x/50, y/50, cos and sin of the polyline's direction there, a one-hot type (lane,
route lane, left edge, right edge, crossing), the speed limit/20 and the crossing road's half width/10.
Agent features per step: x/50, y/50, cos h, sin h, speed/20, length/5, width/5, an ego flag.

The ego appears only as a track of past poses (its speed is read from how far it moved), exactly like
every other vehicle; no ego-status vector is given. The scenes start at t = 0, so the 1 s of history is
rebuilt with the generator's own motion model: constant speed along the road for vehicles that follow it
(the ego and lane traffic; a lane change always starts at t >= 0), a straight constant-velocity line for
crossing traffic. It therefore adds the lane geometry to the current state, not new information.
"""

from __future__ import annotations

import torch

from dpolicy_envs.driving.scenes import EGO_LEN, EGO_WID, Scenes, road_points
from dpolicy_envs.driving.scorer import _interp_station, crossing_axis, to_frenet

HISTORY = 6            # poses at t = -1.0 ... 0 s
HISTORY_DT = 0.2
SEGMENTS = (-10.0, 25.0, 60.0)  # first station of each map segment (m)
POINTS, SPACING = 8, 5.0
MAP_TYPES = ("lane", "route", "left", "right", "crossing")
F_MAP = 4 + len(MAP_TYPES) + 2
F_AGENT = 8
N_MAP = 4 * len(SEGMENTS) + 2 * len(SEGMENTS) + 1
POS_SCALE, SPEED_SCALE = 50.0, 20.0


def _map_rows(xyh: torch.Tensor, valid: torch.Tensor, kind: torch.Tensor, limit: torch.Tensor, width: torch.Tensor):
    """Point features (B, K, P, F_MAP) of polylines with poses xyh (B, K, P, 3); kind (B, K) type ids."""
    onehot = torch.nn.functional.one_hot(kind, len(MAP_TYPES)).float()[:, :, None].expand(*xyh.shape[:3], -1)
    B, K, P = xyh.shape[:3]
    f = torch.cat([xyh[..., :2] / POS_SCALE, torch.cos(xyh[..., 2:3]), torch.sin(xyh[..., 2:3]), onehot,
                   (limit / SPEED_SCALE)[:, None, None, None].expand(B, K, P, 1), width[..., None, None].expand(B, K, P, 1) / 10], -1)
    return f * valid[..., None], valid


def observe_vector(scenes: Scenes) -> dict:
    """The vectorized observation of ``scenes`` (see the module docstring), all float32 / bool on their device."""
    dev, B = scenes.device, scenes.batch
    st = (torch.tensor(SEGMENTS, device=dev)[:, None] + SPACING * torch.arange(POINTS, device=dev)).reshape(-1)  # (S*P,)
    S = len(SEGMENTS)
    stB = st.expand(B, -1)
    rows, valids, kinds, widths = [], [], [], []
    NL = scenes.lane_offsets.shape[1]
    for lane in range(NL):
        off = scenes.lane_offsets[:, lane]
        ok = ~torch.isnan(off)
        xyh = road_points(scenes.road, stB, torch.where(ok, off, torch.zeros_like(off))[:, None].expand_as(stB))
        v = ok[:, None] & (stB <= scenes.lane_end[:, lane:lane + 1])
        rows.append(xyh.reshape(B, S, POINTS, 3)); valids.append(v.reshape(B, S, POINTS))
        kinds.append((scenes.route_lane == lane).long()[:, None].expand(B, S))
    for j, edge in enumerate((scenes.left, scenes.right)):
        xyh = road_points(scenes.road, stB, _interp_station(edge, stB))
        rows.append(xyh.reshape(B, S, POINTS, 3)); valids.append(torch.ones(B, S, POINTS, dtype=torch.bool, device=dev))
        kinds.append(torch.full((B, S), 2 + j, dtype=torch.long, device=dev))
    centre, ang = crossing_axis(scenes)
    r = torch.linspace(-35.0, 35.0, POINTS, device=dev)
    cxy = centre[:, None, :2] + r[None, :, None] * torch.stack([torch.cos(ang), torch.sin(ang)], -1)[:, None]
    rows.append(torch.cat([cxy, ang[:, None, None].expand(B, POINTS, 1)], -1)[:, None])
    valids.append((scenes.cross[:, 2] > 0.5)[:, None, None].expand(B, 1, POINTS))
    kinds.append(torch.full((B, 1), 4, dtype=torch.long, device=dev))
    widths = torch.cat([torch.zeros(B, N_MAP - 1, device=dev), scenes.cross[:, 1:2]], 1)
    feats, valid = _map_rows(torch.cat(rows, 1), torch.cat(valids, 1), torch.cat(kinds, 1), scenes.speed_limit, widths)
    return {"map": feats, "map_valid": valid, **_agent_tracks(scenes)}


def move_agents(road: torch.Tensor, poses: torch.Tensor, v: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """Poses (B, A, T, 3) of agents at ``poses`` (B, A, 3) with speeds ``v`` (B, A) after ``dt`` (T,) seconds
    (negative: before) under the generator's motion model: at constant speed along the road (B, P, 3) where
    they follow it (heading within ~25 degrees of the road's), on a straight line where they cross it."""
    B, A = v.shape
    T = dt.shape[0]
    s, d = to_frenet(road, poses[..., :2])
    road_h = road_points(road, s, torch.zeros_like(s))[..., 2]
    follows = torch.cos(poses[..., 2] - road_h) > 0.9
    along = road_points(road, (s[..., None] + v[..., None] * dt).reshape(B, -1), d[..., None].expand(B, A, T).reshape(B, -1))
    along = along.reshape(B, A, T, 3)
    at0 = road_points(road, s, d)[:, :, None]
    along = along - at0 + poses[:, :, None]                                                  # exact at dt = 0
    step = v[..., None, None] * dt[:, None] * torch.stack([torch.cos(poses[..., 2]), torch.sin(poses[..., 2])], -1)[:, :, None]
    line = torch.cat([poses[:, :, None, :2] + step, poses[:, :, None, 2:].expand(B, A, T, 1)], -1)
    return torch.where(follows[..., None, None], along, line)


def _agent_tracks(scenes: Scenes) -> dict:
    dev, B = scenes.device, scenes.batch
    tau = HISTORY_DT * torch.arange(HISTORY - 1, -1, -1, device=dev, dtype=torch.float32)      # 1.0 ... 0 s ago
    # the ego: constant speed along the road at its lateral offset (it sits at the origin at t = 0)
    ego = road_points(scenes.road, -scenes.ego_v[:, None] * tau, scenes.ego_d[:, None].expand(B, HISTORY))
    ego_v = scenes.ego_v[:, None].expand(B, HISTORY)
    # agents: along the road where they follow it, a straight line where they cross it
    now = scenes.agents[:, :, 0]                                                               # (B, A, 3)
    v = scenes.agent_v[:, :, 0]
    A = now.shape[1]
    past = move_agents(scenes.road, now, v, -tau)
    poses = torch.cat([ego[:, None], past], 1)                                                # (B, 1+A, H, 3)
    speed = torch.cat([ego_v[:, None], v[..., None].expand(B, A, HISTORY)], 1)
    size = torch.cat([torch.tensor([[EGO_LEN, EGO_WID]], device=dev).expand(B, 1, 2), scenes.agent_size], 1)
    is_ego = torch.zeros(B, 1 + A, device=dev)
    is_ego[:, 0] = 1
    valid = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=dev), scenes.agent_valid], 1)
    f = torch.cat([poses[..., :2] / POS_SCALE, torch.cos(poses[..., 2:]), torch.sin(poses[..., 2:]), speed[..., None] / SPEED_SCALE,
                   (size / 5)[:, :, None].expand(B, 1 + A, HISTORY, 2), is_ego[..., None, None].expand(B, 1 + A, HISTORY, 1)], -1)
    return {"tracks": f * valid[..., None, None], "tracks_valid": valid}
