"""``ChunkPolicy``: the deterministic, batched map (obs history, noise, schedule) -> action chunk.

Observations arrive as a dict of ``(B, To, d_k)`` tensors in environment units; they are
normalized per key, concatenated in ``obs_keys`` order and flattened into the global
conditioning vector (Diffusion Policy's ``obs_as_global_cond``). The action chunk is produced
in normalized space ``(B, Tp, Da)`` in [-1, 1] and unnormalized exactly once, in ``act``.
``chunk[:, 0]`` is the action for the current step; a controller executes ``chunk[:, :Ta]``.
"""

from __future__ import annotations

import copy
from typing import Mapping

import numpy as np
import torch
from torch import nn

from dpolicy.config import PolicyConfig
from dpolicy.data.normalizer import DictNormalizer
from dpolicy.errors import ConfigError, ShapeError
from dpolicy.nn import build_net
from dpolicy.process import build_process, sample_loop


class ChunkPolicy(nn.Module):
    def __init__(self, cfg: PolicyConfig, normalizer: DictNormalizer):
        super().__init__()
        if not cfg.obs_keys:
            raise ConfigError("policy.obs_keys is empty; name at least one observation key.")
        missing = [k for k in cfg.obs_keys if k not in cfg.obs_dims]
        if missing:
            raise ConfigError(f"policy.obs_dims has no dimension for observation key(s) {missing}.")
        if cfg.action_dim < 1:
            raise ConfigError(f"policy.action_dim={cfg.action_dim} must be at least 1.")
        for k in cfg.obs_keys:
            if k not in normalizer.obs or normalizer.obs[k].dim != cfg.obs_dims[k]:
                raise ConfigError(f"the normalizer has no statistics of dimension {cfg.obs_dims[k]} for observation key {k!r}.")
        if normalizer.action.dim != cfg.action_dim:
            raise ConfigError(f"the action normalizer has dimension {normalizer.action.dim}, expected {cfg.action_dim}.")
        self.cfg = cfg
        self.normalizer = normalizer
        self.metadata: dict = {}  # JSON-serializable facts saved with the policy, e.g. the env_args of its task
        self.cond_dim = cfg.To * sum(cfg.obs_dims[k] for k in cfg.obs_keys)
        self.net = build_net(cfg.net, cfg.action_dim, cfg.Tp, self.cond_dim)
        self.process = build_process(cfg.process)

    # -- shapes -------------------------------------------------------------------------------
    obs_keys = property(lambda self: self.cfg.obs_keys)
    To = property(lambda self: self.cfg.To)
    Tp = property(lambda self: self.cfg.Tp)
    Ta = property(lambda self: self.cfg.Ta)
    action_dim = property(lambda self: self.cfg.action_dim)
    obs_dims = property(lambda self: dict(self.cfg.obs_dims))
    default_steps = property(lambda self: self.cfg.process.steps)  # sampling steps when a call gives none

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def chunk_shape(self, batch: int) -> tuple[int, int, int]:
        return (batch, self.Tp, self.action_dim)

    def check_obs(self, obs: Mapping[str, torch.Tensor]) -> int:
        """Validate an observation dict; return the batch size. Raises ShapeError naming the culprit."""
        return check_obs_dict(obs, self.obs_keys, self.cfg.obs_dims, self.To, "the policy")

    # -- the map ------------------------------------------------------------------------------
    def encode(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``{k: (B, To, d_k)}`` in env units -> conditioning ``(B, To * sum d_k)``."""
        parts = [self.normalizer.obs[k].normalize(obs[k].to(self.device, torch.float32)) for k in self.obs_keys]
        return torch.cat(parts, dim=-1).flatten(1)

    def field_fn(self, cond: torch.Tensor):
        """Close over the conditioning: ``(x_t (B,Tp,Da), t float or (B,)) -> field (B,Tp,Da)``."""
        def fn(x: torch.Tensor, t) -> torch.Tensor:
            tt = torch.as_tensor(t, device=x.device, dtype=torch.float32)
            if tt.ndim == 0:
                tt = tt.expand(x.shape[0])
            scale = self.process.net_input_scale(t)
            return self.net(x if isinstance(scale, float) and scale == 1.0 else x * scale, self.process.net_time(tt), cond)
        return fn

    def sample_normalized(self, cond: torch.Tensor, noise: torch.Tensor | None = None, steps: int | None = None,
                          generator: torch.Generator | None = None, t_start: float = 1.0) -> torch.Tensor:
        """Denoise standard-normal ``noise`` (B,Tp,Da) into a normalized chunk; with ``t_start < 1``, ``noise`` is
        a partially noised chunk at that time (a warm start) and is continued as it is."""
        b = cond.shape[0]
        if noise is None:
            noise = torch.randn(self.chunk_shape(b), device=cond.device, generator=generator)
        elif tuple(noise.shape) != self.chunk_shape(b):
            raise ShapeError(f"noise has shape {tuple(noise.shape)}; expected {self.chunk_shape(b)} = (B, Tp, Da).")
        x = noise.to(cond.device, torch.float32)
        if t_start >= 1.0 and self.process.noise_scale != 1.0:
            x = x * self.process.noise_scale
        schedule = self.process.schedule(self.default_steps if steps is None else steps, t_start)
        return sample_loop(self.process, self.field_fn(cond), x, schedule, generator)

    @torch.no_grad()
    def act(self, obs: Mapping[str, torch.Tensor], noise: torch.Tensor | None = None, steps: int | None = None,
            generator: torch.Generator | None = None) -> torch.Tensor:
        """``{k: (B, To, d_k)}`` -> action chunk ``(B, Tp, Da)`` in env units. Same noise, same chunk.

        Observations and noise may be tensors, numpy arrays or nested lists (moved to the policy's device);
        a NaN or infinite entry is rejected with a ShapeError naming the key."""
        obs = as_obs_tensors(obs, self.obs_keys, self.device)
        self.check_obs(obs)
        if noise is not None:
            noise = as_noise_tensor(noise, self.device)
        chunk = self.sample_normalized(self.encode(obs), noise, steps, generator)
        return self.normalizer.action.unnormalize(chunk)

    def loss(self, obs: Mapping[str, torch.Tensor], actions: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean training loss for a batch: obs ``{k: (B,To,d_k)}``, actions ``(B,Tp,Da)``, both in env units."""
        x0 = self.normalizer.action.normalize(actions)
        cond = self.encode(obs)
        if self.cfg.obs_noise > 0 and self.training:
            cond = cond + self.cfg.obs_noise * torch.randn(cond.shape, device=cond.device, generator=generator)
        return self.process.loss(self.field_fn(cond), x0, generator).mean()

    def forward(self, obs, actions, generator=None):
        """``forward`` is the training loss, so DDP / torch.compile can wrap the whole policy."""
        return self.loss(obs, actions, generator)

    def with_sampler(self, sampler: str | None, **settings) -> "ChunkPolicy":
        """This policy sampling with another sampler of its process (a view: the weights are shared), or itself."""
        if sampler is None and not settings:
            return self
        view = copy.copy(self)
        view.process = self.process.with_sampler(sampler or self.process.sampler, **settings)
        return view

    # -- persistence --------------------------------------------------------------------------
    def save(self, path) -> None:
        from dpolicy.policy.checkpoint import save_policy

        save_policy(self, path)

    @classmethod
    def from_checkpoint(cls, path, device: str | torch.device = "cpu") -> "ChunkPolicy":
        """Load from a policy directory, a step directory, or a run's checkpoint root (follows ``latest``)."""
        from dpolicy.policy.checkpoint import load_policy

        return load_policy(path, device)


def _to_tensor(v, what: str, device=None) -> torch.Tensor:
    """A numpy array, list or number -> a float32 tensor (on ``device`` when given); tensors pass unchanged."""
    if isinstance(v, torch.Tensor):
        return v
    try:
        a = np.asarray(v, dtype=np.float32)
    except (ValueError, TypeError) as e:
        raise ShapeError(f"{what} is a {type(v).__name__} that is not a numeric array ({e}).") from None
    return torch.as_tensor(a, device=device)


def as_obs_tensors(obs, keys, device=None) -> dict:
    """``obs`` with the entries for ``keys`` that are numpy arrays or lists turned into float32 tensors on
    ``device``; tensors and other keys pass unchanged (validation is ``check_obs_dict``'s job)."""
    if not isinstance(obs, Mapping):
        return obs
    if all(isinstance(v, torch.Tensor) for v in obs.values()):
        return obs
    return {k: _to_tensor(v, f"observation {k!r}", device) if k in keys else v for k, v in obs.items()}


def as_noise_tensor(noise, device=None) -> torch.Tensor:
    """``noise`` as a tensor (numpy arrays and lists on ``device``); raises ShapeError if it is not finite."""
    noise = _to_tensor(noise, "noise", device)
    if noise.is_floating_point() and not bool(torch.isfinite(noise).all()):
        raise ShapeError("noise holds NaN or infinite values.")
    return noise


def check_obs_dict(obs: Mapping[str, torch.Tensor], keys, dims: Mapping[str, int], To: int, who: str) -> int:
    """Validate an observation dict of ``(B, To, dim)`` tensors (or arrays) for ``keys``; return the batch size.
    Raises ShapeError naming the culprit key: a missing key, a wrong shape, a NaN or infinite value."""
    if not isinstance(obs, Mapping):
        raise ShapeError(f"observations must be a dict keyed by {list(keys)}, got {type(obs).__name__}.")
    missing = [k for k in keys if k not in obs]
    if missing:
        raise ShapeError(f"observation key(s) {missing} are missing; {who} needs {list(keys)}.")
    batch = None
    values = {}
    for k in keys:
        v = values[k] = _to_tensor(obs[k], f"observation {k!r}")
        shape = tuple(v.shape)
        want = (To, dims[k])
        if len(shape) != 3 or shape[1:] != want:
            raise ShapeError(f"observation {k!r} has shape {shape}; expected (B, {want[0]}, {want[1]}) = (B, To, dim).")
        if batch is not None and shape[0] != batch:
            raise ShapeError(f"observation {k!r} has batch size {shape[0]} but others have {batch}.")
        batch = shape[0]
    # one device sync for all keys; only a failure looks for the culprit
    floats = [v for v in values.values() if v.is_floating_point()]
    if floats and not bool(torch.stack([torch.isfinite(v).all().to(floats[0].device) for v in floats]).all()):
        bad = next(k for k, v in values.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
        raise ShapeError(f"observation {bad!r} holds NaN or infinite values.")
    return batch
