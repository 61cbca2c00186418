"""Success rates of a controller over seeded episodes, batched over a vector env.

The same protocol as ``dpolicy.eval.evaluate`` (episode ``i`` is reset with seed ``seed + i``,
results stored by episode index, Wilson interval), but actions come from a ``Controller`` with one
slot per sub-env, so chunked and RTI execution are compared on identical episodes; the episodes run in
the same loop (``dpolicy.eval.runner.EpisodeRunner``), with the controller's step as the decision. A slot's noise is
reseeded from its episode's seed at every reset, so an episode's outcome does not depend on which
slot ran it. Latency is not measured here (the batch is not the deployment case): see ``run_loop``.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from dpolicy.deploy.controller import Controller
from dpolicy.errors import ConfigError
from dpolicy.eval.rollout import EvalResult, make_vector_env, summarize
from dpolicy.eval.runner import EpisodeRunner


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
    evals = 0

    from tqdm.auto import tqdm

    bar = tqdm(total=n_episodes, desc="eval", disable=not progress, leave=False)

    def begin(obs, slots, seeds):  # a slot's noise is reseeded from its episode's seed
        ctrl.reset(mask=slots, seed=[0 if seeds[r] is None else seeds[r] for r in np.nonzero(slots)[0]])

    def decide(obs, active):
        nonlocal evals
        actions = ctrl.step({k: obs[k] for k in ctrl.obs_keys})
        evals += int(ctrl.last_evals[active].sum())
        return actions

    runner = EpisodeRunner(venv, [seed + i for i in range(n_episodes)], max_steps=max_steps,
                           on_episode=lambda _: bar.update(1))
    t0 = time.perf_counter()
    try:
        records = runner.run(decide, begin)
    finally:
        bar.close()
        venv.close()
    return summarize(records, time.perf_counter() - t0, evals)
