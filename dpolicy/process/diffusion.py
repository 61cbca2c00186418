"""Diffusion (DDPM training; DDPM and DDIM sampling with any number of steps).

Discrete-time DDPM with ``train_steps`` levels and the cosine ("squaredcos_cap_v2") beta
schedule, as in Diffusion Policy (or the scaled-linear schedule of latent diffusion). Process time
t in [0, 1] maps to level ``k = t * train_steps - 1`` (t=0 is clean data, "alpha-bar = 1"). Sampling
uses the generalized DDIM update between any two levels: ``eta=0`` is deterministic DDIM, ``eta=1``
is the DDPM posterior (ancestral sampling), so DDPM also works with fewer steps than it was trained
with.
"""

from __future__ import annotations

import math

import torch

from dpolicy.errors import ConfigError
from dpolicy.process.base import Process, StepPlan, register

BETA_SCHEDULES = ("cosine", "scaled_linear")


def cosine_alpha_bar(train_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Cumulative alpha products of the cosine schedule (Nichol & Dhariwal), float64, shape (K,)."""
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - f((i + 1) / train_steps) / f(i / train_steps), max_beta) for i in range(train_steps)]
    return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0)


def scaled_linear_alpha_bar(train_steps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Cumulative alpha products of the scaled-linear schedule (betas linear in sqrt), float64, shape (K,)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, train_steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


@register("diffusion")
class Diffusion(Process):
    samplers = ("ddim", "ddpm")

    def __init__(self, train_steps: int = 100, prediction: str = "epsilon", sampler: str = "ddim", eta: float = 0.0,
                 clip_sample: bool = True, beta_schedule: str = "cosine", clip_range: float = 1.0):
        if prediction not in ("epsilon", "sample"):
            raise ConfigError(f"process.prediction={prediction!r} is unknown; choose 'epsilon' or 'sample'.")
        if sampler not in self.samplers:
            raise ConfigError(f"process.sampler={sampler!r} is unknown for diffusion; choose 'ddim' or 'ddpm'.")
        if train_steps < 2:
            raise ConfigError(f"process.train_steps={train_steps} must be at least 2.")
        if beta_schedule not in BETA_SCHEDULES:
            raise ConfigError(f"beta_schedule={beta_schedule!r} is unknown; choose one of {BETA_SCHEDULES}.")
        if not (math.isfinite(eta) and 0.0 <= eta <= 1.0):
            raise ConfigError(f"process.eta={eta} must lie in [0, 1].")
        self.K = train_steps
        self.prediction = prediction
        self.sampler = sampler
        self.eta = 1.0 if sampler == "ddpm" else float(eta)
        self.stochastic = self.eta > 0
        self.clip_sample = clip_sample
        self.clip_range = float(clip_range)
        self.beta_schedule = beta_schedule
        self.alpha_bar = (cosine_alpha_bar if beta_schedule == "cosine" else scaled_linear_alpha_bar)(train_steps)

    @classmethod
    def from_config(cls, cfg):
        cls.parse_options(getattr(cfg, "options", None))
        return cls(train_steps=cfg.train_steps, prediction=cfg.prediction, sampler=cfg.sampler, eta=cfg.eta,
                   clip_sample=cfg.clip_sample)

    def with_sampler(self, sampler, eta: float | None = None, **settings):
        if settings:
            raise ConfigError(f"sampler settings {sorted(settings)} are unknown for diffusion (it takes eta).")
        if sampler not in self.samplers:
            raise ConfigError(f"sampler={sampler!r} does not fit a diffusion policy; choose 'ddim' or 'ddpm'.")
        return Diffusion(self.K, self.prediction, sampler, 0.0 if eta is None else float(eta), self.clip_sample,
                         self.beta_schedule, self.clip_range)

    # -- levels: level k in {0..K-1}; k = -1 stands for clean data --------------------------------------
    @property
    def levels(self) -> int:
        return self.K

    def level(self, t: float) -> int:
        """The level of process time ``t`` (-1 for clean data)."""
        return int(round(t * self.K)) - 1

    def alpha_bar_at(self, t: float) -> float:
        k = self.level(t)
        return 1.0 if k < 0 else float(self.alpha_bar[k])

    def coefficients(self, t):
        ab = self.alpha_bar_at(t)
        return math.sqrt(ab), math.sqrt(1 - ab)

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        return (t * self.K - 1).clamp_min(0) * (100.0 / self.K)

    def time_for(self, alpha, sigma):
        ab = alpha * alpha / (alpha * alpha + sigma * sigma)
        if abs(ab - 1.0) <= 1e-12:
            return 0.0
        k = int((self.alpha_bar - ab).abs().argmin())
        if abs(float(self.alpha_bar[k]) - ab) <= 1e-9 * max(ab, 1e-12) + 1e-15:
            return (k + 1) / self.K
        return None

    def field_signature(self):
        return (self.name, self.K, self.beta_schedule, self.prediction)

    # -- the field ------------------------------------------------------------------------------------
    def _split(self, f: torch.Tensor, x: torch.Tensor, s1ab: float, sab: float):
        """(x0_hat, eps_hat) from the field with sqrt(1 - ab), sqrt(ab) given: the one implementation."""
        x0 = (x - f * s1ab).div_(sab) if self.prediction == "epsilon" else f
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_range, self.clip_range)
        return x0

    def split(self, f, x, t):
        ab = self.alpha_bar_at(t)
        s1ab, sab = math.sqrt(1 - ab), math.sqrt(ab)
        x0 = self._split(f, x, s1ab, sab)
        return x0, (x - x0 * sab).div_(s1ab)

    def join(self, x0, eps, t):
        return eps if self.prediction == "epsilon" else x0

    # -- training -------------------------------------------------------------------------------------
    def loss(self, field_fn, x0, generator=None):
        b = x0.shape[0]
        k = torch.randint(0, self.K, (b,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        ab = self.alpha_bar.to(x0.device, torch.float32)[k].view(b, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        pred = field_fn(x_t, (k + 1).float() / self.K)
        target = noise if self.prediction == "epsilon" else x0
        return (pred.float() - target).pow(2).mean(dim=(1, 2))

    # -- sampling -------------------------------------------------------------------------------------
    def schedule(self, steps, t_start=1.0):
        if steps < 1:
            raise ConfigError(f"sampling steps={steps} must be at least 1.")
        k_start = self.level(t_start)
        steps = min(steps, k_start + 1)
        # evenly spaced levels from k_start down to 0, then the clean endpoint
        levels = [round(k_start - i * (k_start + 1) / steps) for i in range(steps)] + [-1]
        return [((a + 1) / self.K, (b + 1) / self.K) for a, b in zip(levels[:-1], levels[1:])]

    def step_plan(self, t, t_next):
        ab, ab_next = self.alpha_bar_at(t), self.alpha_bar_at(t_next)
        sigma = self.eta * math.sqrt(max((1 - ab_next) / (1 - ab) * (1 - ab / ab_next), 0.0))
        last = ab_next == 1.0 and sigma == 0.0  # onto clean data: the step is x0_hat itself
        coef = (math.sqrt(1 - ab), math.sqrt(ab), math.sqrt(ab_next), math.sqrt(max(1 - ab_next - sigma**2, 0.0)),
                sigma, last)
        return StepPlan(t, t_next, (t,), coef, sigma > 0)

    def apply_step(self, plan, field, x, draw=None):
        s1ab, sab, sab_next, c_eps, sigma, last = plan.coef
        x0 = self._split(field(0, x), x, s1ab, sab)
        if last:
            return x0
        eps = (x - x0 * sab).div_(s1ab)
        x_next = (x0 * sab_next).add_(eps.mul_(c_eps))
        if plan.noisy:
            x_next = x_next.add_(draw() * sigma)
        return x_next
