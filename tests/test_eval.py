"""Tests of dpolicy.eval on a tiny synthetic env and scripted policies (no learned model, no GPU).

The env is a 1-D point that must reach 0 from a seeded start in [-1, -0.3] u [0.3, 1], moving
0.1 * action per step; it terminates on success and truncates at a horizon. Its "mode" is the side
it started on. Policies are scripted controllers implementing the ChunkPolicy duck type.
"""

from __future__ import annotations

import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from dpolicy.eval import (EvalResult, RenderError, evaluate, mode_frequencies, plot_learning_curve,
                          plot_success_vs, record_video, total_variation, wilson_interval)

TOL = 0.05


class PointEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, horizon=20, render_mode=None, report_mode=True, log=None, renders=True, unstable_seeds=()):
        self.observation_space = spaces.Dict({"pos": spaces.Box(-10, 10, (1,), np.float32)})
        self.action_space = spaces.Box(-1, 1, (1,), np.float32)
        self.horizon, self.render_mode, self.report_mode = horizon, render_mode, report_mode
        self.log, self.renders, self.unstable_seeds = log, renders, unstable_seeds
        self.seed_used = None

    def _obs(self):
        return {"pos": np.array([self.pos], dtype=np.float32)}

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.seed_used = seed
        side = 1.0 if self.np_random.random() < 0.5 else -1.0
        self.start = self.pos = side * self.np_random.uniform(0.3, 1.0)
        self.t = 0
        if self.log is not None:
            self.log.append(("reset", seed, self.start))
        return self._obs(), {}

    def step(self, action):
        a = float(np.clip(action[0], -1, 1))
        if self.log is not None:
            self.log.append(("step", self.pos, a))
        self.pos += 0.1 * a
        self.t += 1
        success = abs(self.pos) < TOL
        info = {"is_success": success, "sim_unstable": self.seed_used in self.unstable_seeds and self.t == 3}
        if self.report_mode:
            info["mode"] = int(self.start > 0) if success else -1
        return self._obs(), -abs(self.pos), success, self.t >= self.horizon, info

    def render(self):
        if not self.renders:
            return None
        img = np.zeros((31, 41, 3), dtype=np.uint8)  # odd sizes exercise the mp4 padding
        img[:, int(np.clip((self.pos + 1) * 20, 0, 40))] = 255
        return img


def make_env(**kw):
    return PointEnv(**kw)


class ScriptedPolicy:
    """Plans a chunk by simulating a proportional controller on the known dynamics.

    ``harmful_from=k`` makes chunk entries k.. push away from the target (harmful if ever executed);
    ``noise_scale`` adds the supplied latent noise to the actions (a stochastic policy).
    """

    obs_keys = ["pos"]
    action_dim = 1
    device = torch.device("cpu")

    def __init__(self, To=2, Tp=8, Ta=4, gain=10.0, harmful_from=None, noise_scale=0.0, const=None):
        self.To, self.Tp, self.Ta = To, Tp, Ta
        self.gain, self.harmful_from, self.noise_scale, self.const = gain, harmful_from, noise_scale, const
        self.seen: list[torch.Tensor] = []

    def act(self, obs, noise=None, steps=None, generator=None):
        x = obs["pos"]
        assert x.ndim == 3 and x.shape[1:] == (self.To, 1) and x.dtype == torch.float32
        assert noise is None or noise.shape == (x.shape[0], self.Tp, 1)
        self.seen.append(x.clone())
        if self.const is not None:
            return torch.full((x.shape[0], self.Tp, 1), float(self.const))
        p = x[:, -1, 0].double()
        acts = []
        for t in range(self.Tp):
            a = torch.clamp(-self.gain * p, -1, 1)
            if self.noise_scale:
                a = a + self.noise_scale * noise[:, t, 0].double()
            acts.append(a)
            p = p + 0.1 * torch.clamp(a, -1, 1)
        chunk = torch.stack(acts, 1)[..., None].float()
        if self.harmful_from is not None:
            chunk[:, self.harmful_from:] = torch.sign(x[:, -1:, :])  # full push away from 0
        return chunk


def reference_rollout(policy, seed, horizon=20):
    """Plain single-env receding-horizon loop, written independently of dpolicy.eval."""
    env = PointEnv(horizon=horizon)
    obs, _ = env.reset(seed=seed)
    hist = [obs["pos"]] * policy.To
    ret, length, success = 0.0, 0, False
    while True:
        window = torch.tensor(np.stack(hist[-policy.To:]))[None]
        chunk = policy.act({"pos": window}, noise=torch.zeros(1, policy.Tp, 1))
        for a in chunk[0, :policy.Ta].numpy():
            obs, r, term, trunc, info = env.step(a)
            hist.append(obs["pos"])
            ret, length, success = ret + r, length + 1, success or info["is_success"]
            if term or trunc:
                return success, ret, length


def result_core(res: EvalResult) -> dict:
    d = res.to_dict()
    for k in ("wall_time_s", "policy_calls", "backend", "placement", "workers", "worker_restarts"):
        d.pop(k)
    return d


def test_perfect_and_null_policy():
    good = evaluate(ScriptedPolicy(), make_env, n_episodes=12, n_envs=4, progress=False)
    assert good.success_rate == 1.0 and all(good.successes)
    null = evaluate(ScriptedPolicy(gain=0.0), make_env, n_episodes=12, n_envs=4, progress=False)
    assert null.success_rate == 0.0 and not any(null.successes)
    assert null.lengths == [20] * 12  # truncated at the horizon, never terminated
    assert good.success_ci95[0] > 0.7 and null.success_ci95[1] < 0.3


def test_matches_reference_loop_and_counts_each_episode_once():
    logs: list[list] = []

    def env_fn():
        logs.append([])
        return PointEnv(log=logs[-1])

    pol = ScriptedPolicy(To=2, Tp=8, Ta=3)
    res = evaluate(pol, env_fn, n_episodes=7, n_envs=3, seed=5, progress=False)
    log = [e for env_log in logs for e in env_log + [("reset", None, None)]]  # per env, in order
    assert res.n_episodes == 7 and len(res.successes) == len(res.lengths) == len(res.returns) == 7
    assert res.seeds == list(range(5, 12))
    for i, s in enumerate(res.seeds):
        ok, ret, length = reference_rollout(pol, s)
        assert res.successes[i] == ok and res.lengths[i] == length
        assert res.returns[i] == pytest.approx(ret, abs=1e-9)
    # Every episode's seed was used for exactly one reset; other resets (idle slots) are unseeded.
    seeded = [e[1] for e in log if e[0] == "reset" and e[1] is not None]
    assert sorted(seeded) == list(range(5, 12))
    # Every env step taken inside a seeded episode is counted in that episode's length, and no more.
    steps_per_seed: dict = {}
    for kind, a, _ in log:
        if kind == "reset":
            current = a
        elif current is not None:
            steps_per_seed[current] = steps_per_seed.get(current, 0) + 1
    assert steps_per_seed == dict(zip(res.seeds, res.lengths))


def test_max_steps_caps_length():
    res = evaluate(ScriptedPolicy(gain=0.0), make_env, n_episodes=5, n_envs=2, max_steps=7, progress=False)
    assert res.lengths == [7] * 5


def test_independent_of_n_envs_with_stochastic_policy():
    def run(n_envs, backend=None):
        pol = ScriptedPolicy(Ta=3, gain=2.0, noise_scale=1.5)
        return evaluate(pol, make_env, n_episodes=10, n_envs=n_envs, seed=3, progress=False, backend=backend)

    one, four = run(1), run(4)
    assert 0.0 < one.success_rate < 1.0, "the stochastic policy should give a mix of outcomes"
    assert result_core(one) == result_core(four)
    assert result_core(one) == result_core(run(3, "subprocess"))
    other_seed = evaluate(ScriptedPolicy(Ta=3, gain=2.0, noise_scale=1.5), make_env, n_episodes=10,
                          n_envs=4, seed=100, progress=False)
    assert other_seed.returns != one.returns


def test_obs_history_repeats_first_obs_then_slides():
    pol = ScriptedPolicy(To=3, Tp=4, Ta=2, const=0.5)  # moves +0.05 per step
    res = evaluate(pol, lambda: PointEnv(horizon=9), n_episodes=1, n_envs=1, seed=0, progress=False)
    starts = [np.float32(PointEnv().reset(seed=0)[0]["pos"][0])]
    p = [float(starts[0]) + 0.05 * t for t in range(10)]
    first, second, third = (w[0, :, 0].numpy() for w in pol.seen[:3])
    np.testing.assert_allclose(first, [p[0]] * 3, atol=1e-6)
    np.testing.assert_allclose(second, [p[0], p[1], p[2]], atol=1e-6)
    np.testing.assert_allclose(third, [p[2], p[3], p[4]], atol=1e-6)
    assert len(pol.seen) == math.ceil(res.lengths[0] / 2) == res.policy_calls


def test_obs_history_fresh_after_reset_in_batched_run():
    pol = ScriptedPolicy(To=3, Tp=4, Ta=1, const=0.5)
    n = 6
    evaluate(pol, lambda: PointEnv(horizon=5), n_episodes=n, n_envs=4, seed=0, progress=False)
    starts = sorted(float(np.float32(PointEnv().reset(seed=s)[0]["pos"][0])) for s in range(n))
    windows = torch.cat(pol.seen)[:, :, 0].numpy()
    fresh = []
    for w in windows:
        d = np.diff(w)
        # Each window is the episode start repeated, then +0.05 per step: no stale obs from a previous episode.
        assert np.all((np.abs(d) < 1e-6) | (np.abs(d - 0.05) < 1e-5)), w
        first_move = np.argmax(np.abs(d) > 1e-6) if np.any(np.abs(d) > 1e-6) else len(d)
        assert np.all(np.abs(d[first_move:] - 0.05) < 1e-5), w
        if np.all(np.abs(d) < 1e-6):
            fresh.append(float(w[0]))
    np.testing.assert_allclose(sorted(fresh), starts, atol=1e-6)


def test_only_first_Ta_actions_are_executed():
    log: list = []
    pol = ScriptedPolicy(To=1, Tp=8, Ta=2, gain=10.0, harmful_from=2)
    res = evaluate(pol, lambda: PointEnv(log=log), n_episodes=6, n_envs=3, progress=False)
    assert res.success_rate == 1.0
    steps = [(pos, a) for kind, pos, a in log if kind == "step"]
    assert steps and all(pos * a <= 1e-12 for pos, a in steps), "an action pushing away from the target was executed"
    # Executing the whole chunk (Ta = Tp) with the same harmful entries fails, so the check above can fail.
    bad = ScriptedPolicy(To=1, Tp=8, Ta=8, gain=10.0, harmful_from=2)
    assert evaluate(bad, make_env, n_episodes=6, n_envs=3, progress=False).success_rate == 0.0


def test_mode_counts_and_unstable():
    n = 10
    expected: dict[int, int] = {}
    for s in range(n):
        env = PointEnv()
        env.reset(seed=s)
        m = int(env.start > 0)
        expected[m] = expected.get(m, 0) + 1
    assert len(expected) == 2, "both modes should occur in this seed range"
    res = evaluate(ScriptedPolicy(), lambda: PointEnv(unstable_seeds=(2, 7)), n_episodes=n, n_envs=3, progress=False)
    assert res.mode_counts == expected
    assert res.unstable_episodes == 2 and [i for i, u in enumerate(res.unstable) if u] == [2, 7]
    null = evaluate(ScriptedPolicy(gain=0.0), make_env, n_episodes=4, n_envs=2, progress=False)
    assert null.mode_counts == {} and null.modes == [-1] * 4  # undetermined modes are not counted
    silent = evaluate(ScriptedPolicy(), lambda: PointEnv(report_mode=False), n_episodes=4, n_envs=2, progress=False)
    assert silent.mode_counts == {} and silent.modes == [None] * 4


def test_to_dict_is_json_roundtrip():
    res = evaluate(ScriptedPolicy(), make_env, n_episodes=3, n_envs=2, progress=False)
    d = res.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["n_episodes"] == 3 and len(d["success_ci95"]) == 2


def test_wilson_interval_known_values():
    z = 1.959964
    # 0/10 and 10/10: lower resp. upper bound is exact; the other is 2 z^2/(2n) / (1 + z^2/n) from 0 or 1.
    edge = (z * z / 10) / (1 + z * z / 10)
    assert wilson_interval(0, 10) == pytest.approx((0.0, edge))
    assert wilson_interval(10, 10) == pytest.approx((1.0 - edge, 1.0))
    assert edge == pytest.approx(0.27754, abs=1e-5)
    # 5/10: centre 0.5, half-width z/(1+z^2/10) * sqrt(0.025 + z^2/400).
    half = z / (1 + z * z / 10) * math.sqrt(0.025 + z * z / 400)
    assert wilson_interval(5, 10) == pytest.approx((0.5 - half, 0.5 + half))
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_total_variation():
    assert total_variation({0: 5, 1: 5}, {0: 0.5, 1: 0.5}) == pytest.approx(0.0)
    assert total_variation({0: 10}, {1: 3}) == pytest.approx(1.0)
    assert total_variation({0: 3, 1: 1}, {0: 1, 1: 1}) == pytest.approx(0.25)
    assert mode_frequencies({0: 1, 2: 3}) == {0: 0.25, 2: 0.75}
    with pytest.raises(ValueError):
        total_variation({}, {0: 1})


def test_plots_write_png(tmp_path):
    history = [{"step": i, "loss": 1.0 / (i + 1)} for i in range(50)]
    history[10]["success_rate"] = 0.2
    history[40]["success_rate"] = 0.8
    p1 = plot_learning_curve(history, tmp_path / "curve.png")
    p2 = plot_success_vs([1, 2, 4], [0.2, 0.5, 0.9], [(0.1, 0.3), (0.3, 0.7), (0.7, 0.97)], "latency (ms)",
                         tmp_path / "sub" / "succ.png")
    p3 = plot_success_vs([[1, 2], [1, 2]], [[0.1, 0.2], [0.3, 0.4]], [[(0, 0.3), (0.1, 0.4)], [(0.1, 0.5), (0.2, 0.6)]],
                         "steps", tmp_path / "multi.png", labels=["a", "b"])
    for p in (p1, p2, p3):
        data = p.read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plot_learning_curve([{"step": 0}], tmp_path / "empty.png")


@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
def test_video_written(tmp_path, suffix):
    import imageio.v3 as iio

    path = tmp_path / f"ep{suffix}"
    res = evaluate(ScriptedPolicy(), make_env, n_episodes=3, n_envs=2, video_path=path, video_episodes=2,
                   progress=False)
    assert res.video_path == str(path) and path.stat().st_size > 0
    frames = iio.imread(path, index=None)
    if suffix == ".gif":
        # One frame after each reset and after each step of the two recorded episodes.
        assert len(frames) == res.lengths[0] + res.lengths[1] + 2
    assert frames.shape[1:3] in ((31, 41), (32, 42))


def test_a_missing_mp4_encoder_stops_evaluation_before_its_rollouts(tmp_path, monkeypatch):
    import sys

    from dpolicy.errors import ConfigError

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as on a machine without imageio-ffmpeg
    made = []

    def env_fn(**kw):
        made.append(kw)
        return make_env(**kw)

    with pytest.raises(RenderError, match=r"imageio's ffmpeg plugin.*pip install imageio-ffmpeg.*eval.video=false"):
        evaluate(ScriptedPolicy(), env_fn, n_episodes=2, n_envs=2, video_path=tmp_path / "ep.mp4", progress=False)
    assert made == [] and not (tmp_path / "ep.mp4").exists()
    with pytest.warns(RuntimeWarning, match="no video written: .*ffmpeg"):  # not strict: the results, no video
        res = evaluate(ScriptedPolicy(), env_fn, n_episodes=2, n_envs=2, video_path=tmp_path / "ep.mp4",
                       video_strict=False, progress=False)
    assert res.n_episodes == 2 and res.video_path is None and not (tmp_path / "ep.mp4").exists()
    with pytest.raises(ConfigError, match="must end in one of"):  # a suffix that is no video format stays a setting error
        evaluate(ScriptedPolicy(), env_fn, n_episodes=2, n_envs=2, video_path=tmp_path / "ep.avi", progress=False)
    res = evaluate(ScriptedPolicy(), env_fn, n_episodes=2, n_envs=2, video_path=tmp_path / "ep.gif", progress=False)
    assert res.video_path == str(tmp_path / "ep.gif")  # a GIF needs only Pillow


def test_video_failure_is_clear_or_skipped(tmp_path):
    with pytest.raises(RenderError, match="render"):
        record_video(ScriptedPolicy(), lambda **kw: PointEnv(renders=False, **kw), tmp_path / "x.gif")
    with pytest.warns(RuntimeWarning, match="no video written"):
        res = evaluate(ScriptedPolicy(), lambda **kw: PointEnv(renders=False, **kw), n_episodes=2, n_envs=2,
                       video_path=tmp_path / "x.gif", video_strict=False, progress=False)
    assert res.video_path is None and res.n_episodes == 2
    with pytest.raises(RenderError, match="render_mode"):
        record_video(ScriptedPolicy(), lambda: PointEnv(), tmp_path / "y.gif")
