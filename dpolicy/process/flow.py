"""Flow matching (rectified flow): straight paths ``x_t = (1 - t) x0 + t * noise``.

The network predicts the velocity ``noise - x0`` (dx/dt); sampling integrates from t=1 to t=0
with Euler or Heun steps over a uniform grid. Both samplers are deterministic functions of
the initial noise, which is what latent-noise steering (DSRL) relies on.
"""

from __future__ import annotations

import torch

from dpolicy.errors import ConfigError
from dpolicy.process.base import FieldFn, Process


class Flow(Process):
    def __init__(self, sampler: str = "euler", time_sampling: str = "uniform"):
        if sampler not in ("euler", "heun"):
            raise ConfigError(f"process.sampler={sampler!r} is unknown for flow; choose 'euler' or 'heun'.")
        if time_sampling not in ("uniform", "logit_normal"):
            raise ConfigError(f"process.time_sampling={time_sampling!r} is unknown; choose 'uniform' or 'logit_normal'.")
        self.sampler = sampler
        self.time_sampling = time_sampling

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
        if steps < 1:
            raise ConfigError(f"sampling steps={steps} must be at least 1.")
        ts = [t_start * (1 - i / steps) for i in range(steps + 1)]
        return list(zip(ts[:-1], ts[1:]))

    def step(self, field_fn: FieldFn, x, t, t_next, generator=None):
        dt = t_next - t
        v = field_fn(x, t)
        if self.sampler == "euler" or t_next <= 0:
            # Heun's last step is Euler (as in Karras et al.): the field at t=0 is not needed
            return x + dt * v
        x_pred = x + dt * v
        return x + dt * 0.5 * (v + field_fn(x_pred, t_next))

    def noise_to(self, x0, noise, t):
        return (1 - t) * x0 + t * noise
