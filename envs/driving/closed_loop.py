"""Closed-loop pseudo-simulation (NAVSIM-v2 style): re-plan every 0.5 s against the logged agents.

A planner is any ``plan(scenes) -> (B, 8, 2)`` trajectories in the scenes' ego frame. ``rollout`` starts
at t = 0, asks for a plan, lets the scorer's tracker (kinematic bicycle) execute its first 0.5 s, then
re-expresses the scene around where the ego actually is (``recentre``: the road re-stationed so the ego
sits at station 0, everything moved into its new frame, the logged agents advanced in time) and asks
again, until the agents' log ends (4 s; the scenes are logged for 4 s, so this is the longest rollout
that never invents agent motion). The agents replay their log: they do not react to the ego. The executed
path is then checked with the scorer's own collision (at fault), drivable-area and progress tests.
"""

from __future__ import annotations

import torch

from dpolicy_envs.driving.scenes import DT, HORIZON, S0, STATION_STEP, Scenes, road_points
from dpolicy_envs.driving.scorer import _interp_station, path_metrics, to_frenet, track
from dpolicy_envs.driving.vector import move_agents

REPLAN_STEPS = 5  # 0.5 s at 10 Hz


def _to_frame(xy: torch.Tensor, h: torch.Tensor, origin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Points (B, ..., 2) and headings (B, ...) in the frame of ``origin`` (B, 3: x, y, heading)."""
    shape = (-1,) + (1,) * (xy.dim() - 2)
    c, s = torch.cos(origin[:, 2]).reshape(shape), torch.sin(origin[:, 2]).reshape(shape)
    rel = xy - origin[:, :2].reshape(*shape, 2)
    return torch.stack([c * rel[..., 0] + s * rel[..., 1], -s * rel[..., 0] + c * rel[..., 1]], -1), h - origin[:, 2].reshape(shape)


def _from_frame(xy: torch.Tensor, h: torch.Tensor, origin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``_to_frame``."""
    shape = (-1,) + (1,) * (xy.dim() - 2)
    c, s = torch.cos(origin[:, 2]).reshape(shape), torch.sin(origin[:, 2]).reshape(shape)
    out = torch.stack([c * xy[..., 0] - s * xy[..., 1], s * xy[..., 0] + c * xy[..., 1]], -1) + origin[:, :2].reshape(*shape, 2)
    return out, h + origin[:, 2].reshape(shape)


def recentre(sc: Scenes, ego: torch.Tensor, k: int) -> Scenes:
    """The scenes as the ego sees them at ``ego`` (B, 4: x, y, heading, speed in ``sc``'s frame), ``k`` steps
    (0.1 s) after t = 0: road and bounds re-stationed so the ego is at station 0, poses in its frame, the
    logged agents advanced by k steps (continued with ``move_agents`` past the end of their log)."""
    B, P = sc.road.shape[:2]
    dev = sc.device
    s_e, d_e = (v[:, 0] for v in to_frenet(sc.road, ego[:, None, :2]))
    s_old = S0 + STATION_STEP * torch.arange(P, device=dev)[None] + s_e[:, None]
    road = road_points(sc.road, s_old, torch.zeros_like(s_old))
    road_xy, road_h = _to_frame(road[..., :2], road[..., 2], ego[:, :3])
    T1 = sc.agents.shape[2]
    t = torch.arange(T1, device=dev) + k
    idx = t.clamp(max=T1 - 1)
    # past the end of the log, the generator's motion model continues from the last logged pose
    after = move_agents(sc.road, sc.agents[:, :, -1], sc.agent_v[:, :, -1], (t - (T1 - 1)).clamp(min=0) * DT)
    ag = torch.where((t >= T1)[None, None, :, None], after, sc.agents[:, :, idx])
    v = sc.agent_v[:, :, idx]
    ag_xy, ag_h = _to_frame(ag[..., :2], ag[..., 2], ego[:, :3])
    cross = sc.cross.clone()
    cross[:, 0] -= s_e
    return Scenes(road=torch.cat([road_xy, road_h[..., None]], -1), left=_interp_station(sc.left, s_old),
                  right=_interp_station(sc.right, s_old), lane_offsets=sc.lane_offsets, lane_end=sc.lane_end - s_e[:, None],
                  route_lane=sc.route_lane, cross=cross, ego_v=ego[:, 3].clone(), ego_d=d_e, speed_limit=sc.speed_limit,
                  agents=torch.cat([ag_xy, ag_h[..., None]], -1) * sc.agent_valid[:, :, None, None], agent_v=v,
                  agent_valid=sc.agent_valid, agent_size=sc.agent_size, seeds=sc.seeds)


def rollout(sc: Scenes, plan, replan: int = REPLAN_STEPS, steps: int = HORIZON) -> dict:
    """Drive ``plan`` in closed loop for ``steps`` x 0.1 s, re-planning every ``replan`` steps.

    Returns the executed states (B, steps + 1, 4) in ``sc``'s frame and their NC, DAC and progress (m), each (B,).
    """
    ego = torch.stack([torch.zeros_like(sc.ego_v)] * 3 + [sc.ego_v], -1)
    path = [ego]
    for k in range(0, steps, replan):
        local = recentre(sc, ego, k)
        traj = plan(local)
        st = track(traj[:, None], local.ego_v)["states"][:, 0, 1:min(replan, steps - k) + 1]   # (B, n, 4) local frame
        xy, h = _from_frame(st[..., :2], st[..., 2], ego[:, :3])
        moved = torch.cat([xy, h[..., None], st[..., 3:]], -1)
        path.extend(moved.unbind(1))
        ego = moved[:, -1]
    states = torch.stack(path, 1)
    m = path_metrics(sc, states[:, None])
    return {"states": states, **{key: val[:, 0] for key, val in m.items()}}
