"""DSRL: the noise-action wrapper, the agents' updates on a toy problem with a known optimum, the
steered policy's checkpoint round trip, and the dpolicy-steer loop end to end (tiny sizes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dpolicy.config import NetConfig, PolicyConfig, ProcessConfig
from dpolicy.data.normalizer import DictNormalizer
from dpolicy.errors import CheckpointError, ConfigError
from dpolicy.policy import ChunkPolicy
from dpolicy.policy import load_policy
from dpolicy.rl.agent import Actor, DSRLAgent, DSRLConfig
from dpolicy.rl.noise_env import NoiseActionEnv
from dpolicy.rl.replay import ReplayBuffer
from dpolicy.rl.steered import SteeredPolicy
from dpolicy.tasks import env_args, env_factory


def avoid_base(sampler="ddim", seed=0, horizon=40):
    """An untrained policy with the avoid task's shapes and env_args (enough to exercise the plumbing).
    ``sampler``: ddim | ddpm (diffusion), euler (a flow base) or edm (Heun)."""
    torch.manual_seed(seed)
    process = (ProcessConfig(type="flow", sampler="euler", steps=4) if sampler == "euler" else
               ProcessConfig(type="edm", sampler="heun", steps=4) if sampler == "edm" else
               ProcessConfig(type="diffusion", sampler=sampler, eta=1.0 if sampler == "ddpm" else 0.0, train_steps=20, steps=4))
    cfg = PolicyConfig(obs_keys=["agent_pos", "agent_vel"], obs_dims={"agent_pos": 2, "agent_vel": 2}, action_dim=2,
                       To=2, Tp=8, Ta=4, net=NetConfig(hidden=32, depth=1, time_dim=16), process=process)
    g = torch.Generator().manual_seed(0)
    norm = DictNormalizer.fit({"agent_pos": torch.rand(50, 2, generator=g) * 2 - 1, "agent_vel": torch.rand(50, 2, generator=g)},
                              torch.rand(50, 2, generator=g) * 2 - 1)
    pol = ChunkPolicy(cfg, norm).eval()
    pol.metadata = {"env_args": env_args("avoid", horizon=horizon), "task": "avoid"}
    return pol


# -- the wrapper -----------------------------------------------------------------------------------------------
class CountingEnv:
    """Wraps an env and records every action it executes."""

    def __init__(self, env):
        self.env, self.actions = env, []

    def reset(self, **kw):
        return self.env.reset(**kw)

    def step(self, a):
        self.actions.append(np.array(a))
        return self.env.step(a)

    def close(self):
        self.env.close()


def test_noise_env_spaces_and_chunk_execution():
    base = avoid_base()
    make = env_factory(base.metadata["env_args"])
    envs = []
    env = NoiseActionEnv(base, lambda: envs.append(CountingEnv(make())) or envs[-1], n_envs=3, seed=0, action_magnitude=1.5)
    assert env.noise_dim == base.Tp * base.action_dim == 16 and env.exec_dim == base.Ta * base.action_dim
    state = env.reset()
    assert state.shape == (3, base.cond_dim)
    w = torch.randn(3, env.noise_dim)
    want = base.normalizer.action.unnormalize(env.decode(state, w.clamp(-1.5, 1.5)))[:, :base.Ta]
    st = env.step(state, w)
    assert st.env_steps == 3 * base.Ta and all(len(e.actions) == base.Ta for e in envs)  # Ta actions each, no episode ended
    for i, e in enumerate(envs):  # the executed actions are the first Ta of the base policy's chunk for that noise
        assert np.allclose(np.stack(e.actions), want[i].numpy(), atol=1e-5)
    assert st.executed.shape == (3, env.exec_dim) and st.reward.shape == (3,)
    assert not torch.equal(st.next_state, state)  # the observation history moved on
    with pytest.raises(ConfigError, match="noise action has shape"):
        env.step(st.state, torch.zeros(3, env.noise_dim + 1))
    env.close()


def test_noise_env_stops_a_chunk_when_the_episode_ends_and_resets():
    base = avoid_base(horizon=6)  # an episode of 6 steps: the second chunk of Ta=4 is cut after 2
    env = NoiseActionEnv(base, env_factory(base.metadata["env_args"]), n_envs=2, seed=1)
    state = env.reset()
    st1 = env.step(state, torch.zeros(2, env.noise_dim))
    st2 = env.step(st1.state, torch.zeros(2, env.noise_dim))
    assert st1.env_steps == 8 and st2.env_steps == 4 and st2.done.all()
    assert not torch.equal(st2.state, st2.next_state)  # the next decision starts a fresh episode
    assert (st2.terminated == 0).all()  # a truncation is not a termination: the critic still bootstraps
    env.close()


@pytest.mark.parametrize("sampler", ["ddim", "euler", "edm"])
def test_base_is_a_deterministic_function_of_the_noise_and_ddpm_is_flagged(sampler):
    det, sto = avoid_base(sampler), avoid_base("ddpm")
    make = env_factory(det.metadata["env_args"])
    e_det, e_sto = NoiseActionEnv(det, make, n_envs=2), NoiseActionEnv(sto, make, n_envs=2)
    assert e_det.deterministic and not e_sto.deterministic
    s = e_det.reset()
    w = torch.randn(2, e_det.noise_dim)
    assert torch.equal(e_det.decode(s, w), e_det.decode(s, w))
    assert not torch.equal(e_det.decode(s, w), e_det.decode(s, -w))
    assert not torch.allclose(e_sto.decode(s, w), e_sto.decode(s, w))  # DDPM draws fresh noise inside the chain


# -- agents on a toy problem ------------------------------------------------------------------------------------
TARGET = torch.tensor([0.3, -0.2])


def toy_batch(n, g, decode=None):
    """A one-step bandit: state in R^2, noise w in [-1, 1]^2, reward -|a - TARGET|^2 with a = decode(w)."""
    s = torch.rand(n, 2, generator=g)
    w = torch.rand(n, 2, generator=g) * 2 - 1
    a = decode(s, w) if decode is not None else w
    r = -((a - TARGET) ** 2).sum(-1)
    return {"state": s, "next_state": s, "noise": w, "executed": a, "reward": r, "terminated": torch.ones(n)}


@pytest.mark.parametrize("algo", ["sac", "na"])
def test_agent_updates_reduce_critic_loss_and_find_the_optimum(algo):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    decode = (lambda s, w: 0.5 * w) if algo == "na" else None  # NA: the "base" halves the noise
    cfg = DSRLConfig(algo=algo, hidden=64, layers=2, lr=3e-3, batch_size=128, gamma=0.0, init_alpha=1e-3,
                     target_entropy=-4.0, action_magnitude=1.0)
    agent = DSRLAgent(cfg, state_dim=2, noise_dim=2, exec_dim=2, decode=decode)
    buf = ReplayBuffer(4096, {"state": (2,), "next_state": (2,), "noise": (2,), "executed": (2,), "reward": (), "terminated": ()})
    buf.add(**toy_batch(4096, g, decode))
    first = [agent.update(buf.sample(128))["critic_loss"] for _ in range(10)]
    for _ in range(800):
        stats = agent.update(buf.sample(128))
    last = [agent.update(buf.sample(128))["critic_loss"] for _ in range(10)]
    assert np.mean(last) < 0.2 * np.mean(first)
    s = torch.rand(64, 2, generator=g)
    w = agent.act(s, deterministic=True)
    best = TARGET * (2.0 if algo == "na" else 1.0)  # NA's optimum in noise space undoes the base's halving
    assert (w - best).abs().max() < 0.15, (w.mean(0), best)
    if algo == "na":
        assert "noise_critic_loss" in stats


def test_na_needs_the_base_and_config_is_checked():
    with pytest.raises(ConfigError, match="decode"):
        DSRLAgent(DSRLConfig(algo="na"), 2, 2, 2, decode=None)
    with pytest.raises(ConfigError, match="dsrl.algo"):
        DSRLConfig(algo="ppo")
    with pytest.raises(ConfigError, match="dsrl.utd"):
        DSRLConfig(utd=0)


def test_actor_log_prob_is_a_density_on_the_box():
    """The tanh-Gaussian log-density with the b scaling integrates to ~1 over (-b, b) in one dimension."""
    torch.manual_seed(0)
    actor = Actor(1, 1, 8, 1, b=1.5)
    s = torch.zeros(200000, 1)
    with torch.no_grad():
        w, logp = actor(s)
    assert w.abs().max() <= 1.5
    # importance check: E_w[1 / p(w)] over the box equals its length 3
    est = (1.0 / logp.exp()).mean()
    assert abs(float(est) - 3.0) < 0.3


def _flat_buffer(n=2048, reward=0.0, gamma_state=True):
    g = torch.Generator().manual_seed(1)
    s = torch.rand(n, 2, generator=g)
    w = torch.rand(n, 2, generator=g) * 2 - 1
    buf = ReplayBuffer(n, {"state": (2,), "next_state": (2,), "noise": (2,), "executed": (2,), "reward": (), "terminated": ()})
    buf.add(state=s, next_state=s, noise=w, executed=w, reward=torch.full((n,), reward), terminated=torch.zeros(n))
    return buf


@pytest.mark.parametrize("backup", [False, True])
def test_entropy_enters_the_td_target_only_when_asked(backup):
    """Zero reward, no termination: Q is 0 without the bonus in the backup, and follows the bonus with it."""
    torch.manual_seed(0)
    cfg = DSRLConfig(algo="sac", hidden=32, layers=2, lr=3e-3, batch_size=128, gamma=0.5, init_alpha=0.5,
                     backup_entropy=backup, action_magnitude=1.0)
    agent = DSRLAgent(cfg, 2, 2, 2)
    agent.opt_alpha.param_groups[0]["lr"] = 0.0  # hold alpha fixed so the soft value has a fixed point
    buf = _flat_buffer()
    for _ in range(600):
        stats = agent.update(buf.sample(128))
    s = torch.rand(256, 2)
    with torch.no_grad():
        q = torch.min(*agent.q(s, agent.act(s))).mean()
    if backup:  # soft value: gamma / (1 - gamma) * alpha * entropy, far from 0 for entropy ~1 nat per dim
        expect = 0.5 / 0.5 * 0.5 * stats["entropy"]
        assert abs(float(q) - expect) < 0.35 * abs(expect) + 0.05, (float(q), expect)
    else:
        assert abs(float(q)) < 0.05


def test_q_bounds_clip_the_td_targets():
    torch.manual_seed(0)
    cfg = DSRLConfig(algo="sac", hidden=32, layers=2, lr=3e-3, batch_size=128, gamma=0.9, q_bounds=[0, 1], action_magnitude=1.0)
    agent = DSRLAgent(cfg, 2, 2, 2)
    buf = _flat_buffer(reward=0.5)  # unbounded, Q would climb to 0.5 / (1 - 0.9) = 5
    for _ in range(800):
        agent.update(buf.sample(128))
    s = torch.rand(256, 2)
    with torch.no_grad():
        q = torch.min(*agent.q(s, agent.act(s)))
    assert float(q.max()) < 1.1 and float(q.mean()) > 0.8
    with pytest.raises(ConfigError, match="q_bounds"):
        DSRLConfig(q_bounds=[1, 0])


def test_prior_regularizer_holds_the_actor_near_the_noise_prior():
    """With nothing to gain (flat reward) the prior-regularized actor stays a spread-out, centred noise
    distribution near N(0, I), its KL held near the target."""
    torch.manual_seed(0)
    cfg = DSRLConfig(algo="sac", hidden=32, layers=2, lr=3e-3, batch_size=128, gamma=0.0, regularizer="prior",
                     target_kl=0.3, init_alpha=0.1)
    agent = DSRLAgent(cfg, 2, 2, 2)
    buf = _flat_buffer()
    for _ in range(1000):
        stats = agent.update(buf.sample(128))
    s = torch.rand(4096, 2)
    with torch.no_grad():
        w, logp = agent.actor(s)
    assert w.mean(0).abs().max() < 0.3
    assert 0.6 < float(w.std(0).min()) and float(w.std(0).max()) < 1.2
    assert stats["regularizer"] / 2 < 0.3 + 0.1  # per-dimension KL held at (or under) the target
    with pytest.raises(ConfigError, match="regularizer"):
        DSRLConfig(regularizer="kl")


# -- the steered policy ------------------------------------------------------------------------------------------
def test_steered_checkpoint_round_trip(tmp_path):
    base = avoid_base()
    base.save(tmp_path / "base")
    torch.manual_seed(3)
    actor = Actor(base.cond_dim, base.Tp * base.action_dim, 16, 2, 1.5).eval()
    steered = SteeredPolicy(base, actor, str(tmp_path / "base"))
    steered.save(tmp_path / "steered")
    loaded = load_policy(tmp_path / "steered")
    assert isinstance(loaded, SteeredPolicy)
    g = torch.Generator().manual_seed(0)
    obs = {"agent_pos": torch.randn(5, 2, 2, generator=g), "agent_vel": torch.randn(5, 2, 2, generator=g)}
    assert torch.allclose(loaded.act(obs), steered.act(obs), atol=1e-6)
    # the actor chooses the noise: the chunk differs from the base's with zero noise
    assert not torch.allclose(steered.act(obs), base.act(obs, noise=torch.zeros(5, base.Tp, base.action_dim)))
    # a moved pair (steered dir next to its base) still loads: the base is stored by relative path
    (tmp_path / "moved").mkdir()
    (tmp_path / "base").rename(tmp_path / "moved" / "base")
    (tmp_path / "steered").rename(tmp_path / "moved" / "steered")
    assert torch.allclose(load_policy(tmp_path / "moved" / "steered").act(obs), steered.act(obs), atol=1e-6)


def test_sampling_steered_policy_is_reparameterized_by_the_callers_noise(tmp_path):
    base = avoid_base()
    base.save(tmp_path / "base")
    torch.manual_seed(4)
    actor = Actor(base.cond_dim, base.Tp * base.action_dim, 16, 2, 1.5).eval()
    steered = SteeredPolicy(base, actor, str(tmp_path / "base"), sample=True)
    steered.save(tmp_path / "steered")
    loaded = load_policy(tmp_path / "steered")
    assert loaded.sample
    g = torch.Generator().manual_seed(0)
    obs = {"agent_pos": torch.randn(5, 2, 2, generator=g), "agent_vel": torch.randn(5, 2, 2, generator=g)}
    n1, n2 = torch.randn(2, 5, base.Tp, base.action_dim, generator=g)
    a1 = steered.act(obs, noise=n1)
    assert torch.allclose(loaded.act(obs, noise=n1), a1, atol=1e-6)  # same noise, same chunk (and the flag survives)
    assert not torch.allclose(steered.act(obs, noise=n2), a1)       # the caller's noise matters
    # the actor's draw for that noise is what the base denoises
    cond = base.encode(obs)
    w, _ = actor(cond, eps=n1.reshape(5, -1))
    assert torch.allclose(a1, base.act(obs, noise=w.reshape(5, base.Tp, base.action_dim)), atol=1e-6)
    # the mean-noise policy ignores the caller's noise
    det = SteeredPolicy(base, actor, str(tmp_path / "base"))
    assert torch.allclose(det.act(obs, noise=n1), det.act(obs, noise=n2))


@pytest.mark.parametrize("sample", [False, True])
def test_steered_policy_runs_in_the_deployment_controller(tmp_path, sample):
    """The chunked controller executes the steered policy's chunk (the actor's noise, not the controller's)."""
    from dpolicy.deploy.controller import Controller

    base = avoid_base("euler")
    torch.manual_seed(5)
    steered = SteeredPolicy(base, Actor(base.cond_dim, base.Tp * base.action_dim, 16, 2, 1.5).eval(), None, sample=sample)
    env = env_factory(base.metadata["env_args"])()
    obs, _ = env.reset(seed=3)
    ctrl = Controller(steered, "chunked")
    ctrl.reset(seed=0)
    first = ctrl.step(obs)
    hist = {k: torch.as_tensor(np.repeat(np.asarray(obs[k], np.float32)[None], base.To, 0))[None] for k in base.obs_keys}
    if sample:  # the controller's noise reparameterizes the actor: a different seed, a different chunk
        ctrl2 = Controller(steered, "chunked")
        ctrl2.reset(seed=1)
        assert not np.allclose(ctrl2.step(obs), first)
    else:
        assert np.allclose(first, steered.act(hist)[0, 0].numpy(), atol=1e-5)
    env.close()


def test_steered_checkpoint_errors_name_the_culprit(tmp_path):
    base = avoid_base()
    base.save(tmp_path / "base")
    actor = Actor(base.cond_dim, base.Tp * base.action_dim, 16, 2, 1.5)
    SteeredPolicy(base, actor, str(tmp_path / "base")).save(tmp_path / "s")
    (tmp_path / "s" / "actor.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="actor.safetensors"):
        load_policy(tmp_path / "s")
    SteeredPolicy(base, actor, str(tmp_path / "base")).save(tmp_path / "t")
    import shutil

    shutil.rmtree(tmp_path / "base")
    with pytest.raises(CheckpointError, match="base checkpoint"):
        load_policy(tmp_path / "t")


# -- the loop end to end -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ["na", "sac"])
def test_steer_loop_writes_metrics_curve_and_a_loadable_policy(tmp_path, algo):
    from dpolicy.rl.train import SteerConfig, steer

    base = avoid_base(horizon=20)
    base.save(tmp_path / "base")
    cfg = SteerConfig(base=str(tmp_path / "base"), dsrl=DSRLConfig(algo=algo, hidden=16, layers=1, batch_size=16, utd=1),
                      env_steps=240, n_envs=2, init_steps=40, eval_every=120, eval_episodes=4, progress=False)
    m = steer(cfg, tmp_path / "run", log=lambda *_: None)
    assert m["updates"] > 0 and m["env_steps"] >= 240 and len(m["history"]) == 3
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["algo"] == algo
    assert (tmp_path / "run" / "steering_curve.png").stat().st_size > 0
    pol = load_policy(tmp_path / "run" / "steered")
    assert isinstance(pol, SteeredPolicy) and pol.actor.state_dict().keys() == SteeredPolicy(base, Actor(
        base.cond_dim, 16, 16, 1, 1.5)).actor.state_dict().keys()


def test_steer_rejects_a_missing_base(tmp_path):
    from dpolicy.rl.train import SteerConfig

    with pytest.raises(ConfigError, match="base"):
        SteerConfig(base="")


# -- noise headroom ------------------------------------------------------------------------------------------------
class ThresholdEnv:
    """One-step episodes: success iff the first action coordinate exceeds the start state's threshold."""

    thresholds = (10.0, -10.0, 0.0)  # never, always, depends on the noise

    def __init__(self):
        self.first = []

    def reset(self, seed=None):
        self.s = (seed - 500000) % len(self.thresholds)
        return {"agent_pos": np.full(2, 0.1 * self.s, np.float32), "agent_vel": np.zeros(2, np.float32)}, {}

    def step(self, a):
        self.first.append((self.s, float(a[0])))
        ok = float(a[0]) > self.thresholds[self.s]
        return self.reset(500000 + self.s)[0], float(ok), True, False, {"is_success": ok}

    def close(self):
        pass


def test_noise_headroom_counts_per_state_success_over_noises():
    from dpolicy.rl.headroom import noise_headroom

    env = ThresholdEnv()
    r = noise_headroom(avoid_base(), lambda: env, n_states=3, n_noises=16)
    assert r["per_state"][0] == 0.0 and r["per_state"][1] == 1.0
    mixed_rate = np.mean([a > 0 for s, a in env.first if s == 2])  # what the env saw from state 2
    assert r["per_state"][2] == pytest.approx(mixed_rate) and len(env.first) == 3 * 16
    assert 0 < mixed_rate < 1  # the noise moves the untrained base's first action across 0
    assert r["never"] == pytest.approx(1 / 3) and r["always"] == pytest.approx(1 / 3) and r["mixed"] == pytest.approx(1 / 3)
    assert r["best_noise_per_state"] == pytest.approx(2 / 3) and r["success"] == pytest.approx((1 + mixed_rate) / 3)
    assert noise_headroom(avoid_base(), ThresholdEnv, n_states=3, n_noises=16)["per_state"] == r["per_state"]  # seeded
    with pytest.raises(ConfigError, match="n_noises"):
        noise_headroom(avoid_base(), ThresholdEnv, n_noises=1)


class SignEnv:
    """One chunk per episode: succeeds (reward 1) iff the first action's x is positive; avoid-shaped spaces."""

    def __init__(self):
        import gymnasium as gym

        self.observation_space = gym.spaces.Dict({"agent_pos": gym.spaces.Box(-1, 1, (2,)), "agent_vel": gym.spaces.Box(-1, 1, (2,))})
        self.action_space = gym.spaces.Box(-1, 1, (2,))
        self.rng = np.random.default_rng(0)

    def reset(self, seed=None, options=None):
        self.rng, self.t = np.random.default_rng(seed), 0
        return {"agent_pos": self.rng.uniform(-1, 1, 2).astype(np.float32), "agent_vel": np.zeros(2, np.float32)}, {}

    def step(self, a):
        self.t += 1
        win = self.t == 1 and float(a[0]) > 0
        obs = {"agent_pos": np.zeros(2, np.float32), "agent_vel": np.zeros(2, np.float32)}
        return obs, float(win), win, self.t >= 4, {"is_success": win}

    def close(self):
        pass


def test_chunk_signal_finds_value_in_a_decisive_chunk():
    """Success is decided by the first chunk's noise alone: Q(s, a) explains the return and V(s) cannot,
    and picking the best of k noises by Q succeeds where the worst fails."""
    from dpolicy.rl.headroom import chunk_signal

    base = avoid_base()
    r = chunk_signal(base, SignEnv, env_steps=2400, n_envs=4, k=8, episodes=30, hidden=32, iters=1500)
    assert r["mse_q"] < 0.5 * r["mse_v"] and r["q_gain"] > 0.4
    assert 0.2 < r["base_success"] < 0.8
    assert r["best_of_k_success"] >= 0.9 and r["worst_of_k_success"] <= 0.1
    with pytest.raises(ConfigError, match="k >= 2"):
        chunk_signal(base, SignEnv, k=1)


def test_env_factory_for_a_checkpoint_uses_its_env_args_and_overrides():
    from dpolicy.tasks import env_factory_for

    base = avoid_base(horizon=40)
    env = env_factory_for(base, horizon=7)()
    env.reset(seed=0)
    steps, done = 0, False
    while not done:
        _, _, term, trunc, _ = env.step(np.zeros(2, np.float32))
        steps, done = steps + 1, term or trunc
    assert steps == 7
    env.close()
    base.metadata = {}
    with pytest.raises(ConfigError, match="env_args"):
        env_factory_for(base)
