"""Diffusion (DDPM training; DDPM and DDIM sampling with any number of steps).

Discrete-time DDPM with ``train_steps`` levels and the cosine ("squaredcos_cap_v2") beta
schedule, as in Diffusion Policy. Process time t in [0, 1] maps to level ``k = t * train_steps - 1``
(t=0 is clean data, "alpha-bar = 1"). Sampling uses the generalized DDIM update between any two
levels: ``eta=0`` is deterministic DDIM, ``eta=1`` is the DDPM posterior (ancestral sampling),
so DDPM also works with fewer steps than it was trained with.
"""

from __future__ import annotations

import math

import torch

from dpolicy.errors import ConfigError
from dpolicy.process.base import FieldFn, Process


def cosine_alpha_bar(train_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Cumulative alpha products of the cosine schedule (Nichol & Dhariwal), float64, shape (K,)."""
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - f((i + 1) / train_steps) / f(i / train_steps), max_beta) for i in range(train_steps)]
    return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0)


class Diffusion(Process):
    def __init__(self, train_steps: int = 100, prediction: str = "epsilon", sampler: str = "ddim", eta: float = 0.0,
                 clip_sample: bool = True):
        if prediction not in ("epsilon", "sample"):
            raise ConfigError(f"process.prediction={prediction!r} is unknown; choose 'epsilon' or 'sample'.")
        if sampler not in ("ddim", "ddpm"):
            raise ConfigError(f"process.sampler={sampler!r} is unknown for diffusion; choose 'ddim' or 'ddpm'.")
        if train_steps < 2:
            raise ConfigError(f"process.train_steps={train_steps} must be at least 2.")
        self.K = train_steps
        self.prediction = prediction
        self.sampler = sampler
        self.eta = 1.0 if sampler == "ddpm" else float(eta)
        self.stochastic = self.eta > 0
        self.clip_sample = clip_sample
        self.alpha_bar = cosine_alpha_bar(train_steps)

    # level k in {0..K-1}; k = -1 stands for clean data
    def _level(self, t: float) -> int:
        return int(round(t * self.K)) - 1

    def _ab(self, k: int) -> float:
        return 1.0 if k < 0 else float(self.alpha_bar[k])

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        return (t * self.K - 1).clamp_min(0) * (100.0 / self.K)

    def loss(self, field_fn, x0, generator=None):
        b = x0.shape[0]
        k = torch.randint(0, self.K, (b,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        ab = self.alpha_bar.to(x0.device, torch.float32)[k].view(b, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        pred = field_fn(x_t, (k + 1).float() / self.K)
        target = noise if self.prediction == "epsilon" else x0
        return (pred.float() - target).pow(2).mean(dim=(1, 2))

    def schedule(self, steps, t_start=1.0):
        if steps < 1:
            raise ConfigError(f"sampling steps={steps} must be at least 1.")
        k_start = self._level(t_start)
        steps = min(steps, k_start + 1)
        # evenly spaced levels from k_start down to 0, then the clean endpoint
        levels = [round(k_start - i * (k_start + 1) / steps) for i in range(steps)] + [-1]
        return [((a + 1) / self.K, (b + 1) / self.K) for a, b in zip(levels[:-1], levels[1:])]

    def _split(self, f: torch.Tensor, x: torch.Tensor, ab: float):
        """Return (x0_hat, eps_hat) from the network field."""
        if self.prediction == "epsilon":
            x0 = (x - math.sqrt(1 - ab) * f) / math.sqrt(ab)
        else:
            x0 = f
        if self.clip_sample:
            x0 = x0.clamp(-1, 1)
        eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        return x0, eps

    def step(self, field_fn: FieldFn, x, t, t_next, generator=None):
        k, k_next = self._level(t), self._level(t_next)
        ab, ab_next = self._ab(k), self._ab(k_next)
        x0, eps = self._split(field_fn(x, t), x, ab)
        sigma = self.eta * math.sqrt(max((1 - ab_next) / (1 - ab) * (1 - ab / ab_next), 0.0))
        x_next = math.sqrt(ab_next) * x0 + math.sqrt(max(1 - ab_next - sigma**2, 0.0)) * eps
        if sigma > 0:
            x_next = x_next + sigma * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        return x_next

    def noise_to(self, x0, noise, t):
        ab = self._ab(self._level(t))
        return math.sqrt(ab) * x0 + math.sqrt(1 - ab) * noise
