"""``Policy``: the one interface of every action-chunk policy in dpolicy, and ``act`` written once.

A policy is the batched map ``(observation history, latent noise, sampling steps) -> action chunk``.
Its ``spec`` says what it reads and writes: the observation keys (in order) and their dimensions,
the history length ``To``, the chunk length ``Tp``, the actions a controller executes per chunk
``Ta``, the action dimension and the number of sampling steps a call uses when it names none.
Observations arrive as ``{key: (B, To, d_key)}`` in environment units (tensors, numpy arrays or
nested lists); chunks come out as ``(B, Tp, action_dim)`` in environment units.

``act`` is implemented here, once: convert and check the observations and the noise, ``encode``,
``sample_normalized``, unnormalize with ``normalizer.action``. A subclass says how it encodes and
samples: ``ChunkPolicy`` (one network), ``ComposedPolicy`` (several parents' fields mixed at every
step), ``SteeredPolicy`` (a frozen base whose initial noise an RL actor picks). It provides

* ``spec``, ``encode(obs) -> cond``, ``field_fn(cond)``, ``sample_normalized(cond, noise, steps,
  generator, t_start)`` and the attributes ``process`` and ``normalizer``;
* ``_use_sampler(sampler, settings)``: rebind a view (a shallow copy made by ``with_sampler``, which
  shares every weight) to sample with another sampler of its process;
* ``save(path)`` and, to be loadable, ``load(dir, meta, device)`` with its class registered for a
  checkpoint kind (``dpolicy.policy.checkpoint.register_kind``).

``steps=None`` means the policy's ``default_steps`` everywhere; any other value must be a positive
integer (``steps=0`` is a ConfigError, never "the default").
"""

from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass, field
from typing import ClassVar, Mapping

import numpy as np
import torch
from torch import nn

from dpolicy.errors import ConfigError, ShapeError


@dataclass(frozen=True)
class PolicySpec:
    """What a policy reads and writes. ``action_scale``: the per-dimension factors its actions were
    shrunk by in normalized space during training (RTI-DP's "scale" remedy), None when there were none.
    ``image_shapes``: the camera keys among ``obs_keys`` and their ``(H, W, C)`` images; an image key's
    ``obs_dims`` entry is ``H * W * C`` (a history may hold it flattened), its values are 0..255."""

    obs_keys: tuple
    obs_dims: Mapping[str, int] = field(hash=False)
    To: int
    Tp: int
    Ta: int
    action_dim: int
    default_steps: int
    action_scale: tuple | None = None
    image_shapes: Mapping[str, tuple] = field(default_factory=dict, hash=False)  # camera key -> (H, W, C)

    def __post_init__(self):
        object.__setattr__(self, "obs_keys", tuple(self.obs_keys))
        object.__setattr__(self, "obs_dims", {k: int(self.obs_dims[k]) for k in self.obs_keys})
        object.__setattr__(self, "image_shapes", {k: tuple(int(n) for n in v) for k, v in dict(self.image_shapes).items()})
        bad = [k for k, v in self.image_shapes.items() if k not in self.obs_dims or len(v) != 3
               or v[0] * v[1] * v[2] != self.obs_dims[k]]
        if bad:
            raise ConfigError(f"image key(s) {bad} are not observation keys whose dimension is H * W * C of their image shape.")
        if self.action_scale is not None:
            object.__setattr__(self, "action_scale", tuple(float(v) for v in self.action_scale))
        if not self.obs_keys:
            raise ConfigError("a policy needs at least one observation key.")
        if self.To < 1 or self.Tp < 1 or self.action_dim < 1 or not 1 <= self.Ta <= self.Tp:
            raise ConfigError(f"a policy needs To, Tp, action_dim >= 1 and 1 <= Ta <= Tp (got To={self.To}, "
                              f"Tp={self.Tp}, Ta={self.Ta}, action_dim={self.action_dim}).")
        check_steps(self.default_steps, None, "default_steps")


def check_steps(steps, default: int | None, what: str = "steps") -> int:
    """``steps`` as an int, or ``default`` when it is None. Anything but a positive integer is a ConfigError
    naming the value: 0 never stands for the default."""
    if steps is None and default is not None:
        return int(default)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        hint = "" if default is None else f" (or None for the default, {default})"
        raise ConfigError(f"{what}={steps!r} must be a positive integer{hint}.")
    return int(steps)


class Policy(nn.Module):
    kind: ClassVar[str | None] = None  # the checkpoint kind its class is registered for
    who: ClassVar[str] = "the policy"  # how error messages name it

    normalizer: nn.Module  # a DictNormalizer: ``normalizer.action`` maps normalized chunks to env units
    process: object  # the Process its chunks are sampled with

    def __init__(self):
        super().__init__()
        self.metadata: dict = {}  # JSON-serializable facts saved with the policy, e.g. the env_args of its task

    # -- what a subclass provides ------------------------------------------------------------------
    @property
    def spec(self) -> PolicySpec:
        raise NotImplementedError

    def encode(self, obs: Mapping[str, torch.Tensor]):
        """``{k: (B, To, d_k)}`` in env units -> the conditioning ``sample_normalized`` and ``field_fn`` take."""
        raise NotImplementedError

    def field_fn(self, cond):
        """Close over the conditioning: ``(x_t (B,Tp,Da), t) -> field (B,Tp,Da)`` in the process's parameterization."""
        raise NotImplementedError

    def sample_normalized(self, cond, noise: torch.Tensor | None = None, steps: int | None = None,
                          generator: torch.Generator | None = None, t_start: float = 1.0) -> torch.Tensor:
        """Denoise standard-normal ``noise`` (B,Tp,Da) into a normalized chunk; with ``t_start < 1``, ``noise`` is
        a partially noised chunk at that time (a warm start) and is continued as it is."""
        raise NotImplementedError

    def _use_sampler(self, sampler: str | None, settings: dict) -> None:
        """Make this view (a shallow copy) sample with ``sampler`` of its process and ``settings``."""
        raise ConfigError(f"a {type(self).__name__} has no sampler to change.")

    def save(self, path):
        raise NotImplementedError

    @classmethod
    def load(cls, path, meta: dict, device="cpu") -> "Policy":
        """Rebuild from checkpoint directory ``path`` whose ``meta.json`` holds ``meta``."""
        raise NotImplementedError

    # -- the spec, read through ------------------------------------------------------------------------
    obs_keys = property(lambda self: list(self.spec.obs_keys))
    obs_dims = property(lambda self: dict(self.spec.obs_dims))
    image_shapes = property(lambda self: dict(self.spec.image_shapes))
    obs_shapes = property(lambda self: obs_shapes(self.spec))  # per-step shape of every key: (d,) or (H, W, C)
    To = property(lambda self: self.spec.To)
    Tp = property(lambda self: self.spec.Tp)
    Ta = property(lambda self: self.spec.Ta)
    action_dim = property(lambda self: self.spec.action_dim)
    default_steps = property(lambda self: self.spec.default_steps)  # sampling steps when a call gives none

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def chunk_shape(self, batch: int) -> tuple[int, int, int]:
        return (batch, self.Tp, self.action_dim)

    def resolve_steps(self, steps: int | None) -> int:
        """The sampling steps a call with ``steps`` uses: ``default_steps`` for None, else a positive integer."""
        return check_steps(steps, self.default_steps)

    def check_obs(self, obs: Mapping[str, torch.Tensor]) -> int:
        """Validate an observation dict (tensors, arrays or lists); return the batch size. Raises ShapeError
        naming the culprit key: a missing key, a wrong shape, a NaN or infinite value."""
        spec = self.spec
        return check_obs_dict(obs, spec.obs_keys, spec.obs_dims, spec.To, self.who, spec.image_shapes)

    def initial_noise(self, batch: int, device, noise: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """``noise`` checked to be ``(batch, Tp, Da)`` as float32 on ``device``, or a fresh standard-normal draw."""
        shape = self.chunk_shape(batch)
        if noise is None:
            return torch.randn(shape, device=device, generator=generator)
        if tuple(noise.shape) != shape:
            raise ShapeError(f"noise has shape {tuple(noise.shape)}; expected {shape} = (B, Tp, Da).")
        return noise.to(device, torch.float32)

    # -- the map, once for every policy ----------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: Mapping[str, torch.Tensor], noise: torch.Tensor | None = None, steps: int | None = None,
            generator: torch.Generator | None = None) -> torch.Tensor:
        """``{k: (B, To, d_k)}`` -> action chunk ``(B, Tp, Da)`` in env units. Same noise, same chunk.

        Observations and noise may be tensors, numpy arrays or nested lists (moved to the policy's device);
        a NaN or infinite entry is rejected with a ShapeError naming the key."""
        device = self.device
        obs = as_obs_tensors(obs, self.obs_keys, device)
        self.check_obs(obs)
        if noise is not None:
            noise = as_noise_tensor(noise, device)
        chunk = self.sample_normalized(self.encode(obs), noise, steps, generator)
        return self.normalizer.action.unnormalize(chunk)

    def with_sampler(self, sampler: str | None = None, **settings) -> "Policy":
        """This policy sampling with another sampler of its process (or other sampler settings, e.g. ``eta``):
        a view that shares every weight with this policy, or the policy itself when nothing changes."""
        if sampler is None and not settings:
            return self
        view = copy.copy(self)
        # the copy's registries of submodules, parameters and buffers are its own, their contents shared:
        # rebinding a submodule in the view leaves this policy as it is
        view._modules = self._modules.copy()
        view._parameters = self._parameters.copy()
        view._buffers = self._buffers.copy()
        view._use_sampler(sampler, dict(settings))
        return view

    @classmethod
    def from_checkpoint(cls, path, device: str | torch.device = "cpu") -> "Policy":
        """Load from a policy directory, a step directory, or a run's checkpoint root (follows ``latest``),
        with the class registered for the checkpoint's kind."""
        from dpolicy.policy.checkpoint import load_checkpoint

        return load_checkpoint(path, device)


# -- observations and noise in any array form -----------------------------------------------------------
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


def obs_shapes(spec: PolicySpec) -> dict[str, tuple]:
    """Per-step shape of each observation key of ``spec``: ``(H, W, C)`` for a camera, ``(d,)`` otherwise."""
    return {k: tuple(spec.image_shapes.get(k, (spec.obs_dims[k],))) for k in spec.obs_keys}


def check_obs_dict(obs: Mapping[str, torch.Tensor], keys, dims: Mapping[str, int], To: int, who: str,
                   image_shapes: Mapping[str, tuple] | None = None) -> int:
    """Validate an observation dict of ``(B, To, dim)`` tensors (or arrays) for ``keys``; return the batch size.
    A camera key (in ``image_shapes``) may also come as ``(B, To, H, W, C)``.
    Raises ShapeError naming the culprit key: a missing key, a wrong shape, a NaN or infinite value."""
    image_shapes = image_shapes or {}
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
        image = image_shapes.get(k)
        if image is not None and len(shape) == 5 and shape[1:] == (To, *image):
            pass
        elif len(shape) != 3 or shape[1:] != want:
            if image is not None:
                raise ShapeError(f"observation {k!r} has shape {shape}; expected (B, {To}, {', '.join(map(str, image))}) "
                                 f"= (B, To, H, W, C) images.")
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
