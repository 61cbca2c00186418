"""``ComposedPolicy``: several pretrained chunk policies sampling one shared noisy chunk (GPC).

At every step of one shared process (the *base*: the first parent whose process has discrete levels
(diffusion) if there is one, else the first parent) each parent reads its own observation keys through its own encoder, its field
is converted to the base's time grid and parameterization (``fields.py``), the fields are mixed
(``convex``: ``sum_i w_i field_i``, weights on the simplex; ``product``: weighted score sum) and
the base process takes one step. ``mixture`` ("OR") instead gives each sample to one parent, drawn
with probability ``w_i`` from a deterministic function of the sample's noise, and that parent
samples it on its own. Every operator is a deterministic function of the noise (DDIM eta=0, flow),
like ``ChunkPolicy``; it is a ``Policy`` (``spec``: the union of the parents' observation keys, the
longest history, the shortest ``Ta`` unless given; ``encode`` gives one conditioning per parent), so
evaluation, the controllers and warm starts take it unchanged. Saved as checkpoint kind ``"composed"``
(``checkpoint.py``: the parents by reference).

Actions are composed in the base parent's normalized space. A parent whose action normalizer
differs is mapped affinely into it (``x0 -> D x0 + d`` per dimension); that is exact for the
clean chunk but scales the parent's view of the noise by ``D``, so ``D`` must stay within
``action_norm_tol`` of 1 (different demo subsets give nearly the same limits); beyond that the
parents are rejected. A parent identical in kind to the base (same process, levels, prediction,
normalizer) passes its raw field through, so one parent with ``w = 1`` reproduces that parent
bit for bit.
"""

from __future__ import annotations

import numbers
from typing import Mapping, Sequence

import torch
from torch import nn

from dpolicy.compose.checkpoint import read_composed, save_composed
from dpolicy.compose.fields import OPERATORS, check_weights, combine, matched_time
from dpolicy.errors import CheckpointError, ConfigError, ShapeError
from dpolicy.policy.base import Policy, PolicySpec, check_steps
from dpolicy.policy.checkpoint import load_checkpoint, register_kind, resolve_checkpoint
from dpolicy.policy.chunk_policy import ChunkPolicy
from dpolicy.process import sample_loop

# The mixture draws u ~ U[0, 1) per sample as frac(_MIX_FREQ * <noise, r>) for a fixed unit vector r:
# a deterministic function of the noise (the map stays noise -> chunk), uniform for Gaussian noise,
# and, at this frequency, independent of the noise for every practical purpose.
_MIX_FREQ = 1000.0
_MIX_SEED = 0x6C0_3B05E


def check_compatible(parents: Sequence, action_norm_tol: float = 0.1) -> dict:
    """Check that ``parents`` can share one noisy chunk; return what composing them needs.

    Raises ConfigError with one sentence per incompatibility: kind, action dimension, chunk
    length, observation dimensions, noise schedule, action normalization, environment.
    """
    if len(parents) == 0:
        raise ConfigError("composition needs at least one parent policy.")
    for i, p in enumerate(parents):
        if not isinstance(p, ChunkPolicy):
            raise ConfigError(f"parent {i} is a {type(p).__name__}, not a ChunkPolicy; compose checkpoints of "
                              f"trained policies (nested compositions are not supported).")
        if not p.process.denoising:
            raise ConfigError(f"parent {i} is a {p.process.name} policy; it has no denoising field to compose, "
                              f"only policies of a denoising process (diffusion, flow, edm) do.")
    p0 = parents[0]
    for i, p in enumerate(parents[1:], 1):
        if p.action_dim != p0.action_dim:
            raise ConfigError(f"parent {i} has action dimension {p.action_dim} but parent 0 has {p0.action_dim}; "
                              f"composed policies must act in the same action space.")
        if p.Tp != p0.Tp:
            raise ConfigError(f"parent {i} predicts Tp={p.Tp} actions per chunk but parent 0 predicts Tp={p0.Tp}; "
                              f"the parents share one noisy chunk, so Tp must match.")
    obs_dims: dict[str, int] = {}
    owner: dict[str, int] = {}
    for i, p in enumerate(parents):
        for k in p.obs_keys:
            d = p.obs_dims[k]
            if k in obs_dims and obs_dims[k] != d:
                raise ConfigError(f"observation {k!r} has dimension {d} for parent {i} but {obs_dims[k]} for "
                                  f"parent {owner[k]}; the parents must read the same observation.")
            image = p.image_shapes.get(k)
            if k in owner and image != parents[owner[k]].image_shapes.get(k):
                raise ConfigError(f"observation {k!r} is {'a ' + str(image) + ' image' if image else 'a vector'} for parent "
                                  f"{i} but not for parent {owner[k]}; the parents must read the same observation.")
            obs_dims.setdefault(k, d)
            owner.setdefault(k, i)
    # the base grid: the first parent with discrete levels (a continuous-time parent fits any grid)
    discrete = [i for i, p in enumerate(parents) if p.process.levels is not None]
    base = discrete[0] if discrete else 0
    pb = parents[base].process
    for i in discrete[1:]:
        pi = parents[i].process
        if pi.field_signature() != pb.field_signature() and any(
                pi.time_for(*pb.coefficients(pb.level_time(k))) is None for k in range(pb.levels)):
            raise ConfigError(f"parent {i} is a {pi.name} policy with {pi.levels} noise levels but parent {base} has "
                              f"{pb.levels}; their schedules share no time grid (retrain with the same process.train_steps).")
    maps = [_action_map(parents[base], p, i, base, action_norm_tol) for i, p in enumerate(parents)]
    names = {i: (p.metadata.get("env_args") or {}).get("env_name") for i, p in enumerate(parents)}
    known = {i: n for i, n in names.items() if n}
    env_parent = next(iter(known), None)
    if len(set(known.values())) > 1:
        # a camera policy and a state policy of one task were trained on its two variants: they compose on the
        # environment of the parent whose keys strictly contain those of each parent trained elsewhere (the
        # camera variant provides the state policy's proprioception and its own cameras)
        covering = [j for j in known if all(known[i] == known[j] or set(parents[i].obs_keys) < set(parents[j].obs_keys)
                                            for i in known)]
        if not covering:
            raise ConfigError(f"the parents were trained on different environments {sorted(set(known.values()))} and "
                              f"none of them reads more than every other parent trained elsewhere; composition needs one task.")
        env_parent = covering[0]
    images = {k: tuple(parents[i].image_shapes[k]) for k, i in owner.items() if k in parents[i].image_shapes}
    return {"base": base, "obs_dims": obs_dims, "image_shapes": images, "maps": maps, "env_parent": env_parent}


def _action_map(base, p, i: int, b: int, tol: float):
    """``(D, d)`` with ``x0_parent = D * x0_base + d``, or None when the normalizers are identical."""
    nb, npar = base.normalizer.action, p.normalizer.action
    if torch.equal(nb.offset.cpu(), npar.offset.cpu()) and torch.equal(nb.scale.cpu(), npar.scale.cpu()):
        return None
    D = (npar.scale / nb.scale).detach().cpu()
    d = ((nb.offset - npar.offset) * npar.scale).detach().cpu()
    ratio = torch.maximum(D, 1.0 / D)
    j = int(ratio.argmax())
    if float(ratio[j]) > 1.0 + tol:
        raise ConfigError(f"parent {i}'s action normalization differs from parent {b}'s by a factor {float(ratio[j]):.3g} "
                          f"on action dimension {j} (tolerance {1 + tol:.3g}); composition needs a common normalized "
                          f"action space, so train the parents with the same action statistics (e.g. the same demos).")
    return D, d


@register_kind("composed")
class ComposedPolicy(Policy):
    who = "the composed policy"

    def __init__(self, parents: Sequence, weights: Sequence[float] | None = None, operator: str = "convex",
                 steps: int | None = None, Ta: int | None = None, action_norm_tol: float = 0.1,
                 parent_paths: Sequence[str] | None = None):
        super().__init__()
        parents = list(parents)
        info = check_compatible(parents, action_norm_tol)
        self.parents = nn.ModuleList(parents)
        self.base_index = info["base"]
        self._obs_dims = info["obs_dims"]
        self._mapped = [m is not None for m in info["maps"]]
        for i, m in enumerate(info["maps"]):
            if m is not None:
                self.register_buffer(f"_map_scale_{i}", m[0].to(parents[0].device))
                self.register_buffer(f"_map_shift_{i}", m[1].to(parents[0].device))
        base = parents[self.base_index]
        self.process = base.process
        self.normalizer = base.normalizer  # the base parent's: actions are composed in its normalized space
        self._native = [not self._mapped[i] and self._same_kind(p) for i, p in enumerate(parents)]
        default_steps = check_steps(steps, base.default_steps)
        Ta_ = min(p.Ta for p in parents) if Ta is None else Ta
        if isinstance(Ta_, bool) or not isinstance(Ta_, numbers.Integral) or not 1 <= Ta_ <= base.Tp:
            raise ConfigError(f"Ta={Ta!r} must be between 1 and Tp={base.Tp}.")
        self._spec = PolicySpec(list(self._obs_dims), self._obs_dims, max(p.To for p in parents), base.Tp, int(Ta_),
                                base.action_dim, default_steps, image_shapes=info["image_shapes"])
        self.action_norm_tol = float(action_norm_tol)
        self.parent_paths = None if parent_paths is None else [str(p) for p in parent_paths]
        if self.parent_paths is not None and len(self.parent_paths) != len(parents):
            raise ConfigError(f"got {len(self.parent_paths)} parent path(s) for {len(parents)} parents.")
        # metadata: the task the parents share (the parent whose environment provides every key, then the others)
        first = [parents[info["env_parent"]]] if info["env_parent"] is not None else []
        for p in [*first, base, *parents]:
            for k in ("env_args", "task"):
                if k in p.metadata:
                    self.metadata.setdefault(k, p.metadata[k])
        self.operator = operator
        self.weights = [1.0 / len(parents)] * len(parents) if weights is None else weights

    # -- configuration ------------------------------------------------------------------------
    @property
    def weights(self) -> list[float]:
        return list(self._weights)

    @weights.setter
    def weights(self, w: Sequence[float]) -> None:
        self._weights = check_weights(w, len(self.parents), self.operator)

    def set_weights(self, w: Sequence[float], operator: str | None = None) -> "ComposedPolicy":
        """Change the weights (and, optionally, the operator they are meant for); returns self."""
        if operator is not None:
            w = check_weights(w, len(self.parents), operator)
            self._operator = operator
        self.weights = w
        return self

    @property
    def operator(self) -> str:
        return self._operator

    @operator.setter
    def operator(self, op: str) -> None:
        if op not in OPERATORS:
            raise ConfigError(f"operator={op!r} is unknown; choose one of {OPERATORS}.")
        if hasattr(self, "_weights"):
            check_weights(self._weights, len(self.parents), op)
        self._operator = op

    def _same_kind(self, p) -> bool:
        return p.process.field_signature() == self.process.field_signature()

    def describe(self) -> dict:
        """JSON facts: operator, weights, base and each parent's kind."""
        return {"operator": self.operator, "weights": self.weights, "base": self.base_index, "steps": self.default_steps,
                "Ta": self.Ta, "parents": [{"process": p.process.name, "obs_keys": list(p.obs_keys),
                                            "native": self._native[i], "action_map": self._mapped[i]}
                                           for i, p in enumerate(self.parents)]}

    spec = property(lambda self: self._spec)

    # -- the map ------------------------------------------------------------------------------
    def encode(self, obs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """``{k: (B, To, d_k)}`` -> one conditioning tensor per parent (its keys, its last ``To_i`` steps)."""
        return tuple(p.encode({k: obs[k][:, obs[k].shape[1] - p.To:] for k in p.obs_keys}) for p in self.parents)

    def _map(self, i: int):
        return getattr(self, f"_map_scale_{i}"), getattr(self, f"_map_shift_{i}")

    def _parent_pair(self, i: int, fn, x: torch.Tensor, t: float):
        """Parent ``i``'s ``(x0, eps)`` at base coordinates ``(x, t)``, in the base's action space."""
        p = self.parents[i]
        tp, c = matched_time(self.process, p.process, t)
        xp = x / c if c != 1.0 else x
        if self._mapped[i]:
            D, d = self._map(i)
            xp = D * xp + p.process.coefficients(tp)[0] * d
        x0, eps = p.process.split(fn(xp, tp), xp, tp)
        if self._mapped[i]:
            x0, eps = (x0 - d) / D, eps / D
        return x0, eps

    def field_fn(self, cond: Sequence[torch.Tensor]):
        """The composed field in the base process's parameterization: ``(x_t (B,Tp,Da), t float) -> (B,Tp,Da)``."""
        if self.operator == "mixture":
            raise ConfigError("the mixture operator picks one parent per sample; it has no single field.")
        fns = [p.field_fn(c) for p, c in zip(self.parents, cond)]
        w = self.weights

        if self.operator == "convex":
            def fn(x: torch.Tensor, t) -> torch.Tensor:
                out = None
                for i, wi in enumerate(w):
                    if wi == 0:
                        continue  # a zero-weight parent costs nothing
                    f = fns[i](x, t) if self._native[i] else self.process.join(*self._parent_pair(i, fns[i], x, t), t)
                    out = f * wi if out is None else out + wi * f
                return out
            return fn

        def fn(x: torch.Tensor, t) -> torch.Tensor:  # product: needs every pair explicitly
            pairs = [self._parent_pair(i, fns[i], x, t) if wi != 0 else (None, None) for i, wi in enumerate(w)]
            alpha, sigma = self.process.coefficients(float(t))
            return self.process.join(*combine(pairs, w, "product", x, alpha, sigma), t)
        return fn

    def sample_normalized(self, cond: Sequence[torch.Tensor], noise: torch.Tensor | None = None, steps: int | None = None,
                          generator: torch.Generator | None = None, t_start: float = 1.0) -> torch.Tensor:
        """Denoise ``noise`` (B,Tp,Da) into a chunk in the base parent's normalized space."""
        cond = tuple(cond)
        if len(cond) != len(self.parents):
            raise ShapeError(f"got {len(cond)} conditioning tensor(s) for {len(self.parents)} parents; use encode(obs).")
        noise = self.initial_noise(cond[0].shape[0], cond[0].device, noise, generator)
        if self.operator == "mixture":  # each parent samples on its own (with its own default when steps is None)
            if steps is not None:
                self.resolve_steps(steps)
            return self._sample_mixture(cond, noise, steps, generator, t_start)
        steps = self.resolve_steps(steps)
        if t_start >= 1.0:
            noise = self.process.from_noise(noise)
        schedule = self.process.schedule(steps, t_start)
        return sample_loop(self.process, self.field_fn(cond), noise, schedule, generator)

    def mixture_choice(self, noise: torch.Tensor) -> torch.Tensor:
        """The parent index per sample (B,) the mixture gives ``noise`` (B,Tp,Da); P(i) = w_i."""
        flat = noise.reshape(noise.shape[0], -1).to(torch.float64)
        r = torch.randn(flat.shape[1], generator=torch.Generator().manual_seed(_MIX_SEED), dtype=torch.float64)
        r = (r / r.norm()).to(flat.device)
        u = torch.frac((flat * r).sum(-1) * _MIX_FREQ)
        u = torch.where(u < 0, u + 1.0, u)
        cum = torch.tensor(self.weights, dtype=torch.float64, device=flat.device).cumsum(0)
        return torch.searchsorted(cum, u, right=True).clamp_max(len(self.parents) - 1)

    def _sample_mixture(self, cond, noise, steps, generator, t_start):
        choice = self.mixture_choice(noise)
        out = torch.empty_like(noise)
        for i, p in enumerate(self.parents):
            rows = (choice == i).nonzero().flatten()
            if rows.numel() == 0:
                continue
            z = noise[rows]
            tp = t_start
            if t_start < 1.0:  # a partially denoised chunk: move it to the parent's time and coordinates
                tp, c = matched_time(self.process, p.process, t_start)
                z = z / c
            if self._mapped[i]:
                D, d = self._map(i)
                z = D * z + (p.process.coefficients(tp)[0] * d if tp < 1.0 else 0.0)
            x = p.sample_normalized(cond[i][rows], z, steps, generator, tp)
            if self._mapped[i]:
                D, d = self._map(i)
                x = (x - d) / D
            out[rows] = x
        return out

    def _use_sampler(self, sampler, settings) -> None:
        """The shared process, and each parent of the same process (which the mixture samples through), take
        the sampler; the other parents keep theirs (their fields are read on the shared process's steps)."""
        name = self.process.name
        self.process = self.process.with_sampler(sampler or self.process.sampler, **settings)
        self.parents = nn.ModuleList([p.with_sampler(sampler, **settings) if p.process.name == name else p
                                      for p in self.parents])

    # -- persistence --------------------------------------------------------------------------
    def save(self, path, relative: bool = True):
        """Write a composed checkpoint directory (parents by reference); see ``dpolicy.compose.checkpoint``."""
        return save_composed(self, path, relative=relative)

    @classmethod
    def from_checkpoints(cls, paths: Sequence, device="cpu", **kwargs) -> "ComposedPolicy":
        """Load each parent checkpoint and compose them; the paths are kept for ``save``."""
        parents = [load_checkpoint(p, device) for p in paths]
        return cls(parents, parent_paths=[str(resolve_checkpoint(p).resolve()) for p in paths], **kwargs)

    @classmethod
    def load(cls, path, meta: dict, device="cpu") -> "ComposedPolicy":
        """Rebuild from the ``meta.json`` of composed directory ``path`` (its parents load from their own)."""
        parents, paths, settings = read_composed(path, meta, device)
        try:
            policy = cls(parents, parent_paths=paths, **settings)
        except ConfigError as err:
            raise CheckpointError(f"composed checkpoint {str(path)!r} is invalid: {err}") from None
        policy.metadata.update(meta.get("metadata") or {})
        return policy.to(device).eval()

