"""Asynchronous chunk execution: delay bookkeeping, RTC's guided inpainting, the live loop's thread."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from conftest import tiny_policy
from dpolicy.deploy.asynchronous import (AsyncChunker, AsyncConfig, ChunkPlanner, LiveAsyncRunner, SwitchStats,
                                         evaluate_async, rtc_weight, soft_weights)
from dpolicy.errors import ConfigError


class ClockPolicy:
    """Plans from the observed time ``c``: entry j of its chunk is ``c + j``, the time it is planned for. An executor
    that plays every action at the time it was planned for therefore executes action t at step t."""

    obs_keys, obs_dims, image_shapes = ["clock"], {"clock": 1}, {}
    To, Tp, action_dim = 1, 8, 1
    device = torch.device("cpu")
    process = SimpleNamespace(denoising=False, name="regression")
    normalizer = SimpleNamespace(action=SimpleNamespace(unnormalize=lambda x: x))

    def __init__(self, Ta=3):
        self.Ta = Ta

    def resolve_steps(self, steps):
        return 1

    def encode(self, obs):
        return obs["clock"][:, -1, 0]

    def sample_normalized(self, cond, noise, steps, generator=None):
        return cond[:, None, None] + torch.arange(self.Tp, dtype=torch.float32)[None, :, None]


@pytest.mark.parametrize("strategy", ["naive", "ensemble", "bid"])
@pytest.mark.parametrize("delay", [0, 1, 2, 3])
def test_every_action_is_the_one_planned_for_its_step_and_chunks_switch_after_the_delay(strategy, delay):
    ex = AsyncChunker(ClockPolicy(Ta=3), AsyncConfig(strategy=strategy, delay=delay, candidates=3), batch_size=2)
    ex.reset()
    played, switches = [], []
    for t in range(20):
        a = ex.step({"clock": np.full((2, 1), t, np.float32)})
        played.append(a[:, 0].copy())
        switches.append(ex.switched[0])
    played = np.array(played)
    np.testing.assert_allclose(played, np.arange(20)[:, None].repeat(2, 1), rtol=0, atol=1e-4)  # none skipped, none twice
    s = max(3, delay)
    want = [t == 0 or (t >= s + delay and (t - delay) % s == 0) for t in range(20)]
    assert switches == want
    assert ex.inferences == 2 * len(range(0, 20, s))


def test_a_restarted_slot_starts_over_without_touching_the_other():
    ex = AsyncChunker(ClockPolicy(Ta=3), AsyncConfig(strategy="naive", delay=2), batch_size=2)
    ex.reset()
    for t in range(5):
        ex.step({"clock": np.full((2, 1), t, np.float32)})
    ex.reset(mask=[True, False])
    a = ex.step({"clock": np.array([[100.0], [5.0]], np.float32)})
    assert a.tolist() == [[100.0], [5.0]]  # slot 0: a fresh episode's first chunk, at once; slot 1 carries on


def test_settings_are_checked():
    for kw, culprit in [(dict(strategy="act"), "strategy"), (dict(delay=-1), "delay"), (dict(mask="fuzzy"), "mask"),
                        (dict(beta=float("nan")), "beta"), (dict(candidates=0), "candidates"), (dict(rho=0), "rho"),
                        (dict(guidance="dps"), "guidance")]:
        with pytest.raises(ConfigError, match=culprit):
            AsyncConfig(**kw)
    with pytest.raises(ConfigError, match="exceed the chunk length"):
        ChunkPlanner(ClockPolicy(Ta=6), AsyncConfig(strategy="naive", delay=3))
    with pytest.raises(ConfigError, match="denoising"):
        ChunkPlanner(ClockPolicy(Ta=3), AsyncConfig(strategy="rtc", delay=1))


def test_soft_mask_and_guidance_weight():
    w = soft_weights(16, 4, 8)
    assert w[:4].tolist() == [1.0] * 4 and w[8:].tolist() == [0.0] * 8
    assert all(1 > a > b > 0 for a, b in zip(w[4:7], w[5:8]))
    assert rtc_weight(1.0, 5.0) == 5.0 and rtc_weight(0.5, 5.0) == pytest.approx(2.0) and rtc_weight(0.5, 1.0) == 1.0
    # a guided window shorter than the overlap: decaying over its own entries, nothing after it
    short = soft_weights(16, 4, 8, overlap=2)
    assert short[:4].tolist() == [1.0] * 4 and short[6:].tolist() == [0.0] * 10 and 1 > short[4] > short[5] > 0
    assert torch.equal(soft_weights(16, 4, 8, overlap=10), w)  # longer than the overlap: the overlap
    with pytest.raises(ConfigError, match="overlap"):
        AsyncConfig(overlap=0)


@pytest.fixture(scope="module")
def flow_policy():
    return tiny_policy(process="flow", sampler="euler", Ta=4, steps=5, seed=3)


def _window(pol, B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(B, pol.To, pol.obs_dims[k], generator=g) for k in pol.obs_keys}


@pytest.mark.parametrize("guidance", ["vjp", "direct"])
def test_rtc_pulls_the_new_chunk_towards_the_one_being_executed(flow_policy, guidance):
    pol, d, s = flow_policy, 2, 4
    g = torch.Generator().manual_seed(1)
    prev = ChunkPlanner(pol, AsyncConfig(strategy="naive", delay=d)).plan(_window(pol), torch.randn(6, 1, 8, 3, generator=g), None, 0)
    noise = torch.randn(6, 1, 8, 3, generator=g)
    target = torch.cat([prev[:, s:], prev[:, -1:].expand(-1, s, -1)], 1)
    err = lambda c: ((c - target)[:, : 8 - s] ** 2).sum(-1).mean().item()  # noqa: E731  the guided part
    free = ChunkPlanner(pol, AsyncConfig(strategy="naive", delay=d)).plan(_window(pol, seed=1), noise, prev, s)
    guided = ChunkPlanner(pol, AsyncConfig(strategy="rtc", delay=d, guidance=guidance)).plan(_window(pol, seed=1), noise, prev, s)
    weak = ChunkPlanner(pol, AsyncConfig(strategy="rtc", delay=d, beta=0.0, guidance=guidance)).plan(_window(pol, seed=1), noise, prev, s)
    assert err(guided) < 0.5 * err(free)
    torch.testing.assert_close(weak, free)  # beta = 0: no guidance at all


def test_rtc_with_a_hard_mask_reproduces_the_committed_prefix_exactly(flow_policy):
    pol, d, s = flow_policy, 3, 4
    g = torch.Generator().manual_seed(2)
    prev = ChunkPlanner(pol, AsyncConfig(strategy="naive", delay=d)).plan(_window(pol), torch.randn(6, 1, 8, 3, generator=g), None, 0)
    planner = ChunkPlanner(pol, AsyncConfig(strategy="rtc", delay=d, mask="hard"))
    new = planner.plan(_window(pol, seed=5), torch.randn(6, 1, 8, 3, generator=g), prev, s)
    assert torch.equal(new[:, :d], prev[:, s:s + d])
    target = torch.cat([prev[:, s:], prev[:, -1:].expand(-1, s, -1)], 1)
    assert not torch.allclose(new[:, d:], target[:, d:], atol=1e-3)  # only the prefix is pinned
    assert planner.backwards > 0 and planner.evals == 6 * 5


def test_switch_stats_separate_switch_steps():
    st = SwitchStats()
    st.add_episode([np.zeros(2), np.zeros(2), np.ones(2) * 3, np.ones(2) * 3, np.ones(2) * 3],
                   [True, False, True, False, False])
    out = st.summary()
    assert out["switch_jump_mean"] == pytest.approx(np.sqrt(18)) and out["within_jump_max"] == 0.0 and out["switches"] == 1


class DriftEnv(gym.Env):
    def __init__(self, horizon=15):
        self.observation_space = spaces.Dict({"pos": spaces.Box(-10, 10, (2,), np.float32),
                                              "vel": spaces.Box(-10, 10, (3,), np.float32)})
        self.action_space = spaces.Box(-1, 1, (3,), np.float32)
        self.horizon = horizon

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.x, self.t = self.np_random.normal(size=5), 0
        return {"pos": self.x[:2].astype(np.float32), "vel": self.x[2:].astype(np.float32)}, {}

    def step(self, a):
        self.x = 0.9 * self.x + 0.1 * np.concatenate([np.asarray(a)[:2], np.asarray(a)])
        self.t += 1
        ok = bool(self.x[0] > 0.3)  # success is reported, the episode runs to its horizon
        return ({"pos": self.x[:2].astype(np.float32), "vel": self.x[2:].astype(np.float32)}, float(ok), False,
                self.t >= self.horizon, {"is_success": ok})


def test_evaluation_under_delay_is_reproducible_and_reports_discontinuity(flow_policy):
    cfg = AsyncConfig(strategy="rtc", delay=2)
    r1, x1 = evaluate_async(flow_policy, DriftEnv, cfg, n_episodes=6, n_envs=3, seed=4)
    r2, x2 = evaluate_async(flow_policy, DriftEnv, cfg, n_episodes=6, n_envs=2, seed=4)
    assert r1.returns == r2.returns and r1.lengths == r2.lengths  # per-episode noise: any number of slots
    assert x1["switches"] > 0 and x1["evals_per_step"] > 0 and x1["backwards_per_step"] > 0


def test_the_live_loop_runs_a_real_inference_thread_and_leaves_none_behind(flow_policy):
    before = {t.ident for t in threading.enumerate()}
    runner = LiveAsyncRunner(flow_policy, AsyncConfig(strategy="rtc", delay=1), seed=0)
    try:
        out = runner.run_episode(DriftEnv(horizon=20), seed=3, rate_hz=200.0)
    finally:
        runner.close()
    assert out["length"] == 20 and len(out["actions"]) == 20 and len(runner.latencies) >= 1
    assert all(d >= 0 for d in out["delays"])
    assert not runner.thread.is_alive()
    assert {t.ident for t in threading.enumerate()} <= before


def test_every_policy_kind_runs_asynchronously(flow_policy):
    from conftest import image_policy
    from dpolicy.compose import ComposedPolicy
    from dpolicy.rl.agent import Actor
    from dpolicy.rl.steered import SteeredPolicy

    torch.manual_seed(0)
    steered = SteeredPolicy(flow_policy, Actor(flow_policy.cond_dim, flow_policy.Tp * flow_policy.action_dim, 16, 1, 1.0).eval())
    kinds = {"composed": ComposedPolicy([flow_policy, tiny_policy(process="flow", sampler="euler", Ta=4, seed=4)], [0.5, 0.5]),
             "steered": steered, "regression": tiny_policy("mlp", "regression", "direct", Ta=4)}
    for name, pol in kinds.items():
        for strategy in ("naive", "rtc") if name != "regression" else ("naive", "bid"):
            r, extra = evaluate_async(pol, DriftEnv, AsyncConfig(strategy=strategy, delay=2), n_episodes=2, n_envs=2)
            assert r.n_episodes == 2 and extra["switches"] > 0, (name, strategy)
    cam, _ = image_policy(process="flow")
    ex = AsyncChunker(cam, AsyncConfig(strategy="rtc", delay=1), batch_size=2)
    ex.reset()
    rng = np.random.default_rng(0)
    for t in range(6):
        a = ex.step({"pos": rng.normal(size=(2, 2)).astype(np.float32),
                     "cam": rng.integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)})
        assert a.shape == (2, 2) and np.isfinite(a).all()
    assert ex.planner.backwards > 0


def _ramp_policy(prefix: int, steps: int = 500, seed: int = 0):
    """A two-mode task the observation cannot decide: at clock c the chunk is s * (c + 1 + j) / 20 with a sign s
    the demos draw at random; only the actions already committed tell which mode the robot is in."""
    from dpolicy.config import NetConfig, ProcessConfig, PolicyConfig
    from dpolicy.data import Demo, WindowDataset
    from dpolicy.policy import ChunkPolicy

    torch.manual_seed(seed)
    clock = (np.arange(24, dtype=np.float32) / 20)[:, None]
    demos = [Demo(obs={"clock": clock}, actions=s * (clock + 1 / 20), states=np.zeros((24, 1))) for s in (1.0, -1.0)]
    cfg = PolicyConfig(obs_keys=["clock"], obs_dims={"clock": 1}, action_dim=1, To=1, Tp=8, Ta=4, prefix=prefix,
                       net=NetConfig(type="mlp", hidden=64, depth=2, time_dim=16),
                       process=ProcessConfig(type="flow", sampler="euler", steps=8))
    pol = ChunkPolicy(cfg, WindowDataset(demos, ["clock"], 1, 8).fit_normalizer())
    opt = torch.optim.Adam(pol.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        c = torch.randint(0, 12, (128,), generator=g).float()
        s = torch.randint(0, 2, (128,), generator=g).float() * 2 - 1
        acts = s[:, None, None] * (c[:, None, None] + 1 + torch.arange(8.0)[None, :, None]) / 20
        loss = pol.loss({"clock": (c / 20)[:, None, None]}, acts, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return pol.eval()


def _continuation_agreement(pol, planner_cfg, sign: float, d: int = 2, B: int = 64) -> float:
    """Share of chunks that continue a committed prefix of mode ``sign`` in that mode (clock 6: the chunk planned
    4 steps ago is being executed and the next one starts where its entry 4 is)."""
    c = 6.0
    g = torch.Generator().manual_seed(7)
    prev_env = sign * (c - 4 + 1 + torch.arange(8.0)) / 20
    prev = pol.normalizer.action.normalize(prev_env.view(1, 8, 1).expand(B, -1, -1).clone())
    planner = ChunkPlanner(pol, planner_cfg)
    new = planner.plan({"clock": torch.full((B, 1, 1), c / 20)}, torch.randn(B, 1, 8, 1, generator=g), prev, 4)
    assert torch.equal(new[:, :d], prev[:, 4:4 + d]) or planner_cfg.guidance != "trained"
    cont = pol.normalizer.action.unnormalize(new)[:, d:, 0]
    return float((torch.sign(cont).mean(1) == sign).float().mean())


def test_a_policy_trained_with_committed_prefixes_continues_the_mode_it_is_in():
    trained, plain = _ramp_policy(prefix=3), _ramp_policy(prefix=0)
    rtc = AsyncConfig(strategy="rtc", delay=2, guidance="trained")
    for sign in (1.0, -1.0):
        assert _continuation_agreement(trained, rtc, sign) >= 0.95
    # the same task without the prefix in training: the new chunk picks its mode at random
    naive = AsyncConfig(strategy="naive", delay=2)
    assert min(_continuation_agreement(plain, naive, s) for s in (1.0, -1.0)) < 0.8
    # a call without committed actions is an ordinary policy call (both modes still come out)
    chunks = trained.sample_normalized(trained.encode({"clock": torch.full((64, 1, 1), 0.3)}),
                                       torch.randn(64, 8, 1, generator=torch.Generator().manual_seed(3)))
    signs = torch.sign(trained.normalizer.action.unnormalize(chunks)[:, :, 0].mean(1))
    assert 0.1 < float((signs > 0).float().mean()) < 0.9


def test_trained_guidance_needs_a_policy_trained_with_enough_committed_actions(flow_policy, tmp_path):
    with pytest.raises(ConfigError, match="policy.prefix"):
        ChunkPlanner(flow_policy, AsyncConfig(strategy="rtc", delay=2, guidance="trained"))
    pol = _ramp_policy(prefix=2, steps=1)
    with pytest.raises(ConfigError, match="policy.prefix"):
        ChunkPlanner(pol, AsyncConfig(strategy="rtc", delay=3, guidance="trained", horizon=4))
    from dpolicy.policy import load_policy

    pol.save(tmp_path / "p")
    back = load_policy(tmp_path / "p")
    assert back.cfg.prefix == 2
    cond = back.encode({"clock": torch.zeros(2, 1, 1)})
    x = torch.randn(2, 8, 1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(back.sample_normalized(cond, x), pol.sample_normalized(cond, x))
    with pytest.raises(ConfigError, match="at most policy.prefix=2"):
        back.with_prefix(cond, torch.zeros(2, 3, 1), 3)


class ClockAhead:
    """A forward model of the clock: each committed action advances it by one; records what it was given."""

    def __init__(self):
        self.given = []

    def check_policy(self, policy):
        pass

    def roll(self, window, committed):
        self.given.append(committed[:, :, 0].clone())
        return {"clock": window["clock"] + committed.shape[1]}


@pytest.mark.parametrize("strategy", ["naive", "bid"])
@pytest.mark.parametrize("delay", [1, 2, 3])
def test_a_chunk_planned_from_the_predicted_observation_takes_over_at_its_own_first_entry(strategy, delay):
    ahead = ClockAhead()
    ex = AsyncChunker(ClockPolicy(Ta=3), AsyncConfig(strategy=strategy, delay=delay, candidates=3), batch_size=2,
                      predictor=ahead)
    ex.reset()
    played = [ex.step({"clock": np.full((2, 1), t, np.float32)})[:, 0].copy() for t in range(20)]
    np.testing.assert_allclose(np.array(played), np.arange(20)[:, None].repeat(2, 1), rtol=0, atol=1e-4)
    s = max(3, delay)
    # every inference after the first was given the actions the robot executes while it computes: t0 .. t0 + d - 1
    starts = list(range(s, 20, s))
    assert len(ahead.given) == len(starts)
    for t0, got in zip(starts, ahead.given):
        np.testing.assert_allclose(got.numpy(), np.arange(t0, t0 + delay)[None].repeat(2, 0), atol=1e-4)


def test_forward_model_fits_learns_rolls_and_round_trips(tmp_path):
    from dpolicy.data import Demo
    from dpolicy.deploy.forward import ForwardModel, fit_forward_model
    from dpolicy.errors import CheckpointError

    rng = np.random.default_rng(0)
    demos = []
    for _ in range(20):  # a point mass: position += 0.1 * action, a constant goal
        a = rng.uniform(-1, 1, (40, 2)).astype(np.float32)
        pos = np.cumsum(np.vstack([rng.uniform(-1, 1, (1, 2)), 0.1 * a[:-1]]), 0).astype(np.float32)
        demos.append(Demo(obs={"pos": pos, "goal": np.ones((40, 1), np.float32)}, actions=a, states=np.zeros((40, 1))))
    model, st = fit_forward_model(demos, ["pos", "goal"], steps=1500, seed=0)
    assert st["transitions"] == 20 * 39 and max(st["val_rmse"][:2]) < 0.2 * max(st["val_delta_std"][:2])
    window = {"pos": torch.tensor([[[0.0, 0.0], [0.1, 0.2]]]), "goal": torch.ones(1, 2, 1)}
    committed = torch.tensor([[[1.0, 0.0], [0.0, -1.0], [1.0, 1.0]]])
    out = model.roll(window, committed)
    assert out["pos"].shape == (1, 2, 2)  # the last To = 2 frames: two predicted ones
    np.testing.assert_allclose(out["pos"][0, -1].numpy(), [0.1 + 0.2, 0.2 + 0.0], atol=0.03)
    np.testing.assert_allclose(out["pos"][0, 0].numpy(), [0.1 + 0.1, 0.2 - 0.1], atol=0.03)
    np.testing.assert_allclose(out["goal"].numpy(), 1.0, atol=0.02)
    model.save(tmp_path / "fm")
    back = ForwardModel.load(tmp_path / "fm")
    torch.testing.assert_close(back.roll(window, committed)["pos"], out["pos"])
    (tmp_path / "fm" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        ForwardModel.load(tmp_path / "fm")
    with pytest.raises(CheckpointError, match="not a forward model directory"):
        ForwardModel.load(tmp_path)
    with pytest.raises(ConfigError, match="predicts"):
        back.check_policy(SimpleNamespace(image_shapes={}, obs_keys=["pos", "vel"], obs_dims={"pos": 2, "vel": 3}, action_dim=2))
    with pytest.raises(ConfigError, match="cameras"):
        back.check_policy(SimpleNamespace(image_shapes={"cam": (8, 8, 3)}, obs_keys=["cam"], obs_dims={}, action_dim=2))


def test_recorded_policy_rollouts_replay_in_the_simulator():
    from dpolicy.deploy.forward import record_rollouts
    from dpolicy.policy import load_policy
    from dpolicy.tasks import env_factory_for

    pol = load_policy(str(Path(__file__).resolve().parents[1] / "checkpoints" / "push_flow"), "cpu")
    env_fn = env_factory_for(pol)
    demos = record_rollouts(pol, env_fn, 2, seed=600000)
    assert len(demos) == 2 and set(demos[0].obs) == set(pol.obs_keys)
    env = env_fn()
    for ep, demo in enumerate(demos):
        n = len(demo.actions)
        assert n > 1 and demo.actions.shape == (n, pol.action_dim)
        assert all(v.shape[0] == n for v in demo.obs.values())
        # the recorded observation of every step is what the environment shows after the recorded actions
        obs, _ = env.reset(seed=600000 + ep)
        for t in range(n):
            for k in pol.obs_keys:
                np.testing.assert_allclose(demo.obs[k][t], obs[k], atol=1e-6)
            obs, *_ = env.step(demo.actions[t])
    env.close()


def test_deploy_fits_the_forward_model_on_demos_and_the_policys_own_episodes(tmp_path, monkeypatch):
    from dpolicy.cli import deploy
    from dpolicy.config import DeployConfig
    from dpolicy.data.collect import collect_demos
    from dpolicy.deploy import forward
    from dpolicy.policy import load_policy
    from dpolicy.tasks import env_factory_for

    ck = str(Path(__file__).resolve().parents[1] / "checkpoints" / "push_flow")
    with pytest.raises(ConfigError, match="predict_rollouts=3 .* needs predict="):
        DeployConfig(checkpoint=ck, mode="async", predict_rollouts=3)
    pol = load_policy(ck, "cpu")
    env_fn = env_factory_for(pol)
    demos = tmp_path / "demos.hdf5"
    collect_demos("push", 2, demos, seed=500000, progress=False)
    seen = []
    fit = forward.fit_forward_model

    def quick_fit(data, keys, **kw):  # the fit itself is tested above; here: what it is given
        seen.append(data)
        return fit(data, keys, steps=20)

    monkeypatch.setattr(forward, "fit_forward_model", quick_fit)
    c = DeployConfig(checkpoint=ck, mode="async", predict=str(demos), predict_rollouts=1, predict_seed=600000)
    model = deploy._predictor(c, pol, env_fn, tmp_path / "run")
    assert (tmp_path / "run" / "forward_model" / "forward.json").exists() and model.keys == list(pol.obs_keys)
    # two scripted demos, then the policy's own episode, exactly as record_rollouts gives it
    assert len(seen[0]) == 3
    own = forward.record_rollouts(pol, env_fn, 1, seed=600000)[0]
    np.testing.assert_array_equal(seen[0][2].actions, own.actions)
    # a fitted model's directory is used as it is: adding episodes to it is named as the mistake it is
    c = DeployConfig(checkpoint=ck, mode="async", predict=str(tmp_path / "run" / "forward_model"), predict_rollouts=1)
    with pytest.raises(ConfigError, match="fitted forward model"):
        deploy._predictor(c, pol, env_fn, tmp_path / "run2")
