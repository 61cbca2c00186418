"""Behaviour cloning and evaluation for the driving planners.

The planners here train on one-step scene -> trajectory pairs held entirely on the device, so the
loop is small: AdamW, warm-up + cosine, gradient clipping, a non-finite guard. (The repository's
Trainer is built around windowed chunk datasets and ChunkPolicy checkpoints; these planners are
neither, see the report.)
"""

from __future__ import annotations

import math

import torch

from dpolicy.errors import ShapeError, TrainingError
from dpolicy_envs.driving import score


def fit(model, loss_fn, n: int, steps: int, batch: int = 64, lr: float = 1e-3, seed: int = 0, device="cpu",
        log=None, log_every: int = 0) -> list[float]:
    """Minimise ``loss_fn(idx, gen)`` over random index batches of a dataset of size ``n``."""
    gen = torch.Generator(device).manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1))))
    model.train()
    losses, bad = [], 0
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), device=device, generator=gen)
        loss = loss_fn(idx, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        g = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not (torch.isfinite(loss) and torch.isfinite(g)):
            bad += 1
            if bad >= 10:
                raise TrainingError(f"10 non-finite losses in a row at step {step}.")
            continue
        bad = 0
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log and log_every and (step + 1) % log_every == 0:
            log(f"  step {step + 1}/{steps}: loss {sum(losses[-log_every:]) / log_every:.4f}")
    model.eval()
    return losses


def _target_draw(targets: torch.Tensor, weights: torch.Tensor | None):
    """``(idx, gen) -> targets`` of those scenes: ``targets[idx]`` when ``weights`` is None, else one of each
    scene's candidates ``targets[idx, j]`` drawn with probabilities ``weights[idx]`` (rows summing to 1)."""
    if weights is None:
        return lambda idx, gen: targets[idx]
    if weights.shape != targets.shape[:2]:
        raise ShapeError(f"target weights {tuple(weights.shape)} do not match the candidates {tuple(targets.shape[:2])}.")

    def draw(idx, gen):
        j = torch.multinomial(weights[idx], 1, generator=gen)[:, 0]
        return targets[idx, j]
    return draw


def train_token_planner(planner, ds, steps: int, batch: int = 64, lr: float = 1e-3, seed: int = 0, log=None,
                        soft: tuple | None = None):
    """Masked-token BC on the set's plans, or with ``soft`` = (candidates (n, C, 8, 2), weights (n, C)) on a
    candidate drawn per scene and step."""
    targets, w = (ds.expert, None) if soft is None else soft
    if targets.dim() == 3:
        toks = planner.tok.encode(targets, ds.obs)
    else:  # one candidate at a time: every scene's j-th candidate in that scene's frame
        toks = torch.stack([planner.tok.encode(targets[:, j], ds.obs) for j in range(targets.shape[1])], 1)
    draw = _target_draw(toks, w)
    return fit(planner, lambda idx, gen: planner.loss({k: v[idx] for k, v in ds.obs.items()}, draw(idx, gen), gen),
               ds.n, steps, batch, lr, seed, ds.expert.device, log, max(steps // 5, 1))


def train_continuous(planner, ds, steps: int, batch: int = 64, lr: float = 1e-3, seed: int = 0, log=None,
                     soft: tuple | None = None):
    draw = _target_draw(*((ds.expert, None) if soft is None else soft))
    return fit(planner, lambda idx, gen: planner.loss({k: v[idx] for k, v in ds.obs.items()}, draw(idx, gen), gen),
               ds.n, steps, batch, lr, seed, ds.expert.device, log, max(steps // 5, 1))


@torch.no_grad()
def plan_tokens(planner, ds, steps: int = 8, order: str = "confidence", temperature: float = 0.0, seed: int = 0,
                chunk: int = 256) -> torch.Tensor:
    gen = torch.Generator(ds.expert.device).manual_seed(seed)
    out = []
    for i in range(0, ds.n, chunk):
        o = {k: v[i:i + chunk] for k, v in ds.obs.items()}
        out.append(planner.tok.decode(planner.decode(o, steps=steps, order=order, temperature=temperature, gen=gen), o))
    return torch.cat(out)


@torch.no_grad()
def plan(planner, ds, steps: int | None = None, order: str = "confidence", seed: int = 0, chunk: int = 256) -> torch.Tensor:
    """One trajectory (n, 8, 2) per scene of ``ds``: greedy decoding for a token planner, the sampler from
    seeded noise for a continuous one; ``steps`` None: the planner's own."""
    if hasattr(planner, "decode"):
        return plan_tokens(planner, ds, 8 if steps is None else steps, order, seed=seed, chunk=chunk)
    gen = torch.Generator(ds.expert.device).manual_seed(seed)
    return torch.cat([planner.plan({k: v[i:i + chunk] for k, v in ds.obs.items()}, gen=gen, steps=steps)
                      for i in range(0, ds.n, chunk)])


def scene_planner(planner, encoder: str, steps: int | None = None, order: str = "confidence", seed: int = 0):
    """``plan(scenes) -> (B, 8, 2)`` for closed-loop rollouts: observe the scenes for ``encoder``, then plan
    as ``plan`` does (greedy decoding, or seeded sampler noise that differs between calls)."""
    from dpolicy.drive.data import OBSERVERS

    gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def fn(scenes):
        obs = OBSERVERS[encoder](scenes)
        if hasattr(planner, "decode"):
            return planner.tok.decode(planner.decode(obs, steps=8 if steps is None else steps, order=order), obs)
        g = torch.Generator(scenes.device).manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        return planner.plan(obs, gen=g, steps=steps)
    return fn


@torch.no_grad()
def closed_loop(scenes, plan_fn, chunk: int = 128) -> dict:
    """Closed-loop pseudo-simulation (``envs.driving.closed_loop``) of ``plan_fn`` over ``scenes``: per scene NC,
    DAC (1 = never left the drivable area) and progress (m), each (n,)."""
    from dpolicy_envs.driving.closed_loop import rollout

    parts = [rollout(scenes.index(slice(i, i + chunk)), plan_fn) for i in range(0, scenes.batch, chunk)]
    return {k: torch.cat([p[k] for p in parts]) for k in ("nc", "dac", "progress")}


@torch.no_grad()
def evaluate(ds, traj: torch.Tensor) -> dict:
    """Sub-scores and PDMS-like of one trajectory per scene, EP normalised by the expert candidates."""
    return {k: v[:, 0] for k, v in score(ds.scenes, traj, best_progress=ds.best_progress).items()}
