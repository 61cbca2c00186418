"""Noise headroom: can steering the initial noise help a base policy at all?

DSRL only chooses the noise the frozen base denoises. From a start state where the base fails
whatever the noise (or succeeds whatever the noise) there is nothing to steer. ``noise_headroom``
replays each of ``n_states`` seeded start states with ``n_noises`` different noise seeds (the base
sampled as DSRL samples it, deterministic given the noise) and reports, per state, the share of
noises that succeed. The share of *mixed* states (some noises succeed, some fail) is the room DSRL
has; the share of states where at least one noise succeeded bounds what a per-episode choice of
noise seeds reaches (a per-decision actor can do better, so it is a floor on the ceiling, not a cap).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from dpolicy.errors import ConfigError


def noise_headroom(policy, env_fn: Callable, n_states: int = 20, n_noises: int = 8, state_seed: int = 500000,
                   max_steps: int | None = None) -> dict:
    """Per-state success over noise seeds for ``policy`` (chunked execution, its own sampler)."""
    from dpolicy.deploy.controller import Controller

    if n_states < 1 or n_noises < 2:
        raise ConfigError(f"noise_headroom needs n_states >= 1 and n_noises >= 2, got {n_states} and {n_noises}.")
    env = env_fn()
    ctrl = Controller(policy, "chunked")
    rate = np.zeros((n_states, n_noises), dtype=bool)
    stride = max(n_states, 1000)  # noise seed n * stride + state: no two pairs share one, however many states
    try:
        for s in range(n_states):
            for n in range(n_noises):
                obs, _ = env.reset(seed=state_seed + s)
                ctrl.reset(seed=n * stride + s)  # a distinct noise stream for every (state, noise) pair
                steps = 0
                while True:
                    obs, _, term, trunc, info = env.step(ctrl.step(obs))
                    steps += 1
                    rate[s, n] |= bool(info.get("is_success", False))
                    if term or trunc or (max_steps and steps >= max_steps):
                        break
    finally:
        env.close()
    per_state = rate.mean(1)
    return {"n_states": n_states, "n_noises": n_noises, "state_seed": state_seed, "per_state": per_state.tolist(),
            "success": float(rate.mean()), "mixed": float(((per_state > 0) & (per_state < 1)).mean()),
            "never": float((per_state == 0).mean()), "always": float((per_state == 1).mean()),
            "best_noise_per_state": float((per_state > 0).mean())}
