"""RL on the denoising chain against DSRL, on DSRL's weak bases: success against environment steps per method and
seed, wall clock per 1,000 environment steps, and the fine-tuned policy's drift from its base.

Every run starts from the same weak base as ``dpolicy-bench --sections steer`` (``weak_base``), is evaluated on
the same evaluation seeds, and is cached in the work directory (a rerun does only what is missing). DSRL-NA runs
from the same base with the steer section's recipe and budget sit in the same table, and every fine-tuning run is
also read at DSRL's env-step budget and at DSRL's wall clock, so the two families are compared on both.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dpolicy.bench.report import table

# the bench's recipe on push (FinetuneConfig fields; everything else is the default): only the last denoising step
# made Gaussian, 64 episodes per iteration (8 groups of 8), large batches and a small learning rate, which keep PPO's
# clip fraction near 0.05 on push's weak base (learning rates 1e-4 and 3e-5 clipped 80-90% and 20-40% of the
# ratios and did not improve the base in 50,000 steps)
RECIPE = dict(ft_steps=1, std=0.1, lr=3e-6, episodes_per_iter=64, group=8, batch_size=1024)
# avoid's and lift's episodes are short and DSRL's budgets small: more, smaller iterations and a larger step
# (on avoid, PPO at 3e-5 gained 6 points in 10,000 env steps, at 1e-4 16)
SHORT = dict(ft_steps=1, std=0.1, lr=1e-4, episodes_per_iter=16, group=8, batch_size=256)
RECIPES = {"push": RECIPE, "avoid": SHORT, "lift": SHORT}
# success-filtered matching is behaviour cloning on the replay of successes: a BC learning rate and batch
# grpo-branch: GRPO over branching groups (G chunks at one random decision of a shared trunk, common noise after it)
# grpo-restart: GRPO with half of each iteration's groups started where an earlier failed episode came nearest to success
# awm-exp: AWM's matching loss with positive weights exp(A) (advantage-weighted regression) instead of the paper's
# signed advantages and clipped ratio
ALGO_SETTINGS = {"awm": {"lr": 1e-5}, "awm-exp": {"lr": 1e-5, "awm_weights": "exp"},
                 "filtered": {"lr": 1e-4, "batch_size": 256, "bc_steps": 200}, "grpo-branch": {"branch": True},
                 "grpo-restart": {"restarts": 0.5}}
METHODS = ("ppo", "grpo", "gspo", "awm", "awm-exp", "filtered", "grpo-branch", "grpo-restart")
# fine-tuning budgets: push's is the acceptance budget; avoid's and lift's are 15x and 7.5x DSRL-NA's env steps
# (DSRL's critic updates cost 20-50x more per env step than an iteration here, so a fine-tuning run still ends inside
# DSRL's wall clock; the section marks where it did)
BUDGETS = {"push": 200000, "avoid": 150000, "lift": 150000}
# DSRL-NA seeds per task (default: the section's seeds): on push one run of DSRL's 20,000 env steps costs ~30 min of
# a shared core here (80 s per 1,000 env steps), and the steer section's runs already show it losing the base's success
DSRL_SEEDS = {"push": (0,)}


def settings(task: str, method: str) -> dict:
    """A section method's FinetuneConfig fields on ``task`` (the algorithm included: ``grpo-branch`` is GRPO's)."""
    return {**RECIPES[task], "algo": method.split("-")[0], **ALGO_SETTINGS.get(method, {})}


def _reach(history, level):
    for h in history:
        if h["success_rate"] >= level:
            return int(h["env_steps"])
    return None


def at(history, key: str, limit: float) -> dict:
    """The evaluation at the first point where ``key`` (env_steps or wall_s) reaches ``limit`` (the last one if it
    never does): success after that much experience or time."""
    for h in history:
        if h[key] >= limit:
            return h
    return history[-1]


def dsrl_runs(work: Path, task: str, base_root: Path, seeds, log=print) -> list[dict]:
    """DSRL-NA from the same base with the steer section's recipe and budget, one run per seed (cached)."""
    from dpolicy.bench.steer import BUDGETS as STEER_BUDGETS, DSRL_DEFAULTS, STEER_DEFAULTS
    from dpolicy.rl.agent import DSRLConfig
    from dpolicy.rl.train import SteerConfig, steer

    out = []
    for seed in seeds:
        run = work / f"{task}_dsrl_na_s{seed}"
        mfile = run / "metrics.json"
        if not mfile.exists():
            cfg = SteerConfig(base=str(base_root), dsrl=DSRLConfig(algo="na", **DSRL_DEFAULTS), **STEER_DEFAULTS,
                              env_steps=STEER_BUDGETS[task], seed=seed, progress=False)
            steer(cfg, run, log=lambda s, seed=seed: log(f"[finetune {task} dsrl-na s{seed}] {s}"))
        out.append(json.loads(mfile.read_text()))
    return out


def finetune_section(work: Path, log=print, tasks=("push",), algos=("ppo", "grpo", "gspo", "awm", "filtered"), seeds=(0, 1, 2),
                     env_steps: int | None = None, eval_every: int | None = None, eval_episodes: int = 50,
                     figure: Path | None = Path("docs/img/finetune_push.png"), dsrl: bool = True,
                     rti_tasks=("push",)) -> tuple[str, dict]:
    from dpolicy.bench.steer import BUDGETS as STEER_BUDGETS, weak_base
    from dpolicy.rl.finetune import FinetuneConfig, finetune

    work = Path(work)
    results, body, curves = {}, [], {}
    for task in tasks:
        base_root, base_m = weak_base(work.parent / "steer", task, log)
        budget = env_steps or BUDGETS[task]
        every = eval_every or min(max(budget // 10, 1000), STEER_BUDGETS[task] // 2)
        ref_seeds = [s for s in seeds if s in DSRL_SEEDS.get(task, seeds)]
        ref = dsrl_runs(work, task, base_root, ref_seeds, log) if dsrl else []
        ref_steps = STEER_BUDGETS[task]
        ref_wall = float(np.median([m["wall_s"] for m in ref])) if ref else None
        rows, curves[task] = [], {}
        reads: dict = {}  # algo -> [(success at DSRL's env steps, at its wall clock)] per seed
        reached, tuned = 0, {}
        for m, seed in zip(ref, ref_seeds):
            h = m["history"]
            r90 = _reach(h, 0.9)
            final = f"{h[-1]['success_rate']:.3f}"
            rows.append(["DSRL-NA", seed, f"{h[0]['success_rate']:.2f}", final, final, f"{final} ({h[-1]['env_steps']:,})",
                         f"{max(x['success_rate'] for x in h):.3f}", "-" if r90 is None else f"{r90:,}",
                         f"{m['wall_s_per_1k_env_steps']:.1f}", "-"])
            curves[task].setdefault("DSRL-NA", []).append(h)
            results[f"{task}/dsrl-na/s{seed}"] = m
        for algo in algos:
            for seed in seeds:
                run = work / f"{task}_{algo}_s{seed}"
                mfile = run / "metrics.json"
                if mfile.exists():
                    m = json.loads(mfile.read_text())
                else:
                    cfg = FinetuneConfig(base=str(base_root), env_steps=budget, eval_every=every,
                                         eval_episodes=eval_episodes, seed=seed, progress=False, **settings(task, algo))
                    m = finetune(cfg, run, log=lambda s: log(f"[finetune {task} {algo} s{seed}] {s}"))
                results[f"{task}/{algo}/s{seed}"] = tuned[f"{task}/{algo}/s{seed}"] = m
                h = m["history"]
                curves[task].setdefault(algo, []).append(h)
                r90 = _reach(h, 0.9)
                reached += r90 is not None
                same_steps, same_wall = at(h, "env_steps", ref_steps), at(h, "wall_s", ref_wall or 0.0)
                reads.setdefault(algo, []).append((same_steps["success_rate"], same_wall["success_rate"]))
                rows.append([algo, seed, f"{h[0]['success_rate']:.2f}",
                             f"{same_steps['success_rate']:.3f}" if ref else "-",
                             (f"{same_wall['success_rate']:.3f} ({same_wall['env_steps']:,}"
                              + (f"; ended at {h[-1]['wall_s']:.0f} s)" if h[-1]["wall_s"] < ref_wall else ")")) if ref else "-",
                             f"{h[-1]['success_rate']:.3f} ({h[-1]['env_steps']:,})",
                             f"{max(x['success_rate'] for x in h):.3f}", "-" if r90 is None else f"{r90:,}",
                             f"{m['wall_s_per_1000_env_steps']:.1f}", f"{m['drift_mse']:.4f}"])
        body += [f"**{task}** weak base (BC success {base_m['success_rate']:.2f}; the same base as the steer section's "
                 f"DSRL runs); fine-tuning budget {budget:,} env steps, {eval_episodes} evaluation episodes every {every:,}; "
                 f"recipe {', '.join(f'{k}={v}' for k, v in RECIPES[task].items())}"
                 + "".join(f"; {a}: " + ", ".join(f"{k}={v}" for k, v in ALGO_SETTINGS[a].items())
                           for a in algos if a in ALGO_SETTINGS)
                 + (f". DSRL-NA: the steer section's recipe and budget ({ref_steps:,} env steps, median {ref_wall:.0f} s); "
                    f"*at DSRL's env steps* is each run's first evaluation at or past {ref_steps:,} env steps, *at DSRL's "
                    f"wall clock* its first at or past {ref_wall:.0f} s, or its last where the whole run took less (env "
                    f"steps in brackets)" if ref else "")
                 + f". {reached} of {len(tuned)} fine-tuning runs reached 0.90.", "",
                 table(["method", "seed", "base", "success at DSRL's env steps", "success at DSRL's wall clock",
                        "final success (env steps)", "best", "first env steps at >= 0.90", "wall s / 1,000 env steps",
                        "drift (action MSE)"], rows), ""]
        if ref and reads:
            dsrl_median = float(np.median([m["history"][-1]["success_rate"] for m in ref]))
            body += [_verdict(dsrl_median, reads, ref_steps, ref_wall), ""]
        if task in rti_tasks and tuned:
            key, best = max(tuned.items(), key=lambda kv: kv[1]["history"][-1]["success_rate"])
            body += [rti_check(work, task, base_root, Path(best["checkpoint"]), key, log), ""]
    if figure is not None:
        _plot(curves, figure)
        body += [f"![fine-tuning curves]({figure})", ""]
    title = "## RL on the denoising chain: fine-tuning the weak bases' own weights, beside DSRL-NA (2-core CPU)"
    return "\n".join([title, ""] + body), results


def _verdict(dsrl: float, reads: dict, ref_steps: int, ref_wall: float) -> str:
    """One sentence per comparison: DSRL-NA's median success over seeds (``dsrl``) and the best fine-tuning method's
    (``reads``: algo -> [(success at DSRL's env steps, success at its wall clock)] per seed), at each of the two."""
    parts = []
    for col, what in ((0, f"{ref_steps:,} env steps"), (1, f"{ref_wall:.0f} s of wall clock")):
        med = {algo: float(np.median([r[col] for r in rs])) for algo, rs in reads.items()}
        best = max(med, key=med.get)
        m = med[best]
        win = "DSRL-NA" if dsrl > m else best if m > dsrl else "neither"
        parts.append(f"at {what}: DSRL-NA {dsrl:.2f}, best fine-tuning ({best}) {m:.2f} -> {win}")
    return "Median success over seeds, " + "; ".join(parts) + "."


def rti_check(work: Path, task: str, base_root: Path, tuned: Path, key: str, log=print) -> str:
    """RTI with two evaluations per decision (K'=2 and the two-evaluation timestep list chosen on selection seeds)
    against chunked execution, on the base and on a fine-tuned checkpoint: does fine-tuning keep RTI's property?
    Cached in the work directory per checkpoint."""
    from dpolicy.bench.latency import SPACED, rti_success_section

    store = work / f"{task}_rti.json"
    cached = json.loads(store.read_text()) if store.exists() else {}
    if cached.get("tuned") != str(tuned):
        two = tuple(c for c in SPACED if len(c) == 2)
        body, _ = rti_success_section([base_root, tuned], episodes=200, n_envs=10, ks=(2,), candidates=two,
                                      select_episodes=50, latency_episodes=1, log=log)
        cached = {"tuned": str(tuned), "body": body}
        store.write_text(json.dumps(cached, indent=1))
    body = cached["body"].split("\n", 1)[1].lstrip()  # the RTI section's own title dropped
    return (f"**RTI on the fine-tuned {task} policy** (the run with the best final success, {key}, beside its base; "
            f"200 episodes per row):\n\n{body}")


def _plot(curves: dict, path: Path) -> None:
    """Success against env steps per task (one panel each): mean over seeds, band min-max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.6), squeeze=False)
    for ax, (task, per) in zip(axes[0], curves.items()):
        for algo, runs in per.items():
            xs = sorted({h["env_steps"] for run in runs for h in run})
            ys = np.array([[np.interp(x, [h["env_steps"] for h in run], [h["success_rate"] for h in run]) for x in xs]
                           for run in runs])
            ax.plot(xs, ys.mean(0), label=f"{algo} ({len(runs)} seeds)", ls="--" if algo == "DSRL-NA" else "-")
            ax.fill_between(xs, ys.min(0), ys.max(0), alpha=0.15)
        ax.axhline(0.9, ls=":", color="gray", lw=0.8)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("success (50 episodes)")
        ax.set_title(f"{task}: weak base fine-tuned (band: min-max over seeds)", fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
