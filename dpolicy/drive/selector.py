"""A learned trajectory scorer (Hydra-MDP / GTRS style): the PDMS-like sub-scores of candidate plans,
predicted from the planner's observation alone, to choose among proposals.

The rule-based expert rates its candidates against the agents' logged futures, which no planner can see;
the scorer learns the same rating from the scene as observed. Training pairs come from the train scenes:
every proposal of a fixed proposer (the map-only rule candidates of ``envs.driving.candidates`` and
samples of a planner) labelled with its sub-scores against the log. At test time the scorer rates the
proposals of a scene and the best predicted PDMS-like one is driven; the log is never read.

Architecture: the vector scene encoder (its weights may start from a planner's), a trajectory MLP per
candidate, and cross-attention blocks from each candidate to the scene tokens (no attention between
candidates, so a candidate's rating does not depend on which others are proposed). Five outputs: the
probabilities of NC, DAC, TTC and comfort and the EP fraction, combined as the scorer combines them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpolicy.drive.checkpoint import build_planner, read_planner_dir, save_planner
from dpolicy.drive.encoder import _mlp, make_encoder
from dpolicy.errors import ConfigError, ShapeError
from dpolicy.policy.checkpoint import register_kind
from dpolicy_envs.driving import SUB_SCORES, candidates, forecast, score

TRAJ_SCALE = 30.0  # metres: candidate waypoints are divided by it


def combine(p: dict) -> torch.Tensor:
    """PDMS-like from (predicted) sub-scores, as the scorer combines them."""
    return p["nc"] * p["dac"] * (5 * p["ep"] + 5 * p["ttc"] + 2 * p["comfort"]) / 12


class _Cross(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.nq, self.nk, self.nf = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.att = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, q, ctx, pad):
        k = self.nk(ctx)
        q = q + self.att(self.nq(q), k, k, key_padding_mask=pad, need_weights=False)[0]
        return q + self.ff(self.nf(q))


@register_kind("drive_scorer")
class TrajectoryScorer(nn.Module):
    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4, encoder: str = "vector_mlp", encoder_layers: int = 2):
        super().__init__()
        self.cfg = {"d": d, "layers": layers, "heads": heads, "encoder": encoder, "encoder_layers": encoder_layers}
        self.encoder = make_encoder(encoder, d, encoder_layers, heads)
        self.traj = _mlp(16, 2 * d, d)
        self.blocks = nn.ModuleList(_Cross(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, len(SUB_SCORES))

    def save(self, path, metadata: dict | None = None):
        return save_planner(self, path, metadata)

    @classmethod
    def load(cls, d, meta: dict, device="cpu") -> "TrajectoryScorer":
        cfg, state = read_planner_dir(d, meta)
        return build_planner(cls, d, cfg, state, lambda c: cls(**{k: c[k] for k in ("d", "layers", "heads", "encoder",
                                                                                    "encoder_layers")}), device)

    def logits(self, obs: dict, traj: torch.Tensor, ctx=None) -> torch.Tensor:
        """Candidates (B, N, 8, 2) in the ego frame -> logits (B, N, 5) in ``SUB_SCORES`` order."""
        if traj.dim() != 4 or traj.shape[2:] != (8, 2):
            raise ShapeError(f"candidate trajectories must have shape (B, N, 8, 2), got {tuple(traj.shape)}.")
        ctx, valid = self.encoder.tokens(obs) if ctx is None else ctx
        B, N = traj.shape[:2]
        q = self.traj(traj.reshape(B, N, 16) / TRAJ_SCALE)
        for blk in self.blocks:
            q = blk(q, ctx, ~valid)
        return self.head(self.norm(q))

    def forward(self, obs: dict, traj: torch.Tensor) -> dict:
        """Predicted sub-scores (each (B, N), in [0, 1]) and their PDMS-like combination."""
        p = torch.sigmoid(self.logits(obs, traj))
        out = {k: p[..., i] for i, k in enumerate(SUB_SCORES)}
        out["pdms"] = combine(out)
        return out

    def loss(self, obs: dict, traj: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy against the sub-scores ``labels`` (B, N, 5) measured on the log."""
        return F.binary_cross_entropy_with_logits(self.logits(obs, traj), labels)


@torch.no_grad()
def proposals(planner, obs: dict, scenes, samples: int, gen: torch.Generator, rule: bool = True, steps: int | None = None,
              order: str = "confidence") -> torch.Tensor:
    """Candidates (B, C, 8, 2) for the scenes: ``samples`` plans of ``planner`` (its own plan first, then sampled
    ones at temperature 1 or from fresh noise; none when ``samples`` is 0) and, with ``rule``, the map-only rule
    candidates (every lane and two route offsets x five speed profiles, and the emergency stop)."""
    parts = []
    if samples > 0:
        if hasattr(planner, "decode"):
            s = 8 if steps is None else steps
            first = planner.tok.decode(planner.decode(obs, steps=s, order=order), obs)
            parts.append(first[:, None])
            if samples > 1:
                rep = {k: v.repeat_interleave(samples - 1, 0) for k, v in obs.items()}
                more = planner.tok.decode(planner.decode(obs, steps=s, order=order, temperature=1.0, gen=gen, n=samples - 1), rep)
                parts.append(more.reshape(first.shape[0], samples - 1, 8, 2))
        else:
            parts.append(torch.stack([planner.plan(obs, gen=gen, steps=steps) for _ in range(samples)], 1))
    if rule:
        parts.append(candidates(scenes))
    if not parts:
        raise ConfigError("no proposals: ask for at least one planner sample or the rule candidates.")
    return torch.cat(parts, 1)


@torch.no_grad()
def rate(scorer, obs: dict, scenes, cand: torch.Tensor) -> torch.Tensor:
    """PDMS-like ratings (B, C) of the candidates: the learned ``scorer``'s prediction, or with ``scorer`` None
    the rule-based scorer against a constant-speed forecast of the agents (EP over the candidates' own best)."""
    if scorer is None:
        return score(forecast(scenes), cand)["pdms"]
    return scorer(obs, cand)["pdms"]


def choose(scorer, planner, obs: dict, scenes, samples: int, rule: bool, gen, steps: int | None = None,
           order: str = "confidence") -> torch.Tensor:
    """The best rated of the scenes' proposals, (B, 8, 2)."""
    c = proposals(planner, obs, scenes, samples, gen, rule, steps, order)
    return c[torch.arange(c.shape[0], device=c.device), rate(scorer, obs, scenes, c).argmax(1)]


@torch.no_grad()
def scoring_set(planner, ds, samples: int, rule: bool = True, seed: int = 0, chunk: int = 256, log=None):
    """Proposals (n, C, 8, 2) for every scene of ``ds`` and their sub-scores on the log (n, C, 5)."""
    gen = torch.Generator(ds.expert.device).manual_seed(seed)
    trajs, labels = [], []
    for i in range(0, ds.n, chunk):
        sl = slice(i, i + chunk)
        sc = ds.scenes.index(sl)
        c = proposals(planner, {k: v[sl] for k, v in ds.obs.items()}, sc, samples, gen, rule)
        r = score(sc, c, best_progress=ds.best_progress[sl])
        trajs.append(c)
        labels.append(torch.stack([r[k] for k in SUB_SCORES], -1))
        if log and (i // chunk) % 10 == 0:
            log(f"  scored proposals of scenes {i}..{min(i + chunk, ds.n) - 1} of {ds.n}")
    return torch.cat(trajs), torch.cat(labels)


def train_scorer(scorer: TrajectoryScorer, ds, trajs: torch.Tensor, labels: torch.Tensor, steps: int, batch: int = 64,
                 per_scene: int = 16, lr: float = 1e-3, seed: int = 0, log=None) -> list[float]:
    """Fit the scorer to the labelled proposals: each step ``batch`` scenes with ``per_scene`` of their proposals."""
    from dpolicy.drive.train import fit

    C = trajs.shape[1]

    def loss_fn(idx, gen):
        pick = torch.rand(idx.shape[0], C, generator=gen, device=trajs.device).argsort(1)[:, :min(per_scene, C)]
        t = trajs[idx].gather(1, pick[..., None, None].expand(-1, -1, 8, 2))
        y = labels[idx].gather(1, pick[..., None].expand(-1, -1, labels.shape[-1]))
        return scorer.loss({k: v[idx] for k, v in ds.obs.items()}, t, y)
    return fit(scorer, loss_fn, ds.n, steps, batch, lr, seed, trajs.device, log=log, log_every=max(1, steps // 10))


@torch.no_grad()
def select(scorer, planner, ds, samples: int, rule: bool = True, seed: int = 0, steps: int | None = None,
           order: str = "confidence", chunk: int = 128) -> torch.Tensor:
    """One trajectory (n, 8, 2) per scene of ``ds``: the proposal ``rate`` rates best (``scorer`` None: the
    rule-based scorer on the forecast). The log is not read."""
    gen = torch.Generator(ds.expert.device).manual_seed(seed)
    return torch.cat([choose(scorer, planner, {k: v[i:i + chunk] for k, v in ds.obs.items()}, ds.scenes.index(slice(i, i + chunk)),
                             samples, rule, gen, steps, order) for i in range(0, ds.n, chunk)])


@torch.no_grad()
def rated_candidates(scorer, ds, chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The map-only rule candidates of every scene of ``ds`` (n, C, 8, 2) and ``rate``'s ratings of them (n, C)."""
    cands, ratings = [], []
    for i in range(0, ds.n, chunk):
        sl = slice(i, i + chunk)
        obs, sc = {k: v[sl] for k, v in ds.obs.items()}, ds.scenes.index(sl)
        c = candidates(sc)
        cands.append(c)
        ratings.append(rate(scorer, obs, sc, c))
    return torch.cat(cands), torch.cat(ratings)


def scene_chooser(scorer, planner, encoder: str, samples: int, rule: bool, steps: int | None = None, order: str = "confidence",
                  seed: int = 0):
    """``plan(scenes) -> (B, 8, 2)`` for closed-loop rollouts: observe the scenes for ``encoder`` and drive the best
    rated proposal (as ``select``), with fresh sampling noise at every call."""
    from dpolicy.drive.data import OBSERVERS

    gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def fn(scenes):
        g = torch.Generator(scenes.device).manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        return choose(scorer, planner, OBSERVERS[encoder](scenes), scenes, samples, rule, g, steps, order)
    return fn
