"""Rollout backends: the same per-episode results in this process, in worker processes and on Ray actors,
for any worker count; a killed worker replaced without losing or double counting an episode."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from conftest import tiny_policy
from dpolicy.errors import ConfigError
from dpolicy.eval import evaluate
from dpolicy.eval.backends import PooledEnvs, RolloutBackend, RolloutError, kill_worker_after, split_slots

CKPT = Path(__file__).resolve().parents[1] / "checkpoints" / "avoid_diffusion"


class DriftEnv(gym.Env):
    """Observations ``pos`` (2) and ``vel`` (3) as the tiny test policies read them; the action pushes the point;
    success when its first coordinate passes 0.6 (a random policy succeeds in some episodes, not all)."""

    def __init__(self, horizon=12, fail_on_nan=False):
        self.observation_space = spaces.Dict({"pos": spaces.Box(-10, 10, (2,), np.float32),
                                              "vel": spaces.Box(-10, 10, (3,), np.float32)})
        self.action_space = spaces.Box(-1, 1, (3,), np.float32)
        self.horizon, self.fail_on_nan = horizon, fail_on_nan

    def _obs(self):
        return {"pos": self.pos.astype(np.float32), "vel": self.vel.astype(np.float32)}

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.pos, self.vel, self.t = self.np_random.uniform(-0.5, 0.5, 2), self.np_random.normal(size=3), 0
        return self._obs(), {}

    def step(self, action):
        if self.fail_on_nan and not np.all(np.isfinite(action)):
            raise ValueError("DriftEnv got a non-finite action")
        a = np.clip(np.asarray(action, dtype=np.float64), -1, 1)
        self.vel = 0.8 * self.vel + 0.2 * a
        self.pos = self.pos + 0.3 * self.vel[:2]
        self.t += 1
        success = bool(self.pos[0] > 0.6)
        return self._obs(), float(self.pos[0]), success, self.t >= self.horizon, {"is_success": success}


def core(r):
    return r.seeds, r.successes, r.returns, r.lengths


@pytest.fixture(scope="module")
def policy():
    return tiny_policy(Ta=3, steps=3, seed=1)


def test_settings_are_checked_with_the_culprit_named():
    for kw, culprit in [(dict(kind="mpi"), "mpi"), (dict(workers=0), "workers"), (dict(placement="gpu"), "placement"),
                        (dict(shard=0), "shard"), (dict(max_restarts=-1), "max_restarts")]:
        with pytest.raises(ConfigError, match=culprit):
            RolloutBackend(**kw)
    assert split_slots(10, 3) == [4, 3, 3] and split_slots(2, 5) == [1, 1] and sum(split_slots(7, 2)) == 7


@pytest.mark.parametrize("placement", ["learner", "workers"])
def test_subprocess_workers_give_the_local_results_for_any_worker_count(policy, placement):
    run = lambda kind, w: evaluate(policy, DriftEnv, n_episodes=14, n_envs=4, seed=5, progress=False,  # noqa: E731
                                   backend=RolloutBackend(kind, w, placement=placement))
    local = run("local", 1)
    assert 0 < sum(local.successes) < 14, "the test needs a mix of outcomes"
    for w in (1, 2, 3):
        r = run("subprocess", w)
        assert core(r) == core(local), f"{w} workers"
        assert r.backend == "subprocess" and r.workers == w and r.worker_restarts == 0


@pytest.mark.parametrize("placement", ["learner", "workers"])
def test_a_killed_worker_is_replaced_and_no_episode_is_lost_or_counted_twice(policy, placement):
    kw = dict(n_episodes=16, n_envs=4, seed=11, progress=False)
    clean = evaluate(policy, DriftEnv, backend=RolloutBackend("local", placement=placement, shard=2), **kw)
    hook, done = kill_worker_after(3)
    r = evaluate(policy, DriftEnv, backend=RolloutBackend("subprocess", 2, placement=placement, shard=2), episode_hook=hook, **kw)
    assert done["pid"] is not None
    assert r.worker_restarts == 1
    assert sorted(r.seeds) == list(range(11, 27))
    assert core(r) == core(clean)


def test_a_worker_that_keeps_dying_stops_the_rollout_with_one_sentence(policy):
    hook, _ = kill_worker_after(1)
    with pytest.raises(RolloutError, match="worker 0 died 1 times"):
        evaluate(policy, DriftEnv, n_episodes=8, n_envs=2, seed=0, progress=False, episode_hook=hook,
                 backend=RolloutBackend("subprocess", 2, max_restarts=0))


def test_an_env_error_in_a_worker_is_raised_as_itself():
    envs = PooledEnvs(lambda: DriftEnv(fail_on_nan=True), 2, RolloutBackend("subprocess", 2))
    try:
        envs.reset_slots([0, 1], [0, 1])
        with pytest.raises(ValueError, match="non-finite action"):
            envs.step_slots([1], [np.full(3, np.nan, np.float32)])
        assert envs.restarts == [0, 0]
        obs, r, te, tr, info = envs.step_slots([0], [np.zeros(3, np.float32)])[0]  # the worker is still serving
        assert set(obs) == {"pos", "vel"} and isinstance(r, float)
    finally:
        envs.close()


def test_replay_restores_a_replaced_workers_envs_exactly():
    envs = PooledEnvs(DriftEnv, 3, RolloutBackend("subprocess", 2))
    twin = [DriftEnv() for _ in range(3)]
    try:
        envs.reset_slots([0, 1, 2], [7, 8, 9])
        for e, s in zip(twin, [7, 8, 9]):
            e.reset(seed=s)
        rng = np.random.default_rng(0)
        for t in range(5):
            rows = [0, 2] if t % 2 else [0, 1, 2]
            acts = [rng.uniform(-1, 1, 3).astype(np.float32) for _ in rows]
            envs.step_slots(rows, acts)
            for r, a in zip(rows, acts):
                twin[r].step(a)
        os.kill(envs.worker_pids()[0], signal.SIGKILL)  # worker 0 holds slots 0 and 1
        a = np.full(3, 0.5, np.float32)
        out = envs.step_slots([0, 1, 2], [a, a, a])
        assert envs.restarts == [1, 0] and envs.replayed_steps == 5 + 3  # slot 0 took 5 steps, slot 1 three
        for r in range(3):
            want = twin[r].step(a)[0]
            np.testing.assert_array_equal(out[r][0]["pos"], want["pos"])
    finally:
        envs.close()


def test_the_noise_action_env_steps_the_same_in_worker_processes(policy):
    from dpolicy.rl.noise_env import NoiseActionEnv

    def transitions(backend):
        env = NoiseActionEnv(policy, DriftEnv, n_envs=3, seed=4, backend=backend)
        try:
            state, g, out = env.reset(), torch.Generator().manual_seed(0), []
            for _ in range(6):
                st = env.step(state, torch.randn(3, env.noise_dim, generator=g))
                out.append((st.reward.tolist(), st.done.tolist(), st.env_steps))
                state = st.state
            return out
        finally:
            env.close()

    assert transitions(None) == transitions(RolloutBackend("subprocess", 2))


# -- Ray: a local cluster with 2 workers -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason='optional extra not installed: pip install -e ".[ray]"')
    # 2 workers; logical CPUs to spare, so a replacement actor never waits for a killed one's CPU to be freed
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def avoid():
    from dpolicy.policy import load_policy
    from dpolicy.tasks import env_factory_for

    torch.set_num_threads(1)
    pol = load_policy(str(CKPT), "cpu")
    return pol, env_factory_for(pol)


def test_ray_actors_give_the_local_results_and_survive_a_kill(ray_cluster, avoid):
    pol, env_fn = avoid
    kw = dict(n_episodes=12, n_envs=4, seed=100, progress=False)
    for placement in ("learner", "workers"):  # one test: the local cluster lives in one test process
        local = evaluate(pol, env_fn, backend=RolloutBackend("local", placement=placement), **kw)
        assert core(evaluate(pol, env_fn, backend=RolloutBackend("ray", 2, placement=placement), **kw)) == core(local)
        hook, done = kill_worker_after(2)
        r = evaluate(pol, env_fn, backend=RolloutBackend("ray", 2, placement=placement), episode_hook=hook, **kw)
        assert done["pid"] is not None and r.worker_restarts == 1, placement
        assert core(r) == core(local), placement
