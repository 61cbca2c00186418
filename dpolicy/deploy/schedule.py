"""Short warm-start schedules and discrete action dimensions: the two choices RTI adds to sampling.

**Timesteps.** RTI-DP writes its short schedules as explicit lists of DDPM levels, e.g. ``[2, 1, 0]``
of 100. In this project's continuous time (1 = noise, 0 = data) level ``k`` of a ``K``-level diffusion
is ``t = (k + 1) / K``: that is where ``Diffusion`` evaluates the network at level ``k``
(``net_time(t) = k * 100 / K``), and ``t = 0`` is the clean chunk. So ``[2, 1, 0]`` becomes the steps
``0.03 -> 0.02 -> 0.01 -> 0``: three network evaluations, the last one landing on clean data.
A continuous-time policy (flow, edm) has no levels; it reads the same list on a grid of ``levels``
(default 100, the network's time scale), so ``[2, 1, 0]`` enters the ODE at ``t = 0.03`` and takes
three steps of its sampler.
``k = K'`` is shorthand for ``[K'-1, ..., 0]`` and ``"full"`` for every level.

**Discrete dimensions.** A binary gripper jumps between two values; shifting a chunk carries the old
value into the warm start, and a few small denoising steps cannot move it across. RTI-DP's remedies,
selectable per dimension: ``scale`` (the policy was trained with ``policy.action_scale`` < 1 on that
dimension, so the jump is small in normalized space) and ``clip`` (binarize the warm start's entry to
the nearer of the two levels, divided by ``factor``). Both threshold the executed action back to the
two levels. ``threshold`` only thresholds the output (the no-remedy baseline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from dpolicy.errors import ConfigError

REMEDIES = ("clip", "scale", "threshold")


def n_levels(process, levels: int = 100) -> int:
    """How many timesteps the process offers to a warm start: its discrete levels (K for diffusion), or a
    ``levels`` grid for a continuous-time process (flow, edm)."""
    if not process.denoising:
        raise ConfigError(f"warm starts need a denoising process (diffusion, flow, edm); a {process.name} process "
                          f"has no denoising schedule to enter.")
    return process.levels or int(levels)


def resolve_timesteps(process, k: int | str | None = 3, timesteps: Sequence[int] | None = None,
                      levels: int = 100) -> list[int]:
    """The explicit descending level list for ``k`` (or ``timesteps`` as given), validated."""
    n = n_levels(process, levels)
    if timesteps is not None and len(timesteps) > 0:
        ts = [int(v) for v in timesteps]
        if any(float(v) != int(v) for v in timesteps):
            raise ConfigError(f"timesteps={list(timesteps)} must be integers (levels of the schedule).")
        if ts[-1] != 0 or any(a <= b for a, b in zip(ts[:-1], ts[1:])) or ts[0] >= n:
            raise ConfigError(f"timesteps={ts} must be strictly decreasing, end at 0 and start below {n} "
                              f"(the schedule's number of levels).")
        return ts
    if k == "full":
        return list(range(n - 1, -1, -1))
    if isinstance(k, bool) or not isinstance(k, int):
        raise ConfigError(f"k={k!r} must be a positive integer (network evaluations per decision) or 'full'.")
    if k < 1:
        raise ConfigError(f"k={k} must be at least 1.")
    if k > n:
        raise ConfigError(f"k={k} is larger than the schedule: the policy's process has {n} levels.")
    return list(range(k - 1, -1, -1))


def warm_schedule(process, timesteps: Sequence[int], levels: int = 100) -> list[tuple[float, float]]:
    """``(t, t_next)`` pairs through ``timesteps`` and on to clean data (``t = 0``)."""
    n_levels(process, levels)
    ts = [process.level_time(k, levels) for k in timesteps] + [0.0]
    return list(zip(ts[:-1], ts[1:]))


@dataclass(frozen=True)
class DiscreteDim:
    """A binary action dimension: ``low``/``high`` levels and the ``threshold`` between them, in env units."""

    dim: int
    remedy: str = "clip"
    low: float = -1.0
    high: float = 1.0
    threshold: float = 0.0
    factor: float = 1.0  # clip: the warm start's binarized value is divided by this (RTI-DP uses 1)

    def __post_init__(self):
        if self.remedy not in REMEDIES:
            raise ConfigError(f"discrete remedy {self.remedy!r} for action dimension {self.dim} is unknown; "
                              f"choose one of {REMEDIES}.")
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.threshold < self.high):
            raise ConfigError(f"discrete action dimension {self.dim} needs low < threshold < high, got "
                              f"{self.low}, {self.threshold}, {self.high}.")
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise ConfigError(f"discrete factor={self.factor} for action dimension {self.dim} must be positive.")


def parse_discrete(spec, action_dim: int) -> list[DiscreteDim]:
    """``{dim: remedy}``, ``{dim: {remedy:..., low:..., ...}}`` or a list of DiscreteDim -> validated list.

    Dimensions may be negative (``-1`` is the last); each is stored non-negative.
    """
    if spec is None:
        return []
    items = list(spec.items()) if isinstance(spec, Mapping) else [(d.dim, d) for d in spec]
    out, seen = [], set()
    for dim, v in items:
        try:
            dim = int(dim)
        except (TypeError, ValueError):
            raise ConfigError(f"discrete action dimension {dim!r} is not an integer.") from None
        if not -action_dim <= dim < action_dim:
            raise ConfigError(f"discrete action dimension {dim} is out of range for action dimension {action_dim}.")
        dim %= action_dim
        if dim in seen:
            raise ConfigError(f"discrete action dimension {dim} is listed twice.")
        seen.add(dim)
        if isinstance(v, DiscreteDim):
            d = DiscreteDim(dim, v.remedy, v.low, v.high, v.threshold, v.factor)
        elif isinstance(v, str):
            d = DiscreteDim(dim, v)
        elif isinstance(v, Mapping):
            unknown = sorted(set(v) - {"remedy", "low", "high", "threshold", "factor"})
            if unknown:
                raise ConfigError(f"discrete action dimension {dim} has unknown key(s) {unknown}.")
            d = DiscreteDim(dim, **{k: (str(x) if k == "remedy" else float(x)) for k, x in v.items()})
        else:
            raise ConfigError(f"discrete action dimension {dim}: {v!r} is not a remedy name or mapping.")
        out.append(d)
    return sorted(out, key=lambda d: d.dim)
