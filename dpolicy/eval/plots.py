"""Headless PNG plots: training curves and success rate against a swept quantity.

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas directly,
never through ``pyplot``, so nothing depends on a display or changes the process-wide backend
(a notebook's interactive backend stays as it was) and no figure is left open in pyplot's registry.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _series(history: Sequence[dict], key: str, step_key: str) -> tuple[list[float], list[float]]:
    """Points ``(step, value)`` of ``key`` in ``history``; rows without it or with non-finite values are skipped."""
    xs, ys = [], []
    for i, row in enumerate(history):
        v = row.get(key)
        if v is None:
            continue
        v = float(v)
        if math.isfinite(v):
            xs.append(float(row.get(step_key, i)))
            ys.append(v)
    return xs, ys


def plot_learning_curve(history: Sequence[dict], path: str | Path, keys: Sequence[str] = ("loss",),
                        eval_key: str | None = "success_rate", step_key: str = "step", logy: bool = False,
                        title: str | None = None) -> Path:
    """Training metrics ``keys`` vs step, and ``eval_key`` (if logged) on a second axis in [0, 1].

    ``history`` is a list of log rows (dicts); a row's step is ``row[step_key]``, or its index if absent.
    """
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot(1, 1, 1)
    handles = []
    for key in keys:
        xs, ys = _series(history, key, step_key)
        if xs:
            handles += ax.plot(xs, ys, label=key, linewidth=1.2)
    ex, ey = _series(history, eval_key, step_key) if eval_key else ([], [])
    if not handles and not ex:
        raise ValueError(f"the history has no finite values for {list(keys)} or {eval_key!r}; nothing to plot.")
    ax.set_xlabel(step_key)
    ax.set_ylabel(", ".join(keys))
    if logy and handles:
        ax.set_yscale("log")
    if ex:
        ax2 = ax.twinx()
        handles += ax2.plot(ex, ey, "o-", color="tab:green", label=eval_key)
        ax2.set_ylim(-0.02, 1.02)
        ax2.set_ylabel(eval_key)
    ax.legend(handles=handles, loc="best")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_success_vs(xs, ys, cis, xlabel: str, path: str | Path, labels: Sequence[str] | None = None,
                    ylabel: str = "success rate", title: str | None = None, logx: bool = False) -> Path:
    """Success rate vs ``xs`` with asymmetric error bars from confidence intervals ``cis`` = [(lo, hi), ...].

    With ``labels=None`` the inputs are one series; with ``labels`` they are one sequence per label
    (``xs[j], ys[j], cis[j]`` belong to ``labels[j]``), drawn as separate lines with a legend.
    """
    if labels is None:
        xs, ys, cis = [xs], [ys], [cis]
    elif not (len(xs) == len(ys) == len(cis) == len(labels)):
        raise ValueError("xs, ys and cis must hold one series per label.")
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    for j, (x, y, ci) in enumerate(zip(xs, ys, cis)):
        if not (len(x) == len(y) == len(ci)):
            raise ValueError(f"series {j}: xs, ys and cis have lengths {len(x)}, {len(y)}, {len(ci)}; they must match.")
        # Error bars are distances from the point, clipped at 0 in case an interval excludes its point.
        lower = [max(0.0, yy - lo) for yy, (lo, _) in zip(y, ci)]
        upper = [max(0.0, hi - yy) for yy, (_, hi) in zip(y, ci)]
        ax.errorbar(x, y, yerr=[lower, upper], marker="o", capsize=3,
                    label=None if labels is None else labels[j])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    if logx:
        ax.set_xscale("log")
    if labels is not None:
        ax.legend(loc="best")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    return _save(fig, path)
