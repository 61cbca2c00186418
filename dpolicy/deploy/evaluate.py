"""Success rates of a controller over seeded episodes, batched over a vector env.

The same protocol as ``dpolicy.eval.evaluate`` (episode ``i`` is reset with seed ``seed + i``,
results stored by episode index, Wilson interval), but actions come from a ``Controller`` with one
slot per sub-env, so chunked and RTI execution are compared on identical episodes. A slot's noise is
reseeded from its episode's seed at every reset, so an episode's outcome does not depend on which
slot ran it. Latency is not measured here (the batch is not the deployment case): see ``run_loop``.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from dpolicy.deploy.controller import Controller
from dpolicy.errors import ConfigError
from dpolicy.eval import EpisodeRecord, EvalResult, make_vector_env, summarize
from dpolicy.eval.runner import info_field


def evaluate_controller(policy, env_fn: Callable[[], object], n_episodes: int = 50, n_envs: int = 10, seed: int = 0,
                        max_steps: int | None = None, progress: bool = False, **controller_kwargs) -> EvalResult:
    """Roll out ``Controller(policy, batch_size=n_envs, **controller_kwargs)`` on ``n_episodes`` episodes.

    The result's ``policy_calls`` is the number of network evaluations summed over the episodes'
    decisions (per episode, not per batched call), so ``policy_calls / sum(lengths)`` is the mean
    number of evaluations per executed action."""
    if n_episodes < 1 or n_envs < 1:
        raise ConfigError(f"n_episodes={n_episodes} and n_envs={n_envs} must be at least 1.")
    n_envs = min(n_envs, n_episodes)
    ctrl = Controller(policy, batch_size=n_envs, **controller_kwargs)
    venv = make_vector_env(env_fn, n_envs)
    seeds = [seed + i for i in range(n_episodes)]
    space = venv.single_action_space
    idle = np.clip(np.zeros(space.shape), space.low, space.high).astype(space.dtype)
    records: list[EpisodeRecord | None] = [None] * n_episodes
    slot_ep = np.full(n_envs, -1)
    ret = np.zeros(n_envs)
    length = np.zeros(n_envs, dtype=np.int64)
    success = np.zeros(n_envs, dtype=bool)
    unstable = np.zeros(n_envs, dtype=bool)
    mode: list[int | None] = [None] * n_envs
    next_ep = 0
    evals = 0

    from tqdm.auto import tqdm

    bar = tqdm(total=n_episodes, desc="eval", disable=not progress, leave=False)

    def start(slot: int) -> int | None:
        nonlocal next_ep
        ret[slot], length[slot], success[slot], unstable[slot], mode[slot] = 0.0, 0, False, False, None
        if next_ep >= n_episodes:
            slot_ep[slot] = -1
            return None
        slot_ep[slot], next_ep = next_ep, next_ep + 1
        return seeds[slot_ep[slot]]

    t0 = time.perf_counter()
    try:
        reset_seeds = [start(i) for i in range(n_envs)]
        obs, _ = venv.reset(seed=reset_seeds)
        ctrl.reset(seed=[s if s is not None else 0 for s in reset_seeds])
        while (slot_ep >= 0).any():
            active = slot_ep >= 0
            actions = ctrl.step({k: obs[k] for k in ctrl.obs_keys})
            evals += int(ctrl.last_evals[active].sum())
            actions = np.where(active[:, None], actions, idle[None]).astype(space.dtype)
            obs, rew, term, trunc, info = venv.step(actions)
            rows = np.nonzero(active)[0]
            ret[rows] += rew[rows]
            length[rows] += 1
            success[rows] |= info_field(info, "is_success", n_envs, False, bool)[rows]
            unstable[rows] |= info_field(info, "sim_unstable", n_envs, False, bool)[rows]
            if "mode" in info:
                mode_now = info_field(info, "mode", n_envs, -1, np.int64)
                present = np.asarray(info.get("_mode", np.ones(n_envs, dtype=bool)), dtype=bool)
                for r in rows:
                    if present[r]:
                        mode[r] = int(mode_now[r])
            done = np.asarray(term, dtype=bool) | np.asarray(trunc, dtype=bool)
            ep_done = active & (done | ((length >= max_steps) if max_steps else False))
            for r in np.nonzero(ep_done)[0]:
                records[slot_ep[r]] = EpisodeRecord(seed=seeds[slot_ep[r]], success=bool(success[r]), ret=float(ret[r]),
                                                    length=int(length[r]), mode=mode[r], unstable=bool(unstable[r]))
                bar.update(1)
            reset_mask = ep_done | (~active & done)
            if reset_mask.any() and (next_ep < n_episodes or (active & ~ep_done).any()):
                new_seeds = [start(r) if reset_mask[r] and active[r] else None for r in range(n_envs)]
                obs, _ = venv.reset(seed=new_seeds, options={"reset_mask": reset_mask})
                rows = np.nonzero(reset_mask)[0]
                ctrl.reset(mask=reset_mask, seed=[new_seeds[r] if new_seeds[r] is not None else 0 for r in rows])
            else:
                slot_ep[ep_done] = -1
    finally:
        bar.close()
        venv.close()
    return summarize(records, time.perf_counter() - t0, evals)
