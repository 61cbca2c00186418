"""EDM (Karras et al. 2022): the sigma parameterization with preconditioning, Heun and Euler samplers.

The corruption is ``x = x0 + sigma * eps`` (``alpha = 1``). The network ``F`` is preconditioned:
it sees ``c_in(sigma) * x`` and the denoised chunk is ``D = c_skip(sigma) * x + c_out(sigma) * F``,
with ``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma * sd / sqrt(sigma^2 + sd^2)``,
``c_in = 1 / sqrt(sigma^2 + sd^2)`` and ``sd`` the data's standard deviation. Training draws
``log sigma ~ N(p_mean, p_std^2)``; regressing ``F`` on ``(x0 - c_skip x) / c_out`` is the EDM loss
with its weight ``lambda = 1 / c_out^2`` folded in.

Process time ``t`` in (0, 1] is Karras's rho-spaced noise level,
``sigma(t) = (sigma_min^(1/rho) + t * (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho``, and ``t = 0`` is
clean data, so a uniform grid in ``t`` is the EDM sampling schedule and the last step lands on
``sigma = 0``. Sampling starts from ``sigma_max * noise``. Heun's method takes two network
evaluations per step (one on the last step, onto clean data); both samplers are deterministic
functions of the initial noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dpolicy.errors import ConfigError
from dpolicy.process.base import Process, StepPlan, register, uniform_schedule


@dataclass(frozen=True)
class EDMOptions:
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5  # normalized action chunks lie in [-1, 1]
    rho: float = 7.0
    p_mean: float = -1.2  # training noise levels: log sigma ~ N(p_mean, p_std^2)
    p_std: float = 1.2

    def __post_init__(self):
        finite = all(math.isfinite(v) for v in (self.sigma_min, self.sigma_max, self.sigma_data, self.rho,
                                                  self.p_mean, self.p_std))
        if not (finite and 0 < self.sigma_min < self.sigma_max and self.sigma_data > 0 and self.rho > 0
                and self.p_std > 0):
            raise ConfigError(f"EDM options {self} must be finite with 0 < sigma_min < sigma_max, sigma_data > 0, "
                              f"rho > 0 and p_std > 0.")


@register("edm")
class EDM(Process):
    samplers = ("heun", "euler")
    Options = EDMOptions

    def __init__(self, sampler: str = "heun", options: EDMOptions | None = None, clip_sample: bool = True):
        if sampler not in self.samplers:
            raise ConfigError(f"process.sampler={sampler!r} is unknown for edm; choose one of {self.samplers}.")
        self.sampler = sampler
        self.options = options or EDMOptions()
        self.clip_sample = bool(clip_sample)
        o = self.options
        self._lo, self._hi = o.sigma_min ** (1 / o.rho), o.sigma_max ** (1 / o.rho)
        self.noise_scale = o.sigma_max

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.sampler, cls.parse_options(getattr(cfg, "options", None)), cfg.clip_sample)

    def with_sampler(self, sampler, **settings):
        if settings:
            raise ConfigError(f"sampler settings {sorted(settings)} are unknown for edm.")
        if sampler not in self.samplers:
            raise ConfigError(f"sampler={sampler!r} does not fit an edm policy; choose one of {self.samplers}.")
        return EDM(sampler, self.options, self.clip_sample)

    # -- noise levels ---------------------------------------------------------------------------------
    def sigma(self, t: float) -> float:
        if t <= 0:
            return 0.0
        return (self._lo + t * (self._hi - self._lo)) ** self.options.rho

    def _t_of_sigma(self, s: torch.Tensor) -> torch.Tensor:
        return (s ** (1 / self.options.rho) - self._lo) / (self._hi - self._lo)

    def _precond(self, sigma: float) -> tuple[float, float, float]:
        sd2 = self.options.sigma_data ** 2
        v = sigma * sigma + sd2
        return sd2 / v, sigma * self.options.sigma_data / math.sqrt(v), 1.0 / math.sqrt(v)  # c_skip, c_out, c_in

    def coefficients(self, t):
        return 1.0, self.sigma(t)

    def noise_to(self, x0, noise, t):
        return x0 + self.sigma(t) * noise

    def net_input_scale(self, t):
        if torch.is_tensor(t) and t.ndim > 0:
            s = (self._lo + t.clamp_min(0) * (self._hi - self._lo)) ** self.options.rho
            return (s * s + self.options.sigma_data ** 2).rsqrt().view(-1, 1, 1)
        return self._precond(self.sigma(float(t)))[2]

    def time_for(self, alpha, sigma):
        if sigma <= 0:
            return 0.0
        s = self.options.sigma_max if alpha <= 0 else min(max(sigma / alpha, self.options.sigma_min), self.options.sigma_max)
        return max((s ** (1 / self.options.rho) - self._lo) / (self._hi - self._lo), 1e-9)

    def field_signature(self):
        return (self.name, self.options)

    # -- the field ------------------------------------------------------------------------------------
    def _denoised(self, f: torch.Tensor, x: torch.Tensor, c_skip: float, c_out: float) -> torch.Tensor:
        x0 = (x * c_skip).add_(f * c_out)
        return x0.clamp(-1, 1) if self.clip_sample else x0

    def split(self, f, x, t):
        s = self.sigma(t)
        c_skip, c_out, _ = self._precond(s)
        x0 = self._denoised(f, x, c_skip, c_out)
        return x0, (x - x0) / s

    def join(self, x0, eps, t):
        s = self.sigma(t)
        c_skip, c_out, _ = self._precond(s)
        return (x0 - c_skip * (x0 + s * eps)) / c_out

    # -- training -------------------------------------------------------------------------------------
    def loss(self, field_fn, x0, generator=None):
        o, b = self.options, x0.shape[0]
        ln = torch.randn(b, device=x0.device, generator=generator) * o.p_std + o.p_mean
        sigma = ln.exp().clamp(o.sigma_min, o.sigma_max)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        s = sigma.view(b, 1, 1)
        x_t = x0 + s * noise
        v = s * s + o.sigma_data ** 2
        c_skip, c_out = o.sigma_data ** 2 / v, s * o.sigma_data / v.sqrt()
        target = (x0 - c_skip * x_t) / c_out
        return (field_fn(x_t, self._t_of_sigma(sigma)).float() - target).pow(2).mean(dim=(1, 2))

    # -- sampling -------------------------------------------------------------------------------------
    def schedule(self, steps, t_start=1.0):
        return uniform_schedule(steps, t_start)

    def step_plan(self, t, t_next):
        s, s_next = self.sigma(t), self.sigma(t_next)
        heun = self.sampler == "heun" and s_next > 0
        pre = self._precond(s)[:2]
        pre_next = self._precond(s_next)[:2] if heun else (0.0, 0.0)
        return StepPlan(t, t_next, (t, t_next) if heun else (t,), (s, s_next, *pre, *pre_next, heun))

    def apply_step(self, plan, field, x, draw=None):
        s, s_next, c_skip, c_out, c_skip_n, c_out_n, heun = plan.coef
        x0 = self._denoised(field(0, x), x, c_skip, c_out)
        if s_next == 0.0:  # onto clean data
            return x0
        r = s_next / s  # Euler in sigma: x + (s_next - s) (x - x0) / s = x0 + r (x - x0)
        x_next = (x - x0).mul_(r).add_(x0)
        if not heun:
            return x_next
        x0_n = self._denoised(field(1, x_next), x_next, c_skip_n, c_out_n)
        d = (x - x0).div_(s).add_((x_next - x0_n).div_(s_next))
        return d.mul_(0.5 * (s_next - s)).add_(x)
