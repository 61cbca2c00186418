"""Per-dimension affine normalizers fitted on a dataset and saved inside every checkpoint.

``limits`` maps each dimension's [min, max] to [-1, 1] (Diffusion Policy's choice for low-dim
data); ``gaussian`` maps to zero mean and unit variance. A dimension whose range (or std) is
below ``eps`` is only centred, so constant dimensions normalize to 0 and round-trip exactly.
Statistics are plain lists in JSON so a checkpoint can be read without torch.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from dpolicy.errors import CheckpointError, DatasetError

MODES = ("limits", "gaussian")


class Normalizer(nn.Module):
    """``normalize(x) = (x - offset) * scale`` over the last axis; ``unnormalize`` inverts it."""

    def __init__(self, offset: torch.Tensor, scale: torch.Tensor, mode: str = "limits"):
        super().__init__()
        if mode not in MODES:
            raise DatasetError(f"normalizer mode {mode!r} is not one of {MODES}.")
        offset = torch.as_tensor(offset, dtype=torch.float32).flatten()
        scale = torch.as_tensor(scale, dtype=torch.float32).flatten()
        if offset.shape != scale.shape:
            raise DatasetError(f"normalizer offset {tuple(offset.shape)} and scale {tuple(scale.shape)} differ in shape.")
        if not (torch.isfinite(offset).all() and torch.isfinite(scale).all()) or (scale == 0).any():
            raise DatasetError("normalizer statistics hold non-finite or zero-scale values.")
        self.mode = mode
        self.register_buffer("offset", offset)
        self.register_buffer("scale", scale)

    @property
    def dim(self) -> int:
        return self.offset.numel()

    @classmethod
    def fit(cls, data: torch.Tensor, mode: str = "limits", eps: float = 1e-4, name: str = "data") -> "Normalizer":
        """Fit on ``data`` of shape (N, D)."""
        data = torch.as_tensor(data, dtype=torch.float32)
        if data.ndim != 2 or data.shape[0] == 0:
            raise DatasetError(f"cannot fit a normalizer on {name!r} with shape {tuple(data.shape)}; expected (N>0, D).")
        if not torch.isfinite(data).all():
            raise DatasetError(f"{name!r} holds NaN or infinite values; refusing to fit a normalizer on it.")
        if mode == "limits":
            lo, hi = data.min(0).values, data.max(0).values
            rng = hi - lo
            centre = (hi + lo) / 2
            scale = torch.where(rng > eps, 2.0 / rng.clamp_min(eps), torch.ones_like(rng))
            return cls(centre, scale, mode)
        if mode == "gaussian":
            mean, std = data.mean(0), data.std(0, unbiased=False)
            scale = torch.where(std > eps, 1.0 / std.clamp_min(eps), torch.ones_like(std))
            return cls(mean, scale, mode)
        raise DatasetError(f"normalizer mode {mode!r} is not one of {MODES}.")

    def rescaled(self, factors) -> "Normalizer":
        """A copy whose normalized values are multiplied by ``factors`` (one per dimension).

        Folding the factor into ``scale`` keeps the normalizer one affine map, so a checkpoint
        stores the effective statistics and loads without knowing a factor was ever applied.
        """
        f = torch.as_tensor(factors, dtype=torch.float32).flatten()
        if f.shape != self.scale.shape:
            raise DatasetError(f"{f.numel()} scale factors for a normalizer of dimension {self.dim}.")
        return Normalizer(self.offset.clone(), self.scale * f.to(self.scale.device), self.mode)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.offset) * self.scale

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scale + self.offset

    def to_dict(self) -> dict:
        return {"mode": self.mode, "offset": self.offset.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping, name: str = "normalizer") -> "Normalizer":
        try:
            return cls(torch.tensor(d["offset"]), torch.tensor(d["scale"]), d.get("mode", "limits"))
        except (KeyError, TypeError, DatasetError) as e:
            raise CheckpointError(f"normalizer entry {name!r} is malformed ({e}).") from None


class DictNormalizer(nn.Module):
    """A normalizer per observation key plus one for actions."""

    def __init__(self, obs: Mapping[str, Normalizer], action: Normalizer):
        super().__init__()
        self.obs = nn.ModuleDict(dict(obs))
        self.action = action

    @classmethod
    def fit(cls, obs: Mapping[str, torch.Tensor], actions: torch.Tensor, obs_mode="limits", action_mode="limits"):
        return cls({k: Normalizer.fit(v, obs_mode, name=f"obs/{k}") for k, v in obs.items()},
                   Normalizer.fit(actions, action_mode, name="actions"))

    def to_dict(self) -> dict:
        return {"obs": {k: n.to_dict() for k, n in self.obs.items()}, "action": self.action.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping) -> "DictNormalizer":
        if not isinstance(d, Mapping) or "obs" not in d or "action" not in d:
            raise CheckpointError("normalizer.json must hold 'obs' and 'action' entries.")
        return cls({k: Normalizer.from_dict(v, f"obs/{k}") for k, v in d["obs"].items()},
                   Normalizer.from_dict(d["action"], "action"))
