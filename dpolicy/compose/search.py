"""Test-time weight search: choose the weights on one set of seeds, report them on a disjoint set.

``grid_search`` evaluates every point of a regular grid on the simplex (2-3 parents);
``cem_search`` runs the cross-entropy method over softmax logits (any number of parents). Every
candidate is evaluated on the *same* selection seeds (common random numbers: the same env starts
and the same noise), and ranked by success rate, then mean return. ``select_and_report`` then
evaluates the chosen weights and every parent alone on evaluation seeds that do not overlap the
selection seeds (the GPC paper selected on its evaluation episodes; a selected maximum of noisy
estimates is biased upwards, so here the number that is reported was not used to choose).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from dpolicy.errors import ConfigError
from dpolicy.eval.stats import wilson_interval


@dataclass
class Candidate:
    weights: list[float]
    success_rate: float
    successes: int
    episodes: int
    mean_return: float
    ci95: tuple[float, float]
    stage: int = 0  # CEM iteration (0 for the grid)

    def key(self):
        return (self.success_rate, self.mean_return)


@dataclass
class SearchResult:
    method: str
    best: list[float]
    candidates: list[Candidate]
    seed: int
    episodes: int
    evaluations: int = field(init=False)

    def __post_init__(self):
        self.evaluations = len(self.candidates)

    def to_dict(self) -> dict:
        return asdict(self)


def simplex_grid(n: int, resolution: int) -> list[list[float]]:
    """All weight vectors with ``n`` entries in multiples of ``1 / resolution`` that sum to 1."""
    if n < 1 or resolution < 1:
        raise ConfigError(f"a simplex grid needs n >= 1 parents and resolution >= 1 (got n={n}, resolution={resolution}).")
    out = []
    for c in itertools.product(range(resolution + 1), repeat=n - 1):
        if sum(c) <= resolution:
            k = [*c, resolution - sum(c)]
            out.append([v / resolution for v in k])
    return sorted(out, key=lambda w: [-v for v in w])  # parent 0 alone first


def check_disjoint(select_seed: int, select_episodes: int, eval_seed: int, eval_episodes: int) -> None:
    a, b = range(select_seed, select_seed + select_episodes), range(eval_seed, eval_seed + eval_episodes)
    if a.start < b.stop and b.start < a.stop:
        raise ConfigError(f"selection seeds [{a.start}, {a.stop}) overlap evaluation seeds [{b.start}, {b.stop}); "
                          f"the weights must be chosen on seeds that are not used to report them.")


def _score(policy, weights, env_fn, episodes, seed, n_envs, steps, stage=0) -> Candidate:
    from dpolicy.eval import evaluate

    policy.set_weights(weights)
    r = evaluate(policy, env_fn, n_episodes=episodes, n_envs=n_envs, seed=seed, progress=False, steps=steps)
    k = int(sum(r.successes))
    return Candidate([float(v) for v in weights], r.success_rate, k, r.n_episodes, r.mean_return, wilson_interval(k, r.n_episodes), stage)


def _best(cands: Sequence[Candidate]) -> Candidate:
    return max(cands, key=lambda c: c.key())  # first of equals: the grid lists parent 0 alone first


def grid_search(policy, env_fn: Callable, episodes: int = 50, seed: int = 200_000, resolution: int = 10,
                n_envs: int = 10, steps: int | None = None, log: Callable[[str], None] | None = None) -> SearchResult:
    """Evaluate every weight vector of ``simplex_grid(len(parents), resolution)``; keep the best."""
    n = len(policy.parents)
    if n > 3:
        raise ConfigError(f"a grid over {n} parents is too large; use search=cem for more than 3 parents.")
    cands = []
    for w in simplex_grid(n, resolution):
        c = _score(policy, w, env_fn, episodes, seed, n_envs, steps)
        cands.append(c)
        if log:
            log(f"[compose] w={_fmt(w)}: success {c.success_rate:.3f} ({c.successes}/{c.episodes})")
    best = _best(cands)
    policy.set_weights(best.weights)
    return SearchResult("grid", best.weights, cands, seed, episodes)


def cem_search(policy, env_fn: Callable, episodes: int = 50, seed: int = 200_000, iterations: int = 4,
               population: int = 8, elite_frac: float = 0.25, init_std: float = 1.0, rng_seed: int = 0,
               n_envs: int = 10, steps: int | None = None, log: Callable[[str], None] | None = None) -> SearchResult:
    """Cross-entropy method over logits ``z`` with ``w = softmax(z)``: sample a population from a
    diagonal Gaussian, refit it to the elite, repeat. The uniform mix and each parent alone are
    evaluated first, so the search never reports less than the best of them on the selection seeds."""
    n = len(policy.parents)
    if iterations < 1 or population < 2 or not 0 < elite_frac <= 1:
        raise ConfigError(f"cem needs iterations >= 1, population >= 2 and 0 < elite_frac <= 1 "
                          f"(got {iterations}, {population}, {elite_frac}).")
    rng = np.random.default_rng(rng_seed)
    mean, std = np.zeros(n), np.full(n, float(init_std))
    n_elite = max(1, int(round(elite_frac * population)))
    start = [[1.0 / n] * n] + [list(np.eye(n)[i]) for i in range(n)]
    cands = [_score(policy, w, env_fn, episodes, seed, n_envs, steps, 0) for w in start]
    for it in range(1, iterations + 1):
        z = mean + std * rng.standard_normal((population, n))
        ws = np.exp(z - z.max(1, keepdims=True))
        ws = ws / ws.sum(1, keepdims=True)
        batch = []
        for zi, w in zip(z, ws):
            w = [float(v) for v in np.round(w, 4)]
            w[-1] = round(1.0 - sum(w[:-1]), 6)
            if w[-1] < 0:
                w = [v / sum(w[:-1]) for v in w[:-1]] + [0.0]
            c = _score(policy, w, env_fn, episodes, seed, n_envs, steps, it)
            batch.append((c, zi))
        cands += [c for c, _ in batch]
        elite = sorted(batch, key=lambda cz: cz[0].key(), reverse=True)[:n_elite]
        ez = np.stack([zi for _, zi in elite])
        mean, std = ez.mean(0), np.maximum(ez.std(0), 0.05)
        if log:
            b = elite[0][0]
            log(f"[compose] cem iteration {it}: best w={_fmt(b.weights)} success {b.success_rate:.3f}")
    best = _best(cands)
    policy.set_weights(best.weights)
    return SearchResult("cem", best.weights, cands, seed, episodes)


def paired_difference(a: Sequence[bool], b: Sequence[bool], z: float = 1.959964) -> tuple[float, tuple[float, float]]:
    """Mean of ``a - b`` over paired episodes (same seeds) and its normal-approximation 95% interval."""
    if len(a) != len(b) or not a:
        raise ValueError("paired results must have the same, non-zero length.")
    d = np.asarray(a, float) - np.asarray(b, float)
    m = float(d.mean())
    half = z * float(d.std(ddof=1)) / math.sqrt(len(d)) if len(d) > 1 else float("inf")
    return m, (m - half, m + half)


def select_and_report(policy, env_fn: Callable, search: str = "grid", select_episodes: int = 50,
                      select_seed: int = 200_000, eval_episodes: int = 200, eval_seed: int = 100_000,
                      n_envs: int = 10, steps: int | None = None, resolution: int = 10,
                      cem: dict | None = None, weights: Sequence[float] | None = None,
                      log: Callable[[str], None] | None = None) -> dict:
    """Choose weights (``search`` in grid | cem | none) on the selection seeds, then evaluate the
    composition and each parent alone on the disjoint evaluation seeds. Returns a JSON-able dict;
    ``policy`` is left at the chosen weights."""
    from dpolicy.eval import evaluate

    n = len(policy.parents)
    if search == "none":
        if weights is None:
            raise ConfigError("search=none needs weights=[...] (one per parent).")
        policy.set_weights(weights)
        sres = None
    else:
        check_disjoint(select_seed, select_episodes, eval_seed, eval_episodes)
        if search == "grid":
            sres = grid_search(policy, env_fn, select_episodes, select_seed, resolution, n_envs, steps, log)
        elif search == "cem":
            sres = cem_search(policy, env_fn, select_episodes, select_seed, n_envs=n_envs, steps=steps, log=log, **(cem or {}))
        else:
            raise ConfigError(f"search={search!r} is unknown; choose 'grid', 'cem' or 'none'.")
    chosen = policy.weights

    def run(w):
        policy.set_weights(w)
        return evaluate(policy, env_fn, n_episodes=eval_episodes, n_envs=n_envs, seed=eval_seed, progress=False, steps=steps)

    comp = run(chosen)
    parents = [run(list(np.eye(n)[i])) for i in range(n)]
    policy.set_weights(chosen)
    best_i = max(range(n), key=lambda i: (parents[i].success_rate, parents[i].mean_return))
    diff, diff_ci = paired_difference(comp.successes, parents[best_i].successes)
    out = {
        "operator": policy.operator, "search": search, "weights": chosen,
        "select": None if sres is None else sres.to_dict(),
        "select_seeds": None if sres is None else [select_seed, select_seed + select_episodes],
        "eval_seeds": [eval_seed, eval_seed + eval_episodes],
        "composed": _brief(comp),
        "parents": [_brief(r) for r in parents],
        "best_parent": best_i,
        "gain_vs_best_parent": diff, "gain_ci95": list(diff_ci),
    }
    if log:
        lo, hi = comp.success_ci95
        log(f"[compose] chosen w={_fmt(chosen)}: eval success {comp.success_rate:.3f} [{lo:.3f}, {hi:.3f}] vs best parent "
            f"{best_i} {parents[best_i].success_rate:.3f}; gain {diff:+.3f} [{diff_ci[0]:+.3f}, {diff_ci[1]:+.3f}]")
    return out


def _brief(r) -> dict:
    return {"success_rate": r.success_rate, "success_ci95": list(r.success_ci95), "n_episodes": r.n_episodes,
            "mean_return": r.mean_return, "successes": [bool(s) for s in r.successes], "mode_counts": r.mode_counts}


def _fmt(w) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in w) + "]"
