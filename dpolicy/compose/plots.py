"""The weight-sweep plot: success vs weight with Wilson intervals, the parents and the choice marked.

Two parents: x is the weight of parent 1 (0 = parent 0 alone, 1 = parent 1 alone). More parents:
one point per evaluated candidate, in evaluation order, labelled by its weights. Selection-seed
results are drawn as the sweep; the chosen weights' and the parents' evaluation-seed results are
drawn on top with their own markers, so the selection/evaluation gap is visible.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from dpolicy.eval.plots import _save


_PARENT_COLORS = ["tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:olive", "tab:cyan"]


def _err(y, ci):
    return [[max(0.0, y - ci[0])], [max(0.0, ci[1] - y)]]


def plot_weight_sweep(report: dict, path: str | Path, title: str | None = None,
                      parent_names: list[str] | None = None) -> Path:
    """Draw ``select_and_report``'s result; returns the PNG path."""
    sel = report.get("select") or {"candidates": []}
    cands = sel["candidates"]
    n = len(report["parents"])
    names = parent_names or [f"parent {i}" for i in range(n)]
    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot(1, 1, 1)
    two = n == 2
    xpos = (lambda w: w[1] / sum(w)) if two else None  # product weights need not sum to 1: plot the share
    if cands:
        if two:
            pts = sorted(cands, key=lambda c: c["weights"][1])
            xs = [c["weights"][1] for c in pts]
        else:
            pts = cands
            xs = list(range(len(pts)))
        ys = [c["success_rate"] for c in pts]
        lo = [max(0.0, y - c["ci95"][0]) for y, c in zip(ys, pts)]
        hi = [max(0.0, c["ci95"][1] - y) for y, c in zip(ys, pts)]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, color="tab:blue",
                    label=f"selection seeds ({sel.get('episodes', '?')} episodes each)")
        if not two:
            ax.set_xticks(xs)
            ax.set_xticklabels(["(" + ",".join(f"{v:.2f}" for v in c["weights"]) + ")" for c in pts], rotation=60, fontsize=7)
    w = report["weights"]
    comp = report["composed"]
    cx = xpos(w) if two else _index_of(cands, w)
    ne = comp["n_episodes"]
    ax.errorbar([cx], [comp["success_rate"]], yerr=_err(comp["success_rate"], comp["success_ci95"]), marker="*",
                markersize=14, color="tab:red", capsize=4, linestyle="none", label=f"chosen w, evaluation seeds ({ne})")
    for i, r in enumerate(report["parents"]):
        e = [0.0] * n
        e[i] = 1.0
        px = (xpos(e) if two else _index_of(cands, e)) + 0.02 * (1 if i == 0 else -1)  # beside the star, if chosen
        ax.errorbar([px], [r["success_rate"]], yerr=_err(r["success_rate"], r["success_ci95"]), marker="s", markersize=8,
                    capsize=4, linestyle="none", color=_PARENT_COLORS[i % len(_PARENT_COLORS)],
                    label=f"{names[i]} alone, evaluation seeds")
    ax.set_xlabel(f"weight of {names[1]}" if two else "candidate weights")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)
    if two:
        ax.set_xlim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title or f"{report.get('operator', 'convex')} composition: success vs weight")
    return _save(fig, path)


def _index_of(cands, w) -> float:
    for j, c in enumerate(cands):
        if all(abs(a - b) < 1e-9 for a, b in zip(c["weights"], w)):
            return j
    return -1
