"""``ChunkPolicy``: the deterministic, batched map (obs history, noise, schedule) -> action chunk.

Observations arrive as a dict of ``(B, To, d_k)`` tensors in environment units; vectors are
normalized per key, camera images (``cfg.image_shapes``; ``(B, To, H, W, C)`` or flattened, 0..255)
go through the image encoder (``cfg.vision``, trained with the denoiser) once per frame; each frame's
vectors (in ``obs_keys`` order) and image features are concatenated and flattened over the history
into the global conditioning vector (Diffusion Policy's ``obs_as_global_cond``). The encoder runs once per call of
``encode``, so once per decision however many denoising steps follow. The action chunk is produced
in normalized space ``(B, Tp, Da)`` in [-1, 1] and unnormalized exactly once, in ``act`` (the
``Policy`` base's). ``chunk[:, 0]`` is the action for the current step; a controller executes
``chunk[:, :Ta]``. Saved as a policy directory (``checkpoint.py``), checkpoint kind ``"chunk"``.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from dpolicy.config import PolicyConfig
from dpolicy.data.normalizer import DictNormalizer
from dpolicy.errors import ConfigError
from dpolicy.nn import build_net
from dpolicy.policy.base import Policy, PolicySpec
from dpolicy.policy.checkpoint import load_weights, read_policy_dir, register_kind, save_policy
from dpolicy.process import build_process, sample_loop


class PrefixConditioned(nn.Module):
    """A denoiser whose conditioning is ``[observation features, prefix block]``; a conditioning of the observation
    features alone gets the empty block (no committed actions)."""

    def __init__(self, net: nn.Module, obs_dim: int, block_dim: int):
        super().__init__()
        self.net, self.obs_dim, self.block_dim = net, int(obs_dim), int(block_dim)

    def forward(self, x, t, cond):
        if cond.shape[-1] == self.obs_dim:
            cond = torch.cat([cond, cond.new_zeros(cond.shape[0], self.block_dim)], dim=-1)
        return self.net(x, t, cond)


def prefix_block(actions: torch.Tensor, given: torch.Tensor, n: int) -> torch.Tensor:
    """The conditioning block of committed actions: ``actions`` (B, >= n, Da) normalized, ``given`` (B,) how many of
    the first entries are committed (0..n) -> (B, n * Da + n): the committed actions (zero past ``given``), then the
    0/1 mask."""
    B, Da = actions.shape[0], actions.shape[-1]
    mask = (torch.arange(n, device=actions.device)[None] < given.to(actions.device)[:, None]).to(actions.dtype)
    return torch.cat([(actions[:, :n] * mask[..., None]).reshape(B, n * Da), mask], dim=-1)


@register_kind("chunk")
class ChunkPolicy(Policy):
    def __init__(self, cfg: PolicyConfig, normalizer: DictNormalizer, load_pretrained: bool = True):
        super().__init__()
        if not cfg.obs_keys:
            raise ConfigError("policy.obs_keys is empty; name at least one observation key.")
        missing = [k for k in cfg.obs_keys if k not in cfg.obs_dims]
        if missing:
            raise ConfigError(f"policy.obs_dims has no dimension for observation key(s) {missing}.")
        if cfg.action_dim < 1:
            raise ConfigError(f"policy.action_dim={cfg.action_dim} must be at least 1.")
        images = {k: tuple(v) for k, v in cfg.image_shapes.items()}
        unknown = [k for k in images if k not in cfg.obs_keys]
        if unknown:
            raise ConfigError(f"policy.image_shapes names key(s) {unknown} that are not in policy.obs_keys {cfg.obs_keys}.")
        for k in cfg.obs_keys:
            if k in images:
                continue
            if k not in normalizer.obs or normalizer.obs[k].dim != cfg.obs_dims[k]:
                raise ConfigError(f"the normalizer has no statistics of dimension {cfg.obs_dims[k]} for observation key {k!r}.")
        if normalizer.action.dim != cfg.action_dim:
            raise ConfigError(f"the action normalizer has dimension {normalizer.action.dim}, expected {cfg.action_dim}.")
        self.cfg = cfg
        self.normalizer = normalizer
        self.image_keys = [k for k in cfg.obs_keys if k in images]
        self.vector_keys = [k for k in cfg.obs_keys if k not in images]
        self.encoder = None
        if images:
            from dpolicy.nn import build_image_encoder

            self.encoder = build_image_encoder(cfg.vision, {k: images[k] for k in self.image_keys}, load_pretrained)
        frame = sum(cfg.obs_dims[k] for k in self.vector_keys) + (self.encoder.out_dim if self.encoder is not None else 0)
        self.cond_dim = cfg.To * frame
        self.net = build_net(cfg.net, cfg.action_dim, cfg.Tp, self.cond_dim + cfg.prefix * (cfg.action_dim + 1))
        if cfg.prefix:
            self.net = PrefixConditioned(self.net, self.cond_dim, cfg.prefix * (cfg.action_dim + 1))
        self.process = build_process(cfg.process)
        self._spec = PolicySpec(cfg.obs_keys, cfg.obs_dims, cfg.To, cfg.Tp, cfg.Ta, cfg.action_dim, cfg.process.steps,
                                cfg.action_scale, images)

    spec = property(lambda self: self._spec)  # fixed by the config at construction

    # -- the map ------------------------------------------------------------------------------
    def encode(self, obs: Mapping[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """``{k: (B, To, d_k)}`` in env units -> conditioning ``(B, To * frame features)``; ``generator`` draws the
        image augmentation while training."""
        device = self.device
        if self.encoder is None:
            parts = [self.normalizer.obs[k].normalize(obs[k].to(device, torch.float32)) for k in self.obs_keys]
            return torch.cat(parts, dim=-1).flatten(1)
        B, To = obs[self.obs_keys[0]].shape[:2]
        frames = {k: obs[k].to(device).reshape(B * To, *self.cfg.image_shapes[k]) for k in self.image_keys}
        feats = self.encoder(frames, generator).reshape(B, To, -1)
        vectors = [self.normalizer.obs[k].normalize(obs[k].to(device, torch.float32)) for k in self.vector_keys]
        return torch.cat(vectors + [feats], dim=-1).flatten(1)

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
        steps = self.resolve_steps(steps)
        x = self.initial_noise(cond.shape[0], cond.device, noise, generator)
        if t_start >= 1.0:
            x = self.process.from_noise(x)
        schedule = self.process.schedule(steps, t_start)
        return sample_loop(self.process, self.field_fn(cond), x, schedule, generator)

    def with_prefix(self, cond: torch.Tensor, committed: torch.Tensor, given: int) -> torch.Tensor:
        """The conditioning of a chunk whose first ``given`` actions are ``committed`` (B, >= given, Da), normalized."""
        n = self.cfg.prefix
        if not 0 <= given <= n:
            raise ConfigError(f"{given} committed actions, but this policy was trained with at most policy.prefix={n}.")
        g = torch.full((cond.shape[0],), given, device=cond.device)
        pad = committed.new_zeros(committed.shape[0], max(n - committed.shape[1], 0), committed.shape[2])
        return torch.cat([cond, prefix_block(torch.cat([committed, pad], 1), g, n)], dim=-1)

    def loss(self, obs: Mapping[str, torch.Tensor], actions: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean training loss for a batch: obs ``{k: (B,To,d_k)}``, actions ``(B,Tp,Da)``, both in env units."""
        x0 = self.normalizer.action.normalize(actions)
        cond = self.encode(obs, generator)
        if self.cfg.obs_noise > 0 and self.training:
            cond = cond + self.cfg.obs_noise * torch.randn(cond.shape, device=cond.device, generator=generator)
        if self.cfg.prefix:
            given = torch.randint(0, self.cfg.prefix + 1, (x0.shape[0],), device=x0.device, generator=generator)
            cond = torch.cat([cond, prefix_block(x0, given, self.cfg.prefix)], dim=-1)
        return self.process.loss(self.field_fn(cond), x0, generator).mean()

    def forward(self, obs, actions, generator=None):
        """``forward`` is the training loss, so DDP / torch.compile can wrap the whole policy."""
        return self.loss(obs, actions, generator)

    def _use_sampler(self, sampler, settings) -> None:
        self.process = self.process.with_sampler(sampler or self.process.sampler, **settings)

    # -- persistence --------------------------------------------------------------------------
    def save(self, path) -> None:
        save_policy(self, path)

    @classmethod
    def load(cls, path, meta: dict, device="cpu") -> "ChunkPolicy":
        cfg, normalizer, state = read_policy_dir(path, meta)
        policy = cls(cfg, normalizer, load_pretrained=False)  # the saved weights hold what a pretrained file gave
        policy.metadata = dict(meta.get("metadata") or {})
        load_weights(policy, state, path / "model.safetensors")
        return policy.to(torch.device(device)).eval()
