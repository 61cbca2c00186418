"""A fixed-rate control loop: a batch-1 controller driving one gymnasium env at ``rate_hz``.

Each tick the newest observation goes to ``controller.step`` and the action to ``env.step``; the
observation-to-action time of every decision is recorded (wall clock, and the thread's CPU time,
which separates the controller's own cost from preemption on a shared machine). A decision whose
latency exceeds the control period is a **deadline miss**: on a robot the previous command would
have been held for a period. With ``realtime=True`` the loop sleeps until the next tick (a tick that
overruns is re-anchored, not caught up); with ``realtime=False`` it runs as fast as it can and the
misses are judged against the same period, which gives the same latency statistics without waiting.
``prime=True`` runs each episode's first full solve after ``reset``, before the clock starts (the
robot is at rest), for chunked and RTI alike.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from dpolicy.errors import ConfigError
from dpolicy.eval.stats import wilson_interval


def percentiles(values_ms, qs=(50, 90, 99)) -> dict:
    v = np.asarray(values_ms, dtype=np.float64)
    if v.size == 0:
        return {f"p{q}": float("nan") for q in qs} | {"max": float("nan"), "mean": float("nan")}
    out = {f"p{q}": float(np.percentile(v, q)) for q in qs}
    out.update(max=float(v.max()), mean=float(v.mean()))
    return out


@dataclass
class LoopReport:
    rate_hz: float
    period_ms: float
    realtime: bool
    episodes: int
    decisions: int
    deadline_misses: int
    miss_rate: float
    latency_ms: dict  # wall clock, observation -> action: p50, p90, p99, max, mean
    cpu_ms: dict  # the controller thread's CPU time per decision, same statistics
    nfe_per_decision: float  # network evaluations per decision (on the clock; primed solves excluded)
    nfe_max: int
    primed_evals: int  # network evaluations spent off the clock by prime()
    success_rate: float
    success_ci95: tuple
    successes: list = field(default_factory=list)
    lengths: list = field(default_factory=list)
    wall_s: float = 0.0
    controller: dict = field(default_factory=dict)
    latencies_ms: list | None = None  # every decision's latency when asked for (keep_latencies=True)
    cpu_latencies_ms: list | None = None
    nfe: list | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["success_ci95"] = list(self.success_ci95)
        return d

    def summary(self) -> str:
        lat = self.latency_ms
        lo, hi = self.success_ci95
        return (f"{self.decisions} decisions at {self.rate_hz:g} Hz: latency p50 {lat['p50']:.3f} ms, p90 {lat['p90']:.3f} ms, "
                f"p99 {lat['p99']:.3f} ms; {self.deadline_misses} deadline misses ({self.miss_rate:.2%}); "
                f"{self.nfe_per_decision:.2f} network evaluations per decision; success {self.success_rate:.3f} "
                f"[{lo:.3f}, {hi:.3f}] over {self.episodes} episodes")


def control_rate(env) -> float | None:
    """The env's own control rate (1 / dt) when it says, else None."""
    dt = getattr(getattr(env, "unwrapped", env), "dt", None)
    return 1.0 / float(dt) if dt else None


def run_loop(controller, env, rate_hz: float | None = None, episodes: int = 1, seed: int = 0,
             max_steps: int | None = None, realtime: bool = True, prime: bool = True,
             keep_latencies: bool = False, on_step: Callable | None = None, gc_pause: bool = True) -> LoopReport:
    """Run ``episodes`` seeded episodes (seeds ``seed + i``) of ``env`` (an env or a zero-argument factory).

    ``gc_pause`` keeps Python's cyclic garbage collector from running inside an episode (it runs between
    episodes instead), as real-time Python loops do; reference counting still frees everything.
    """
    if getattr(controller, "B", 1) != 1:
        raise ConfigError(f"the control loop drives one env; the controller has batch_size={controller.B}.")
    if episodes < 1:
        raise ConfigError(f"episodes={episodes} must be at least 1.")
    own = isinstance(env, type) or not hasattr(env, "step")  # a factory (or an env class) to call
    gc_was_enabled = gc.isenabled()
    env = env() if own else env
    try:
        rate = float(rate_hz or control_rate(env) or 0)
        if not rate > 0:
            raise ConfigError("rate_hz is required: the environment does not say its control period (env.dt).")
        period = 1.0 / rate
        lat, cpu, nfe, successes, lengths = [], [], [], [], []
        misses = 0
        evals_before = controller.total_evals
        t_start = time.perf_counter()
        for ep in range(episodes):
            obs, _ = env.reset(seed=seed + ep)
            controller.reset(seed=seed + ep)
            if prime:
                controller.prime(obs)
            success, n = False, 0
            if gc_pause:  # no gc.collect() here: freeing memory right before the clock starts costs page faults in it
                gc.disable()
            tick = time.perf_counter()
            while True:
                t0, c0 = time.perf_counter(), time.thread_time()
                action = controller.step(obs)
                dt, dc = time.perf_counter() - t0, time.thread_time() - c0
                lat.append(dt * 1e3)
                cpu.append(dc * 1e3)
                nfe.append(controller.last_nfe)
                misses += dt > period
                obs, _, term, trunc, info = env.step(action)
                n += 1
                success |= bool(info.get("is_success", False))
                if on_step is not None:
                    on_step(ep, n, action, info)
                if term or trunc or (max_steps and n >= max_steps):
                    break
                if realtime:
                    tick += period
                    wait = tick - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                    else:
                        tick = time.perf_counter()  # overran: start the next period now
            if gc_pause:
                gc.enable()
            successes.append(success)
            lengths.append(n)
        wall = time.perf_counter() - t_start
    finally:
        if gc_pause and not gc_was_enabled:
            gc.disable()
        elif gc_pause:
            gc.enable()
        if own:
            env.close()
    k = int(sum(successes))
    on_clock = int(sum(nfe))
    return LoopReport(
        rate_hz=rate, period_ms=period * 1e3, realtime=realtime, episodes=episodes, decisions=len(lat),
        deadline_misses=int(misses), miss_rate=misses / max(len(lat), 1), latency_ms=percentiles(lat),
        cpu_ms=percentiles(cpu), nfe_per_decision=on_clock / max(len(nfe), 1), nfe_max=int(max(nfe, default=0)),
        primed_evals=int(controller.total_evals - evals_before - on_clock), success_rate=k / episodes,
        success_ci95=wilson_interval(k, episodes), successes=successes, lengths=lengths, wall_s=wall,
        controller=controller.describe(), latencies_ms=lat if keep_latencies else None,
        cpu_latencies_ms=cpu if keep_latencies else None, nfe=nfe if keep_latencies else None)
