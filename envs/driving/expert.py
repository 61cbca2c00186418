"""A PDM-Closed-style rule-based expert and the planner observation.

Candidates follow lane centrelines (every lane present, plus the route lane shifted by +-0.5 m)
with several target speeds on smooth speed profiles, plus one emergency stop (every waypoint at the ego's
current position, which the tracker turns into braking at its limit, as PDM-Closed's IDM brakes hard for a
leader that stops); all are scored with the PDMS-like scorer and the best is kept. The smooth profiles
alone brake at 3 m/s^2 at most, and in ~6% of scenes every one of them ends in an at-fault collision.
The best candidate progress (over candidates with NC*DAC = 1) is returned as the EP normaliser for any
other planner on the same scene, as NAVSIM does with PDM-Closed.

The expert scores its candidates against the agents' logged futures, which hold what no planner can
observe at t = 0 (a leader's IDM braking, a lane change that has not started). ``forecast`` replaces
those futures with a constant-speed forecast from the agents' current state (along the road for lane
traffic, a straight line for crossing traffic; the motion model of the planner observation's history),
so ``expert_plan(forecast(scenes))`` is the same rule-based planner without the log: PDM-Closed as it runs
in nuPlan and NAVSIM, on the information a learned planner has.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from dpolicy_envs.driving.scenes import DT, LANE_W, Scenes, road_points
from dpolicy_envs.driving.scorer import N_WAYPOINTS, WAYPOINT_DT, score
from dpolicy_envs.driving.vector import move_agents

SPEED_FRACTIONS = (0.0, 0.3, 0.6, 0.85, 1.0)
ROUTE_SHIFTS = (-0.5, 0.5)
N_ROUTE_PTS = 16


def candidates(scenes: Scenes) -> torch.Tensor:
    """Candidate trajectories (B, C, 8, 2) for the scenes: lanes x speed profiles, then the emergency stop."""
    dev = scenes.device
    B = scenes.batch
    offs = scenes.lane_offsets
    ego_lane_d = torch.where(torch.isnan(offs), scenes.ego_d[:, None], offs)      # absent lanes -> stay
    route_d = offs.gather(1, scenes.route_lane[:, None])
    targets = torch.cat([ego_lane_d, route_d + torch.tensor(ROUTE_SHIFTS, device=dev)], 1)  # (B, L)
    vt = scenes.speed_limit[:, None] * torch.tensor(SPEED_FRACTIONS, device=dev)            # (B, S)
    t = torch.arange(1, int(round(N_WAYPOINTS * WAYPOINT_DT / DT)) + 1, device=dev) * DT  # fine grid
    v0 = scenes.ego_v[:, None, None]
    dv = vt[..., None] - v0
    a_max = torch.where(dv > 0, torch.full_like(dv, 1.5), torch.full_like(dv, 3.0))
    tau = (math.pi * dv.abs() / (2 * a_max)).clamp(min=1.0)
    v = v0 + dv * (1 - torch.cos(math.pi * (t / tau).clamp(max=1))) / 2                 # (B, S, Tf)
    s = torch.cumsum(v * DT, -1)
    k = int(round(WAYPOINT_DT / DT))
    s = s[..., k - 1::k]                                                                     # (B, S, 8)
    tw = torch.arange(1, N_WAYPOINTS + 1, device=dev) * WAYPOINT_DT
    blend = (1 - torch.cos(math.pi * (tw / 4.0).clamp(max=1))) / 2                          # lane change over 4 s
    d = scenes.ego_d[:, None, None] + (targets[..., None] - scenes.ego_d[:, None, None]) * blend  # (B, L, 8)
    S, L = s.shape[1], d.shape[1]
    ss = s[:, None].expand(B, L, S, N_WAYPOINTS)
    dd = d[:, :, None].expand(B, L, S, N_WAYPOINTS)
    xy = road_points(scenes.road, ss, dd)[..., :2]
    stop = xy.new_zeros(B, 1, N_WAYPOINTS, 2)          # the ego frame's origin: brake to a standstill
    return torch.cat([xy.reshape(B, L * S, N_WAYPOINTS, 2), stop], 1)


def forecast(scenes: Scenes) -> Scenes:
    """``scenes`` with every agent's future replaced by the constant-speed forecast from its pose and speed at t = 0."""
    T = scenes.agents.shape[2] - 1
    dt = torch.arange(1, T + 1, device=scenes.device, dtype=scenes.agents.dtype) * DT
    future = move_agents(scenes.road, scenes.agents[:, :, 0], scenes.agent_v[:, :, 0], dt)
    return replace(scenes, agents=torch.cat([scenes.agents[:, :, :1], future], 2),
                   agent_v=scenes.agent_v[:, :, :1].expand_as(scenes.agent_v).contiguous())


def expert_plan(scenes: Scenes, chunk: int = 32) -> tuple[torch.Tensor, dict]:
    """Best candidate per scene: trajectories (B, 8, 2) and info (its sub-scores, best_progress)."""
    outs, infos = [], []
    for i in range(0, scenes.batch, chunk):
        sc = scenes.index(slice(i, i + chunk))
        cand = candidates(sc)
        r = score(sc, cand)
        # prefer higher PDMS-like, then progress, to break ties deterministically
        key = r["pdms"] * 1000 + r["progress"] * 1e-3
        j = key.argmax(1)
        pick = lambda z: z.gather(1, j[:, None])[:, 0]  # noqa: E731
        outs.append(cand[torch.arange(sc.batch, device=cand.device), j])
        info = {k: pick(v) for k, v in r.items()}
        info["best_progress"] = (r["progress"] * r["nc"] * r["dac"]).max(1).values
        infos.append(info)
    return torch.cat(outs), {k: torch.cat([d[k] for d in infos]) for k in infos[0]}


def observe(scenes: Scenes) -> dict:
    """Planner observation, all in the ego frame (scaled to order 1):

    ego (B, 4): speed/20, speed limit/20, (route lane offset - ego offset)/3.5, crossing flag
    route (B, 16, 2): route-lane centreline 0..75 m ahead /50
    bounds (B, 16, 4): left and right drivable edges at the same stations /50
    agents (B, 8, 7): x/50, y/50, cos h, sin h, vx/20, vy/20, valid; nearest first
    """
    dev = scenes.device
    B = scenes.batch
    route_d = scenes.lane_offsets.gather(1, scenes.route_lane[:, None])[:, 0]
    ego = torch.stack([scenes.ego_v / 20, scenes.speed_limit / 20, (route_d - scenes.ego_d) / LANE_W, scenes.cross[:, 2]], -1)
    st = torch.linspace(0, 75, N_ROUTE_PTS, device=dev).expand(B, -1)
    route = road_points(scenes.road, st, route_d[:, None].expand_as(st))[..., :2] / 50
    from dpolicy_envs.driving.scorer import _interp_station
    left = road_points(scenes.road, st, _interp_station(scenes.left, st))[..., :2] / 50
    right = road_points(scenes.road, st, _interp_station(scenes.right, st))[..., :2] / 50
    a = scenes.agents[:, :, 0]                                              # (B, A, 3)
    v = scenes.agent_v[:, :, 0]
    feats = torch.stack([a[..., 0] / 50, a[..., 1] / 50, torch.cos(a[..., 2]), torch.sin(a[..., 2]),
                         v * torch.cos(a[..., 2]) / 20, v * torch.sin(a[..., 2]) / 20, scenes.agent_valid.float()], -1)
    dist = torch.where(scenes.agent_valid, a[..., :2].norm(dim=-1), torch.full_like(v, 1e6))
    order = dist.argsort(1)
    feats = feats.gather(1, order[..., None].expand(-1, -1, feats.shape[-1])) * scenes.agent_valid.gather(1, order)[..., None]
    return {"ego": ego, "route": route, "bounds": torch.cat([left, right], -1), "agents": feats}
