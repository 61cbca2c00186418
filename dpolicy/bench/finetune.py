"""RL on the denoising chain against DSRL, on DSRL's weak bases: success against environment steps per method and
seed, wall clock per 1,000 environment steps, and the fine-tuned policy's drift from its base.

Every run starts from the same weak base as ``dpolicy-bench --sections steer`` (``weak_base``), is evaluated on
the same evaluation seeds, and is cached in the work directory (a rerun does only what is missing).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dpolicy.bench.report import table

# the bench's recipe (FinetuneConfig fields; everything else is the default): only the last denoising step made
# Gaussian, 64 episodes per iteration (8 groups of 8), large batches and a small learning rate, which keep PPO's
# clip fraction near 0.05 on push's weak base (learning rates 1e-4 and 3e-5 clipped 80-90% and 20-40% of the
# ratios and did not improve the base in 50,000 steps)
RECIPE = dict(ft_steps=1, std=0.1, lr=3e-6, episodes_per_iter=64, group=8, batch_size=1024)
# success-filtered matching is behaviour cloning on the replay of successes: a BC learning rate and batch
ALGO_SETTINGS = {"ppo": RECIPE, "grpo": RECIPE, "gspo": RECIPE, "awm": {**RECIPE, "lr": 1e-5},
                 "filtered": {**RECIPE, "lr": 1e-4, "batch_size": 256, "bc_steps": 200}}
BUDGETS = {"push": 200000, "avoid": 10000, "lift": 20000}


def _reach(history, level):
    for h in history:
        if h["success_rate"] >= level:
            return int(h["env_steps"])
    return None


def finetune_section(work: Path, log=print, tasks=("push",), algos=("ppo", "grpo", "gspo", "awm", "filtered"), seeds=(0, 1, 2),
                     env_steps: int | None = None, eval_every: int | None = None, eval_episodes: int = 50,
                     figure: Path | None = Path("docs/img/finetune_push.png")) -> tuple[str, dict]:
    from dpolicy.bench.steer import weak_base
    from dpolicy.rl.finetune import FinetuneConfig, finetune

    work = Path(work)
    results, body = {}, []
    for task in tasks:
        base_root, base_m = weak_base(work.parent / "steer", task, log)
        budget = env_steps or BUDGETS[task]
        every = eval_every or max(budget // 10, 1000)
        rows, curves = [], {}
        for algo in algos:
            for seed in seeds:
                run = work / f"{task}_{algo}_s{seed}"
                mfile = run / "metrics.json"
                if mfile.exists():
                    m = json.loads(mfile.read_text())
                else:
                    cfg = FinetuneConfig(base=str(base_root), algo=algo, env_steps=budget, eval_every=every,
                                         eval_episodes=eval_episodes, seed=seed, progress=False, **ALGO_SETTINGS[algo])
                    m = finetune(cfg, run, log=lambda s: log(f"[finetune {task} {algo} s{seed}] {s}"))
                results[f"{task}/{algo}/s{seed}"] = m
                h = m["history"]
                curves.setdefault(algo, []).append(h)
                r90 = _reach(h, 0.9)
                rows.append([algo, seed, f"{h[0]['success_rate']:.2f}", f"{h[-1]['success_rate']:.3f}",
                             f"{max(x['success_rate'] for x in h):.3f}", "-" if r90 is None else f"{r90:,}",
                             f"{m['wall_s_per_1000_env_steps']:.1f}", f"{m['drift_mse']:.4f}"])
        reached = sum(r[5] != "-" for r in rows)
        body += [f"**{task}** weak base (BC success {base_m['success_rate']:.2f}; the same base as the steer section's "
                 f"DSRL runs); budget {budget:,} env steps, {eval_episodes} evaluation episodes every {every:,}; recipe "
                 f"{', '.join(f'{k}={v}' for k, v in RECIPE.items())}"
                 + "".join(f"; {a}: " + ", ".join(f"{k}={v}" for k, v in ALGO_SETTINGS[a].items() if RECIPE.get(k) != v)
                           for a in algos if ALGO_SETTINGS[a] != RECIPE)
                 + f". {reached} of {len(rows)} runs reached 0.90.", "",
                 table(["method", "seed", "base", "final success", "best", "first env steps at >= 0.90",
                        "wall s / 1,000 env steps", "drift (action MSE)"], rows), ""]
        if figure is not None:
            _plot(curves, figure, task)
            body += [f"![fine-tuning curves]({figure})", ""]
    title = "## RL on the denoising chain: fine-tuning the weak bases' own weights (2-core CPU)"
    return "\n".join([title, ""] + body), results


def _plot(curves: dict, path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for algo, runs in curves.items():
        xs = sorted({h["env_steps"] for run in runs for h in run})
        ys = np.array([[np.interp(x, [h["env_steps"] for h in run], [h["success_rate"] for h in run]) for x in xs]
                       for run in runs])
        ax.plot(xs, ys.mean(0), label=f"{algo} ({len(runs)} seeds)")
        ax.fill_between(xs, ys.min(0), ys.max(0), alpha=0.15)
    ax.axhline(0.9, ls="--", color="gray", lw=0.8)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("success (50 episodes)")
    ax.set_title(f"{task}: fine-tuning the weak base (band: min-max over seeds)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
