"""Curves and scene pictures for the driving benchmark (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dpolicy_envs.driving import boundary_polygon  # noqa: E402
from dpolicy_envs.driving.scenes import S0, STATION_STEP, frenet_to_xy  # noqa: E402


def _finish(fig, ax, path, xkey: str, ylabel: str, legend_size: int) -> Path:
    ax.set_xlabel("rollout trajectories" if xkey == "samples" else xkey)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_curves(path, curves: dict, ylabel: str = "test PDMS-like", xkey: str = "samples") -> Path:
    """curves: label -> list of history records with ``xkey`` and ``test_pdms``."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, hist in curves.items():
        pts = [(h[xkey], h["test_pdms"]) for h in hist if "test_pdms" in h]
        ax.plot(*zip(*pts), marker="o", label=label)
    return _finish(fig, ax, path, xkey, ylabel, 8)


def plot_seed_bands(path, runs: dict, ylabel: str = "validation PDMS-like", xkey: str = "samples",
                    reference: dict | None = None) -> Path:
    """runs: label -> run directories (one per seed) holding ``history.json``; the mean over seeds with a band from
    the lowest to the highest seed at each evaluation. ``reference``: label -> a level drawn as a dashed line."""
    import json

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, dirs in runs.items():
        hists = [[h for h in json.loads((Path(d) / "history.json").read_text()) if "test_pdms" in h] for d in dirs]
        n = min(len(h) for h in hists)
        x = np.array([h[xkey] for h in hists[0][:n]])
        y = np.array([[h["test_pdms"] for h in hist[:n]] for hist in hists])
        line, = ax.plot(x, y.mean(0), marker="o", label=f"{label} (mean of {len(dirs)} seeds, band: min-max)")
        ax.fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.2)
    for label, level in (reference or {}).items():
        ax.axhline(level, ls="--", color="gray", lw=1)
        ax.annotate(label, (ax.get_xlim()[0], level), fontsize=7, va="bottom")
    return _finish(fig, ax, path, xkey, ylabel, 7)


def plot_scenes(path, ds, plans: dict, n: int = 4) -> Path:
    """A few scenes: drivable area, agents at t = 0 (with their logged paths), and each planner's plan."""
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 4))
    for i, ax in enumerate(np.atleast_1d(axes)):
        poly = boundary_polygon(ds.scenes, i)
        ax.fill(poly[:, 0], poly[:, 1], color="0.85")
        sc = ds.scenes
        if float(sc.cross[i, 2]) > 0.5:  # the crossing road of an intersection scene
            st = float(sc.cross[i, 0])
            mid = float((sc.left[i] + sc.right[i]).mean() / 2)
            p = frenet_to_xy(sc.road[i].cpu().numpy(), np.array([st]), np.array([mid]))[0]
            ang, hw = p[2] + np.pi / 2 + float(sc.cross[i, 3]), float(sc.cross[i, 1])
            u, n_ = np.array([np.cos(ang), np.sin(ang)]), np.array([-np.sin(ang), np.cos(ang)])
            quad = np.array([p[:2] + 60 * u + hw * n_, p[:2] + 60 * u - hw * n_, p[:2] - 60 * u - hw * n_, p[:2] - 60 * u + hw * n_])
            ax.fill(quad[:, 0], quad[:, 1], color="0.85")
        road = sc.road[i].cpu().numpy()
        stations = S0 + STATION_STEP * np.arange(len(road))
        for off, end in zip(sc.lane_offsets[i].cpu().numpy(), sc.lane_end[i].cpu().numpy()):
            if np.isfinite(off):
                keep = stations < end
                c = frenet_to_xy(road, stations[keep], np.full(keep.sum(), off))
                ax.plot(c[:, 0], c[:, 1], color="0.6", lw=0.5, ls="--")
        ag = ds.scenes.agents[i].cpu().numpy()
        for a in np.nonzero(ds.scenes.agent_valid[i].cpu().numpy())[0]:
            ax.plot(ag[a, :, 0], ag[a, :, 1], color="tab:red", lw=0.8, alpha=0.6)
            ax.plot(ag[a, 0, 0], ag[a, 0, 1], "s", color="tab:red", ms=5)
        for label, traj in plans.items():
            t = traj[i].cpu().numpy()
            ax.plot(np.r_[0, t[:, 0]], np.r_[0, t[:, 1]], marker=".", label=label)
        ax.plot(0, 0, "ks", ms=6)
        ax.set_xlim(-20, 100)
        ax.set_ylim(-40, 40)
        ax.set_aspect("equal")
        ax.set_title(f"seed {int(ds.scenes.seeds[i])}", fontsize=9)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
