"""``evaluate``: success rate, returns and mode statistics of a chunk policy over seeded episodes.

Episode ``i`` is reset with seed ``seed + i`` and its latent noise comes from a generator derived
from that seed, so a result is reproducible and the same for any ``n_envs``. The episodes run through the
batched loop in :mod:`dpolicy.eval.runner` on env slots that live in this process (a gymnasium sync vector
env), in worker processes or in Ray actors (:mod:`dpolicy.eval.backends`; the same results under each). Videos, if asked for, are recorded afterwards by replaying the
first episodes in one render-enabled env, which keeps the batched path free of rendering cost.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from dpolicy.errors import ConfigError
from dpolicy.eval.backends import _subprocess_start, make_vector_env  # noqa: F401  (re-exported)
from dpolicy.eval.runner import policy_inference, run_episodes
from dpolicy.eval.stats import wilson_interval


@dataclass
class EvalResult:
    n_episodes: int
    success_rate: float
    success_ci95: tuple[float, float]
    mean_return: float
    std_return: float  # population std (ddof=0) over episodes
    mean_length: float
    mode_counts: dict[int, int]  # final mode -> episodes, modes >= 0 only
    unstable_episodes: int
    seeds: list[int] = field(default_factory=list)
    successes: list[bool] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    modes: list[int | None] = field(default_factory=list)  # None: the env never reported a mode
    unstable: list[bool] = field(default_factory=list)
    wall_time_s: float = 0.0
    policy_calls: int = 0
    video_path: str | None = None
    backend: str = "local"
    placement: str = "learner"
    workers: int = 1
    worker_restarts: int = 0  # rollout workers that died and were replaced (their episodes replayed)

    def to_dict(self) -> dict:
        """Plain JSON types; mode keys become strings so a JSON round trip returns the same dict."""
        d = asdict(self)
        d["success_ci95"] = list(self.success_ci95)
        d["mode_counts"] = {str(k): v for k, v in sorted(self.mode_counts.items())}
        return d

    def summary(self) -> str:
        lo, hi = self.success_ci95
        return (f"success {self.success_rate:.3f} [{lo:.3f}, {hi:.3f}] over {self.n_episodes} episodes, "
                f"return {self.mean_return:.3f} +- {self.std_return:.3f}, length {self.mean_length:.1f}")


def summarize(records, wall_time_s: float = 0.0, policy_calls: int = 0) -> EvalResult:
    """Aggregate per-episode records (in episode order) into an ``EvalResult``."""
    n = len(records)
    succ = [r.success for r in records]
    rets = np.array([r.ret for r in records], dtype=np.float64)
    lens = np.array([r.length for r in records], dtype=np.float64)
    modes = [r.mode for r in records]
    counts: dict[int, int] = {}
    for m in modes:
        if m is not None and m >= 0:  # -1 = the episode ended before a mode was determined
            counts[m] = counts.get(m, 0) + 1
    k = int(sum(succ))
    return EvalResult(
        n_episodes=n,
        success_rate=k / n if n else math.nan,
        success_ci95=wilson_interval(k, n),
        mean_return=float(rets.mean()) if n else math.nan,
        std_return=float(rets.std()) if n else math.nan,
        mean_length=float(lens.mean()) if n else math.nan,
        mode_counts=dict(sorted(counts.items())),
        unstable_episodes=int(sum(r.unstable for r in records)),
        seeds=[r.seed for r in records],
        successes=succ,
        returns=[float(x) for x in rets],
        lengths=[r.length for r in records],
        modes=modes,
        unstable=[r.unstable for r in records],
        wall_time_s=wall_time_s,
        policy_calls=policy_calls,
    )


def evaluate(policy, env_fn: Callable[[], object], n_episodes: int = 50, n_envs: int = 10, seed: int = 0,
             max_steps: int | None = None, video_path: str | Path | None = None, video_episodes: int = 1,
             progress: bool = True, steps: int | None = None, *, backend=None,
             per_episode_noise: bool = True, video_env_fn: Callable[[], object] | None = None,
             video_strict: bool = True, episode_hook: Callable | None = None) -> EvalResult:
    """Roll ``policy`` out for ``n_episodes`` seeded episodes in ``n_envs`` parallel envs.

    ``max_steps`` caps episode length on top of the env's own truncation; ``steps`` is passed to
    ``policy.act`` (sampling steps). ``per_episode_noise=False`` lets the policy draw its own noise
    (from one generator seeded by ``seed``), which ties results to ``n_envs``. The video env is
    ``video_env_fn()`` or, by default, ``env_fn(render_mode="rgb_array")``; ``video_strict=False``
    turns a rendering failure into a warning. ``backend`` (a ``RolloutBackend`` or its kind: local,
    subprocess, ray) places the envs; ``episode_hook(record, envs)`` is called as each episode ends.
    """
    from dpolicy.eval.backends import RolloutBackend, make_rollout_envs, run_sharded

    if n_episodes < 1:
        raise ConfigError(f"n_episodes={n_episodes} must be at least 1.")
    if n_envs < 1:
        raise ConfigError(f"n_envs={n_envs} must be at least 1.")
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"max_steps={max_steps} must be at least 1 (or None for the env's own limit).")
    if video_path is not None and video_episodes > 0 and video_strict:  # before the rollouts, not after them
        from dpolicy.eval.video import check_video_writer

        check_video_writer(video_path)
    seeds = [seed + i for i in range(n_episodes)]
    backend = RolloutBackend.of(backend)
    sharded = backend.placement == "workers"
    venv = None if sharded else make_rollout_envs(env_fn, min(n_envs, n_episodes), backend)

    from tqdm.auto import tqdm

    bar = tqdm(total=n_episodes, desc="eval", disable=not progress, leave=False)
    n_done = n_succ = 0

    def on_episode(rec, workers=None):
        nonlocal n_done, n_succ
        n_done, n_succ = n_done + 1, n_succ + int(rec.success)
        bar.set_postfix(success=f"{n_succ / n_done:.2f}")
        bar.update(1)
        if episode_hook is not None:
            episode_hook(rec, venv if workers is None else workers)

    t0 = time.perf_counter()
    restarts = 0
    kwargs = dict(max_steps=max_steps, steps=steps, per_episode_noise=per_episode_noise)
    try:
        if sharded:
            records, calls, restarts = run_sharded(policy, env_fn, seeds, backend, backend.shard or n_envs, kwargs,
                                                   on_episode=on_episode)
        else:
            with policy_inference(policy):
                records, calls = run_episodes(policy, venv, seeds, on_episode=on_episode, **kwargs)
            restarts = int(sum(getattr(venv, "restarts", [0])))
    finally:
        bar.close()
        if venv is not None:
            venv.close()
    result = summarize(records, time.perf_counter() - t0, calls)
    result.backend, result.placement = backend.kind, backend.placement
    result.workers = 1 if backend.kind == "local" else backend.workers
    result.worker_restarts = restarts

    if video_path is not None and video_episodes > 0:
        from dpolicy.eval.video import record_video

        written = record_video(policy, video_env_fn or env_fn, video_path, n_episodes=min(video_episodes, n_episodes),
                               seed=seed, max_steps=max_steps, steps=steps, per_episode_noise=per_episode_noise,
                               strict=video_strict, env_is_render_ready=video_env_fn is not None)
        result.video_path = None if written is None else str(written)
    return result
