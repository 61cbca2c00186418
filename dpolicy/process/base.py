"""The process interface and the one sampling loop every sampler in dpolicy goes through.

Time runs from 1 (pure noise) to 0 (data) for every process; a schedule is a list of
``(t, t_next)`` pairs with ``t > t_next``. A *field function* ``field_fn(x_t, t) -> field`` hides
the network and the conditioning, so the loop never needs to know about observations, and
several policies' fields can be mixed before a step.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

FieldFn = Callable[[torch.Tensor, float], torch.Tensor]


class Process:
    """Base class. Subclasses define the forward corruption, the training target and the step."""

    stochastic: bool = False  # True when ``step`` draws fresh noise (e.g. DDPM); sampling is then not a function of the initial noise alone

    def loss(self, field_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample training loss (B,) for clean chunks ``x0`` (B, Tp, Da)."""
        raise NotImplementedError

    def schedule(self, steps: int, t_start: float = 1.0) -> list[tuple[float, float]]:
        """``steps`` (t, t_next) pairs from ``t_start`` down to 0."""
        raise NotImplementedError

    def step(self, field_fn: FieldFn, x: torch.Tensor, t: float, t_next: float,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """One step from time ``t`` to ``t_next``; may call ``field_fn`` more than once (Heun)."""
        raise NotImplementedError

    def noise_to(self, x0: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
        """Corrupt clean chunks to time ``t`` (used by warm starts)."""
        raise NotImplementedError

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """Map process time in [0, 1] to the network's time input (a ~[0, 100] scale for every process)."""
        return t * 100.0


def sample_loop(process: Process, field_fn: FieldFn, x: torch.Tensor, schedule: Sequence[tuple[float, float]],
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Integrate ``x`` along ``schedule``. Deterministic given ``x`` unless ``process.stochastic``."""
    for t, t_next in schedule:
        x = process.step(field_fn, x, t, t_next, generator)
    return x
