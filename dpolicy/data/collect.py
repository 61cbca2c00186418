"""Expert rollouts -> a robomimic-layout dataset (the library side of ``dpolicy-collect``).

Only successful episodes are kept by default (``keep_failures=True`` keeps everything, which is
how deliberately weak demonstration sets are made, together with ``noise_std`` and few demos).
Observations keep the environment's dtypes: camera images stay uint8 (T, H, W, C) and are written
compressed, one frame per chunk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpolicy.data.robomimic import Demo, check_compression, storage, write_dataset
from dpolicy.errors import ConfigError


def collect_demos(task: str, n_demos: int, out_path, seed: int = 0, noise_std: float = 0.0, env_kwargs: dict | None = None,
                  expert_kwargs: dict | None = None, keep_failures: bool = False, max_attempts: int | None = None,
                  valid_fraction: float = 0.0, progress: bool = True, compression: str | None = "gzip") -> dict:
    """Roll out the task's scripted expert until ``n_demos`` episodes are kept; write them to ``out_path``
    (images compressed with ``compression``: gzip, lzf or None). The summary gives the demos' lengths, the
    expert's success rate, the file's size and the bytes of images in it."""
    from tqdm import tqdm

    from dpolicy import tasks

    if n_demos < 1:
        raise ConfigError(f"n_demos={n_demos} must be at least 1.")
    check_compression(compression)
    env_kwargs = dict(env_kwargs or {})
    args = tasks.env_args(task, **env_kwargs)
    env = tasks.make_env(args)
    expert = tasks.make_expert(env, noise_std=noise_std, seed=seed, **(expert_kwargs or {}))
    max_attempts = max_attempts or 3 * n_demos + 20
    tally = {"attempts": 0, "successes": 0}
    lengths, modes = [], []

    def episodes():
        """Kept episodes, one at a time, so that only one episode's images are in memory while the file is written."""
        bar = tqdm(total=n_demos, desc=f"collect {task}", disable=not progress, dynamic_ncols=True, leave=False)
        try:
            while len(lengths) < n_demos and tally["attempts"] < max_attempts:
                ep_seed = seed + tally["attempts"]
                tally["attempts"] += 1
                demo, success, info = _episode(env, expert, ep_seed)
                tally["successes"] += success
                if success or keep_failures:
                    lengths.append(len(demo))
                    if "mode" in info:
                        modes.append(int(info["mode"]))
                    bar.update(1)
                    yield demo
        finally:
            bar.close()
            env.close()
        if len(lengths) < n_demos:
            raise ConfigError(f"the {task!r} expert kept only {len(lengths)} of {n_demos} demos in {tally['attempts']} "
                              f"attempts (success {tally['successes']}/{tally['attempts']}); lower noise_std or set "
                              "keep_failures=true.")

    path = write_dataset(Path(out_path), episodes(), args, valid_fraction=valid_fraction, seed=seed, compression=compression)
    attempts = tally["attempts"]
    summary = {"path": str(path), "task": task, "demos": len(lengths), "attempts": attempts,
               "expert_success_rate": tally["successes"] / attempts, "mean_length": float(np.mean(lengths)),
               "min_length": int(np.min(lengths)), "max_length": int(np.max(lengths)), "steps": int(np.sum(lengths)),
               "noise_std": noise_std, "compression": compression, **storage(path)}
    if modes:
        vals, counts = np.unique(modes, return_counts=True)
        summary["mode_frequencies"] = {int(v): float(c) / len(modes) for v, c in zip(vals, counts)}
    return summary


def _episode(env, expert, ep_seed: int) -> tuple[Demo, bool, dict]:
    """One expert episode from ``env.reset(seed=ep_seed)``: the demo, whether it succeeded, the last info."""
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
            rec[k].append(np.array(v))  # a copy, in the env's dtype (uint8 images stay uint8)
        obs, r, term, trunc, info = env.step(action)
        for k, v in obs.items():
            nxt[k].append(np.array(v))
        acts.append(action)
        rews.append(r)
        done = term or trunc
        dones.append(int(done))
        success = success or bool(info.get("is_success", False))
    demo = Demo(obs={k: np.stack(v) for k, v in rec.items()}, next_obs={k: np.stack(v) for k, v in nxt.items()},
                actions=np.stack(acts), rewards=np.asarray(rews, np.float32), dones=np.asarray(dones),
                states=np.stack(states), attrs={"seed": ep_seed, "success": int(success)})
    return demo, success, info
