"""Asynchronous chunk execution: the policy thinks while the robot moves.

An inference started at control step ``t0`` reads the observation of ``t0`` and delivers its chunk ``d``
control steps later (the *delay*); meanwhile the robot keeps executing the current chunk. When the new chunk
arrives at ``t0 + d`` the executor switches to it at index ``d`` (its entry for the current time). A new
inference starts every ``s`` steps (the execution horizon, ``max(Ta, d)`` by default), so every chunk
executes ``s`` actions, indices ``[d, d + s)``. The first chunk of an episode is computed before the robot
starts (as real-time chunking does), so ``d = 0`` is exactly synchronous chunked execution.

How the new chunk is made consistent with the one being executed is the *strategy*:

* ``naive``: switch to the new chunk as it is (what a synchronous policy does when run asynchronously);
* ``ensemble``: ACT's temporal ensembling: the action for time ``t`` is the average of every delivered
  chunk's entry for ``t``, with weights ``exp(-m i)`` (``i = 0`` the oldest);
* ``bid``: bidirectional decoding's backward coherence: ``candidates`` chunks are sampled and the one closest
  to the current chunk over their overlap (squared distance weighted ``rho^j``) is kept (its forward-contrast
  term needs a second, weaker policy and is left out);
* ``rtc``: real-time chunking (Black, Galliker and Levine 2025): guided inpainting during denoising (or, with
  ``guidance=trained``, its training-time form: a policy trained with ``policy.prefix`` committed actions as
  conditioning (see ``ChunkPolicy``) is given the frozen prefix and denoises the rest without guidance). The
  first ``d`` entries (executed from the current chunk while the inference runs) are frozen, the overlap
  ``[d, H - s)`` is pulled towards the current chunk with exponentially decaying weights (``mask=soft``) or
  left free (``mask=hard``), the rest is free; ``overlap`` shortens the guided window to the overlap's first
  entries, so a chunk replanned often is not held to a plan several replans old. At each step the predicted
  clean chunk's weighted error to the target is back-propagated through the network (a vector-Jacobian
  product) and added to the step with
  RTC's clipped weight ``min(beta, (1 - tau) / (tau r^2))`` (tau: the paper's time, 0 = noise); the hard
  mask also replaces the frozen entries by the noised target at every step (inpainting), so the delivered
  chunk's frozen prefix is the committed actions exactly.

``warm`` (RTI inside the async loop): the new chunk's denoising starts from the current chunk shifted to the
new chunk's time, re-noised to the first of ``warm`` timesteps, instead of from noise.

With a forward model (``dpolicy.deploy.forward``, ``predictor=``), an inference does not plan from the stale
observation of ``t0``: the window is rolled forward through the ``d`` committed actions and the new chunk is
planned for ``t0 + d``, where it takes over (its first ``d`` entries are the committed actions); the strategies
then compare it with the current chunk from ``t0 + d`` on.

``AsyncChunker`` runs B slots in lockstep with a deterministic injected delay (the benchmark harness: the
chunk is computed when the inference starts and delivered ``d`` steps later, so results are exactly
reproducible); ``LiveAsyncRunner`` runs one episode with a real inference thread and wall-clock delay.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from dpolicy.deploy.kernel import shift_chunk
from dpolicy.deploy.schedule import resolve_timesteps, warm_schedule
from dpolicy.config import MASKS, STRATEGIES, AsyncConfig  # noqa: F401  (the settings live with the other configs)
from dpolicy.errors import ConfigError
from dpolicy.policy.history import ObsHistory

def soft_weights(H: int, d: int, s: int, overlap: int | None = None) -> torch.Tensor:
    """RTC's soft mask over a chunk of ``H``: 1 on the frozen ``[0, d)``, exponentially decaying weights on the
    overlap ``[d, H - s)`` (or only its first ``overlap`` entries), 0 on the rest."""
    w = torch.zeros(H)
    w[:d] = 1.0
    end = max(d, H - s) if overlap is None else min(max(d, H - s), d + overlap)
    for j in range(d, end):
        c = (end - j) / (end - d + 1)
        w[j] = c * (math.exp(c) - 1) / (math.e - 1)
    return w


def rtc_weight(t: float, beta: float) -> float:
    """RTC's guidance weight at process time ``t`` (1 = noise): ``min(beta, (1 - tau) / (tau r^2))``, tau = 1 - t."""
    tau = 1.0 - t
    if tau <= 0.0 or tau >= 1.0:
        return beta
    r2 = (1 - tau) ** 2 / (tau ** 2 + (1 - tau) ** 2)
    return min(beta, (1 - tau) / (tau * r2))


def rtc_sample(process, fn, x: torch.Tensor, schedule, target: torch.Tensor, weights: torch.Tensor, beta: float,
               frozen: int = 0, noise: torch.Tensor | None = None, generator=None, guidance: str = "vjp") -> torch.Tensor:
    """Denoise ``x`` along ``schedule`` with RTC's guidance towards ``target`` (B, Tp, Da), ``weights`` (B, Tp).
    ``frozen > 0`` (the hard mask) also writes ``target[:, :frozen]``, noised to the step's time with ``noise``,
    into ``x`` before every step and the clean target after the last, so those entries come out exactly."""
    w = weights[..., None]
    for t, t_next in schedule:
        if frozen:
            x = x.clone()
            x[:, :frozen] = process.noise_to(target[:, :frozen], noise[:, :frozen], t)
        # RTC moves the sample by (t - t_next) * weight * g in one Euler step of a flow. Here the guidance shifts
        # the predicted clean chunk by delta * g, the noise estimate staying consistent with x_t, which moves the
        # next sample by delta * (alpha' - sigma' alpha / sigma) * g: delta is chosen so the two agree
        a, sg = process.coefficients(t)
        a_n, s_n = process.coefficients(t_next)
        gain = a_n - s_n * a / sg if sg > 0 else a_n
        delta = rtc_weight(t, beta) * (t - t_next) / max(gain, 1e-3)

        def guided(xq, tq, delta=delta):
            if guidance == "vjp":
                with torch.enable_grad():
                    xg = xq.detach().requires_grad_(True)
                    f = fn(xg, tq)
                    x0, eps = process.split(f, xg, tq)
                    (g,) = torch.autograd.grad(x0, xg, grad_outputs=((target - x0) * w).detach())
                x0 = x0.detach() + delta * g
            else:  # direct: the Jacobian taken as the identity, the correction capped at the target itself
                x0, eps = process.split(fn(xq, tq), xq, tq)
                x0 = x0 + min(delta, 1.0) * (target - x0) * w
            a_q, s_q = process.coefficients(tq)
            eps = (xq - a_q * x0) / s_q if s_q > 1e-6 else eps.detach()
            return process.join(x0, eps, tq)

        x = process.step(guided, x, t, t_next, generator)
    if frozen:
        x = x.clone()
        x[:, :frozen] = target[:, :frozen]
    return x


@dataclass
class SwitchStats:
    """Action discontinuity of executed sequences: jumps ``|a_t - a_{t-1}|`` and jerks (third differences) at the
    steps where a new chunk took over vs at the other steps."""

    switch_jumps: list = field(default_factory=list)
    within_jumps: list = field(default_factory=list)
    switch_jerks: list = field(default_factory=list)
    within_jerks: list = field(default_factory=list)

    def add_episode(self, actions: Sequence[np.ndarray], switches: Sequence[bool]) -> None:
        a = np.asarray(actions, dtype=np.float64)
        for t in range(1, len(a)):
            jump = float(np.linalg.norm(a[t] - a[t - 1]))
            (self.switch_jumps if switches[t] else self.within_jumps).append(jump)
            if t >= 3:
                jerk = float(np.linalg.norm(a[t] - 3 * a[t - 1] + 3 * a[t - 2] - a[t - 3]))
                (self.switch_jerks if switches[t] else self.within_jerks).append(jerk)

    def summary(self) -> dict:
        f = lambda v, op: float(op(v)) if v else float("nan")  # noqa: E731
        return {"switch_jump_mean": f(self.switch_jumps, np.mean), "switch_jump_max": f(self.switch_jumps, np.max),
                "within_jump_mean": f(self.within_jumps, np.mean), "within_jump_max": f(self.within_jumps, np.max),
                "switch_jerk_mean": f(self.switch_jerks, np.mean), "within_jerk_mean": f(self.within_jerks, np.mean),
                "switches": len(self.switch_jumps)}


class ChunkPlanner:
    """Makes the chunks of an asynchronous executor: a batch of inferences, each from its slot's observation
    history and (when it has one) the chunk it will take over from."""

    def __init__(self, policy, cfg: AsyncConfig):
        self.policy, self.cfg = policy, cfg
        self.process = policy.process
        self.Tp, self.Da, self.Ta = policy.Tp, policy.action_dim, policy.Ta
        self.d = cfg.delay
        self.s = cfg.horizon or max(self.Ta, self.d)
        if self.d + self.s > self.Tp:
            raise ConfigError(f"delay {self.d} + execution horizon {self.s} exceed the chunk length Tp={self.Tp}: "
                              f"the chunk would run out before the next one arrives.")
        if self.d > self.s:
            raise ConfigError(f"delay {self.d} is longer than the execution horizon {self.s}: set horizon >= delay.")
        self.trained = cfg.strategy == "rtc" and cfg.guidance == "trained"
        if self.trained and self.d > 0:
            n = getattr(getattr(policy, "cfg", None), "prefix", 0)
            if not hasattr(policy, "with_prefix") or n < self.d:
                raise ConfigError(f"guidance=trained needs a policy trained with policy.prefix >= delay {self.d} "
                                  f"committed actions; this one has {n or 'none'} (train with policy.prefix={self.d}, "
                                  f"or use guidance=vjp).")
        guided = cfg.strategy == "rtc" or cfg.warm is not None
        if guided and not getattr(self.process, "denoising", False):
            raise ConfigError(f"strategy={cfg.strategy} / warm starts need a denoising process; "
                              f"a {self.process.name} policy has no denoising chain.")
        self.steps = policy.resolve_steps(cfg.steps)
        self.schedule = self.process.schedule(self.steps) if self.process.denoising else None
        self.warm_schedule = None
        if cfg.warm is not None:
            self.warm_schedule = warm_schedule(self.process, resolve_timesteps(self.process, timesteps=cfg.warm))
        self.weights = soft_weights(self.Tp, self.d, self.s, cfg.overlap) if cfg.mask == "soft" else \
            torch.cat([torch.ones(self.d), torch.zeros(self.Tp - self.d)])
        self.evals = 0      # network evaluations (forward passes), summed over slots
        self.backwards = 0  # vector-Jacobian products (rtc)

    def _noise_start(self, cond, noise):
        noise_for = getattr(self.policy, "noise_for", None)  # a steered policy's actor picks the noise
        return noise_for(cond, noise) if noise_for is not None else noise

    def plan(self, window: dict, noise: torch.Tensor, prev: torch.Tensor | None, offset: int,
             generator=None) -> torch.Tensor:
        """Normalized chunks ``(B, Tp, Da)`` for the observation windows; ``noise`` is ``(B, N, Tp, Da)`` (N
        candidates for bid, else 1). ``prev`` (B, Tp, Da) normalized, or None: the chunk being executed, whose
        entry ``offset + j`` is planned for the new chunk's time ``j``."""
        pol, cfg, proc = self.policy, self.cfg, self.process
        B, N = noise.shape[:2]
        if prev is not None and offset >= self.Tp:  # the current chunk has run out: nothing left to agree with
            prev = None
        with torch.no_grad():
            cond = pol.encode(window)
            target = None
            if prev is not None:
                target = shift_chunk(prev, offset)  # the current chunk on the new chunk's clock (last entry repeated)
            if N > 1:  # bid: the candidates as one batch
                cond_n = pol.encode({k: v.repeat_interleave(N, 0) for k, v in window.items()})
                chunks = pol.sample_normalized(cond_n, noise.reshape(B * N, self.Tp, self.Da), self.steps, generator)
                self.evals += B * N * proc.evals(self.schedule) if self.schedule else B * N
                chunks = chunks.reshape(B, N, self.Tp, self.Da)
                if target is None:
                    return chunks[:, 0]
                overlap = self.Tp - offset
                wj = self.cfg.rho ** torch.arange(overlap, dtype=chunks.dtype, device=chunks.device)
                dist = (((chunks[:, :, :overlap] - target[:, None, :overlap]) ** 2).sum(-1) * wj).sum(-1)
                return chunks[torch.arange(B), dist.argmin(1)]
            eps = noise[:, 0]
            if target is not None and self.warm_schedule is not None:  # RTI: continue the current chunk
                sched = self.warm_schedule
                x = proc.noise_to(target, eps, sched[0][0])
            else:
                sched = self.schedule
                if sched is None:  # not a denoising process (regression): the policy's own map
                    self.evals += B
                    return pol.sample_normalized(cond, eps, self.steps, generator)
                x = proc.from_noise(self._noise_start(cond, eps))
            self.evals += B * proc.evals(sched)
            if self.trained and self.d > 0 and target is not None:  # the committed actions as conditioning, kept exactly
                from dpolicy.process import sample_loop

                x = sample_loop(proc, pol.field_fn(pol.with_prefix(cond, target[:, :self.d], self.d)), x, sched, generator)
                x = x.clone()
                x[:, :self.d] = target[:, :self.d]
                return x
            if cfg.strategy == "rtc" and not self.trained and target is not None:
                fn = pol.field_fn(cond)
                w = self.weights.to(x.device)[None].expand(B, -1)
                frozen = self.d if cfg.mask == "hard" else 0
                self.backwards += B * proc.evals(sched) if cfg.guidance == "vjp" else 0
                return rtc_sample(proc, fn, x, sched, target, w, cfg.beta, frozen, eps, generator, cfg.guidance)
            if sched is self.schedule and self.warm_schedule is None:
                return pol.sample_normalized(cond, eps, self.steps, generator)
            from dpolicy.process import sample_loop

            return sample_loop(proc, pol.field_fn(cond), x, sched, generator)


class AsyncChunker:
    """B slots of asynchronous execution with a deterministic injected delay (see the module text). ``reset``
    at episode starts, then ``step(obs) -> (B, Da)`` actions once per control step; ``switched[r]`` says
    whether slot r's last action came from a chunk that just took over."""

    def __init__(self, policy, cfg: AsyncConfig, batch_size: int = 1, seed: int = 0, predictor=None):
        self.policy, self.cfg, self.B = policy, cfg, int(batch_size)
        self.planner = ChunkPlanner(policy, cfg)
        self.d, self.s, self.Tp, self.Da = self.planner.d, self.planner.s, policy.Tp, policy.action_dim
        # with a forward model (dpolicy.deploy.forward) the window is rolled forward through the committed actions
        # and the new chunk is planned for the step it takes over at: no frozen prefix left to plan
        self.predictor, self.ahead = predictor, None
        if predictor is not None:
            predictor.check_policy(policy)
            self.ahead = ChunkPlanner(policy, AsyncConfig(**{**cfg.__dict__, "delay": 0, "horizon": self.s}))
        self.device = torch.device(policy.device)
        self.unnormalize = policy.normalizer.action.unnormalize
        self.history = ObsHistory(policy.obs_keys, policy.To, self.B, self.device, shapes=policy.image_shapes)
        self.N = cfg.candidates if cfg.strategy == "bid" else 1
        self.gens = [torch.Generator(device=self.device).manual_seed(seed + r) for r in range(self.B)]
        self.shared_gen = torch.Generator(device=self.device).manual_seed(seed)
        self.t = np.zeros(self.B, dtype=np.int64)
        self.fresh = np.ones(self.B, dtype=bool)
        self.cur = torch.zeros(self.B, self.Tp, self.Da, device=self.device)        # normalized
        self.cur_env = np.zeros((self.B, self.Tp, self.Da), dtype=np.float32)     # env units
        self.cur_start = np.zeros(self.B, dtype=np.int64)
        self.has_cur = np.zeros(self.B, dtype=bool)
        self.pending: list = [None] * self.B  # (normalized chunk, env chunk, t0)
        self.delivered: list[list] = [[] for _ in range(self.B)]  # ensemble: (env chunk, t0), oldest first
        self.switched = np.zeros(self.B, dtype=bool)
        self.inferences = 0

    def reset(self, mask=None, seeds: Sequence[int] | None = None) -> None:
        rows = np.nonzero(np.ones(self.B, bool) if mask is None else np.asarray(mask, bool))[0]
        for k, r in enumerate(rows):
            if seeds is not None and seeds[k] is not None:
                self.gens[r].manual_seed(int(seeds[k]))
            self.t[r], self.fresh[r], self.has_cur[r], self.pending[r] = 0, True, False, None
            self.delivered[r] = []

    def _switch(self, r: int, chunk, env, t0: int) -> None:
        self.cur[r], self.cur_env[r], self.cur_start[r], self.has_cur[r] = chunk, env, t0, True
        if self.cfg.strategy == "ensemble":
            self.delivered[r] = [(c, s0) for c, s0 in self.delivered[r] if self.t[r] - s0 < self.Tp] + [(env, t0)]
        self.switched[r] = True

    def step(self, obs) -> np.ndarray:
        self.history.read(obs)
        fresh = self.fresh.copy()
        self.history.push(fresh=fresh if fresh.any() else None)
        self.fresh[:] = False
        self.switched[:] = False
        for r in range(self.B):  # chunks that arrive now
            p = self.pending[r]
            if p is not None and self.t[r] == p[2] + self.d:
                self._switch(r, *p)
                self.pending[r] = None
        start = np.nonzero((self.t % self.s) == 0)[0]
        if len(start):
            self._start(start)
        out = np.zeros((self.B, self.Da), dtype=np.float32)
        for r in range(self.B):
            k = int(self.t[r] - self.cur_start[r])
            if self.cfg.strategy == "ensemble":
                live = [(c, s0) for c, s0 in self.delivered[r] if 0 <= self.t[r] - s0 < self.Tp]
                w = np.exp(-self.cfg.decay * np.arange(len(live)))
                out[r] = sum(wi * c[self.t[r] - s0] for wi, (c, s0) in zip(w, live)) / w.sum()
            else:
                out[r] = self.cur_env[r, min(k, self.Tp - 1)]
        self.t += 1
        return out

    def _start(self, rows: np.ndarray) -> None:
        """Start inferences for ``rows`` from their current observation; deliver at once where there is no chunk
        yet (the episode's first, computed before the robot moves) or the delay is 0."""
        with torch.no_grad():
            noise = torch.stack([torch.randn(self.N, self.Tp, self.Da, device=self.device, generator=self.gens[r])
                                 for r in rows])
            has = self.has_cur[rows]
            chunks = torch.empty(len(rows), self.Tp, self.Da, device=self.device)
            window = self.history.window(rows)
            for group in (np.nonzero(~has)[0], np.nonzero(has)[0]):  # first chunks from noise; the rest may use prev
                if not len(group):
                    continue
                sub = {k: v[group] for k, v in window.items()}
                prev = self.cur[rows[group]] if has[group[0]] else None
                offset = int(self.t[rows[group[0]]] - self.cur_start[rows[group[0]]]) if prev is not None else 0
                if prev is not None and np.any(self.t[rows[group]] - self.cur_start[rows[group]] != offset):
                    raise RuntimeError("slots starting together must be at the same offset in their chunks.")
                if prev is not None and self.predictor is not None and self.d > 0:
                    idx = [min(offset + j, self.Tp - 1) for j in range(self.d)]  # executed while this one computes
                    committed = torch.as_tensor(self.cur_env[rows[group]][:, idx], device=self.device)
                    planned = self.ahead.plan(self.predictor.roll(sub, committed), noise[group], prev, offset + self.d,
                                              self.shared_gen)
                    chunks[group] = torch.cat([prev[:, idx], planned[:, :self.Tp - self.d]], 1)
                    self.planner.evals += self.ahead.evals
                    self.planner.backwards += self.ahead.backwards
                    self.ahead.evals = self.ahead.backwards = 0
                else:
                    chunks[group] = self.planner.plan(sub, noise[group], prev, offset, self.shared_gen)
            env = self.unnormalize(chunks).to("cpu", torch.float32).numpy()
        self.inferences += len(rows)
        for k, r in enumerate(rows):
            if not self.has_cur[r] or self.d == 0:
                self._switch(r, chunks[k], env[k], int(self.t[r]))
            else:
                self.pending[r] = (chunks[k], env[k], int(self.t[r]))


def evaluate_async(policy, env_fn: Callable[[], object], cfg: AsyncConfig, n_episodes: int = 50, n_envs: int = 10,
                   seed: int = 0, max_steps: int | None = None, progress: bool = False, predictor=None):
    """Success of asynchronous execution under ``cfg`` (its injected delay) on seeded episodes, with the action
    discontinuity at chunk switches and the network evaluations per control step (``predictor``: a forward model
    that plans each chunk from the observation predicted for its switch step). Returns ``(EvalResult, dict)``."""
    from tqdm.auto import tqdm

    from dpolicy.eval.rollout import make_vector_env, summarize
    from dpolicy.eval.runner import EpisodeRunner

    if n_episodes < 1 or n_envs < 1:
        raise ConfigError(f"n_episodes={n_episodes} and n_envs={n_envs} must be at least 1.")
    n_envs = min(n_envs, n_episodes)
    ex = AsyncChunker(policy, cfg, batch_size=n_envs, seed=seed, predictor=predictor)
    venv = make_vector_env(env_fn, n_envs)
    stats = SwitchStats()
    acts: list[list] = [[] for _ in range(n_envs)]
    sw: list[list] = [[] for _ in range(n_envs)]
    bar = tqdm(total=n_episodes, desc="async", disable=not progress, leave=False)

    def begin(obs, slots, seeds):
        rows = np.nonzero(slots)[0]
        ex.reset(mask=slots, seeds=[None if seeds[r] is None else int(seeds[r]) * 7919 + 1 for r in rows])
        for r in rows:
            if acts[r]:
                stats.add_episode(acts[r], sw[r])
            acts[r], sw[r] = [], []

    def decide(obs, active):
        a = ex.step({k: obs[k] for k in ex.policy.obs_keys})
        for r in np.nonzero(active)[0]:
            acts[r].append(a[r].copy())
            sw[r].append(bool(ex.switched[r]) and len(acts[r]) > 1)
        return a

    runner = EpisodeRunner(venv, [seed + i for i in range(n_episodes)], max_steps=max_steps,
                           on_episode=lambda _: bar.update(1))
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            records = runner.run(decide, begin)
    finally:
        bar.close()
        venv.close()
    for r in range(n_envs):
        if acts[r]:
            stats.add_episode(acts[r], sw[r])
    res = summarize(records, time.perf_counter() - t0, ex.planner.evals)
    steps = int(sum(res.lengths))
    extra = {"strategy": cfg.strategy, "delay": cfg.delay, "horizon": ex.s, "mask": cfg.mask, "predicted": predictor is not None,
             "evals_per_step": ex.planner.evals / max(steps, 1), "backwards_per_step": ex.planner.backwards / max(steps, 1),
             **stats.summary()}
    return res, extra


class LiveAsyncRunner:
    """One episode at a time with a real inference thread: the control loop runs at ``rate_hz`` and never waits
    for the policy; an inference reads the observation of the step it starts at, and its chunk is switched
    in at the index of the step it arrives at (its measured delay). RTC's frozen prefix is sized by the
    largest delay seen so far (in steps, starting from ``cfg.delay``). ``close()`` stops and joins the thread."""

    def __init__(self, policy, cfg: AsyncConfig, seed: int = 0):
        ChunkPlanner(policy, cfg)  # the settings' checks, before any thread starts
        self.policy, self.cfg = policy, cfg
        self.device = torch.device(policy.device)
        self.Tp, self.Da = policy.Tp, policy.action_dim
        self.s = cfg.horizon or max(policy.Ta, cfg.delay)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.requests: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="dpolicy-async-inference", daemon=True)
        self.thread.start()

    def _planner(self, d: int) -> ChunkPlanner:
        d = min(d, self.s, self.Tp - self.s)
        return ChunkPlanner(self.policy, AsyncConfig(**{**self.cfg.__dict__, "delay": d, "horizon": self.s}))

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.requests.get(timeout=0.05)
            except queue.Empty:
                continue
            if job is None:
                break
            window, noise, prev, offset, d, t0 = job
            start = time.perf_counter()
            try:
                chunk = self._planner(d).plan(window, noise, prev, offset, self.gen)
                env = self.policy.normalizer.action.unnormalize(chunk).to("cpu", torch.float32).numpy()[0]
                self.results.put((chunk, env, t0, time.perf_counter() - start, None))
            except Exception as e:  # handed to the control loop, which raises it
                self.results.put((None, None, t0, 0.0, e))

    def run_episode(self, env, seed: int, rate_hz: float, max_steps: int | None = None) -> dict:
        dt = 1.0 / rate_hz
        hist = ObsHistory(self.policy.obs_keys, self.policy.To, 1, self.device, shapes=self.policy.image_shapes)
        obs, _ = env.reset(seed=seed)
        hist.read(obs)
        hist.push(fresh=np.ones(1, bool))
        noise = lambda: torch.randn(1, 1, self.Tp, self.Da, device=self.device, generator=self.gen)  # noqa: E731
        with torch.no_grad():  # the first chunk, before the robot moves
            cur = self._planner(0).plan(hist.window(), noise(), None, 0, self.gen)
        cur_env = self.policy.normalizer.action.unnormalize(cur).to("cpu", torch.float32).numpy()[0]
        cur_start, in_flight, d_est = 0, False, self.cfg.delay
        actions, switches, delays, ret, success, starved = [], [], [], 0.0, False, 0
        t, next_tick = 0, time.perf_counter()
        while True:
            switched = False
            try:
                chunk, env_chunk, t0, latency, err = self.results.get_nowait()
                if err is not None:
                    raise err
                in_flight = False
                self.latencies.append(latency)
                delays.append(t - t0)
                d_est = max(d_est, t - t0)
                cur, cur_env, cur_start, switched = chunk, env_chunk, t0, True
            except queue.Empty:
                pass
            if not in_flight and t - cur_start >= self.s:
                self.requests.put(({k: v.clone() for k, v in hist.window().items()}, noise(), cur.clone(),
                                   t - cur_start, d_est, t))
                in_flight = True
            k = t - cur_start
            starved += int(k >= self.Tp)
            a = cur_env[min(k, self.Tp - 1)]
            obs, r, term, trunc, info = env.step(a)
            actions.append(a.copy())
            switches.append(switched and t > 0)
            ret += float(r)
            success |= bool(info.get("is_success", False))
            t += 1
            hist.read(obs)
            hist.push()
            if term or trunc or (max_steps and t >= max_steps):
                break
            next_tick += dt
            time.sleep(max(0.0, next_tick - time.perf_counter()))
        while in_flight:  # let the last inference finish before the next episode
            chunk, *_ = self.results.get()
            in_flight = False
        return {"seed": seed, "success": success, "return": ret, "length": t, "delays": delays, "starved": starved,
                "actions": actions, "switches": switches}

    def close(self) -> None:
        self._stop.set()
        self.requests.put(None)
        self.thread.join(timeout=10)
