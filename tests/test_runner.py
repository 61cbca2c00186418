"""The one episode loop (``EpisodeRunner``) and the one observation history (``ObsHistory``).

Batched evaluation, the controller's success evaluation and the noise-action MDP all run on them. The
pinned figures below were produced by the three separate loops these replaced, on the same tiny
untrained policy on ``avoid`` with the same seeds: the results must not move.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from dpolicy.config import NetConfig, PolicyConfig, ProcessConfig
from dpolicy.data.normalizer import DictNormalizer
from dpolicy.deploy import evaluate_controller
from dpolicy.errors import ConfigError, ShapeError
from dpolicy.eval import evaluate
from dpolicy.eval.rollout import make_vector_env
from dpolicy.eval.runner import EpisodeRunner
from dpolicy.policy import ChunkPolicy
from dpolicy.policy.history import ObsHistory
from dpolicy.rl.noise_env import NoiseActionEnv
from dpolicy.tasks import env_args, env_factory


def avoid_policy(sampler="ddim", horizon=150):
    """Untrained, with action statistics that lean forward, so some episodes reach the goal, some hit an
    obstacle early and some run out of time."""
    torch.manual_seed(0)
    process = ProcessConfig(type="diffusion", sampler=sampler, eta=1.0 if sampler == "ddpm" else 0.0, train_steps=20, steps=4)
    cfg = PolicyConfig(obs_keys=["agent_pos", "agent_vel"], obs_dims={"agent_pos": 2, "agent_vel": 2}, action_dim=2,
                       To=2, Tp=8, Ta=4, net=NetConfig(hidden=32, depth=1, time_dim=16), process=process)
    g = torch.Generator().manual_seed(0)
    acts = torch.stack([torch.rand(200, generator=g) * 2 - 1, torch.rand(200, generator=g) * 1.2 - 0.1], 1)
    norm = DictNormalizer.fit({"agent_pos": torch.rand(200, 2, generator=g) * 2 - 1,
                               "agent_vel": torch.rand(200, 2, generator=g)}, acts)
    pol = ChunkPolicy(cfg, norm).eval()
    pol.metadata = {"env_args": env_args("avoid", horizon=horizon), "task": "avoid"}
    return pol


def outcome(r):
    return {"successes": r.successes, "returns": r.returns, "lengths": r.lengths, "modes": r.modes, "calls": r.policy_calls}


# -- pinned: the figures of the loops before they were unified ---------------------------------------------------
PINNED_EVAL = {
    "ddim": {"successes": [True, True, False, False, False, False, False, False],
             "returns": [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], "lengths": [74, 73, 8, 11, 17, 46, 15, 40],
             "modes": [0, 0, -1, -1, -1, -1, -1, -1], "calls": 40},
    "ddpm": {"successes": [False] * 8, "returns": [0.0] * 8, "lengths": [11, 35, 10, 35, 40, 13, 15, 11],
             "modes": [-1] * 8, "calls": 35},
}
PINNED_CONTROLLER = {
    "rti": {"successes": [False] * 6, "returns": [0.0] * 6, "lengths": [24, 89, 150, 150, 31, 150], "modes": [-1] * 6,
            "calls": 1200},
    "chunked": {"successes": [False] * 6, "returns": [0.0] * 6, "lengths": [33, 11, 49, 19, 14, 13], "modes": [-1] * 6,
                "calls": 152},
}
PINNED_NOISE = {
    "done": [[0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0], [1, 0, 1], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0],
             [0, 0, 0], [1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 1]],
    "term": [[0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0], [1, 0, 1], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0],
             [0, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 1]],
    "reward": [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.75, 1.0], [1.0, 1.0, 1.0], [0.25, 1.0, 0.5], [1.0, 1.0, 1.0],
               [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.5, 1.0, 1.0], [1.0, 1.0, 1.0],
               [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],
    "env_steps": [12, 12, 11, 12, 7, 12, 12, 12, 12, 12, 10, 12, 12, 12],
    "state_sum": [-9.053735530236736, -11.619980326853693, -13.489390574395657, -11.867423247545958, -13.129211493767798,
                  -11.36331330286339, -19.532017022371292, -9.92167692258954, -16.02029697271064, -10.884815042838454,
                  -11.657668262720108, -14.077119371853769, -12.655457705259323, -12.867355552967638],
    "next_sum": [-9.053735530236736, -11.619980326853693, -9.976655960083008, -11.867423247545958, -8.72177903726697,
                 -11.36331330286339, -19.532017022371292, -9.92167692258954, -16.02029697271064, -10.884815042838454,
                 -8.35426093172282, -14.077119371853769, -12.707193387206644, -13.322895157150924],
}


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_batched_evaluation_gives_the_pinned_episodes(sampler):
    pol = avoid_policy(sampler)
    r = evaluate(pol, env_factory(pol.metadata["env_args"]), n_episodes=8, n_envs=3, seed=5, progress=False)
    assert outcome(r) == PINNED_EVAL[sampler]


@pytest.mark.parametrize("mode", ["rti", "chunked"])
def test_controller_evaluation_gives_the_pinned_episodes(mode):
    pol = avoid_policy()
    kw = {"k": 2} if mode == "rti" else {}
    r = evaluate_controller(pol, env_factory(pol.metadata["env_args"]), n_episodes=6, n_envs=3, seed=11, mode=mode, **kw)
    assert outcome(r) == PINNED_CONTROLLER[mode]


def noise_run(env, decisions=14):
    g = torch.Generator().manual_seed(3)
    state = env.reset()
    steps, states = [], [state]
    for _ in range(decisions):
        st = env.step(state, torch.randn(env.n, env.noise_dim, generator=g) * 1.2)
        steps.append(st)
        states += [st.next_state, st.state]
        state = st.state
    env.close()
    return steps, states


def test_the_noise_action_env_gives_the_pinned_transitions():
    pol = avoid_policy(horizon=40)
    steps, _ = noise_run(NoiseActionEnv(pol, env_factory(pol.metadata["env_args"]), n_envs=3, seed=1, reward_offset=0.25))
    assert [st.done.astype(int).tolist() for st in steps] == PINNED_NOISE["done"]
    assert [st.terminated.int().tolist() for st in steps] == PINNED_NOISE["term"]
    assert [st.reward.tolist() for st in steps] == PINNED_NOISE["reward"]
    assert [st.env_steps for st in steps] == PINNED_NOISE["env_steps"]
    assert not any(st.success.any() for st in steps)
    np.testing.assert_allclose([float(st.state.double().sum()) for st in steps], PINNED_NOISE["state_sum"], rtol=1e-5)
    np.testing.assert_allclose([float(st.next_state.double().sum()) for st in steps], PINNED_NOISE["next_sum"], rtol=1e-5)


class SequentialNoiseEnv:
    """The noise-action MDP written as a plain loop: env by env, Ta actions each (stopping where the episode
    ends), numpy histories, resets after the whole batch in slot order. The reference for NoiseActionEnv."""

    def __init__(self, base, env_fn, n, seed, reward_offset):
        self.base, self.envs, self.n, self.offset = base, [env_fn() for _ in range(n)], n, reward_offset
        self.rng, self.gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
        self.noise_dim = base.Tp * base.action_dim
        self.hist = [None] * n

    def _start(self, i):
        obs, _ = self.envs[i].reset(seed=int(self.rng.integers(2**31)))
        self.hist[i] = {k: np.repeat(np.asarray(obs[k], np.float32).reshape(1, -1), self.base.To, 0) for k in self.base.obs_keys}

    def _state(self):
        return self.base.encode({k: torch.as_tensor(np.stack([h[k] for h in self.hist])) for k in self.base.obs_keys})

    def reset(self):
        for i in range(self.n):
            self._start(i)
        return self._state()

    @torch.no_grad()
    def step(self, state, w):
        b = self.base
        chunk = b.sample_normalized(state, w.clamp(-1.5, 1.5).reshape(-1, b.Tp, b.action_dim), None, self.gen)
        actions = b.normalizer.action.unnormalize(chunk)[:, :b.Ta].numpy()
        done = np.zeros(self.n, bool)
        for i, env in enumerate(self.envs):
            for j in range(b.Ta):
                obs, r, term, trunc, info = env.step(actions[i, j])
                for k in b.obs_keys:
                    h = self.hist[i][k]
                    h[:-1] = h[1:]
                    h[-1] = np.asarray(obs[k], np.float32).reshape(-1)
                if term or trunc:
                    done[i] = True
                    break
        next_state = self._state()
        for i in np.nonzero(done)[0]:
            self._start(i)
        return next_state, self._state(), done

    def close(self):
        for e in self.envs:
            e.close()


def test_the_noise_action_env_equals_a_plain_sequential_loop():
    pol = avoid_policy(horizon=30)
    make = env_factory(pol.metadata["env_args"])
    steps, states = noise_run(NoiseActionEnv(pol, make, n_envs=3, seed=2))
    ref = SequentialNoiseEnv(pol, make, 3, 2, 0.0)
    g = torch.Generator().manual_seed(3)
    state = ref.reset()
    assert torch.equal(state, states[0])
    for i, st in enumerate(steps):
        nxt, state, done = ref.step(state, torch.randn(3, ref.noise_dim, generator=g) * 1.2)
        assert torch.equal(nxt, st.next_state) and torch.equal(state, st.state), i
        assert np.array_equal(done, st.done), i
    ref.close()


def test_noise_action_env_rejects_zero_steps():
    pol = avoid_policy()
    with pytest.raises(ConfigError, match="steps=0"):
        NoiseActionEnv(pol, env_factory(pol.metadata["env_args"]), n_envs=1, steps=0)


# -- the runner on its own ---------------------------------------------------------------------------------------
class LineEnv(gym.Env):
    """x += a each step; terminates (success) past 1, truncates after ``horizon`` steps; seed sets the start."""

    def __init__(self, horizon=6):
        self.observation_space = gym.spaces.Dict({"x": gym.spaces.Box(-10, 10, (1,), np.float32)})
        self.action_space = gym.spaces.Box(-1, 1, (1,), np.float32)
        self.horizon, self.metadata, self.render_mode, self.log = horizon, {}, None, []

    def reset(self, seed=None, options=None):
        self.x, self.t = 0.1 * (seed or 0), 0
        self.log.append(("reset", seed))
        return {"x": np.array([self.x], np.float32)}, {}

    def step(self, a):
        self.x += float(a[0])
        self.t += 1
        self.log.append(("step", float(a[0])))
        return {"x": np.array([self.x], np.float32)}, 1.0, self.x > 1.0, self.t >= self.horizon, {"is_success": self.x > 1.0}

    def close(self):
        pass


@pytest.mark.parametrize("backend", ["list", "vector"])
def test_runner_plays_each_seeded_episode_once_in_any_slot(backend):
    seeds = [0, 3, 5, 9, 2]

    def play(n):
        envs = [LineEnv() for _ in range(n)] if backend == "list" else make_vector_env(LineEnv, n)
        starts = {}

        def begin(obs, slots, slot_seeds):
            for r in np.nonzero(slots)[0]:
                if slot_seeds[r] is not None:
                    starts[slot_seeds[r]] = float(obs["x"][r, 0])

        runner = EpisodeRunner(envs, seeds, max_steps=5)
        records = runner.run(lambda obs, active: np.full((n, 1), 0.3, np.float32), begin)
        return [(r.seed, r.success, r.ret, r.length) for r in records], starts

    one, starts = play(1)
    assert [r[0] for r in one] == seeds and starts == {s: pytest.approx(0.1 * s) for s in seeds}
    assert one == play(2)[0] == play(4)[0]  # slots do not change outcomes (4: more slots than episodes left)
    assert [r[3] for r in one] == [4, 3, 2, 1, 3] and all(r[1] for r in one)  # past 1 from 0.1 * seed, +0.3 a step
    assert [r[2] for r in one] == [4.0, 3.0, 2.0, 1.0, 3.0]


def test_a_list_runner_steps_only_the_slots_asked_for_and_resets_when_told():
    envs = [LineEnv(horizon=100) for _ in range(3)]
    seeds = iter(range(100))
    runner = EpisodeRunner(envs, next_seed=lambda: next(seeds))
    runner.reset()
    res = runner.step(np.full((3, 1), 0.5, np.float32), np.array([True, False, True]))
    assert [len([e for e in env.log if e[0] == "step"]) for env in envs] == [1, 0, 1]
    assert res.reward.tolist() == [1.0, 0.0, 1.0] and not res.ended.any()
    res = runner.step(np.full((3, 1), 0.7, np.float32))
    assert res.ended.tolist() == [True, False, True]  # 0 + 0.5 + 0.7 and 0.2 + 0.5 + 0.7 pass 1
    assert runner.restart(np.array([False, False, True]))[1].tolist() == [False, False, True]
    assert envs[2].log[-1] == ("reset", 3) and envs[0].log[-1][0] == "step"  # the endless seeds, in order
    with pytest.raises(ConfigError, match="either a list of seeds or a next_seed"):
        EpisodeRunner(envs)


# -- the history -------------------------------------------------------------------------------------------------
def test_obs_history_starts_by_repeating_the_first_observation_and_slides():
    h = ObsHistory(["a", "b"], To=3, n=2, dims={"a": 1, "b": 2})
    h.start(h.read({"a": np.array([[1.0], [10.0]]), "b": np.array([[1, 1], [10, 10]])})[0])
    for v in (2.0, 3.0):
        h.push(h.read({"a": np.array([[v], [10 * v]]), "b": np.array([[v, v], [10 * v, 10 * v]])})[0])
    w = h.window()
    assert w["a"][:, :, 0].tolist() == [[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]] and w["b"].shape == (2, 3, 2)
    # slot 1 starts over, slot 0 slides; then only slot 0 slides
    h.push(h.read({"a": np.array([[4.0], [7.0]]), "b": np.zeros((2, 2))})[0], fresh=np.array([False, True]))
    h.push(h.read({"a": np.array([[5.0], [8.0]]), "b": np.zeros((2, 2))})[0], slots=np.array([True, False]))
    assert h.window()["a"][:, :, 0].tolist() == [[3.0, 4.0, 5.0], [7.0, 7.0, 7.0]]
    assert h.window([1])["a"].shape == (1, 3, 1) and torch.equal(h.views()["a"], h.buffer[:, :, :1])


def test_obs_history_reads_one_slot_or_a_batch_and_names_bad_keys():
    one = ObsHistory(["p", "v"], To=2, n=1, dims={"p": 2, "v": 1})
    assert one.read({"p": [1.0, 2.0], "v": 3.0})[1] is False
    assert one.read({"p": np.ones((1, 2)), "v": np.ones((1, 1))})[1] is True
    with pytest.raises(ShapeError, match=r"\['v'\] are missing"):
        one.read({"p": [1.0, 2.0]})
    with pytest.raises(ShapeError, match="'p' has shape"):
        one.read({"p": [1.0, 2.0, 3.0], "v": 3.0})
    with pytest.raises(ShapeError, match="'v' holds NaN"):
        one.read({"p": [1.0, 2.0], "v": np.inf}, check_finite=True)
    inferred = ObsHistory(["p"], To=2, n=3)  # dimensions taken from the first observation
    inferred.start(inferred.read({"p": np.zeros((3, 4))})[0])
    assert inferred.dims == {"p": 4} and inferred.buffer.shape == (3, 2, 4)
