"""Flow matching (rectified flow): straight paths ``x_t = (1 - t) x0 + t * noise``.

The network predicts the velocity ``noise - x0`` (dx/dt); sampling integrates from t=1 to t=0
with Euler or Heun steps over a uniform grid. Both samplers are deterministic functions of
the initial noise, which is what latent-noise steering (DSRL) relies on.
"""

from __future__ import annotations

import torch

from dpolicy.errors import ConfigError
from dpolicy.process.base import Process, StepPlan, register, uniform_schedule


@register("flow")
class Flow(Process):
    samplers = ("euler", "heun")

    def __init__(self, sampler: str = "euler", time_sampling: str = "uniform"):
        if sampler not in self.samplers:
            raise ConfigError(f"process.sampler={sampler!r} is unknown for flow; choose 'euler' or 'heun'.")
        if time_sampling not in ("uniform", "logit_normal"):
            raise ConfigError(f"process.time_sampling={time_sampling!r} is unknown; choose 'uniform' or 'logit_normal'.")
        self.sampler = sampler
        self.time_sampling = time_sampling

    @classmethod
    def from_config(cls, cfg):
        cls.parse_options(getattr(cfg, "options", None))
        return cls(sampler=cfg.sampler, time_sampling=cfg.time_sampling)

    def with_sampler(self, sampler, **settings):
        if settings:
            raise ConfigError(f"sampler settings {sorted(settings)} are unknown for flow.")
        if sampler not in self.samplers:
            raise ConfigError(f"sampler={sampler!r} does not fit a flow policy; choose 'euler' or 'heun'.")
        return Flow(sampler, self.time_sampling)

    def coefficients(self, t):
        return 1.0 - t, t

    def noise_to(self, x0, noise, t):
        return (1 - t) * x0 + t * noise

    def split(self, f, x, t):  # v = eps - x0 and x = (1 - t) x0 + t eps
        return x - t * f, x + (1.0 - t) * f

    def join(self, x0, eps, t):
        return eps - x0

    def time_for(self, alpha, sigma):
        return sigma / (alpha + sigma)

    def loss(self, field_fn, x0, generator=None):
        b = x0.shape[0]
        if self.time_sampling == "uniform":
            t = torch.rand(b, device=x0.device, generator=generator)
        else:  # logit-normal puts more weight on mid-path times (Esser et al., 2024)
            t = torch.sigmoid(torch.randn(b, device=x0.device, generator=generator))
        noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        tt = t.view(b, 1, 1)
        x_t = (1 - tt) * x0 + tt * noise
        return (field_fn(x_t, t).float() - (noise - x0)).pow(2).mean(dim=(1, 2))

    def schedule(self, steps, t_start=1.0):
        return uniform_schedule(steps, t_start)

    def step_plan(self, t, t_next):
        # Heun's last step is Euler (as in Karras et al.): the field at t=0 is not needed
        heun = self.sampler == "heun" and t_next > 0
        return StepPlan(t, t_next, (t, t_next) if heun else (t,), (t_next - t, heun))

    def apply_step(self, plan, field, x, draw=None):
        dt, heun = plan.coef
        v = field(0, x)
        if not heun:
            return x + v * dt
        x_pred = x + v * dt
        return x + (v + field(1, x_pred)).mul_(dt * 0.5)
