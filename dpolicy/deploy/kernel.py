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

The arithmetic is the process's own: the step plans (``process.step_plan``: the times each step
evaluates the network at and its coefficients, Python floats) are computed once here, and each step
runs ``process.apply_step``, the same function ``process.step`` runs, so for the same inputs the result
equals ``sample_loop(process, policy.field_fn(cond), x, schedule)`` (``torch.equal`` on CPU; the tests
check it against the generic path). Only ``ChunkPolicy``-shaped policies (a ``net`` called as
``net(net_input_scale(t) * x, process.net_time(t), cond)``) have this fast form.

``FastStep`` is the same decision specialized to one batch size, which is what the controller runs:
the history arrives normalized, the time embeddings of the fixed timesteps are computed once
(``fast_field``; for the residual MLP the forward is replayed from the parameters with the ATen calls
the modules make, skipping per-module Python dispatch), and only the executed actions are
unnormalized. It is bit-for-bit equal to the ``DecisionStep`` (tests/test_deploy.py); the
``DecisionStep`` stays the reference and the unit ``torch.export`` writes.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from dpolicy.deploy.schedule import DiscreteDim
from dpolicy.errors import ConfigError


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
        if not process.denoising:
            raise ConfigError(f"a {process.name} process has no denoising schedule; RTI and the fast path need a "
                              f"policy of a denoising process (diffusion, flow, edm).")
        if not schedule:
            raise ConfigError("the decision schedule is empty.")
        self.net = policy.net
        self.process = process
        self.warm, self.renoise, self.shift = bool(warm), bool(renoise), int(shift)
        self.Tp, self.Da, self.To = policy.Tp, policy.action_dim, policy.To
        self.schedule = [(float(a), float(b)) for a, b in schedule]
        if not 1 <= self.shift <= self.Tp:
            raise ConfigError(f"shift={shift} must be between 1 and Tp={self.Tp}.")
        # per history column: a vector key's statistics; a camera key's columns pass unchanged (offset 0, scale 1),
        # its 0..255 values go to the policy's image encoder, which runs once per decision
        n_obs, images = policy.normalizer.obs, policy.image_shapes
        ref = policy.normalizer.action.offset
        offs, scales, self.vector_cols, self.image_cols, col = [], [], [], [], 0
        for k in policy.obs_keys:
            d = policy.obs_dims[k]
            if k in images:
                offs.append(torch.zeros(d, device=ref.device))
                scales.append(torch.ones(d, device=ref.device))
                self.image_cols.append((k, slice(col, col + d), tuple(images[k])))
            else:
                offs.append(n_obs[k].offset)
                scales.append(n_obs[k].scale)
                self.vector_cols.append(slice(col, col + d))
            col += d
        self.encoder = policy.encoder if images else None
        self.register_buffer("obs_offset", torch.cat(offs).detach().clone())
        self.register_buffer("obs_scale", torch.cat(scales).detach().clone())
        na = policy.normalizer.action
        self.register_buffer("act_offset", na.offset.detach().clone())
        self.register_buffer("act_scale", na.scale.detach().clone())

        self.discrete = DiscreteActions(na, discrete, self.Da)

        # the schedule as constants: the process's own step plans, the network times (a buffer), input scales
        times: list[float] = []
        self.plans: list[tuple] = []  # (StepPlan, index of its first time in `times`, step-noise row or -1)
        n_noise = 0
        for t, t_next in self.schedule:
            plan = process.step_plan(t, t_next)
            self.plans.append((plan, len(times), n_noise if plan.noisy else -1))
            n_noise += int(plan.noisy)
            times.extend(plan.times)
        self.n_evals = len(times)
        self.n_step_noise = max(n_noise, 1)
        self.stochastic = n_noise > 0
        # exactly what ChunkPolicy.field_fn feeds the network: net_time of a float32 time, x scaled by net_input_scale
        tnet = process.net_time(torch.tensor(times, dtype=torch.float32))
        self.register_buffer("tnet", tnet.to(na.offset.device))
        self.in_scale = [float(process.net_input_scale(t)) for t in times]
        if self.warm:  # the coefficients of process.noise_to at the entry time, as constants
            self.renoise_coef = tuple(float(c) for c in process.coefficients(self.schedule[0][0]))

    # -- pieces (also used by the generic path and the tests) -------------------------------------------
    def warm_start(self, prev: torch.Tensor) -> torch.Tensor:
        """Shift left by ``shift``, repeat the last action, binarize the clip dimensions."""
        return self.discrete.binarize(shift_chunk(prev, self.shift))

    def to_env(self, chunk: torch.Tensor) -> torch.Tensor:
        return self.discrete.threshold(chunk / self.act_scale + self.act_offset)

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        return self.cond(((obs - self.obs_offset) * self.obs_scale))

    def cond(self, obs_n: torch.Tensor) -> torch.Tensor:
        """The conditioning from a normalized history ``(B, To, Dobs)``: the history itself, flattened, or for a
        policy with cameras each frame's vectors then its image features (``ChunkPolicy.encode``'s layout)."""
        if self.encoder is None:
            return obs_n.flatten(1)
        B, To = obs_n.shape[0], obs_n.shape[1]
        frames = {k: obs_n[:, :, sl].reshape(B * To, *shape) for k, sl, shape in self.image_cols}
        parts = [obs_n[:, :, sl] for sl in self.vector_cols] + [self.encoder(frames).reshape(B, To, -1)]
        return torch.cat(parts, dim=-1).flatten(1)

    def _field(self, i: int, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        s = self.in_scale[i]
        return self.net(x if s == 1.0 else x * s, self.tnet[i].expand(x.shape[0]), cond)

    def integrate(self, x: torch.Tensor, cond: torch.Tensor, step_noise: torch.Tensor) -> torch.Tensor:
        for plan, i0, z in self.plans:
            x = self.process.apply_step(plan, lambda j, y: self._field(i0 + j, y, cond), x, lambda: step_noise[z])  # noqa: B023
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
            x = self.process.from_noise(noise)
        chunk = self.integrate(x, cond, step_noise)
        return chunk, self.to_env(chunk)


# -- the hot path -------------------------------------------------------------------------------------------
def _plain_residual_mlp(net) -> bool:
    """True when ``net`` is exactly the ``ResidualMLP`` layout (no subclass, no hooks), so its forward can be
    replayed op for op from its parameters."""
    from dpolicy.nn.embeddings import SinusoidalTimeEmbedding
    from dpolicy.nn.mlp import ResidualBlock, ResidualMLP

    if type(net) is not ResidualMLP or type(net.time) is not nn.Sequential:
        return False
    if any(m._forward_hooks or m._forward_pre_hooks for m in net.modules()):
        return False
    kinds = lambda seq, want: len(seq) == len(want) and all(type(m) is w for m, w in zip(seq, want))  # noqa: E731
    ok = type(net.inp) is nn.Linear and type(net.blocks) is nn.Sequential and type(net.out) is nn.Sequential
    ok = ok and kinds(net.time, (SinusoidalTimeEmbedding, nn.Linear, nn.Mish, nn.Linear))
    ok = ok and kinds(net.out, (nn.LayerNorm, nn.Mish, nn.Linear))
    ok = ok and all(type(b) is ResidualBlock and type(b.net) is nn.Sequential
                    and kinds(b.net, (nn.LayerNorm, nn.Linear, nn.Mish, nn.Linear)) for b in net.blocks)
    return ok and all(m.bias is not None for m in net.modules() if isinstance(m, (nn.Linear, nn.LayerNorm)))


def fast_field(net, tnet: torch.Tensor, batch_size: int):
    """``field(i, x, cond)``, bitwise equal to ``net(x, tnet[i].expand(B), cond)`` for ``x`` of batch ``B``.

    The network times of a decision step are fixed, so whatever depends only on them is computed here,
    once, at the batch size the controller runs (a matrix product's rounding can depend on the number
    of rows, so a batch-1 constant is not reused for other batches). For the residual MLP that is the
    whole time-embedding MLP, and the forward is replayed from the parameters with the same ATen calls
    ``nn.Linear`` / ``nn.LayerNorm`` / ``nn.Mish`` make (``addmm`` with the transposed weight view,
    ``layer_norm``, ``mish``), without the per-module Python dispatch. Any other network is called as is
    with its time tensors prebuilt. Parameters are read by reference: in-place weight updates are seen,
    but build the step again after moving the network to another device or dtype.
    """
    B = int(batch_size)
    times = [tnet[i].expand(B) for i in range(tnet.shape[0])]
    if not _plain_residual_mlp(net):
        def field(i: int, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            return net(x, times[i], cond)
        field.replayed = False
        return field

    with torch.no_grad():
        temb = [net.time(t) for t in times]  # exactly what ResidualMLP.forward computes for these times
    addmm, layer_norm, mish, cat = torch.addmm, torch.layer_norm, torch._C._nn.mish, torch.cat
    lin = lambda m: (m.bias, m.weight.t())  # noqa: E731  (what F.linear does for 2-D input: addmm(b, x, W^T))
    ln = lambda m: (tuple(m.normalized_shape), m.weight, m.bias, m.eps)  # noqa: E731
    b_in, w_in = lin(net.inp)
    blocks = [(*ln(b.net[0]), *lin(b.net[1]), *lin(b.net[3])) for b in net.blocks]
    o_shape, o_w, o_b, o_eps = ln(net.out[0])
    b_out, w_out = lin(net.out[2])
    shape = (B, net.horizon, net.action_dim)

    def field(i: int, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = addmm(b_in, cat([x.reshape(B, -1), temb[i], cond], -1), w_in)
        for ns, lw, lb, eps, b1, w1, b2, w2 in blocks:
            h = h + addmm(b2, mish(addmm(b1, layer_norm(h, ns, lw, lb, eps), w1)), w2)
        return addmm(b_out, mish(layer_norm(h, o_shape, o_w, o_b, o_eps)), w_out).view(shape)

    field.replayed = True
    return field


class FastStep:
    """A ``DecisionStep`` specialized to one batch size: the controller's hot path.

    ``(prev (B,Tp,Da), obs_n (B,To,Dobs) normalized, noise, step_noise) -> (chunk (B,Tp,Da), actions (B,n_out,Da))``

    Differences from calling the ``DecisionStep`` (all exact, ``torch.equal`` in the tests):

    * the observation history comes in already normalized (the controller normalizes each observation
      once, when it arrives, with the same float32 subtract-then-multiply), so encoding is a view;
    * only the first ``n_out`` actions (the ones the controller executes) are unnormalized;
    * the network runs through ``fast_field`` (time embeddings of the fixed timesteps precomputed);
    * the shift is one gather with a precomputed index; the step plans and their per-step field closures
      are built once, and each step is the same ``process.apply_step`` as the reference.
    """

    def __init__(self, step: DecisionStep, batch_size: int, n_out: int | None = None):
        self.step, self.B = step, int(batch_size)
        self.n_out = step.Tp if n_out is None else int(n_out)
        if not 1 <= self.n_out <= step.Tp:
            raise ConfigError(f"n_out={n_out} must be between 1 and Tp={step.Tp}.")
        self.field = fast_field(step.net, step.tnet, self.B)
        self.warm, self.renoise = step.warm, step.renoise
        self.renoise_coef = getattr(step, "renoise_coef", None)
        dev = step.act_offset.device
        self.shift_index = torch.tensor([min(i + step.shift, step.Tp - 1) for i in range(step.Tp)], device=dev)
        self.discrete = step.discrete
        self.act_scale, self.act_offset = step.act_scale, step.act_offset
        self.process = step.process
        # one (plan, field, draw) per step, built once; they read the call's cond and step noise from self
        self._cond = self._step_noise = None
        self.steps = [(plan, self._indexed_field(i0, step.in_scale), self._draw(z)) for plan, i0, z in step.plans]

    def _indexed_field(self, i0: int, in_scale: list):
        field, scales = self.field, in_scale

        def f(j: int, x: torch.Tensor) -> torch.Tensor:
            s = scales[i0 + j]
            return field(i0 + j, x if s == 1.0 else x * s, self._cond)
        return f

    def _draw(self, z: int):
        return lambda: self._step_noise[z]

    def __call__(self, prev: torch.Tensor, obs_n: torch.Tensor, noise: torch.Tensor,
                 step_noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cond = self.step.cond(obs_n)
        if self.warm:
            x = self.discrete.binarize(prev.index_select(1, self.shift_index))
            if self.renoise:
                a, b = self.renoise_coef
                x = (x * a).add_(noise * b)  # = a * x + b * noise
        else:
            x = self.process.from_noise(noise)
        self._cond, self._step_noise = cond, step_noise
        apply = self.process.apply_step
        for plan, field, draw in self.steps:
            x = apply(plan, field, x, draw)
        head = x if self.n_out == x.shape[1] else x[:, :self.n_out]
        return x, self.discrete.threshold((head / self.act_scale).add_(self.act_offset))
