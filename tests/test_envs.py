"""Tests for the envs package: API conformance, determinism, state replay, robustness, experts,
env_args round trips, adapters, kwarg validation and rendering. CPU only, seeded, ~tens of seconds."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import dpolicy_envs as envs
from dpolicy_envs import avoid
from dpolicy_envs.benchmark import adversarial_check

TASKS = ("avoid", "push", "lift")


def _rollout(env, actions, seed):
    """Observations, rewards and flags of a rollout; resets (unseeded) when an episode ends."""
    obs, _ = env.reset(seed=seed)
    out = [np.concatenate([obs[k] for k in sorted(obs)])]
    for a in actions:
        obs, r, term, trunc, info = env.step(a)
        out.append(np.concatenate([obs[k] for k in sorted(obs)] + [[r, term, trunc, info["is_success"]]]))
        if term or trunc:
            obs, _ = env.reset()
            out.append(np.concatenate([obs[k] for k in sorted(obs)]))
    return out


def _random_actions(env, n, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, env.action_space.shape[0])).astype(np.float32)


@pytest.mark.parametrize("task", TASKS)
def test_check_env(task):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(envs.make_env(task).unwrapped)
        warnings.filterwarnings("ignore", message=".*different from the unwrapped")  # expected for make()'s wrappers
        check_env(envs.make_env(task))


@pytest.mark.parametrize("task", TASKS)
def test_spaces_and_info(task):
    env = envs.make_env(task)
    t = envs.TASKS[task]
    assert tuple(env.observation_space.spaces) == t.obs_keys == env.unwrapped.OBS_KEYS
    assert env.action_space.shape == (t.act_dim,) and env.action_space.dtype == np.float32
    assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
    obs, info = env.reset(seed=0)
    assert set(obs) == set(t.obs_keys) and info["is_success"] is False
    assert all(v.dtype == np.float32 and v.ndim == 1 and np.abs(v).max() < 2 for v in obs.values())
    _, _, _, _, info = env.step(env.action_space.sample())
    assert isinstance(info["is_success"], bool) and info["sim_unstable"] is False


@pytest.mark.parametrize("task", TASKS)
def test_seeded_determinism(task):
    a, b = envs.make_env(task), envs.make_env(task)
    actions = _random_actions(a, 200)
    ra, rb = _rollout(a, actions, seed=3), _rollout(b, actions, seed=3)
    assert len(ra) == len(rb) and all(np.array_equal(x, y) for x, y in zip(ra, rb))
    rc = _rollout(b, actions, seed=4)
    assert not np.array_equal(ra[0], rc[0])


@pytest.mark.parametrize("task", TASKS)
def test_state_replay(task):
    env, other = envs.make_env(task, terminate_on_success=False), envs.make_env(task, terminate_on_success=False)
    expert = envs.make_expert(env, seed=0)
    obs, info = env.reset(seed=5)
    expert.reset(obs, info)
    for _ in range(8):  # get somewhere interesting (pushing / grasping)
        obs, *_ = env.step(expert(obs))
    state = env.unwrapped.get_state()
    assert state.dtype == np.float64 and state.ndim == 1
    actions = [expert(obs)]
    ref = []
    for i in range(25):
        obs, r, term, trunc, info = env.step(actions[-1])
        ref.append((obs, r, term, trunc, info["is_success"]))
        actions.append(expert(obs))
    other.reset(seed=99)
    other.unwrapped.set_state(state)
    assert np.array_equal(other.unwrapped.get_state(), state)
    for i, (obs, r, term, trunc, succ) in enumerate(ref):
        o2, r2, t2, tr2, info2 = other.step(actions[i])
        assert all(np.array_equal(obs[k], o2[k]) for k in obs), f"step {i} diverged"
        assert (r, term, trunc, succ) == (r2, t2, tr2, info2["is_success"])
    with pytest.raises(ValueError, match="entries"):
        other.unwrapped.set_state(state[:-1])


@pytest.mark.parametrize("task", TASKS)
def test_adversarial_actions(task):
    res = adversarial_check(task, n_sequences=20, seed=0)
    assert res["sequences"] == 20 and res["steps"] > 20 * 10
    assert res["exceptions"] == 0, res["errors"]
    assert res["nonfinite_obs"] == 0
    assert res["unstable_flagged"] >= 2 and res["unstable_not_ended"] == 0  # the corrupted-state sequences


@pytest.mark.parametrize("task", TASKS)
def test_unstable_step_returns_last_finite_obs(task):
    env = envs.make_env(task).unwrapped
    env.reset(seed=0)
    obs, *_ = env.step(np.zeros(env.ACT_DIM, np.float32))
    state = env.get_state()
    nq, nv = env.model.nq, env.model.nv
    state[1 + nq:1 + nq + nv] = 1e12  # beyond MuJoCo's limit: it warns and silently resets the data
    env.set_state(state)
    before = env._get_obs()
    obs2, reward, term, _, info = env.step(np.zeros(env.ACT_DIM, np.float32))
    assert term and info["sim_unstable"] and not info["is_success"] and reward == 0.0
    assert all(np.array_equal(before[k], obs2[k]) for k in before)
    assert all(np.isfinite(v).all() for v in obs2.values())


@pytest.mark.parametrize("task", TASKS)
def test_nonfinite_action_is_zero_action(task):
    a, b = envs.make_env(task), envs.make_env(task)
    a.reset(seed=1)
    b.reset(seed=1)
    bad = np.full(a.action_space.shape, np.nan, np.float32)
    bad[0] = np.inf
    good = np.zeros(a.action_space.shape, np.float32)  # every non-finite entry means "no command"
    for _ in range(5):
        oa, *_ = a.step(bad)
        ob, *_ = b.step(good)
    assert all(np.array_equal(oa[k], ob[k]) for k in oa)


@pytest.mark.parametrize("task", TASKS)
def test_expert_succeeds(task):
    env = envs.make_env(task)
    expert = envs.make_expert(env, seed=0)
    wins = 0
    for ep in range(20):
        obs, info = env.reset(seed=1000 + ep)
        expert.reset(obs, info)
        done = False
        while not done:
            action = expert(obs)
            assert action.dtype == np.float32 and np.all(np.abs(action) <= 1)
            obs, _, term, trunc, info = env.step(action)
            done = term or trunc
        wins += info["is_success"]
    assert wins >= 18


def test_lift_expert_gripper_is_binary():
    env = envs.make_env("lift")
    expert = envs.make_expert(env, noise_std=0.3, seed=0)
    obs, info = env.reset(seed=0)
    expert.reset(obs, info)
    grips = []
    for _ in range(40):
        a = expert(obs)
        grips.append(a[3])
        obs, _, term, trunc, _ = env.step(a)
        if term or trunc:
            break
    assert set(grips) == {-1.0, 1.0}


def test_lift_careless_operator_closes_early_and_fails():
    """early_close=1: every episode closes the gripper at the hover height and fails; 0: the expert as is;
    in between, the careless share is drawn per episode."""
    def run(p, n=6):
        env = envs.make_env("lift")
        expert = envs.make_expert(env, seed=0, early_close=p)
        wins, min_closed_z = [], []
        for ep in range(n):
            obs, info = env.reset(seed=2000 + ep)
            expert.reset(obs, info)
            done, zs = False, []
            while not done:
                a = expert(obs)
                if a[3] > 0:
                    zs.append(float(obs["eef_pos"][2]))
                obs, _, term, trunc, info = env.step(a)
                done = term or trunc
            wins.append(bool(info["is_success"]))
            min_closed_z.append(zs[0])
        return wins, min_closed_z

    careless, z_careless = run(1.0)
    careful, z_careful = run(0.0)
    assert not any(careless) and all(careful)
    assert min(z_careless) > max(z_careful) + 0.03  # the careless grip closes well above the careful one
    with pytest.raises(ValueError, match="early_close"):
        envs.make_expert(envs.make_env("lift"), early_close=1.5)


def _avoid_modes(mode_probs, n, seed):
    env = envs.make_env("avoid")
    expert = envs.make_expert(env, seed=seed, mode_probs=mode_probs)
    modes, wins = [], 0
    for ep in range(n):
        obs, info = env.reset(seed=seed + ep)
        assert info["mode"] == -1
        expert.reset(obs, info)
        done = False
        while not done:
            obs, _, term, trunc, info = env.step(expert(obs))
            done = term or trunc
        modes.append(info["mode"])
        wins += info["is_success"]
    return modes, wins


@pytest.mark.parametrize("mode", range(avoid.NUM_MODES))
def test_avoid_single_mode(mode):
    probs = np.eye(avoid.NUM_MODES)[mode].tolist()
    modes, wins = _avoid_modes(probs, 8, seed=10 * mode)
    assert modes == [mode] * 8 and wins == 8


def test_avoid_uniform_mix_covers_every_mode():
    modes, wins = _avoid_modes(None, 40, seed=0)
    assert set(modes) == set(range(avoid.NUM_MODES)) and wins >= 38
    assert max(modes.count(m) for m in range(avoid.NUM_MODES)) <= 20  # roughly balanced


def test_avoid_mean_route_collides():
    # The average of the routes is straight up the middle: it must hit the first cylinder and fail.
    env = envs.make_env("avoid")
    env.reset(seed=0)
    for _ in range(100):
        _, _, term, trunc, info = env.step(np.array([0.0, 1.0], np.float32))
        if term or trunc:
            break
    assert term and info["collided"] and not info["is_success"]


def test_avoid_route_classification():
    assert avoid.classify_row2(-0.4, -1) == 0 and avoid.classify_row2(0.4, 1) == 3
    assert avoid.classify_row2(0.0, -1) == 1 and avoid.classify_row2(0.0, 1) == 2


def test_horizon_truncates_and_rewards():
    env = envs.make_env("avoid", horizon=5, reward_type="dense")
    env.reset(seed=0)
    flags, rewards = [], []
    for _ in range(5):
        _, r, term, trunc, _ = env.step(np.array([0.5, 0.2], np.float32))
        flags.append(trunc)
        rewards.append(r)
    assert flags == [False] * 4 + [True]
    assert rewards[-1] > rewards[0] >= 0  # dense progress grows as the agent moves up
    sparse = envs.make_env("lift")
    expert = envs.make_expert(sparse, seed=0)
    obs, info = sparse.reset(seed=0)
    expert.reset(obs, info)
    rs = []
    while True:
        obs, r, term, trunc, info = sparse.step(expert(obs))
        rs.append(r)
        if term or trunc:
            break
    assert info["is_success"] and rs[-1] == 1.0 and set(rs[:-1]) == {0.0}


@pytest.mark.parametrize("task", TASKS)
def test_env_args_round_trip(task):
    args = envs.env_args(task, horizon=37)
    assert args["env_name"] == envs.TASKS[task].env_id and args["env_type"] == "gymnasium"
    assert args["env_kwargs"]["horizon"] == 37 and "reward_type" in args["env_kwargs"]
    rebuilt = envs.make_env_from_args(json.loads(json.dumps(args)))
    direct = envs.make_env(task, **args["env_kwargs"])
    assert rebuilt.unwrapped.horizon == 37
    actions = _random_actions(direct, 60, seed=1)
    ra, rb = _rollout(rebuilt, actions, seed=2), _rollout(direct, actions, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(ra, rb))
    with pytest.raises(ValueError, match="robosuite"):
        envs.make_env_from_args({**args, "env_type": "robosuite"})


@pytest.mark.parametrize("task,kwargs,culprit", [
    ("avoid", {"reward_type": "bogus"}, "bogus"),
    ("push", {"horizon": 0}, "horizon"),
    ("lift", {"render_mode": "human"}, "human"),
    ("push", {"yaw_tolerance": -1.0}, "yaw_tolerance"),
    ("lift", {"not_a_kwarg": 1}, "not_a_kwarg"),
    ("avoid", {"terminate_on_success": "yes"}, "terminate_on_success"),
])
def test_bad_kwargs(task, kwargs, culprit):
    with pytest.raises(ValueError, match=culprit):
        envs.make_env(task, **kwargs)


def test_bad_names_and_expert_kwargs():
    with pytest.raises(ValueError, match="wibble"):
        envs.env_args("avoid", wibble=1)
    with pytest.raises(ValueError, match="NoSuchEnv-v9"):
        envs.make_env("NoSuchEnv-v9")
    with pytest.raises(ValueError, match="mode_probs"):
        envs.make_expert(envs.make_env("avoid"), mode_probs=[1.0, 0.0])
    with pytest.raises(ValueError, match="noise_std"):
        envs.make_expert(envs.make_env("push"), noise_std=-1)
    with pytest.raises(ValueError, match="Pendulum"):
        envs.make_expert(envs.make_env("Pendulum-v1"))


def test_dict_obs_adapter():
    env = envs.make_env("Pendulum-v1")
    assert isinstance(env, envs.DictObsAdapter) and list(env.observation_space.spaces) == ["state"]
    obs, info = env.reset(seed=0)
    assert obs["state"].shape == (3,) and obs["state"].dtype == np.float32 and info["is_success"] is False
    assert env.observation_space.contains(obs)
    obs, *_ = env.step(env.action_space.sample())
    assert obs["state"].shape == (3,)
    # a Dict-observation env keeps only the listed keys, flattened
    inner = gym.make(envs.TASKS["lift"].env_id)
    sub = envs.DictObsAdapter(inner, keys=["object_pos", "gripper_state"])
    obs, _ = sub.reset(seed=0)
    assert list(obs) == ["object_pos", "gripper_state"] and obs["object_pos"].shape == (3,)
    with pytest.raises(ValueError, match="CartPole-v1"):
        envs.DictObsAdapter(gym.make("CartPole-v1"))
    with pytest.raises(ValueError, match="nope"):
        envs.DictObsAdapter(inner, keys=["nope"])


def test_unit_action_adapter_rescales():
    env = envs.UnitActionAdapter(gym.make("Pendulum-v1"))  # torque in [-2, 2]
    assert np.allclose(env.action([1.0]), [2.0]) and np.allclose(env.action([-1.0]), [-2.0])
    assert np.allclose(env.action([np.nan]), [0.0]) and np.allclose(env.action([1e6]), [2.0])


def test_pusht_optional():
    try:
        import gym_pusht  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"pip install dpolicy\[pusht\]"):
            envs.make_env("pusht")
        return
    env = envs.make_env("pusht")
    obs, info = env.reset(seed=0)
    assert list(obs) == ["state"] and "is_success" in info
    assert env.action_space.low.min() == -1 and env.action_space.high.max() == 1


def _gl_available() -> bool:
    try:
        import mujoco
        r = mujoco.Renderer(mujoco.MjModel.from_xml_string("<mujoco/>"), 8, 8)
        r.close()
        return True
    except Exception:  # noqa: BLE001 -- any GL failure means "no offscreen rendering here"
        return False


@pytest.mark.parametrize("task", TASKS)
def test_render(task):
    plain = envs.make_env(task)
    plain.reset(seed=0)
    assert plain.render() is None  # render_mode=None renders nothing
    if not _gl_available():
        pytest.skip("offscreen GL (EGL/OSMesa) unavailable")
    env = envs.make_env(task, render_mode="rgb_array", width=96, height=64)
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (64, 96, 3) and frame.dtype == np.uint8 and frame.std() > 5
    env.step(env.action_space.sample())
    assert env.render().shape == (64, 96, 3)
    env.close()


def test_import_does_not_pull_torch():
    code = "import sys, envs; envs.make_env('push').reset(seed=0); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("task", ["push", "avoid", "lift"])
def test_progress_reward_is_the_change_of_the_dense_score(task):
    dense, prog = envs.make_env(task, reward_type="dense"), envs.make_env(task, reward_type="progress")
    _, _ = dense.reset(seed=3)
    _, _ = prog.reset(seed=3)
    first = dense.unwrapped._evaluate()[2]
    rng = np.random.default_rng(0)
    prev, total, n = first, 0.0, 0
    for _ in range(40):
        a = rng.uniform(-1, 1, dense.action_space.shape).astype(np.float32)
        _, rd, td, _, _ = dense.step(a)
        _, rp, tp, _, _ = prog.step(a)
        assert rp == pytest.approx(rd - prev, abs=1e-12) and td == tp
        prev, total, n = rd, total + rp, n + 1
        if td:
            break
    assert total == pytest.approx(prev - first, abs=1e-9)  # an episode's sum is its last score minus its first
    # a state set from outside (another episode's start) becomes the reference of the next step's progress
    other = envs.make_env(task, reward_type="dense")
    other.reset(seed=7)
    state = other.unwrapped.get_state()
    dense.unwrapped.set_state(state)
    prog.unwrapped.set_state(state)
    start = dense.unwrapped._evaluate()[2]
    assert start != pytest.approx(prev)
    a = np.zeros(dense.action_space.shape, np.float32)
    _, rd, *_ = dense.step(a)
    _, rp, *_ = prog.step(a)
    assert rp == pytest.approx(rd - start, abs=1e-12)
