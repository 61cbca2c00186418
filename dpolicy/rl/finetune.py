"""Fine-tuning a chunk policy's own weights with reward, through its denoising chain.

The last ``K'`` denoising steps become a Gaussian policy: each draws ``x' ~ N(mean_theta(x), std^2)`` around the
deterministic step of the policy's own process (DDIM with eta = 0, a flow's Euler or Heun step, EDM's step), so
every chain has a likelihood, a sum over its fine-tuned steps (DPPO's two-level MDP: the denoising steps are
actions inside each environment decision; a flow policy becomes a stochastic sampler with fixed noise, as in
ReinFlow and Flow-GRPO). The steps before them run deterministically. ``std`` is DPPO's minimum exploration
noise, in normalized action units.

Every iteration plays whole episodes with the policy being trained (``collect``), then updates it:

* ``ppo`` (DPPO): GAE over the environment decisions with a value network on the policy's observation encoding,
  PPO's clipped ratio per denoising step;
* ``grpo`` / ``gspo``: ``group`` episodes start from the same reset state (the same seed gives the same
  simulator state), each episode's return is normalized within its group and is the advantage of every
  decision in it; no value network. GRPO clips each denoising step's ratio (token level); GSPO clips the
  chain's length-normalized ratio ``exp(mean_k log r_k)`` (sequence level). With ``branch=True`` a group is
  ``group`` chunks sampled at one decision instead: its episodes play the same chunks up to a decision drawn
  at random (a shared trunk: same seed, same actions, so the same simulator state in every member), each
  member samples its own chunk there and plays on to the end, and only that decision is trained, with its
  member's normalized return as advantage. After the branch the members draw the same noise for every later
  decision (``common_noise``), so what differs between their returns is the branch's chunk and where it led,
  not the luck of the rest of the episode;
* ``awm``: advantage-weighted matching (Xue et al.): the policy's own training loss (denoising or flow matching)
  on its own sampled chunks stands in for the chain's likelihood, so no likelihood of the chain is needed. With
  ``awm_weights=linear`` (the paper's form) each chunk's ``log p`` is minus its matching loss at ``awm_draws``
  noise levels and noises drawn once per minibatch, and the loss is PPO's clipped ``-A * ratio`` of the current
  to the rollout policy's value (clip ``awm_clip``), with the signed group advantage clamped to +-5: good chunks
  are matched more closely and bad ones less, and the two pulls cancel where advantages do, so the policy does not
  drift by re-learning its own exploration noise. With ``awm_weights=exp`` the loss is the matching loss weighted
  by ``exp(A / temperature)`` (capped at ``max_weight``; advantage-weighted regression): every weight is positive,
  so it also imitates its own noisy chunks.
* ``filtered``: success-filtered matching (reward-weighted regression with a 0/1 weight, self-imitation): the
  chunks of the episodes that succeeded are kept in a replay of ``buffer`` decisions and the policy's own training
  loss (fresh noise levels, as in behaviour cloning) is taken on them for ``bc_steps`` steps per iteration; no
  likelihood, no advantage, no critic. Every success the policy stumbles on becomes a demonstration.

With ``restarts`` (any method; local environments whose task stores, restores and scores its simulator state) a
share of each iteration's groups (episodes, for PPO and filtered) starts not from a reset but from a stored failure
state: for every episode from a reset that failed, the simulator state and observation history at the decision
where the task's dense score was highest, where it came nearest to success before it went wrong (a reverse
curriculum from the policy's own failures). A group from such a state shares it as a reset group shares its seed;
the episode keeps the state's step count, so it ends at the task's horizon as the failed one did.

``kl_coef`` adds the KL divergence of each fine-tuned step to the frozen base's step (Gaussians with the same
std: a squared distance of the means). The result is an ordinary checkpoint (the policy's own class and format),
so evaluation, deployment (chunked or RTI), composition, export and steering load it like any other.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dpolicy.config import register
from dpolicy.errors import ConfigError
from dpolicy.eval.runner import EpisodeRunner
from dpolicy.policy.history import ObsHistory
from dpolicy.process import sample_loop

logger = logging.getLogger("dpolicy.finetune")
ALGOS = ("ppo", "grpo", "gspo", "awm", "filtered")
GROUPED = ("grpo", "gspo", "awm")  # the methods whose episodes come in groups of a shared start
AWM_WEIGHTS = ("linear", "exp")
AWM_ADV_CLAMP = 5.0  # awm linear: group advantages (z-scores) clamped to +-this, as the AWM paper does


@dataclass
class FinetuneConfig:
    base: str = ""                  # the policy to fine-tune (policy dir, step dir or run checkpoints/)
    algo: str = "ppo"               # ppo | grpo | gspo | awm | filtered
    env_kwargs: dict = field(default_factory=dict)
    env_steps: int = 200000         # environment steps of fine-tuning
    episodes_per_iter: int = 16     # episodes played per iteration (grpo/gspo/awm: a multiple of group)
    group: int = 8                  # grpo/gspo/awm: episodes per state-reset group
    branch: bool = False            # grpo/gspo/awm: a group is G chunks at one decision of a shared trunk
    common_noise: bool = True       # branch: the members draw the same noise after the branch
    branch_horizon: int | None = None  # branch: decisions each member plays from its branch on (None: to the end)
    branch_copy: bool = False       # branch: members copy the leader's simulator state at the branch (trunk paid once)
    restarts: float = 0.0           # share of each iteration's episodes (groups) started from a stored failure state
    restart_buffer: int = 256       # restarts: failure states kept (the newest)
    group_noise: bool = False       # grpo/gspo/awm: a group's members draw the same initial noise at their k-th decision,
                                    # so only the fine-tuned steps' noise (and where it led) tells their returns apart
    train_seeds: list | None = None  # a fixed pool of reset seeds every episode (group) starts from: a fit check (does
                                     # the method raise success on starts it replays?); None: a fresh seed each time
    ft_steps: int | None = None     # K': fine-tuned denoising steps, the last ones (None: all of them)
    sampling_steps: int | None = None  # denoising steps of the chain (None: the policy's own)
    std: float = 0.1                # exploration std of each fine-tuned step (normalized action units)
    lr: float = 3e-5                # the policy's learning rate
    critic_lr: float = 1e-3         # ppo: the value network's
    epochs: int = 4                 # passes over each iteration's data
    batch_size: int = 256
    clip: float = 0.2               # ppo / grpo: ratio clip per denoising step
    seq_clip: float = 0.05          # gspo: clip of the sequence-level ratio
    gamma: float = 0.99             # per environment step
    lam: float = 0.95               # ppo: GAE
    kl_coef: float = 0.0            # KL of the fine-tuned steps to the frozen base's
    awm_weights: str = "linear"     # awm: linear (signed advantages, clipped ratio) | exp (exp(A / temperature))
    awm_clip: float = 0.01          # awm linear: clip of the matching-likelihood ratio
    awm_draws: int = 4              # awm linear: noise levels (and noises) per chunk in its matching likelihood
    temperature: float = 1.0        # awm exp: weights exp(A / temperature), capped at max_weight
    max_weight: float = 20.0
    buffer: int = 50000             # filtered: successful decisions kept (the newest)
    bc_steps: int = 200             # filtered: gradient steps per iteration on the replay
    reward_offset: float = 0.0      # added to every env reward
    grad_clip: float = 1.0
    eval_every: int = 20000         # env steps between evaluations
    eval_episodes: int = 50
    eval_seed: int = 100000
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    backend: str | None = None      # where the envs run: local | subprocess | ray (None: the process default)
    workers: int = 1
    address: str | None = None      # ray: an existing cluster
    placement: str = "learner"      # the evaluations: learner | workers
    shard: int | None = None

    def __post_init__(self):
        from dpolicy.eval.backends import RolloutBackend

        RolloutBackend.from_settings(self)
        if not self.base:
            raise ConfigError("base=<checkpoint> is required: the policy to fine-tune.")
        if self.algo not in ALGOS:
            raise ConfigError(f"algo={self.algo!r} is unknown; choose one of {', '.join(ALGOS)}.")
        for k in ("env_steps", "episodes_per_iter", "group", "epochs", "batch_size", "eval_episodes", "buffer", "bc_steps",
                  "awm_draws", "restart_buffer"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{k}={v!r} must be an integer of at least 1.")
        grouped = self.algo in GROUPED
        if grouped and self.episodes_per_iter % self.group:
            raise ConfigError(f"episodes_per_iter={self.episodes_per_iter} must be a multiple of group={self.group}.")
        if grouped and self.group < 2:
            raise ConfigError(f"group={self.group} must be at least 2: a group normalizes returns against each other.")
        for k in ("branch", "common_noise", "branch_copy", "group_noise"):
            if not isinstance(getattr(self, k), bool):
                raise ConfigError(f"{k}={getattr(self, k)!r} must be true or false.")
        if self.branch and not grouped:
            raise ConfigError(f"branch=true needs a group method (grpo, gspo or awm); algo={self.algo!r} has no groups.")
        if self.branch_horizon is not None:
            h = self.branch_horizon
            if isinstance(h, bool) or not isinstance(h, int) or h < 1:
                raise ConfigError(f"branch_horizon={h!r} must be an integer of at least 1 (or null: to the episode's end).")
            if not self.branch:
                raise ConfigError("branch_horizon needs branch=true: it cuts the members' episodes after their branch.")
        if self.group_noise and (not grouped or self.branch):
            raise ConfigError("group_noise needs a group method (grpo, gspo or awm) without branch=true (branching groups "
                              "share their trunk and, with common_noise, the noise after it).")
        if self.branch_copy and not self.branch:
            raise ConfigError("branch_copy needs branch=true: it is how the members reach their branch's state.")
        r = self.restarts
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise ConfigError(f"restarts={r!r} must be a share in [0, 1): the rest of each iteration starts from resets.")
        if r and self.branch:
            raise ConfigError("restarts and branch=true both choose where a group starts; use one of them.")
        if self.train_seeds is not None:
            pool = self.train_seeds
            if isinstance(pool, (str, bytes)) or not hasattr(pool, "__iter__"):
                raise ConfigError(f"train_seeds={pool!r} must be a list of seeds (or null for fresh ones).")
            pool = list(pool)
            if not pool or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in pool):
                raise ConfigError(f"train_seeds={pool!r} must be a non-empty list of integers of at least 0.")
            self.train_seeds = pool
        if self.awm_weights not in AWM_WEIGHTS:
            raise ConfigError(f"awm_weights={self.awm_weights!r} is unknown; choose one of {', '.join(AWM_WEIGHTS)}.")
        for k in ("std", "lr", "critic_lr", "clip", "seq_clip", "awm_clip", "temperature", "max_weight"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"{k}={v!r} must be a positive number.")
        for k in ("gamma", "lam"):
            if not 0 < getattr(self, k) <= 1:
                raise ConfigError(f"{k}={getattr(self, k)!r} must be in (0, 1].")
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef={self.kl_coef!r} must be at least 0.")
        if self.ft_steps is not None and self.ft_steps < 1:
            raise ConfigError(f"ft_steps={self.ft_steps!r} must be at least 1 (or None for every step).")
        self.env_kwargs = dict(self.env_kwargs or {})


register(FinetuneConfig)


class DenoisingChain:
    """The policy's sampler with its last ``K'`` steps made Gaussian (``sample``) and their log-likelihood
    (``log_prob``, differentiable in the policy's weights)."""

    def __init__(self, policy, steps: int | None = None, ft_steps: int | None = None, std: float = 0.1):
        proc = policy.process
        if not getattr(proc, "denoising", False):
            raise ConfigError(f"a {proc.name} policy has no denoising chain to fine-tune.")
        if proc.stochastic:  # the mean of a DDPM step: its deterministic counterpart
            proc = proc.with_sampler("ddim", eta=0.0)
        self.policy, self.process, self.std = policy, proc, float(std)
        schedule = proc.schedule(policy.resolve_steps(steps))
        k = len(schedule) if ft_steps is None else int(ft_steps)
        if k > len(schedule):
            raise ConfigError(f"ft_steps={k} is more than the chain's {len(schedule)} denoising steps.")
        self.pre, self.ft = schedule[:len(schedule) - k], schedule[len(schedule) - k:]
        # the environment only ever sees a chunk's first Ta actions: the last step explores those and its
        # likelihood counts only them (noise on the rest would add variance to every ratio and no signal);
        # earlier steps' latents feed the whole chunk, so they explore every entry
        self.explore = torch.ones(k, policy.Tp, 1, device=policy.device)  # (K', Tp, 1): entries each step explores
        if k:
            self.explore[-1, policy.Ta:] = 0.0

    @property
    def k(self) -> int:
        return len(self.ft)

    def means(self, policy, cond: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """``(B, K', Tp, Da)``: each fine-tuned step's mean from latent ``k`` under ``policy``'s field."""
        fn = policy.field_fn(cond)
        return torch.stack([self.process.step(fn, latents[:, j], t, tn, None) for j, (t, tn) in enumerate(self.ft)], 1)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, noise: torch.Tensor, generators) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Chunks ``(B, Tp, Da)`` (normalized), the latents ``(B, K'+1, Tp, Da)`` and log-likelihoods ``(B, K')``."""
        fn = self.policy.field_fn(cond)
        x = sample_loop(self.process, fn, self.process.from_noise(noise), self.pre)
        lat, logp = [x], []
        for j, (t, tn) in enumerate(self.ft):
            mean = self.process.step(fn, x, t, tn, None)
            eps = torch.stack([torch.randn(mean.shape[1:], device=mean.device, generator=g) for g in generators])
            eps = eps * self.explore[j]
            x = mean + self.std * eps
            lat.append(x)
            logp.append(-0.5 * (eps ** 2).sum((1, 2)))
        return x, torch.stack(lat, 1), torch.stack(logp, 1)

    def log_prob(self, cond: torch.Tensor, latents: torch.Tensor, policy=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-likelihoods ``(B, K')`` of the recorded latents (constants dropped: they cancel in ratios), and the means."""
        mu = self.means(policy or self.policy, cond, latents[:, :-1])
        return -0.5 * ((latents[:, 1:] - mu) ** 2 * self.explore).sum((2, 3)) / self.std ** 2, mu


@dataclass
class Batch:
    cond: torch.Tensor        # (D, S) the policy's observation encoding at each decision
    latents: torch.Tensor     # (D, K'+1, Tp, Da)
    logp: torch.Tensor        # (D, K') at collection
    reward: np.ndarray        # (D,) discounted sum of the decision's env rewards
    discount: np.ndarray      # (D,) gamma ** (env steps the decision took)
    episode: np.ndarray       # (D,) episode index
    last: np.ndarray          # (D,) the episode's last decision
    terminated: np.ndarray    # (D,) ... and it ended by termination (no bootstrap)
    final_cond: torch.Tensor  # (E, S) encoding after each episode's last step (bootstrap of truncated ones)
    returns: np.ndarray       # (E,) undiscounted episode returns
    successes: np.ndarray     # (E,)
    env_steps: int
    branch: np.ndarray | None = None  # (D,) the decision is its episode's branch decision (branching groups)
    nearest: list | None = None       # (E,) restarts: (simulator state, observation history) at the episode's decision
                                      # with the highest dense score

    def rows(self, keep: np.ndarray) -> "Batch":
        """The decisions where ``keep`` holds (episode-level fields unchanged)."""
        t = torch.as_tensor(np.nonzero(keep)[0], device=self.cond.device)
        pick = lambda a: None if a is None else a[keep]  # noqa: E731
        return dataclasses.replace(self, cond=self.cond[t], latents=self.latents[t], logp=self.logp[t], reward=self.reward[keep],
                                   discount=self.discount[keep], episode=self.episode[keep], last=self.last[keep],
                                   terminated=self.terminated[keep], branch=pick(self.branch))


def collect(policy, chain: DenoisingChain, envs: list, seeds: list[int], gamma: float, reward_offset: float,
            rng: np.random.Generator, branch_at: np.ndarray | None = None, leader: np.ndarray | None = None,
            common_noise: bool = True, horizon: int | None = None, copy_state: bool = False, starts: list | None = None,
            track: bool = False, init_seeds: list | None = None) -> Batch:
    """Play one episode per env slot (``seeds[i]`` in slot ``i``) with the chain's Gaussian steps; record every decision.

    Branching groups: slot ``i`` executes the chunks of slot ``leader[i]`` (same seed: the same states) for its
    first ``branch_at[i]`` decisions, samples its own chunk at decision ``branch_at[i]`` (flagged in
    ``Batch.branch``) and its own from then on; with ``common_noise`` the slots sharing a leader restart one
    noise stream after the branch; with ``horizon`` a slot stops after that many decisions from its branch on
    (its episode is cut there: not terminated, its return and success so far). With ``copy_state`` (a list of
    envs with ``get_state`` / ``set_state``) only the leader plays the trunk; at its branch decision every member
    takes the leader's simulator state, history and episode so far, so the trunk's steps are paid once; a member
    whose leader's episode ends before the branch never starts (it repeats the leader's record). ``branch_at[i] < 0``:
    an ordinary episode.

    Restarts: slot ``i`` with ``starts[i] = (state, history)`` plays its episode on from that simulator state (stored
    from an earlier episode, its step count with it, so the episode ends at the task's horizon as that one would
    have) and with that observation history (None: the state's observation repeated, as at a reset); ``track``
    keeps, per episode, the simulator state and observation history of its decision where the task's dense score
    was highest (``Batch.nearest``).

    ``init_seeds``: slot ``i`` draws each decision's initial noise from its own stream seeded ``init_seeds[i]``, so
    slots with one seed draw the same initial noise at their k-th decision (the fine-tuned steps' noise stays their
    own)."""
    n, dev = len(seeds), torch.device(policy.device)
    To, Tp, Ta, Da = policy.To, policy.Tp, policy.Ta, policy.action_dim
    runner = EpisodeRunner(envs, seeds)
    hist = ObsHistory(policy.obs_keys, To, n, dev, policy.obs_dims, shapes=policy.image_shapes)
    gens = [torch.Generator(device=dev).manual_seed(int(rng.integers(2**62))) for _ in range(n)]
    init_gens = gens if init_seeds is None else [torch.Generator(device=dev).manual_seed(int(v)) for v in init_seeds]
    obs, _ = runner.reset()
    placed = [] if starts is None else [i for i, s in enumerate(starts) if s is not None]
    if placed:
        obs = runner.place(placed, [starts[i][0] for i in placed])
    hist.start(hist.read(obs)[0])
    for i in placed:
        if starts[i][1] is not None:
            hist.buffer[i] = starts[i][1]
    queue = np.zeros((n, Ta, Da), np.float32)
    pos = np.full(n, Ta)
    cur = np.full(n, -1)  # each slot's current decision
    made = np.zeros(n, int)  # decisions each slot has made
    branching = branch_at is not None
    branch_at = np.asarray(branch_at) if branching else np.full(n, -1)
    leader = np.asarray(leader) if branching else np.arange(n)
    # each group's noise after its branch (drawn only when branching, so ordinary runs keep their random stream)
    after = {int(g): int(rng.integers(2**62)) for g in np.unique(leader)} if branching else {}
    flags: list[bool] = []
    stopped = np.zeros(n, bool)  # slots cut after their branch horizon
    # copy_state: the members waiting for their leader's branch (they do not step until then)
    waiting = (leader != np.arange(n)) & (branch_at >= 0) if copy_state else np.zeros(n, bool)
    if copy_state and not (isinstance(envs, (list, tuple)) and all(hasattr(e.unwrapped, "get_state") for e in envs)):
        raise ConfigError("branch_copy needs local environments with get_state / set_state (backend=local).")
    rec: dict[str, list] = {k: [] for k in ("cond", "lat", "logp", "reward", "disc", "episode", "steps")}
    nearest: list = [None] * n  # track: each slot's (score, state, history) at its best decision so far
    ended_at, terminated, final_cond = {}, {}, [None] * n
    unnorm = policy.normalizer.action.unnormalize
    env_steps = 0
    while (runner.active & ~stopped & ~waiting).any():
        if waiting.any():  # leaders at their branch decision hand their state to their members
            for r in np.nonzero(runner.active & ~waiting & (pos >= Ta) & (branch_at >= 0) & (made == branch_at))[0]:
                members = np.nonzero(waiting & (leader == r))[0]
                runner.follow(r, members)
                hist.buffer[members] = hist.buffer[r].clone()  # one source row into every member's
                made[members], pos[members] = made[r], Ta
                waiting[members] = False
        active = runner.active & ~stopped & ~waiting
        plan = active & (pos >= Ta)
        if horizon is not None:
            cut = plan & (branch_at >= 0) & (made >= branch_at + horizon)
            for r in np.nonzero(cut)[0]:
                ended_at[int(r)], terminated[int(r)] = cur[r], False
                with torch.no_grad():
                    final_cond[r] = policy.encode(hist.window([r]))[0]
            stopped |= cut
            active, plan = active & ~cut, plan & ~cut
            if not active.any():
                break
        if plan.any():
            rows = np.nonzero(plan)[0]
            with torch.no_grad():
                cond = policy.encode(hist.window(rows))
                noise = torch.stack([torch.randn(Tp, Da, device=dev, generator=init_gens[r]) for r in rows])
                x, lat, logp = chain.sample(cond, noise, [gens[r] for r in rows])
                queue[rows] = unnorm(x)[:, :Ta].cpu().numpy()
            trunk = rows[made[rows] < branch_at[rows]]
            queue[trunk] = queue[leader[trunk]]  # the leader plans at the same step: its state is theirs
            pos[rows] = 0
            for j, r in enumerate(rows):
                flags.append(bool(made[r] == branch_at[r]))
                if flags[-1] and common_noise:
                    gens[r] = torch.Generator(device=dev).manual_seed(after[int(leader[r])])
                made[r] += 1
                cur[r] = len(rec["cond"])
                rec["cond"].append(cond[j])
                rec["lat"].append(lat[j])
                rec["logp"].append(logp[j])
                rec["reward"].append(0.0)
                rec["disc"].append(1.0)
                rec["episode"].append(int(r))
                rec["steps"].append(0)
                if track:
                    env = envs[r].unwrapped
                    if nearest[r] is None or env.score > nearest[r][0]:
                        nearest[r] = (float(env.score), env.get_state(), hist.buffer[r].clone())
        rows = np.nonzero(active)[0]
        acts = np.zeros((n, Da), np.float32)
        acts[rows] = queue[rows, pos[rows]]
        pos[rows] += 1
        res = runner.step(acts, active)
        env_steps += len(rows)
        hist.push(hist.read(res.obs)[0], slots=active)
        for r in rows:
            i = cur[r]
            rec["reward"][i] += rec["disc"][i] * (float(res.reward[r]) + reward_offset)
            rec["disc"][i] *= gamma
            rec["steps"][i] += 1
        for r in np.nonzero(res.ended)[0]:
            ended_at[int(r)], terminated[int(r)] = cur[r], bool(res.terminated[r])
            with torch.no_grad():
                final_cond[r] = policy.encode(hist.window([r]))[0]
        runner.restart()
    D = len(rec["cond"])
    last = np.zeros(D, bool)
    term = np.zeros(D, bool)
    for r, i in ended_at.items():
        last[i], term[i] = True, terminated[r]
    # a cut episode has no record of its own: its return, length and success so far; a member that never started
    # repeats its leader's episode
    recs = [runner.current(i) if rec is None else rec for i, rec in enumerate(runner.records)]
    for m in np.nonzero(waiting)[0]:
        recs[m], final_cond[m] = recs[leader[m]], final_cond[leader[m]]
    return Batch(cond=torch.stack(rec["cond"]), latents=torch.stack(rec["lat"]), logp=torch.stack(rec["logp"]),
                 reward=np.array(rec["reward"]), discount=np.array(rec["disc"]), episode=np.array(rec["episode"]),
                 last=last, terminated=term, final_cond=torch.stack(final_cond),
                 returns=np.array([r.ret + reward_offset * r.length for r in recs]),
                 successes=np.array([r.success for r in recs], dtype=bool), env_steps=env_steps, branch=np.array(flags, bool),
                 nearest=[None if b is None else b[1:] for b in nearest] if track else None)


def clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, clip: float) -> tuple[torch.Tensor, float]:
    """PPO's clipped objective as a loss, ``-mean(min(r A, clip(r, 1 - clip, 1 + clip) A))`` (``adv`` broadcast
    against ``ratio``), and the share of ratios outside the clip range."""
    lo, hi = 1 - clip, 1 + clip
    loss = -torch.min(ratio * adv, ratio.clamp(lo, hi) * adv).mean()
    return loss, ((ratio < lo) | (ratio > hi)).float().mean().item()


def gae(batch: Batch, values: np.ndarray, final_values: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Advantages and value targets over each episode's decisions (in order); a truncated episode bootstraps
    from the value of its final observation."""
    adv = np.zeros(len(values))
    for e in np.unique(batch.episode):
        idx = np.nonzero(batch.episode == e)[0]
        nxt, running = 0.0 if batch.terminated[idx[-1]] else final_values[e], 0.0
        for i in idx[::-1]:
            delta = batch.reward[i] + batch.discount[i] * nxt - values[i]
            running = delta + batch.discount[i] * lam * running
            adv[i], nxt = running, values[i]
    return adv, adv + values


def group_advantages(batch: Batch, group: int) -> np.ndarray:
    """Each decision's advantage: its episode's return normalized within the episode's group."""
    r = batch.returns.reshape(-1, group)
    a = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-6)
    return a.reshape(-1)[batch.episode]


class Critic(nn.Module):
    def __init__(self, dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Mish(), nn.Linear(hidden, hidden), nn.Mish(), nn.Linear(hidden, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)


class Finetuner:
    """One algorithm's updates on a policy (in place); ``iteration`` collects and updates once."""

    def __init__(self, policy, env_fn, cfg: FinetuneConfig):
        self.policy, self.cfg = policy, cfg
        self.device = torch.device(policy.device)
        self.chain = DenoisingChain(policy, cfg.sampling_steps, cfg.ft_steps, cfg.std)
        self.base = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.kl_coef > 0 else None
        # the denoiser is trained; the observation encoder (cameras) and the normalizers stay as they are
        self.params = [p for n, p in policy.named_parameters() if n.startswith("net.")]
        for n, p in policy.named_parameters():
            p.requires_grad_(n.startswith("net."))
        if not self.params:
            raise ConfigError(f"a {type(policy).__name__} has no denoiser weights (net.*) to fine-tune.")
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr)
        self.critic = Critic(policy.cond_dim).to(self.device) if cfg.algo == "ppo" else None
        self.copt = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr) if self.critic is not None else None
        from dpolicy.eval.backends import PooledEnvs, RolloutBackend

        backend = RolloutBackend.from_settings(cfg)
        n = cfg.episodes_per_iter  # one slot per episode of an iteration, here or in workers / Ray actors
        self.envs = [env_fn() for _ in range(n)] if backend.kind == "local" else PooledEnvs(env_fn, n, backend)
        self.rng = np.random.default_rng(cfg.seed)
        self.env_steps = 0
        self.decisions = 1.0  # branch: the median episode's decisions in the last iteration (branch points drawn below it)
        self.replay: tuple[torch.Tensor, torch.Tensor] | None = None  # filtered: (cond, chunk) of successful decisions
        self.failures: collections.deque = collections.deque(maxlen=cfg.restart_buffer)  # restarts: stored states
        if cfg.restarts:
            env = self.envs[0].unwrapped if isinstance(self.envs, list) else None
            if env is None or not all(hasattr(type(env), a) for a in ("get_state", "set_state", "score")):
                raise ConfigError("restarts need local environments (backend=local) whose tasks store and restore their "
                                  "simulator state and score it (get_state, set_state, score).")

    def seeds(self) -> list[int]:
        c = self.cfg
        size = c.group if c.algo in GROUPED else 1  # episodes sharing a start
        n = c.episodes_per_iter // size
        if c.train_seeds is not None:
            picks = [c.train_seeds[int(i)] for i in self.rng.integers(len(c.train_seeds), size=n)]
        else:
            picks = [int(s) for s in self.rng.integers(2**31, size=n)]
        return [s for s in picks for _ in range(size)]

    def branches(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Branching groups: each slot's branch decision (one draw per group, below the last iteration's median
        episode length in decisions) and its group's first slot, whose trunk it plays."""
        c = self.cfg
        if not c.branch:
            return None, None
        n = c.episodes_per_iter // c.group
        at = self.rng.integers(0, max(int(self.decisions), 1), size=n)
        return np.repeat(at, c.group), np.repeat(np.arange(n) * c.group, c.group)

    def init_seeds(self, n: int) -> list | None:
        """group_noise: one initial-noise seed per group, repeated for its members (None otherwise)."""
        c = self.cfg
        return np.repeat(self.rng.integers(2**62, size=n // c.group), c.group).tolist() if c.group_noise else None

    def starts(self) -> list | None:
        """Restarts: each slot's start, a stored (simulator state, observation history) or None (a reset). The last
        ``restarts`` share of the iteration's groups (episodes, for the methods without groups) each start from one
        stored failure drawn at random."""
        c = self.cfg
        if not c.restarts or not self.failures:
            return None
        unit = c.group if c.algo in GROUPED else 1
        units = c.episodes_per_iter // unit
        k = min(max(int(round(c.restarts * units)), 1), units - 1) if units > 1 else 0
        starts: list = [None] * c.episodes_per_iter
        for j, i in enumerate(self.rng.integers(len(self.failures), size=k)):
            first = (units - k + j) * unit
            starts[first:first + unit] = [self.failures[int(i)]] * unit
        return starts

    def store_failures(self, batch: Batch, starts: list | None) -> None:
        """Keep, for every episode from a reset that failed, the simulator state and observation history of the
        decision where the task's dense score was highest: where it came nearest to success before it went wrong."""
        for e in np.nonzero(~batch.successes)[0]:
            if (starts is None or starts[e] is None) and batch.nearest[e] is not None:
                self.failures.append(batch.nearest[e])

    def iteration(self) -> dict:
        c, pol = self.cfg, self.policy
        pol.eval()
        seeds = self.seeds()
        branch_at, leader = self.branches()
        starts = self.starts()
        init = self.init_seeds(len(seeds))
        batch = collect(pol, self.chain, self.envs, seeds, c.gamma, c.reward_offset, self.rng, branch_at, leader,
                        c.common_noise, c.branch_horizon, c.branch_copy, starts, track=bool(c.restarts), init_seeds=init)
        self.env_steps += batch.env_steps
        per = np.bincount(batch.episode)
        self.decisions = float(np.median(per[per > 0]))
        fresh = np.array([s is None for s in starts]) if starts is not None else np.ones(len(batch.successes), bool)
        out = {"env_steps": self.env_steps, "return": float(batch.returns[fresh].mean()),
               "success": float(batch.successes[fresh].mean()), "decisions": len(batch.reward)}
        if c.restarts:
            if not fresh.all():  # success from the stored failure states
                out["restart_success"] = float(batch.successes[~fresh].mean())
            self.store_failures(batch, starts)
            out["failures_kept"] = len(self.failures)
        if c.algo == "filtered":
            return {**out, **self.imitate_successes(batch)}
        if c.algo == "ppo":
            with torch.no_grad():
                values = self.critic(batch.cond).cpu().numpy()
                final_values = self.critic(batch.final_cond).cpu().numpy()
            adv, targets = gae(batch, values, final_values, c.lam)
            adv = (adv - adv.mean()) / (adv.std() + 1e-6)
        else:
            adv, targets = group_advantages(batch, c.group), None
        if c.branch:  # only the branch decisions are trained; a group whose trunk ended before its branch has none
            adv, batch = adv[batch.branch], batch.rows(batch.branch)
            out["trained"] = len(adv)
            if not len(adv):
                return out
        stats = self.update(batch, torch.as_tensor(adv, dtype=torch.float32, device=self.device),
                            None if targets is None else torch.as_tensor(targets, dtype=torch.float32, device=self.device))
        return {**out, **stats}

    def imitate_successes(self, batch: Batch) -> dict:
        """Add the decisions of the successful episodes to the replay (the newest ``buffer`` kept), then take
        ``bc_steps`` steps of the policy's training loss on batches drawn from it."""
        c, pol = self.cfg, self.policy
        keep = torch.as_tensor(batch.successes[batch.episode], device=self.device)
        cond, x0 = batch.cond[keep], batch.latents[keep][:, -1]
        if self.replay is not None:
            cond, x0 = torch.cat([self.replay[0], cond]), torch.cat([self.replay[1], x0])
        self.replay = (cond[-c.buffer:], x0[-c.buffer:])
        n = len(self.replay[0])
        if n == 0:
            return {"loss": float("nan"), "replay": 0}
        pol.train()
        g = torch.Generator().manual_seed(int(self.rng.integers(2**31)))
        losses = []
        for _ in range(c.bc_steps):
            idx = torch.randint(0, n, (min(c.batch_size, n),), generator=g).to(self.device)
            loss = pol.process.loss(pol.field_fn(self.replay[0][idx]), self.replay[1][idx], g).mean()
            if self.base is not None:
                lat = batch.latents[: len(idx)]
                mu = self.chain.means(pol, batch.cond[: len(idx)], lat[:, :-1])
                with torch.no_grad():
                    mu_base = self.chain.means(self.base, batch.cond[: len(idx)], lat[:, :-1])
                loss = loss + c.kl_coef * ((mu - mu_base) ** 2).sum((2, 3)).mean() / (2 * c.std ** 2)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self.params, c.grad_clip)
            self.opt.step()
            losses.append(loss.item())
        pol.eval()
        return {"loss": float(np.mean(losses)), "replay": n}

    def update(self, batch: Batch, adv: torch.Tensor, targets: torch.Tensor | None) -> dict:
        c, pol = self.cfg, self.policy
        pol.train()
        D = len(adv)
        g = torch.Generator().manual_seed(int(self.rng.integers(2**31)))
        losses, clipped, kls = [], [], []
        x0 = batch.latents[:, -1]
        # awm linear: the rollout policy, whose matching likelihood the ratio divides by
        old = copy.deepcopy(pol).eval().requires_grad_(False) if c.algo == "awm" and c.awm_weights == "linear" else None
        for _ in range(c.epochs):
            for idx in torch.randperm(D, generator=g).split(c.batch_size):
                idx = idx.to(self.device)
                cond, lat, a = batch.cond[idx], batch.latents[idx], adv[idx]
                if c.algo == "awm":
                    if old is not None:
                        ratio = self.matching_ratio(pol, old, cond, x0[idx], int(torch.randint(2**62, (1,), generator=g)))
                        loss, frac = clipped_surrogate(ratio, a.clamp(-AWM_ADV_CLAMP, AWM_ADV_CLAMP).repeat(c.awm_draws),
                                                       c.awm_clip)
                        clipped.append(frac)
                    else:
                        w = torch.exp(a / c.temperature).clamp(max=c.max_weight)
                        loss = (w * pol.process.loss(pol.field_fn(cond), x0[idx])).mean()
                    mu = self.chain.means(pol, cond, lat[:, :-1]) if self.base is not None else None
                else:
                    logp, mu = self.chain.log_prob(cond, lat)
                    log_ratio = logp - batch.logp[idx]
                    if c.algo == "gspo":  # the chain's length-normalized ratio, one per chunk
                        loss, frac = clipped_surrogate(log_ratio.mean(1).exp(), a, c.seq_clip)
                    else:  # one ratio per denoising step
                        loss, frac = clipped_surrogate(log_ratio.exp(), a[:, None], c.clip)
                    clipped.append(frac)
                if self.base is not None:
                    with torch.no_grad():
                        mu_base = self.chain.means(self.base, cond, lat[:, :-1])
                    kl = ((mu - mu_base) ** 2).sum((2, 3)).mean() / (2 * c.std ** 2)
                    loss = loss + c.kl_coef * kl
                    kls.append(kl.item())
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(self.params, c.grad_clip)
                self.opt.step()
                losses.append(loss.item())
                if self.critic is not None:
                    vloss = ((self.critic(cond) - targets[idx]) ** 2).mean()
                    self.copt.zero_grad(set_to_none=True)
                    vloss.backward()
                    self.copt.step()
        pol.eval()
        out = {"loss": float(np.mean(losses))}
        if clipped:
            out["clip_frac"] = float(np.mean(clipped))
        if kls:
            out["kl"] = float(np.mean(kls))
        return out

    def matching_ratio(self, pol, old, cond: torch.Tensor, x0: torch.Tensor, seed: int) -> torch.Tensor:
        """``(awm_draws * B,)``: exp of the change of each chunk's matching log-likelihood (minus its training loss
        at ``awm_draws`` noise levels and noises, the same draws for both policies) from ``old`` to ``pol``."""
        k = self.cfg.awm_draws
        cond_k, x0_k = cond.repeat(k, 1), x0.repeat(k, 1, 1)
        draws = lambda: torch.Generator(device=x0.device).manual_seed(seed)  # noqa: E731
        with torch.no_grad():
            logp_old = -old.process.loss(old.field_fn(cond_k), x0_k, draws())
        logp = -pol.process.loss(pol.field_fn(cond_k), x0_k, draws())
        return (logp - logp_old).exp()

    def close(self) -> None:
        for env in self.envs if isinstance(self.envs, list) else [self.envs]:
            env.close()


def action_drift(policy, base, env_fn, episodes: int = 5, seed: int = 123) -> float:
    """Mean squared difference (normalized action units) between the fine-tuned and the base policy's chunks on the
    base's own states (observation windows of ``episodes`` base episodes), from the same noise."""
    from dpolicy.eval.rollout import make_vector_env
    from dpolicy.eval.runner import run_episodes

    windows = []

    class Spy:  # the base, recording the windows it decides on
        def __getattr__(self, k):
            return getattr(base, k)

        def act(self, obs, noise=None, steps=None, generator=None):
            windows.append(({k: v.clone() for k, v in obs.items()}, None if noise is None else noise.clone()))
            return base.act(obs, noise=noise, steps=steps, generator=generator)

    venv = make_vector_env(env_fn, min(episodes, 10))
    try:
        with torch.no_grad():
            run_episodes(Spy(), venv, [seed + i for i in range(episodes)])
    finally:
        venv.close()
    diffs = []
    norm = base.normalizer.action.normalize
    with torch.no_grad():
        for obs, noise in windows:
            a, b = policy.act(obs, noise=noise), base.act(obs, noise=noise)
            diffs.append(((norm(a) - norm(b)) ** 2).mean().item())
    return float(np.mean(diffs))


def finetune(cfg: FinetuneConfig, run_dir, log=None) -> dict:
    """Fine-tune ``cfg.base``; writes metrics.json, finetune_curve.png and finetuned/ into ``run_dir``."""
    from tqdm import tqdm

    from dpolicy.eval import plot_success_vs
    from dpolicy.kinds import load_policy
    from dpolicy.policy.checkpoint import resolve_checkpoint
    from dpolicy.tasks import env_factory, policy_env_args
    from dpolicy.utils import resolve_device, seed_everything

    log = log or logger.info
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    base_dir = resolve_checkpoint(cfg.base)
    policy = load_policy(base_dir, device)
    base = load_policy(base_dir, device).eval()
    env_fn = env_factory(policy_env_args(policy, f"checkpoint {cfg.base!r} stores no env_args.", None, cfg.env_kwargs))

    from dpolicy.rl.train import _evaluate

    ev = lambda: _evaluate(policy, env_fn, cfg)  # noqa: E731  DSRL's evaluation: same seeds, steps and backend

    tuner = Finetuner(policy, env_fn, cfg)
    t0 = time.perf_counter()
    history = [{"env_steps": 0, "wall_s": 0.0, **ev()}]
    log(f"finetune {cfg.algo}: base success {history[0]['success_rate']:.3f}")
    iters, next_eval = [], cfg.eval_every
    bar = tqdm(total=cfg.env_steps, desc=f"finetune {cfg.algo}", disable=not cfg.progress)
    try:
        while tuner.env_steps < cfg.env_steps:
            before = tuner.env_steps
            it = tuner.iteration()
            it["wall_s"] = time.perf_counter() - t0
            iters.append(it)
            bar.update(tuner.env_steps - before)
            bar.set_postfix(train_success=f"{it['success']:.2f}")
            if tuner.env_steps >= next_eval or tuner.env_steps >= cfg.env_steps:
                rec = {"env_steps": tuner.env_steps, "wall_s": time.perf_counter() - t0, **ev()}
                history.append(rec)
                log(f"finetune {cfg.algo}: {tuner.env_steps} env steps, success {rec['success_rate']:.3f}")
                next_eval = tuner.env_steps + cfg.eval_every
    finally:
        bar.close()
        tuner.close()
    policy.metadata = {**policy.metadata, "finetuned": {"algo": cfg.algo, "base": str(base_dir), "env_steps": tuner.env_steps}}
    out = run_dir / "finetuned"
    policy.save(out)
    drift = action_drift(policy, base, env_fn)
    wall = time.perf_counter() - t0
    metrics = {"config": {k: v for k, v in cfg.__dict__.items()}, "history": history, "iterations": iters,
               "final": history[-1], "drift_mse": drift, "wall_s": wall,
               "wall_s_per_1000_env_steps": 1000 * wall / max(tuner.env_steps, 1), "checkpoint": str(out)}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    plot_success_vs([h["env_steps"] for h in history], [h["success_rate"] for h in history],
                    [h["success_ci95"] for h in history], "environment steps", run_dir / "finetune_curve.png",
                    title=f"fine-tuning ({cfg.algo})")
    return metrics
