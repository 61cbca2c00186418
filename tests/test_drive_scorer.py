"""PDMS-like scorer edge cases on hand-built straight-road scenes, plus scene generation and the expert."""

import math

import pytest
import torch

from dpolicy_envs.driving import expert_plan, generate_scenes, observe, score, split_seeds
from dpolicy_envs.driving.scenes import HORIZON, MAX_AGENTS, N_STATIONS, S0, STATION_STEP, Scenes

V = 10.0


def straight_scene(agents=()):
    """Two-lane straight road, ego in the right lane at 10 m/s; agents: (x, y, speed) moving along +x."""
    s = S0 + STATION_STEP * torch.arange(N_STATIONS, dtype=torch.float32)
    road = torch.stack([s, torch.full_like(s, -1.75), torch.zeros_like(s)], -1)[None]
    ag = torch.zeros(1, MAX_AGENTS, HORIZON + 1, 3)
    av = torch.zeros(1, MAX_AGENTS, HORIZON + 1)
    valid = torch.zeros(1, MAX_AGENTS, dtype=torch.bool)
    t = torch.arange(HORIZON + 1) * 0.1
    for i, (x, y, v) in enumerate(agents):
        ag[0, i, :, 0] = x + v * t
        ag[0, i, :, 1] = y
        av[0, i] = v
        valid[0, i] = True
    return Scenes(road=road, left=torch.full((1, N_STATIONS), 7.0), right=torch.zeros(1, N_STATIONS),
                  lane_offsets=torch.tensor([[1.75, 5.25, math.nan, math.nan]]), lane_end=torch.full((1, 4), math.inf),
                  route_lane=torch.tensor([0]), cross=torch.zeros(1, 4), ego_v=torch.tensor([V]), ego_d=torch.tensor([1.75]),
                  speed_limit=torch.tensor([13.9]), agents=ag, agent_v=av, agent_valid=valid,
                  agent_size=torch.tensor([[[4.6, 1.9]] * MAX_AGENTS]), seeds=torch.tensor([0]))


def line(v=V, y=None):
    t = torch.arange(1, 9) * 0.5
    return torch.stack([v * t, torch.zeros_like(t) if y is None else y], -1)[None]


def test_perfect_trajectory_scores_one():
    r = score(straight_scene(), line())
    assert {k: float(r[k]) for k in ("nc", "dac", "ttc", "comfort", "ep", "pdms")} == dict(nc=1, dac=1, ttc=1, comfort=1, ep=1, pdms=1)


def test_collision_scores_zero():
    r = score(straight_scene([(20.0, 0.0, 0.0)]), line())
    assert float(r["nc"]) == 0 and float(r["pdms"]) == 0


def test_rear_end_on_a_stopped_ego_is_not_its_fault():
    stop = torch.zeros(1, 8, 2)
    sc = straight_scene([(-30.0, 0.0, 12.0)])
    sc.ego_v[:] = 0.0
    r = score(sc, stop)
    assert float(r["nc"]) == 1


def test_leaving_drivable_area_scores_zero():
    t = torch.arange(1, 9) * 0.5
    r = score(straight_scene(), line(y=torch.clamp(t - 0.5, min=0) * 2.5))  # drifts 8.75 m left; edge at 5.25
    assert float(r["dac"]) == 0 and float(r["nc"]) == 1 and float(r["pdms"]) == 0


def test_comfort_violation_alone_scores_ten_twelfths():
    t = torch.arange(1, 9) * 0.5
    x = torch.where(t < V / 6, V * t - 3 * t**2, torch.full_like(t, V * V / 12))  # brake at 6 m/s^2 to a stop
    r = score(straight_scene(), torch.stack([x, torch.zeros_like(t)], -1)[None])
    assert float(r["comfort"]) == 0 and float(r["nc"]) == float(r["dac"]) == float(r["ttc"]) == float(r["ep"]) == 1
    assert float(r["pdms"]) == pytest.approx(10 / 12)


def test_time_to_collision_without_collision():
    # a parked car 1 m beyond where the ego's front ends up: no collision, but the 0.3 s projection hits it
    r = score(straight_scene([(40.0 + 4.6 + 1.0, 0.0, 0.0)]), line())
    assert float(r["nc"]) == 1 and float(r["ttc"]) == 0 and float(r["pdms"]) == pytest.approx(7 / 12)


def test_ep_normalised_by_best_and_five_metre_rule():
    sc = straight_scene()
    trajs = torch.stack([line()[0], line(v=5.0)[0]])[None]
    r = score(sc, trajs)
    prog = r["progress"][0]
    assert prog[0] == pytest.approx(40.0, abs=0.5) and 20 < prog[1] < 30
    assert r["ep"][0].tolist() == pytest.approx([1.0, float(prog[1] / prog[0])])
    assert float(score(sc, trajs, best_progress=torch.tensor([80.0]))["ep"][0, 0]) == pytest.approx(float(prog[0]) / 80)
    slow = torch.stack([line(v=0.5)[0], line(v=0.25)[0]])[None]
    sc.ego_v[:] = 0.5
    assert score(sc, slow)["ep"][0].tolist() == [1.0, 1.0]  # best progress under 5 m


def test_bad_inputs_name_the_culprit():
    sc = straight_scene()
    with pytest.raises(ValueError, match="NaN"):
        score(sc, torch.full((1, 8, 2), float("nan")))
    with pytest.raises(ValueError, match="shape"):
        score(sc, torch.zeros(1, 7, 2))
    with pytest.raises(ValueError, match="best_progress"):
        score(sc, line(), best_progress=torch.zeros(3))
    with pytest.raises(ValueError, match="unknown split"):
        split_seeds("tset", 3)


def test_scenes_are_deterministic_and_splits_disjoint():
    a, b = generate_scenes([5, 6]), generate_scenes([5, 6])
    assert torch.equal(a.agents, b.agents) and torch.equal(a.road, b.road)
    assert not set(split_seeds("train", 100)) & set(split_seeds("test", 100))
    obs = observe(a)
    assert obs["agents"].shape == (2, MAX_AGENTS, 7) and obs["route"].shape == (2, 16, 2)
    assert all(torch.isfinite(v).all() for v in obs.values())


def test_expert_scores_well_and_is_batched_consistently():
    sc = generate_scenes(split_seeds("test", 12))
    traj, info = expert_plan(sc)
    assert traj.shape == (12, 8, 2) and float(info["pdms"].mean()) >= 0.85
    traj2, _ = expert_plan(sc.index(slice(3, 5)))
    assert torch.allclose(traj[3:5], traj2, atol=1e-4)


def test_the_expert_brakes_hard_when_every_smooth_candidate_collides():
    from dpolicy_envs.driving import candidates

    # a stopped car 14 m ahead in the ego lane, and a car alongside in the other lane: the smooth speed
    # profiles (3 m/s^2 at most) run into the first, a lane change into the second
    sc = straight_scene([(14.0, 0.0, 0.0), (0.0, 3.5, V)])
    cand = candidates(sc)
    r = score(sc, cand)
    assert (r["nc"][0, :-1] == 0).all() and float(r["nc"][0, -1]) == 1.0   # only the emergency stop is collision-free
    traj, info = expert_plan(sc)
    assert torch.equal(traj[0], cand[0, -1]) and float(info["nc"][0]) == 1.0 and float(info["pdms"][0]) > 0
