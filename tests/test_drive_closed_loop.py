"""Closed-loop pseudo-simulation: frames, the agents' clock, and agreement with the open-loop scorer."""

import pytest
import torch
from test_drive_scorer import V, straight_scene

from dpolicy_envs.driving import expert_plan, generate_scenes, road_points, score
from dpolicy_envs.driving.closed_loop import recentre, rollout
from dpolicy_envs.driving.scorer import track


def _constant_speed(scenes):
    t = torch.arange(1, 9) * 0.5
    return (scenes.ego_v[:, None, None] * t[None, :, None]) * torch.tensor([1.0, 0.0])


def test_one_plan_for_the_whole_log_is_the_open_loop_score():
    sc = generate_scenes(range(300, 316))
    traj, _ = expert_plan(sc)
    res = rollout(sc, lambda s: traj, replan=40)
    assert torch.equal(res["states"], track(traj[:, None], sc.ego_v)["states"][:, 0])
    ol = score(sc, traj)
    for k in ("nc", "dac", "progress"):
        assert torch.allclose(res[k], ol[k][:, 0]), k


def test_recentre_moves_the_frame_and_the_agents_clock():
    sc = straight_scene([(30.0, 0.0, 5.0)])
    same = recentre(sc, torch.tensor([[0.0, 0.0, 0.0, V]]), 0)
    assert torch.allclose(same.road, sc.road, atol=5e-3) and torch.allclose(same.agents, sc.agents, atol=1e-5)
    moved = recentre(sc, torch.tensor([[10.0, 0.5, 0.1, 7.0]]), 10)  # 1 s in, 10 m on, 0.5 m left, turned 0.1 rad
    assert float(moved.ego_v) == 7.0 and float(moved.ego_d) == pytest.approx(1.75 + 0.5, abs=1e-4)
    c, s = torch.cos(torch.tensor(0.1)), torch.sin(torch.tensor(0.1))
    a = sc.agents[0, 0, 10, :2] - torch.tensor([10.0, 0.5])                 # the agent 1 s later, relative to the ego
    assert torch.allclose(moved.agents[0, 0, 0, :2], torch.stack([c * a[0] + s * a[1], -s * a[0] + c * a[1]]), atol=1e-4)
    # past the end of the 4 s log the agent keeps its speed along the road
    assert float(moved.agents[0, 0, -1, 0] - moved.agents[0, 0, -2, 0]) == pytest.approx(0.5 * float(c), rel=1e-3)
    # the ego sits at station 0 of the re-stationed road, at its lateral offset
    origin = road_points(moved.road, torch.zeros(1, 1), moved.ego_d[:, None])[0, 0]
    assert torch.allclose(origin[:2], torch.zeros(2), atol=1e-4) and float(origin[2]) == pytest.approx(-0.1, abs=1e-5)


def test_rollout_re_plans_in_the_ego_frame():
    free = straight_scene()
    res = rollout(free, _constant_speed)                                      # re-planned every 0.5 s
    assert float(res["progress"]) == pytest.approx(V * 4.0, rel=1e-3) and float(res["nc"]) == 1 and float(res["dac"]) == 1
    assert torch.allclose(res["states"][0, :, 1], torch.zeros(41), atol=1e-3)  # still in its lane
    blocked = straight_scene([(30.0, 0.0, 0.0)])                             # a stopped car 30 m ahead in the ego's lane
    assert float(rollout(blocked, _constant_speed)["nc"]) == 0
    stop = lambda s: torch.zeros(s.batch, 8, 2) + torch.linspace(1, 6, 8)[None, :, None] * torch.tensor([1.0, 0.0])  # noqa: E731
    assert float(rollout(blocked, stop)["nc"]) == 1
