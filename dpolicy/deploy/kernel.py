"""``DecisionStep``: one control decision as a pure tensor function, the unit the fast path captures.

    (prev chunk (B,Tp,Da) normalized, obs history (B,To,Dobs) env units, noise (B,Tp,Da),
     step noise (S,B,Tp,Da))  ->  (new chunk (B,Tp,Da) normalized, actions (B,Tp,Da) env units)

A *warm* step shifts ``prev`` left by ``shift`` actions and repeats its last action, binarizes the
``clip`` dimensions, optionally re-noises the result to the first timestep (``process.noise_to``)
and integrates the short schedule; a *cold* step ignores ``prev`` and integrates from ``noise``
(the full solve of chunked execution and of the first RTI decision). Observations are normalized
and actions unnormalized inside, and discrete dimensions are thresholded, so the module is the whole
policy step and an exported copy needs nothing else. Every coefficient (the schedule's time points,
``alpha-bar`` products, step sizes) is a Python float or a buffer fixed at construction: no host
round trip, no data-dependent control flow, which is what CUDA-graph capture and ``torch.export``
require. Randomness enters only through ``noise`` and ``step_noise`` (DDPM's per-step noise, ``S`` =
the number of steps with sigma > 0, at least 1 so the shape never has a zero dimension).

The arithmetic repeats ``Diffusion.step`` / ``Flow.step`` operation for operation (only the
``0 * eps`` of a last step onto clean data is skipped), so for the same inputs the result equals
``sample_loop(process, policy.field_fn(cond), x, schedule)`` (``torch.equal`` on CPU; the tests
check it against the generic path); only ``ChunkPolicy``-shaped policies (a ``net`` called as
``net(x, process.net_time(t), cond)``) have this fast form.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from dpolicy.deploy.schedule import DiscreteDim
from dpolicy.errors import ConfigError
from dpolicy.process import Diffusion, Flow


def has_fast_form(policy) -> bool:
    """True for a ``ChunkPolicy`` (one network, the standard field); compositions and steered policies,
    whose fields or cold-start noise come from elsewhere, run through the controller's generic path."""
    from dpolicy.policy.chunk_policy import ChunkPolicy

    return isinstance(policy, ChunkPolicy) and type(policy).field_fn is ChunkPolicy.field_fn


def shift_chunk(prev: torch.Tensor, shift: int = 1) -> torch.Tensor:
    """``(B,Tp,Da)``: drop the first ``shift`` actions, repeat the last one to keep the length."""
    return torch.cat([prev[:, shift:], prev[:, -1:].expand(-1, shift, -1)], dim=1)


class DiscreteActions(nn.Module):
    """Binary action dimensions as masks and levels: ``binarize`` a normalized warm start's ``clip``
    dimensions, ``threshold`` env-unit actions of every listed dimension to its two levels."""

    def __init__(self, action_normalizer, dims: Sequence[DiscreteDim], action_dim: int):
        super().__init__()
        off, sc = action_normalizer.offset.detach().cpu(), action_normalizer.scale.detach().cpu()
        clip = torch.zeros(action_dim, dtype=torch.bool)
        disc = torch.zeros(action_dim, dtype=torch.bool)
        low, high, thr = torch.zeros(action_dim), torch.zeros(action_dim), torch.zeros(action_dim)
        lo_n, hi_n, thr_n = torch.zeros(action_dim), torch.zeros(action_dim), torch.zeros(action_dim)
        for d in dims:
            disc[d.dim] = True
            low[d.dim], high[d.dim], thr[d.dim] = d.low, d.high, d.threshold
            if d.remedy == "clip":
                clip[d.dim] = True
                lo_n[d.dim] = (d.low - off[d.dim]) * sc[d.dim] / d.factor
                hi_n[d.dim] = (d.high - off[d.dim]) * sc[d.dim] / d.factor
                thr_n[d.dim] = (d.threshold - off[d.dim]) * sc[d.dim]
        self.has_clip, self.has_discrete = bool(clip.any()), bool(disc.any())
        device = action_normalizer.offset.device
        for name, v in dict(clip_mask=clip, disc_mask=disc, low=low, high=high, thr=thr, clip_low=lo_n,
                            clip_high=hi_n, clip_thr=thr_n).items():
            self.register_buffer(name, v.to(device))

    def binarize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_clip:
            return x
        return torch.where(self.clip_mask, torch.where(x > self.clip_thr, self.clip_high, self.clip_low), x)

    def threshold(self, a: torch.Tensor) -> torch.Tensor:
        if not self.has_discrete:
            return a
        return torch.where(self.disc_mask, torch.where(a > self.thr, self.high, self.low), a)


class DecisionStep(nn.Module):
    def __init__(self, policy, process, schedule: Sequence[tuple[float, float]], warm: bool, renoise: bool = True,
                 shift: int = 1, discrete: Sequence[DiscreteDim] = ()):
        super().__init__()
        if not has_fast_form(policy):
            raise ConfigError(f"a {type(policy).__name__} has no single network to build a fast decision step from; "
                              f"use the controller's generic path (fast=False).")
        if not isinstance(process, (Diffusion, Flow)):
            raise ConfigError(f"a {type(process).__name__} process has no denoising schedule; RTI and the fast path "
                              f"need a diffusion or flow policy.")
        if not schedule:
            raise ConfigError("the decision schedule is empty.")
        self.net = policy.net
        self.process = process
        self.warm, self.renoise, self.shift = bool(warm), bool(renoise), int(shift)
        self.Tp, self.Da, self.To = policy.Tp, policy.action_dim, policy.To
        self.schedule = [(float(a), float(b)) for a, b in schedule]
        if not 1 <= self.shift <= self.Tp:
            raise ConfigError(f"shift={shift} must be between 1 and Tp={self.Tp}.")
        n_obs = policy.normalizer.obs
        self.register_buffer("obs_offset", torch.cat([n_obs[k].offset for k in policy.obs_keys]).detach().clone())
        self.register_buffer("obs_scale", torch.cat([n_obs[k].scale for k in policy.obs_keys]).detach().clone())
        na = policy.normalizer.action
        self.register_buffer("act_offset", na.offset.detach().clone())
        self.register_buffer("act_scale", na.scale.detach().clone())

        self.discrete = DiscreteActions(na, discrete, self.Da)

        # the schedule as constants: network times (a buffer) and per-step Python floats
        times: list[float] = []
        self.plan: list[tuple] = []
        n_noise = 0
        for t, t_next in self.schedule:
            if isinstance(process, Diffusion):
                k, k_next = process._level(t), process._level(t_next)
                ab, ab_next = process._ab(k), process._ab(k_next)
                sigma = process.eta * math.sqrt(max((1 - ab_next) / (1 - ab) * (1 - ab / ab_next), 0.0))
                z = n_noise if sigma > 0 else -1
                n_noise += int(sigma > 0)
                self.plan.append((len(times), ab, ab_next, sigma, z))
                times.append(t)
            else:
                heun = process.sampler == "heun" and t_next > 0
                self.plan.append((len(times), t_next - t, heun))
                times.extend([t, t_next] if heun else [t])
        self.n_evals = len(times)
        self.n_step_noise = max(n_noise, 1)
        self.stochastic = n_noise > 0
        # exactly what ChunkPolicy.field_fn feeds the network: net_time of a float32 time
        tnet = process.net_time(torch.tensor(times, dtype=torch.float32))
        self.register_buffer("tnet", tnet.to(na.offset.device))
        if self.warm:  # the coefficients of process.noise_to at the entry time, as constants
            t0 = self.schedule[0][0]
            if isinstance(process, Diffusion):
                ab = process._ab(process._level(t0))
                self.renoise_coef = (math.sqrt(ab), math.sqrt(1 - ab))
            else:
                self.renoise_coef = (1 - t0, t0)

    # -- pieces (also used by the generic path and the tests) -------------------------------------------
    def warm_start(self, prev: torch.Tensor) -> torch.Tensor:
        """Shift left by ``shift``, repeat the last action, binarize the clip dimensions."""
        return self.discrete.binarize(shift_chunk(prev, self.shift))

    def to_env(self, chunk: torch.Tensor) -> torch.Tensor:
        return self.discrete.threshold(chunk / self.act_scale + self.act_offset)

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        return ((obs - self.obs_offset) * self.obs_scale).flatten(1)

    def _field(self, i: int, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.net(x, self.tnet[i].expand(x.shape[0]), cond)

    def integrate(self, x: torch.Tensor, cond: torch.Tensor, step_noise: torch.Tensor) -> torch.Tensor:
        p = self.process
        if isinstance(p, Diffusion):
            for i, ab, ab_next, sigma, z in self.plan:
                f = self._field(i, x, cond)
                x0 = (x - math.sqrt(1 - ab) * f) / math.sqrt(ab) if p.prediction == "epsilon" else f
                if p.clip_sample:
                    x0 = x0.clamp(-1, 1)
                if ab_next == 1.0 and z < 0:  # onto clean data: Diffusion.step gives 1 * x0 + 0 * eps, i.e. x0
                    x = x0
                    continue
                eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
                x = math.sqrt(ab_next) * x0 + math.sqrt(max(1 - ab_next - sigma**2, 0.0)) * eps
                if z >= 0:
                    x = x + sigma * step_noise[z]
            return x
        for i, dt, heun in self.plan:
            v = self._field(i, x, cond)
            if not heun:
                x = x + dt * v
            else:
                x_pred = x + dt * v
                x = x + dt * 0.5 * (v + self._field(i + 1, x_pred, cond))
        return x

    def forward(self, prev: torch.Tensor, obs: torch.Tensor, noise: torch.Tensor,
                step_noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cond = self.encode(obs)
        if self.warm:
            x = self.warm_start(prev)
            if self.renoise:
                a, b = self.renoise_coef
                x = a * x + b * noise  # = process.noise_to(x, noise, t_enter)
        else:
            x = noise
        chunk = self.integrate(x, cond, step_noise)
        return chunk, self.to_env(chunk)
