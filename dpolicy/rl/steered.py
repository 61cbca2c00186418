"""A steered policy: a frozen base policy plus the DSRL actor that picks its noise.

It is a ``Policy`` like any other (the evaluator, the controllers and ``load_policy`` take it), with the
base's observations, shapes and normalizer. By default ``act`` takes the actor's deterministic noise
(the tanh of its mean) and ignores a ``noise`` argument, since choosing the noise is the point. With
``sample=True`` the noise is drawn from the actor, reparameterized by the caller's standard-normal
``noise`` (so seeded evaluation stays reproducible and paired with the base's): the right choice when
the base's mean noise decodes to a poor chunk (an average of modes) and the actor was trained to stay
near the base's noise prior (``dsrl.regularizer=prior``). ``steps`` (None: the base's default) is the
number of sampling steps a call uses when it names none.
Saved as a directory: ``steered.json`` (kind, the base checkpoint's path, the actor's sizes),
``actor.safetensors``, and ``meta.json`` marking the kind (``"steered"``) so ``load_policy`` can dispatch.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from dpolicy.errors import CheckpointError, ConfigError
from dpolicy.policy.base import Policy, PolicySpec, check_steps
from dpolicy.policy.checkpoint import atomic_dir, load_checkpoint, read_json, register_kind, write_json

KIND = "steered"


@register_kind(KIND)
class SteeredPolicy(Policy):
    def __init__(self, base: Policy, actor: nn.Module, base_path: str | None = None, steps: int | None = None,
                 sample: bool = False):
        super().__init__()
        self.base, self.actor, self.base_path, self.sample = base, actor, base_path, bool(sample)
        self.steps = None if steps is None else check_steps(steps, None)
        self.base.requires_grad_(False)
        self.metadata = dict(getattr(base, "metadata", {}))

    @property
    def spec(self) -> PolicySpec:
        spec = self.base.spec
        return spec if self.steps is None else dataclasses.replace(spec, default_steps=self.steps)

    cond_dim = property(lambda self: self.base.cond_dim)
    process = property(lambda self: self.base.process)
    normalizer = property(lambda self: self.base.normalizer)

    def encode(self, obs):
        return self.base.encode(obs)

    def field_fn(self, cond):
        return self.base.field_fn(cond)

    def noise_for(self, cond: torch.Tensor, noise: torch.Tensor | None = None, generator=None) -> torch.Tensor:
        if self.sample:
            eps = None if noise is None else noise.reshape(cond.shape[0], -1).to(cond.dtype)
            w, _ = self.actor(cond, generator=generator, eps=eps)
        else:
            w, _ = self.actor(cond, deterministic=True)
        return w.reshape(cond.shape[0], self.Tp, self.action_dim)

    def sample_normalized(self, cond, noise=None, steps=None, generator=None, t_start: float = 1.0):
        steps = self.resolve_steps(steps)
        return self.base.sample_normalized(cond, self.noise_for(cond, noise, generator), steps, generator, t_start)

    def _use_sampler(self, sampler, settings) -> None:
        self.base = self.base.with_sampler(sampler, **settings)

    # -- checkpoints ----------------------------------------------------------------------------------
    def save(self, path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        if self.base_path is None:
            raise CheckpointError("a steered policy needs its base checkpoint's path to be saved (base_path).")
        base = Path(self.base_path).resolve()
        with atomic_dir(path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.actor.state_dict().items()}, str(tmp / "actor.safetensors"))
            lin = [m for m in self.actor.net if isinstance(m, nn.Linear)]
            write_json(tmp / "steered.json", {
                "kind": KIND, "base": os.path.relpath(base, path.resolve()), "base_abs": str(base),
                "state_dim": lin[0].in_features, "noise_dim": lin[-1].out_features // 2, "hidden": lin[0].out_features,
                "layers": len(lin) - 1, "action_magnitude": self.actor.b, "steps": self.steps, "sample": self.sample})
            write_json(tmp / "meta.json", {"format": "dpolicy-policy", "kind": KIND, "metadata": self.metadata})
        return path

    @classmethod
    def from_checkpoint(cls, path, device="cpu") -> "SteeredPolicy":
        """Load the steered policy directory ``path``."""
        return cls.load(Path(path), None, device)

    @classmethod
    def load(cls, path, meta, device="cpu") -> "SteeredPolicy":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from dpolicy.rl.agent import Actor

        path = Path(path)
        spec = read_json(path / "steered.json", f"steered policy {path}")
        if spec.get("kind") != KIND:
            raise CheckpointError(f"{path / 'steered.json'} does not describe a steered policy.")
        base_dir = (path / spec["base"]).resolve()
        if not base_dir.exists():
            base_dir = Path(spec.get("base_abs", ""))
        if not base_dir.exists():
            raise CheckpointError(f"the base checkpoint {spec['base']!r} of steered policy {str(path)!r} does not exist.")
        base = load_checkpoint(base_dir, device)
        actor = Actor(spec["state_dim"], spec["noise_dim"], spec["hidden"], spec["layers"], spec["action_magnitude"])
        if spec["state_dim"] != base.cond_dim or spec["noise_dim"] != base.Tp * base.action_dim:
            raise CheckpointError(f"steered policy {str(path)!r} does not fit its base checkpoint (state or noise size differs).")
        try:
            actor.load_state_dict(load_file(str(path / "actor.safetensors")))
        except (FileNotFoundError, SafetensorError, RuntimeError) as e:
            raise CheckpointError(f"{path / 'actor.safetensors'} cannot be loaded ({str(e).splitlines()[0]}).") from None
        try:
            return cls(base, actor.to(device).eval(), str(base_dir), spec.get("steps"), bool(spec.get("sample", False)))
        except ConfigError as e:
            raise CheckpointError(f"{path / 'steered.json'} is invalid: {e}") from None
