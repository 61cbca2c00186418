"""Fine-tuning through the denoising chain: the chain's likelihood, a bandit with a known optimum, checkpoints."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from conftest import make_demos, tiny_policy
from dpolicy.errors import ConfigError
from dpolicy.rl.finetune import DenoisingChain, FinetuneConfig, Finetuner, group_advantages, gae, Batch, collect

TARGET = np.array([0.6, -0.4, 0.2], np.float32)


class Bandit(gym.Env):
    """One decision: the first action of the chunk is scored by -|a - TARGET|^2 and the episode ends."""

    def __init__(self):
        self.observation_space = spaces.Dict({"pos": spaces.Box(-10, 10, (2,), np.float32),
                                              "vel": spaces.Box(-10, 10, (3,), np.float32)})
        self.action_space = spaces.Box(-1, 1, (3,), np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        return {"pos": np.zeros(2, np.float32), "vel": np.zeros(3, np.float32)}, {}

    def step(self, a):
        err = float(((np.asarray(a) - TARGET) ** 2).sum())
        return self.reset()[0], -err, True, False, {"is_success": err < 0.05}


@pytest.mark.parametrize("process,sampler", [("flow", "euler"), ("diffusion", "ddim")])
def test_chain_log_probabilities_are_the_gaussians_they_were_drawn_from(process, sampler):
    pol = tiny_policy(process=process, sampler=sampler, steps=4, seed=0).eval()
    chain = DenoisingChain(pol, ft_steps=2, std=0.3)
    g = torch.Generator().manual_seed(0)
    cond = pol.encode({"pos": torch.zeros(1, 2, 2), "vel": torch.zeros(1, 2, 3)}).expand(4000, -1)
    x, lat, logp = chain.sample(cond, torch.randn(4000, 8, 3, generator=g), [g] * 4000)
    assert lat.shape == (4000, 3, 8, 3) and torch.equal(x, lat[:, -1])
    again, mu = chain.log_prob(cond, lat)
    torch.testing.assert_close(again, logp, rtol=1e-4, atol=1e-3)  # the recorded likelihood is the recomputed one
    # Monte Carlo: the draws around each mean have the chain's std, and the mean log-density is -d/2 (constants
    # dropped), d = the entries a step explores: every one before the last step, the Ta executed actions at it
    resid = (lat[:, 1:] - mu) / 0.3
    explored = torch.cat([resid[:, 0].flatten(), resid[:, 1, :pol.Ta].flatten()])
    assert explored.std().item() == pytest.approx(1.0, abs=0.02) and explored.mean().abs().item() < 0.02
    assert torch.equal(lat[:, 2, pol.Ta:], mu[:, 1, pol.Ta:])  # actions never executed are not explored
    assert logp[:, 0].mean().item() == pytest.approx(-0.5 * 8 * 3, rel=0.03)
    assert logp[:, 1].mean().item() == pytest.approx(-0.5 * pol.Ta * 3, rel=0.03)
    other = tiny_policy(process=process, sampler=sampler, steps=4, seed=5).eval()  # another network: lower likelihood
    assert chain.log_prob(cond, lat, other)[0].mean() < logp.mean() - 1


def test_settings_are_checked():
    for kw, culprit in [(dict(algo="trpo"), "algo"), (dict(group=1, algo="grpo"), "group"), (dict(std=0), "std"),
                        (dict(episodes_per_iter=10, group=4, algo="gspo"), "multiple"), (dict(gamma=1.5), "gamma"),
                        (dict(env_steps=0), "env_steps"), (dict(kl_coef=-1), "kl_coef"),
                        (dict(algo="ppo", branch=True), "branch"), (dict(algo="grpo", branch="yes"), "branch")]:
        with pytest.raises(ConfigError, match=culprit):
            FinetuneConfig(base="x", **kw)
    with pytest.raises(ConfigError, match="base"):
        FinetuneConfig()
    with pytest.raises(ConfigError, match="denoising chain"):
        DenoisingChain(tiny_policy("mlp", "regression", "direct"))


def test_advantages():
    b = Batch(cond=torch.zeros(5, 1), latents=torch.zeros(5, 2, 1, 1), logp=torch.zeros(5, 1),
              reward=np.array([0.0, 1.0, 0.0, 0.0, 2.0]), discount=np.array([0.5] * 5), episode=np.array([0, 0, 1, 1, 1]),
              last=np.array([0, 1, 0, 0, 1], bool), terminated=np.array([0, 1, 0, 0, 0], bool), final_cond=torch.zeros(2, 1),
              returns=np.array([1.0, 3.0]), successes=np.array([True, False]), env_steps=9)
    adv, tgt = gae(b, np.zeros(5), np.array([0.0, 4.0]), lam=1.0)
    # episode 0 terminated: 0 + 0.5 * 1; episode 1 truncated: bootstraps 4 from its final observation
    np.testing.assert_allclose(tgt, [0.5, 1.0, 0.5 * 0.5 * (2 + 0.5 * 4), 0.5 * (2 + 0.5 * 4), 2 + 0.5 * 4])
    np.testing.assert_allclose(group_advantages(b, 2), [-1, -1, 1, 1, 1], atol=1e-5)


def _bandit_policy():
    """A tiny flow policy and its mean squared error to the bandit's target on fixed noise."""
    torch.manual_seed(0)
    pol = tiny_policy(process="flow", sampler="euler", steps=3, seed=2, demos=make_demos(seed=3)).eval()
    obs = {"pos": torch.zeros(64, 2, 2), "vel": torch.zeros(64, 2, 3)}
    noise = torch.randn(64, 8, 3, generator=torch.Generator().manual_seed(9))

    def err():
        with torch.no_grad():
            return float(((pol.act(obs, noise=noise)[:, 0] - torch.as_tensor(TARGET)) ** 2).sum(-1).mean())

    return pol, err


@pytest.mark.parametrize("algo", ["ppo", "grpo", "gspo", "awm", "awm-exp"])
def test_each_algorithm_moves_a_bandit_towards_its_optimum(algo):
    pol, err = _bandit_policy()
    algo, _, weights = algo.partition("-")
    cfg = FinetuneConfig(base="unused", algo=algo, episodes_per_iter=32, group=8, std=0.3, lr=3e-3, epochs=16,
                         batch_size=32, gamma=1.0, seed=1, awm_weights=weights or "linear")
    tuner = Finetuner(pol, Bandit, cfg)
    before = err()
    for _ in range(40):
        tuner.iteration()
    tuner.close()
    # 1,280 one-step episodes: every method at least halves the error; the likelihood-ratio ones get much closer
    assert err() < (0.3 if algo in ("ppo", "grpo") else 0.5) * before, (before, err())


def test_awm_with_signed_advantages_leaves_the_policy_alone_where_returns_tie():
    """Rewards that no action changes give zero advantages: the paper's signed weights have nothing to push, while
    positive exp weights still imitate the policy's own noisy chunks and move it."""
    changed = {}
    for weights in ("linear", "exp"):
        pol = tiny_policy(process="flow", sampler="euler", steps=3, seed=2).eval()
        before = {k: v.clone() for k, v in pol.state_dict().items()}
        cfg = FinetuneConfig(base="unused", algo="awm", awm_weights=weights, episodes_per_iter=16, group=8, std=0.3,
                             lr=3e-3, epochs=8, batch_size=32, seed=1)
        tuner = Finetuner(pol, lambda: Walk(moves=False), cfg)
        for _ in range(4):
            tuner.iteration()
        tuner.close()
        changed[weights] = max(float((pol.state_dict()[k] - v).abs().max()) for k, v in before.items())
    assert changed["linear"] == 0.0 and changed["exp"] > 1e-3


@pytest.mark.parametrize("process,sampler", [("diffusion", "ddim"), ("flow", "euler"), ("edm", "heun")])
def test_awm_matching_ratio_is_one_for_the_same_policy_and_moves_with_the_weights(process, sampler):
    pol = tiny_policy(process=process, sampler=sampler, steps=4, seed=0).eval()
    tuner = Finetuner(pol, Bandit, FinetuneConfig(base="unused", algo="awm", episodes_per_iter=8, group=8, awm_draws=3))
    cond = pol.encode({"pos": torch.zeros(5, 2, 2), "vel": torch.zeros(5, 2, 3)})
    x0 = torch.randn(5, 8, 3, generator=torch.Generator().manual_seed(1))
    old = tiny_policy(process=process, sampler=sampler, steps=4, seed=0).eval()
    old.load_state_dict(pol.state_dict())
    r = tuner.matching_ratio(pol, old, cond, x0, seed=3)
    assert r.shape == (15,) and torch.allclose(r, torch.ones(15))  # the same draws for both: exactly the same loss
    other = tiny_policy(process=process, sampler=sampler, steps=4, seed=7).eval()
    assert not torch.allclose(tuner.matching_ratio(other, old, cond, x0, seed=3), torch.ones(15), atol=1e-3)
    tuner.close()
    with pytest.raises(ConfigError, match="awm_weights"):
        FinetuneConfig(base="x", algo="awm", awm_weights="softmax")
    with pytest.raises(ConfigError, match="awm_clip"):
        FinetuneConfig(base="x", algo="awm", awm_clip=0)


class Walk(gym.Env):
    """12 steps; the position integrates the first two action entries (``moves``) or stays at 0; reward -|pos|."""

    def __init__(self, moves=True):
        self.observation_space = Bandit().observation_space
        self.action_space = spaces.Box(-1, 1, (3,), np.float32)
        self.moves = moves

    def _obs(self):
        return {"pos": self.pos.astype(np.float32), "vel": np.zeros(3, np.float32)}

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.pos, self.t = self.np_random.uniform(-1, 1, 2), 0
        return self._obs(), {}

    def step(self, a):
        self.pos = self.pos + 0.1 * np.asarray(a[:2]) * self.moves
        self.t += 1
        return self._obs(), -float(np.abs(self.pos).sum()), False, self.t >= 12, {"is_success": False}

    def get_state(self):
        return np.array([*self.pos, self.t])

    def set_state(self, state):
        self.pos, self.t = np.array(state[:2]), int(state[2])


@pytest.mark.parametrize("common", [True, False])
def test_branching_groups_share_the_trunk_and_sample_their_own_chunk_at_the_branch(common):
    pol = tiny_policy(process="flow", sampler="euler", steps=3, seed=2).eval()
    chain = DenoisingChain(pol, ft_steps=1, std=0.3)
    n, g = 8, 4
    at, leader = np.repeat([1, 2], g), np.repeat([0, g], g)
    for moves in (True, False):
        b = collect(pol, chain, [Walk(moves) for _ in range(n)], [5] * g + [7] * g, 0.99, 0.0, np.random.default_rng(0),
                    at, leader, common)
        assert b.env_steps == 12 * n and b.branch.sum() == n  # three decisions per episode, one of them the branch
        dec = {e: np.nonzero(b.episode == e)[0] for e in range(n)}
        assert all(b.branch[dec[e][at[e]]] for e in range(n))
        for grp in (range(g), range(g, n)):
            first = grp[0]
            for k in range(at[first] + 1):  # the members' observations are the leader's up to the branch
                assert all(torch.equal(b.cond[dec[e][k]], b.cond[dec[first][k]]) for e in grp)
            chunks = [b.latents[dec[e][at[first]], -1, :pol.Ta] for e in grp]  # each samples its own chunk there
            assert all(not torch.equal(chunks[0], c) for c in chunks[1:])
            if moves:  # ... and the chunks lead to different states
                nxt = at[first] + 1
                if nxt < 3:
                    assert not torch.equal(b.cond[dec[grp[1]][nxt]], b.cond[dec[first][nxt]])
            elif at[first] + 1 < 3:  # same observation after the branch: common noise makes the same chunk
                later = [b.latents[dec[e][at[first] + 1], -1] for e in grp]
                assert all(torch.equal(later[0], c) for c in later[1:]) == common
        if not moves:  # nothing the policy does changes the reward: every member's return is the same
            assert np.all(b.returns[:g] == b.returns[0])


def test_a_branch_horizon_cuts_each_member_after_its_decisions_from_the_branch():
    pol = tiny_policy(process="flow", sampler="euler", steps=3, seed=2).eval()
    chain = DenoisingChain(pol, ft_steps=1, std=0.3)
    g = 4
    at, leader = np.repeat([0, 1, 2], g), np.repeat([0, g, 2 * g], g)
    full = collect(pol, chain, [Walk() for _ in range(3 * g)], [5] * 3 * g, 0.99, 0.0, np.random.default_rng(0), at, leader)
    cut = collect(pol, chain, [Walk() for _ in range(3 * g)], [5] * 3 * g, 0.99, 0.0, np.random.default_rng(0), at, leader,
                  horizon=1)
    # Ta = 4, 12-step episodes: a member branching at decision j plays 4 (j + 1) steps, or 12 if its episode ends first
    assert cut.env_steps == g * (4 + 8 + 12) and full.env_steps == 3 * g * 12
    assert cut.branch.sum() == 3 * g and np.array_equal(np.bincount(cut.episode), np.repeat([1, 2, 3], g))
    assert np.array_equal(cut.last, np.isin(np.arange(len(cut.episode)), [np.nonzero(cut.episode == e)[0][-1] for e in range(3 * g)]))
    assert not cut.terminated.any() and len(cut.final_cond) == 3 * g
    # the same random streams: the cut episodes' returns are the first steps' of the full ones
    np.testing.assert_allclose(cut.returns[2 * g:], full.returns[2 * g:])
    assert np.all(cut.returns[:g] > full.returns[:g])  # fewer steps of a negative reward
    with pytest.raises(ConfigError, match="branch_horizon"):
        FinetuneConfig(base="x", algo="grpo", branch_horizon=2)
    with pytest.raises(ConfigError, match="branch_horizon"):
        FinetuneConfig(base="x", algo="grpo", branch=True, branch_horizon=0)


def test_copying_the_leaders_state_plays_the_same_branches_and_pays_the_trunk_once():
    pol = tiny_policy(process="flow", sampler="euler", steps=3, seed=2).eval()
    chain = DenoisingChain(pol, ft_steps=1, std=0.3)
    g = 4
    at, leader = np.repeat([0, 2, 5], g), np.repeat([0, g, 2 * g], g)  # the third group's episodes end before its branch
    runs = [collect(pol, chain, [Walk() for _ in range(3 * g)], [5] * g + [7] * g + [9] * g, 0.99, 0.0,
                    np.random.default_rng(0), at, leader, copy_state=copy) for copy in (False, True)]
    replay, copied = runs
    # the trunk's steps are paid once: 8 steps of the second group's trunk are not replayed by its 3 other members,
    # and the third group's members never start
    assert copied.env_steps == replay.env_steps - (g - 1) * 8 - (g - 1) * 12
    assert copied.branch.sum() == replay.branch.sum() == 2 * g
    idx = [np.nonzero(b.branch)[0] for b in runs]  # the branch decisions see the same states either way
    # (equal up to rounding: the encodings come from batches of other sizes, whose kernels may sum in another order)
    torch.testing.assert_close(replay.cond[idx[0]], copied.cond[idx[1]])
    np.testing.assert_array_equal(replay.episode[idx[0]], copied.episode[idx[1]])
    # branching at the first decision there is no trunk: the same chunks (the same noise) and returns either way
    torch.testing.assert_close(replay.latents[idx[0][:g]], copied.latents[idx[1][:g]])
    np.testing.assert_allclose(copied.returns[:g], replay.returns[:g], rtol=1e-6)
    # members that never started repeat their leader's episode
    np.testing.assert_allclose(copied.returns[2 * g:], copied.returns[2 * g])
    assert not np.isin(np.arange(2 * g + 1, 3 * g), copied.episode).any()  # members that never started decided nothing
    with pytest.raises(ConfigError, match="get_state"):
        collect(pol, chain, [Bandit() for _ in range(2)], [1, 1], 0.99, 0.0, np.random.default_rng(0), np.array([0, 0]),
                np.array([0, 0]), copy_state=True)
    with pytest.raises(ConfigError, match="branch_copy"):
        FinetuneConfig(base="x", algo="grpo", branch_copy=True)


def test_branching_grpo_trains_only_the_branch_decisions_and_moves_the_bandit():
    pol, err = _bandit_policy()
    cfg = FinetuneConfig(base="unused", algo="grpo", branch=True, episodes_per_iter=32, group=8, std=0.3, lr=3e-3,
                         epochs=16, batch_size=32, gamma=1.0, seed=1)
    tuner = Finetuner(pol, Bandit, cfg)
    before = err()
    for _ in range(40):
        it = tuner.iteration()
        assert it["trained"] == 32  # one-decision episodes: every member branches at its first decision
    tuner.close()
    assert err() < 0.3 * before, (before, err())


class ScoredWalk(Walk):
    """The walk with a dense score (minus the distance from the origin), its current observation, and a log of the
    states it handed out with their scores."""

    def __init__(self, moves=True):
        super().__init__(moves)
        self.handed = []

    @property
    def score(self):
        return -float(np.abs(self.pos).sum())

    def observation(self):
        return self._obs()

    def get_state(self):
        state = super().get_state()
        self.handed.append((state, self.score))
        return state


def test_episodes_restart_from_a_stored_state_and_history_and_run_to_the_tasks_horizon():
    pol = tiny_policy(process="flow", sampler="euler", steps=3, seed=2).eval()
    chain = DenoisingChain(pol, ft_steps=1, std=0.3)
    To = pol.To
    state = np.array([0.5, -0.5, 4.0])  # four of the twelve steps already played
    past = torch.zeros(To, 5)
    past[:, :2] = torch.tensor([0.5, -0.5])
    past[0, :2] = torch.tensor([0.3, -0.2])  # an older observation than the state's own (To > 1)
    starts = [None, (state, None), None, (state, past)]
    envs = [ScoredWalk(), ScoredWalk(), ScoredWalk(), ScoredWalk(moves=False)]
    b = collect(pol, chain, envs, [3] * 4, 0.99, 0.0, np.random.default_rng(0), starts=starts, track=True)
    assert b.env_steps == 12 + 8 + 12 + 8  # a restarted episode plays the steps its state had left
    first = {e: np.nonzero(b.episode == e)[0][0] for e in range(4)}
    fresh = pol.encode({"pos": torch.tensor([[[0.5, -0.5]] * To]), "vel": torch.zeros(1, To, 3)})[0]
    torch.testing.assert_close(b.cond[first[1]], fresh)  # no history given: the state's observation repeated
    given = pol.encode({"pos": past[None, :, :2], "vel": past[None, :, 2:]})[0]
    torch.testing.assert_close(b.cond[first[3]], given)
    assert not torch.equal(b.cond[first[0]], fresh)
    # each episode's nearest approach: the state its env handed out with the highest score, and the history there
    for e in range(4):
        states, scores = zip(*envs[e].handed)
        np.testing.assert_array_equal(b.nearest[e][0], states[int(np.argmax(scores))])
        assert b.nearest[e][1].shape == (To, 5)
    # a walker that stays put scores the same at every decision: the first is kept, with the history it was given
    np.testing.assert_array_equal(b.nearest[3][0], state)
    torch.testing.assert_close(b.nearest[3][1], past)
    plain = collect(pol, chain, [Walk() for _ in range(2)], [3, 3], 0.99, 0.0, np.random.default_rng(0))
    assert plain.nearest is None


def test_restarts_store_where_each_failure_came_nearest_and_start_later_groups_there():
    pol = tiny_policy(process="flow", sampler="euler", steps=3, seed=2).eval()
    cfg = FinetuneConfig(base="unused", algo="grpo", episodes_per_iter=16, group=4, restarts=0.5, std=0.3, lr=1e-3,
                         batch_size=32, restart_buffer=20, seed=1)
    tuner = Finetuner(pol, ScoredWalk, cfg)
    assert tuner.starts() is None  # nothing stored yet: every episode starts from a reset
    b = collect(pol, tuner.chain, tuner.envs, list(range(16)), 0.99, 0.0, np.random.default_rng(0), track=True)
    tuner.store_failures(b, None)
    assert len(tuner.failures) == 16  # a walk never succeeds: one state per episode
    assert all(kept is b.nearest[e] for e, kept in enumerate(tuner.failures))
    starts = tuner.starts()
    assert starts[:8] == [None] * 8  # half of the four groups restart, each group from one state
    assert all(starts[i] is starts[4 * (i // 4)] and starts[i] is not None for i in range(8, 16))
    it = tuner.iteration()
    assert "restart_success" in it and it["failures_kept"] == 20  # the newest 20 kept
    tuner.close()
    for kw, culprit in [(dict(restarts=1.0), "restarts"), (dict(restarts=-0.1), "restarts"),
                        (dict(restarts=0.5, branch=True), "branch"), (dict(restart_buffer=0), "restart_buffer")]:
        with pytest.raises(ConfigError, match=culprit):
            FinetuneConfig(base="x", algo="grpo", **kw)
    with pytest.raises(ConfigError, match="get_state"):
        Finetuner(pol, Bandit, FinetuneConfig(base="unused", algo="grpo", restarts=0.5))


class LooseBandit(Bandit):
    """The bandit where about one draw in ten of the untrained policy succeeds."""

    def step(self, a):
        obs, r, term, trunc, _ = super().step(a)
        return obs, r, term, trunc, {"is_success": -r < 0.6}


def test_success_filtered_matching_imitates_only_its_successes():
    pol, err = _bandit_policy()
    cfg = FinetuneConfig(base="unused", algo="filtered", episodes_per_iter=64, std=0.3, lr=3e-3, bc_steps=50,
                         batch_size=64, buffer=256, seed=1)
    tuner = Finetuner(pol, LooseBandit, cfg)
    before, rates = err(), []
    for _ in range(12):
        rates.append(tuner.iteration()["success"])
        kept = pol.normalizer.action.unnormalize(tuner.replay[1])[:, 0]
        assert float(((kept - torch.as_tensor(TARGET)) ** 2).sum(-1).max()) < 0.6  # the replay holds successes only
    tuner.close()
    assert len(tuner.replay[0]) == 256  # the newest 256 kept
    assert err() < 0.3 * before and rates[-1] > 2 * rates[0], (before, err(), rates)


def test_a_finetuned_checkpoint_loads_everywhere_and_runs_under_rti(tmp_path):
    from dpolicy.deploy import Controller
    from dpolicy.kinds import load_policy
    from dpolicy.rl.finetune import finetune

    from dpolicy.policy import load_policy as load_ckpt

    src = tmp_path / "base"
    base = load_ckpt("checkpoints/avoid_flow", "cpu")
    base.save(src)
    m = finetune(FinetuneConfig(base=str(src), algo="grpo", env_steps=300, episodes_per_iter=4, group=2, eval_episodes=2,
                                eval_every=10**6, progress=False), tmp_path / "run", log=lambda s: None)
    pol = load_policy(m["checkpoint"], "cpu")
    assert pol.metadata["finetuned"]["algo"] == "grpo" and m["drift_mse"] >= 0
    assert (tmp_path / "run" / "finetune_curve.png").exists()
    ctrl = Controller(pol, "rti", k=2)
    obs = {"agent_pos": np.zeros(2, np.float32), "agent_vel": np.zeros(2, np.float32)}
    assert ctrl.step(obs).shape == (2,)


def test_bench_reads_each_run_at_the_reference_budget_and_wall_clock():
    from dpolicy.bench.finetune import at, settings

    h = [{"env_steps": 0, "wall_s": 0.0, "success_rate": 0.4}, {"env_steps": 10400, "wall_s": 9.0, "success_rate": 0.5},
         {"env_steps": 20800, "wall_s": 18.0, "success_rate": 0.7}]
    assert at(h, "env_steps", 10000)["success_rate"] == 0.5  # the first evaluation at or past the budget
    assert at(h, "wall_s", 9.0)["success_rate"] == 0.5 and at(h, "wall_s", 9.5)["success_rate"] == 0.7
    assert at(h, "wall_s", 100.0) is h[-1]  # a run shorter than the reference: its last evaluation
    assert settings("push", "filtered")["bc_steps"] == 200 and settings("avoid", "ppo")["episodes_per_iter"] == 16
    assert settings("lift", "grpo-branch")["algo"] == "grpo" and settings("lift", "grpo-branch")["branch"] is True
    assert settings("lift", "grpo")["algo"] == "grpo" and "branch" not in settings("lift", "grpo")
    assert settings("push", "grpo-restart")["algo"] == "grpo" and settings("push", "grpo-restart")["restarts"] == 0.5


def test_bench_verdict_names_the_family_with_the_higher_median():
    from dpolicy.bench.finetune import _verdict

    reads = {"ppo": [(0.5, 0.7), (0.6, 0.9)], "grpo": [(0.1, 0.1)]}
    line = _verdict(0.2, reads, 10000, 300.0)
    assert "10,000 env steps: DSRL-NA 0.20, best fine-tuning (ppo) 0.55 -> ppo" in line
    assert "300 s of wall clock: DSRL-NA 0.20, best fine-tuning (ppo) 0.80 -> ppo" in line


def test_train_seeds_draw_every_start_from_the_pool():
    from types import SimpleNamespace

    for algo, group in (("grpo", 4), ("ppo", 8)):
        cfg = FinetuneConfig(base="x", algo=algo, episodes_per_iter=16, group=group, train_seeds=[11, 22, 33])
        seen = set()
        for _ in range(20):
            seeds = Finetuner.seeds(SimpleNamespace(cfg=cfg, rng=np.random.default_rng(len(seen))))
            assert len(seeds) == 16 and set(seeds) <= {11, 22, 33}
            if algo == "grpo":  # a group shares its start
                assert all(len(set(seeds[i:i + 4])) == 1 for i in range(0, 16, 4))
            seen |= set(seeds)
        assert seen == {11, 22, 33}
    fresh = Finetuner.seeds(SimpleNamespace(cfg=FinetuneConfig(base="x", algo="ppo"), rng=np.random.default_rng(0)))
    assert len(set(fresh)) == len(fresh)
    for bad in ([], [1, -2], "11", [1.5], 7):
        with pytest.raises(ConfigError, match="train_seeds"):
            FinetuneConfig(base="x", train_seeds=bad)


def test_group_noise_gives_a_groups_members_one_initial_noise_per_decision():
    from types import SimpleNamespace

    pol = tiny_policy(process="flow", sampler="euler", steps=3, seed=2).eval()
    chain = DenoisingChain(pol, std=0.3)  # every step fine-tuned: the first latent is the initial noise itself
    n, g = 8, 4
    for shared in (True, False):
        init = np.repeat([3, 9], g).tolist() if shared else None
        b = collect(pol, chain, [Walk() for _ in range(n)], [5] * n, 0.99, 0.0, np.random.default_rng(0), init_seeds=init)
        dec = {e: np.nonzero(b.episode == e)[0] for e in range(n)}
        for k in range(3):
            x0 = [b.latents[dec[e][k], 0] for e in range(n)]
            assert all(torch.equal(x0[0], x) for x in x0[1:g]) == shared and all(torch.equal(x0[g], x) for x in x0[g + 1:]) == shared
            assert not torch.equal(x0[0], x0[g])  # another group, another noise
            last = [b.latents[dec[e][k], -1] for e in range(g)]  # the explored steps stay each member's own
            assert all(not torch.equal(last[0], x) for x in last[1:])
    # the fine-tuner draws one seed per group when asked, none otherwise
    cfg = FinetuneConfig(base="x", algo="grpo", episodes_per_iter=8, group=4, group_noise=True)
    seeds = Finetuner.init_seeds(SimpleNamespace(cfg=cfg, rng=np.random.default_rng(0)), 8)
    assert len(seeds) == 8 and len(set(seeds[:4])) == len(set(seeds[4:])) == 1 and seeds[0] != seeds[4]
    assert Finetuner.init_seeds(SimpleNamespace(cfg=FinetuneConfig(base="x", algo="grpo"), rng=None), 16) is None
    for bad in (dict(algo="ppo"), dict(algo="grpo", branch=True), dict(algo="grpo", group_noise="yes")):
        with pytest.raises(ConfigError, match="group_noise"):
            FinetuneConfig(base="x", **{"group_noise": True, **bad})
