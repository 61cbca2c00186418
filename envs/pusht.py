"""gym-pusht's PushT (optional extra): evaluation with the metrics LeRobot reports.

The environment itself comes from ``adapters.make_pusht`` (state observation ``{"state": (5,)}`` =
agent xy, block xy, block angle; action = the agent's target position rescaled from [0, 512]^2 to
[-1, 1]^2). gym-pusht's reward is ``clip(coverage / 0.95, 0, 1)`` where coverage is the overlap of the
block with the goal T; it reports ``info["coverage"]`` and ``info["is_success"]`` (coverage > 0.95,
which also terminates the episode); episodes are truncated at 300 steps. LeRobot's evaluation reports
``pc_success`` (share of episodes that succeeded), ``avg_max_reward`` (mean over episodes of the
per-episode maximum reward) and ``avg_sum_reward``; ``evaluate`` computes exactly those, plus the
mean per-episode maximum coverage and env steps/s.

No scripted PushT expert is provided: pushing a T to a pose needs contact planning that a small
feedback controller does not do reliably. ``random_policy`` and ``hold_policy`` are the
demonstration-free reference floors. Nothing here imports dpolicy.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from .adapters import make_pusht

SUCCESS_COVERAGE = 0.95


def random_policy(seed: int):
    """Uniform random target positions."""
    rng = np.random.default_rng(seed)
    return lambda obs: rng.uniform(-1.0, 1.0, 2).astype(np.float32)


def hold_policy(seed: int):
    """Target = the agent's own position (it stays where it starts)."""
    return lambda obs: (np.asarray(obs["state"][:2], np.float32) / 256.0 - 1.0)


def episode_metrics(rewards, coverages, successes) -> dict:
    """Per-episode summary from the step-wise rewards, coverages and success flags."""
    if len(rewards) == 0:
        raise ValueError("an episode needs at least one step to be scored")
    return {"sum_reward": float(np.sum(rewards)), "max_reward": float(np.max(rewards)),
            "max_coverage": float(np.max(coverages)), "success": bool(np.any(successes)), "length": len(rewards)}


def aggregate(episodes: list[dict]) -> dict:
    """LeRobot's ``pc_success``, ``avg_max_reward``, ``avg_sum_reward`` over per-episode summaries."""
    if not episodes:
        raise ValueError("no episodes to aggregate")
    n = len(episodes)
    succ = sum(e["success"] for e in episodes)
    return {"episodes": n, "successes": int(succ), "pc_success": succ / n,
            "avg_max_reward": float(np.mean([e["max_reward"] for e in episodes])),
            "avg_sum_reward": float(np.mean([e["sum_reward"] for e in episodes])),
            "mean_max_coverage": float(np.mean([e["max_coverage"] for e in episodes])),
            "mean_length": float(np.mean([e["length"] for e in episodes]))}


def evaluate(make_actor: Callable[[int], Callable], episodes: int = 50, seed: int = 100000, env=None,
             max_steps: int | None = None) -> dict:
    """Roll ``make_actor(episode_seed)`` (a callable obs -> action in [-1, 1]^2) out on seeded episodes."""
    if episodes < 1:
        raise ValueError(f"episodes={episodes} must be at least 1")
    own = env is None
    env = make_pusht() if own else env
    per_episode, steps, t0 = [], 0, time.perf_counter()
    try:
        for i in range(episodes):
            obs, _ = env.reset(seed=seed + i)
            actor = make_actor(seed + i)
            rewards, coverages, successes, done = [], [], [], False
            while not done:
                obs, r, term, trunc, info = env.step(actor(obs))
                rewards.append(float(r))
                coverages.append(float(info.get("coverage", 0.0)))
                successes.append(bool(info.get("is_success", False)))
                done = term or trunc or (max_steps is not None and len(rewards) >= max_steps)
            steps += len(rewards)
            per_episode.append(episode_metrics(rewards, coverages, successes))
    finally:
        if own:
            env.close()
    out = aggregate(per_episode)
    out["steps_per_s"] = steps / (time.perf_counter() - t0)
    out["per_episode"] = per_episode
    return out
