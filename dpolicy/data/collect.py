"""Expert rollouts -> a robomimic-layout dataset (the library side of ``dpolicy-collect``).

Only successful episodes are kept by default (``keep_failures=True`` keeps everything, which is
how deliberately weak demonstration sets are made, together with ``noise_std`` and few demos).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpolicy.data.robomimic import Demo, write_dataset
from dpolicy.errors import ConfigError


def collect_demos(task: str, n_demos: int, out_path, seed: int = 0, noise_std: float = 0.0, env_kwargs: dict | None = None,
                  expert_kwargs: dict | None = None, keep_failures: bool = False, max_attempts: int | None = None,
                  valid_fraction: float = 0.0, progress: bool = True) -> dict:
    """Roll out the task's scripted expert until ``n_demos`` episodes are kept; write them to ``out_path``."""
    from tqdm import tqdm

    from dpolicy import tasks

    if n_demos < 1:
        raise ConfigError(f"n_demos={n_demos} must be at least 1.")
    env_kwargs = dict(env_kwargs or {})
    args = tasks.env_args(task, **env_kwargs)
    env = tasks.make_env(args)
    expert = tasks.make_expert(env, noise_std=noise_std, seed=seed, **(expert_kwargs or {}))
    max_attempts = max_attempts or 3 * n_demos + 20
    demos, attempts, successes, lengths, modes = [], 0, 0, [], []
    bar = tqdm(total=n_demos, desc=f"collect {task}", disable=not progress, dynamic_ncols=True, leave=False)
    while len(demos) < n_demos and attempts < max_attempts:
        ep_seed = seed + attempts
        attempts += 1
        obs, info = env.reset(seed=ep_seed)
        expert.reset(obs, info)
        rec = {k: [] for k in obs}
        nxt = {k: [] for k in obs}
        acts, rews, dones, states = [], [], [], []
        success, done = False, False
        while not done:
            states.append(env.unwrapped.get_state())
            action = np.asarray(expert(obs), dtype=np.float32)
            for k, v in obs.items():
                rec[k].append(np.asarray(v, np.float32))
            obs, r, term, trunc, info = env.step(action)
            for k, v in obs.items():
                nxt[k].append(np.asarray(v, np.float32))
            acts.append(action)
            rews.append(r)
            done = term or trunc
            dones.append(int(done))
            success = success or bool(info.get("is_success", False))
        successes += success
        if success or keep_failures:
            demos.append(Demo(obs={k: np.stack(v) for k, v in rec.items()}, next_obs={k: np.stack(v) for k, v in nxt.items()},
                              actions=np.stack(acts), rewards=np.asarray(rews, np.float32), dones=np.asarray(dones),
                              states=np.stack(states), attrs={"seed": ep_seed, "success": int(success)}))
            lengths.append(len(acts))
            if "mode" in info:
                modes.append(int(info["mode"]))
            bar.update(1)
    bar.close()
    env.close()
    if len(demos) < n_demos:
        raise ConfigError(f"the {task!r} expert kept only {len(demos)} of {n_demos} demos in {attempts} attempts "
                          f"(success {successes}/{attempts}); lower noise_std or set keep_failures=true.")
    path = write_dataset(Path(out_path), demos, args, valid_fraction=valid_fraction, seed=seed)
    summary = {"path": str(path), "task": task, "demos": len(demos), "attempts": attempts,
               "expert_success_rate": successes / attempts, "mean_length": float(np.mean(lengths)),
               "min_length": int(np.min(lengths)), "max_length": int(np.max(lengths)), "steps": int(np.sum(lengths)),
               "noise_std": noise_std}
    if modes:
        vals, counts = np.unique(modes, return_counts=True)
        summary["mode_frequencies"] = {int(v): float(c) / len(modes) for v, c in zip(vals, counts)}
    return summary
