"""Measurement helpers for the benchmark command: env speed, expert quality, adversarial robustness.

All are pure functions (no printing) returning plain numbers/dicts. ``steps_per_second`` times env
stepping alone (random actions drawn up front, resets included, one process; on an image task every
step renders its cameras). ``renders_per_second`` times an image task's camera rendering alone. ``expert_stats`` runs
seeded expert episodes and reports success, episode lengths and, for avoid, the route (mode) mix.
``adversarial_check`` throws extreme action sequences (+-1e6, NaN, +-inf, bang-bang, mixtures) and a
corrupted simulator state at an env and counts exceptions, non-finite observations and whether
unstable episodes were flagged and ended.
"""

from __future__ import annotations

import time

import numpy as np

from .registry import make_env, make_expert


def steps_per_second(name: str, n_steps: int = 20000, seed: int = 0, **env_kwargs) -> float:
    env = make_env(name, **env_kwargs)
    shape = env.action_space.shape
    actions = np.random.default_rng(seed).uniform(-1.0, 1.0, (n_steps, *shape)).astype(np.float32)
    env.reset(seed=seed)
    start = time.perf_counter()
    for a in actions:
        _, _, terminated, truncated, _ = env.step(a)
        if terminated or truncated:
            env.reset()
    elapsed = time.perf_counter() - start
    env.close()
    return n_steps / elapsed


def renders_per_second(name: str, n_renders: int = 200, seed: int = 0, **env_kwargs) -> float:
    """Camera images per second of an image task (every camera of one state per call, no physics)."""
    env = make_env(name, **env_kwargs)
    base = env.unwrapped
    if not base.cameras:
        env.close()
        raise ValueError(f"{name!r} has no cameras; renders_per_second times the image tasks")
    env.reset(seed=seed)  # makes the renderer, so its start-up is not timed
    start = time.perf_counter()
    for _ in range(n_renders):
        base._render_cameras()
    elapsed = time.perf_counter() - start
    env.close()
    return n_renders * len(base.cameras) / elapsed


def expert_stats(name: str, n_episodes: int = 1000, seed: int = 0, noise_std: float = 0.0, env_kwargs=None,
                 **expert_kwargs) -> dict:
    env = make_env(name, **(env_kwargs or {}))
    expert = make_expert(env, noise_std=noise_std, seed=seed, **expert_kwargs)
    successes, lengths, modes = [], [], []
    for ep in range(n_episodes):
        obs, info = env.reset(seed=seed + ep)
        expert.reset(obs, info)
        done, steps = False, 0
        while not done:
            obs, _, terminated, truncated, info = env.step(expert(obs))
            steps += 1
            done = terminated or truncated
        successes.append(bool(info["is_success"]))
        lengths.append(steps)
        if "mode" in info:
            modes.append(int(info["mode"]))
    env.close()
    out = {"episodes": n_episodes, "success_rate": float(np.mean(successes)), "mean_length": float(np.mean(lengths)),
           "max_length": int(np.max(lengths))}
    if modes:
        vals, counts = np.unique(modes, return_counts=True)
        out["mode_frequencies"] = {int(v): float(c) / len(modes) for v, c in zip(vals, counts)}
        ok = np.asarray(successes)
        out["mode_frequencies_successful"] = {int(v): float(np.sum(ok & (np.asarray(modes) == v))) / max(ok.sum(), 1)
                                              for v in vals}
    return out


_KINDS = ("+1e6", "-1e6", "nan", "+inf", "-inf", "bang_bang", "bang_bang_1e6", "mixed", "huge_random", "corrupt_state")


def _action(kind: str, step: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "+1e6":
        return np.full(dim, 1e6)
    if kind == "-1e6":
        return np.full(dim, -1e6)
    if kind == "nan":
        return np.full(dim, np.nan)
    if kind == "+inf":
        return np.full(dim, np.inf)
    if kind == "-inf":
        return np.full(dim, -np.inf)
    if kind == "bang_bang":
        return np.full(dim, 1.0 if step % 2 else -1.0)
    if kind == "bang_bang_1e6":
        return np.where(rng.random(dim) < 0.5, 1e6, -1e6) * (1.0 if step % 2 else -1.0)
    if kind == "mixed":
        return rng.choice(np.array([np.nan, np.inf, -np.inf, 1e6, -1e6, 1.0, -1.0, 0.0]), dim)
    return rng.normal(0.0, 1e4, dim)  # huge_random and after the corruption in corrupt_state


def adversarial_check(name: str, n_sequences: int = 20, seed: int = 0, steps: int = 60) -> dict:
    """Run ``n_sequences`` adversarial rollouts (cycling through the kinds above) and count problems."""
    env = make_env(name)
    base = env.unwrapped
    rng = np.random.default_rng(seed)
    dim = env.action_space.shape[0]
    out = {"sequences": 0, "steps": 0, "exceptions": 0, "nonfinite_obs": 0, "unstable_flagged": 0,
           "unstable_ended": 0, "unstable_not_ended": 0, "errors": []}
    for i in range(n_sequences):
        kind = _KINDS[i % len(_KINDS)]
        out["sequences"] += 1
        try:
            obs, _ = env.reset(seed=seed + i)
            if kind == "corrupt_state" and hasattr(base, "get_state"):
                # blow the velocities up, as a diverging solver would; the next step must catch it.
                # (1e6, not 1e12: above MuJoCo's own 1e10 limit it would print a warning to stdout.)
                nq, nv = base.model.nq, base.model.nv
                state = base.get_state()
                state[1 + nq:1 + nq + nv] = 1e6
                base.set_state(state)
            for t in range(steps):
                obs, _, terminated, truncated, info = env.step(_action(kind, t, dim, rng).astype(np.float32))
                out["steps"] += 1
                if not all(np.isfinite(v).all() for v in obs.values()):
                    out["nonfinite_obs"] += 1
                if info.get("sim_unstable", False):
                    out["unstable_flagged"] += 1
                    out["unstable_ended" if terminated else "unstable_not_ended"] += 1
                if terminated or truncated:
                    break
        except Exception as e:  # noqa: BLE001 -- counting them is the point
            out["exceptions"] += 1
            out["errors"].append(f"{kind}: {type(e).__name__}: {e}")
    env.close()
    return out
