"""DSRL benchmark: weak base policies improved by RL in their noise space.

For each task a deliberately weak base (few demos, short training; its recipe is below) is trained
with the BC workflow, then steered by DSRL-NA and DSRL-SAC over several seeds with the same budget,
plus the stochastic-sampler ablation (the same diffusion base sampled with eta=1, so the chunk is
no longer a function of the noise). Returns a markdown body, a results dict and a figure of success
vs environment steps.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from dpolicy.bench.report import table

# Weak bases whose support holds good chunks but which sample bad ones often (20-60% success), the
# premise of steering the noise. Four sampling steps keep the frozen base cheap; the base is
# deterministic in its noise (DDIM).
# - avoid: demos from a noisy expert (only successful episodes kept): collisions come from chunks
#   that swing into an obstacle, decided at the chunk where the route is taken.
# - lift: mixed-quality demos, as robomimic's multi-human sets: 65% of the episodes come from a careless
#   operator who closes the gripper above the cube and lifts empty-handed (kept with keep_failures),
#   so at the hover pose the base sometimes closes too early.
# - push (headroom only): demos from a noisy expert. Its noise decides success over whole episodes
#   (every start state is mixed) but no single chunk decides much, and DSRL did not beat the base
#   within 50,000 env steps (the closing notes of the DSRL issue list the runs).
WEAK_BASES = {
    "avoid": ["task=avoid", "task.n_demos=50", "task.demo_noise=0.7", "train.steps=3000", "policy.process.steps=4"],
    "push": ["task=push", "task.n_demos=50", "task.demo_noise=0.7", "train.steps=2000", "policy.process.steps=4"],
    "lift": ["task=lift", "task.n_demos=150", "task.expert_kwargs={early_close:0.65}", "task.keep_failures=true",
             "train.steps=3000", "policy.process.steps=4"],
    # the same operators seen through the cameras (proprioception and 84 x 84 images, no object state); the
    # noise-action MDP's state is the frozen base's encoding, so the steering agent reads the base's image features
    "lift_image": ["task=lift_image", "task.n_demos=150", "task.expert_kwargs={early_close:0.65}", "task.keep_failures=true",
                   "policy.process.steps=4"],
}
BASE_NOTES = {
    "avoid": "demos from a noisy expert, successful episodes only",
    "lift": "65% of the demos from a careless operator who closes the gripper above the cube and lifts empty-handed, "
            "failures kept",
    "push": "demos from a noisy expert, successful episodes only",
    "lift_image": "lift's careless-operator demos, seen through the agent-view and wrist cameras",
}
# env steps per run (the goal is 90% within 50,000; runs stop at these budgets)
BUDGETS = {"avoid": 10000, "push": 20000, "lift": 20000, "lift_image": 20000}
# STEER_DEFAULTS and DSRL_DEFAULTS repeat SteerConfig's and DSRLConfig's defaults except the bench's own recipe values,
# eval_every=2500 and q_bounds=(0, 1) (tests/test_configs.py holds them to that)
STEER_DEFAULTS = dict(n_envs=4, init_steps=1500, eval_every=2500, eval_episodes=50)
# sparse success reward (no per-step cost: on avoid a collision ends the episode, and a per-step cost
# would pay the agent to crash early); TD targets without the entropy bonus and clipped to the returns a
# success reward can pay, [0, 1]; a small initial temperature so the entropy bonus does not drown a
# reward of at most 1
DSRL_DEFAULTS = dict(hidden=256, layers=3, utd=10, batch_size=256, init_alpha=0.01, noise_critic_actor_frac=0.5,
                     backup_entropy=False, q_bounds=(0.0, 1.0))


def weak_base(work: Path, task: str, log=print) -> tuple[Path, dict]:
    """Train (or reuse) the weak base for ``task``; returns its checkpoint root and BC metrics."""
    from dpolicy.bench.suite import compose_run
    from dpolicy.train.bc import train_bc

    overrides = WEAK_BASES[task] + ["eval.episodes=100", "eval.video=false", "eval.every=0", "train.progress=false"]
    run_dir = work / f"base_{task}"
    stamp = run_dir / "overrides.json"
    same = stamp.exists() and json.loads(stamp.read_text()) == overrides
    if (run_dir / "metrics.json").exists() and same:
        return run_dir / "checkpoints", json.loads((run_dir / "metrics.json").read_text())
    if run_dir.exists() and not same:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(overrides))  # an interrupted run with these settings resumes from its checkpoints
    m = train_bc(compose_run(overrides), run_dir, progress=False)
    log(f"[steer] weak base {task}: BC success {m['success_rate']:.3f} ({' '.join(WEAK_BASES[task])})")
    return run_dir / "checkpoints", m


def _first_reach(history: list[dict], level: float) -> int | None:
    for h in history:
        if h["success_rate"] >= level:
            return int(h["env_steps"])
    return None


def steer_section(work: Path, tasks=("avoid", "push"), seeds=(0, 1, 2), algos=("na", "sac"), ablation_seeds=(0,),
                  env_steps: int | None = None, figure: Path | None = Path("docs/img/dsrl_curves.png"),
                  log=print) -> tuple[str, dict]:
    from dpolicy.rl.agent import DSRLConfig
    from dpolicy.rl.train import SteerConfig, steer

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for task in tasks:
        base_root, base_m = weak_base(work, task, log)
        budget = env_steps or BUDGETS[task]
        runs = [(a, s, None) for a in algos for s in seeds] + [("na", s, 1.0) for s in ablation_seeds]
        for algo, seed, eta in runs:
            name = f"{task}_{algo}{'_ddpm' if eta else ''}_s{seed}"
            cfg = SteerConfig(base=str(base_root), dsrl=DSRLConfig(algo=algo, **DSRL_DEFAULTS),
                              **STEER_DEFAULTS, env_steps=budget, seed=seed, base_eta=eta, progress=False)
            t0 = time.perf_counter()
            m = steer(cfg, work / name, log=lambda msg, n=name: log(f"[steer] {n}: {msg}"))
            m["bench_wall_s"] = time.perf_counter() - t0
            results[name] = {"task": task, "algo": algo, "seed": seed, "eta": eta, "base_bc_success": base_m["success_rate"],
                             "budget": budget,
                             **{k: m[k] for k in ("base_success", "final_success", "final_success_ci95", "env_steps",
                                                  "wall_s", "wall_s_per_1k_env_steps", "history", "deterministic_base")}}
            log(f"[steer] {name}: {m['base_success']:.3f} -> {m['final_success']:.3f} in {m['wall_s']:.0f} s")
    (work / f"steer_results_{'_'.join(tasks)}.json").write_text(json.dumps(results, indent=2, default=float))
    return render(results, figure), results


def render(results: dict, figure: Path | None) -> str:
    groups: dict = {}
    for r in results.values():
        groups.setdefault((r["task"], r["algo"], r["eta"]), []).append(r)
    rows = []
    for (task, algo, eta), rs in groups.items():
        finals = [r["final_success"] for r in rs]
        peak = [max(h["success_rate"] for h in r["history"]) for r in rs]
        reach = [_first_reach(r["history"], 0.9) for r in rs]
        label = f"DSRL-{algo.upper()}" + (" (stochastic sampler, eta=1)" if eta else "")
        rows.append([task, label, len(rs), f"{rs[0]['budget']:,}", f"{np.median([r['base_success'] for r in rs]):.2f}",
                     " / ".join(f"{f:.2f}" for f in finals), " / ".join(f"{p:.2f}" for p in peak),
                     " / ".join(f"{x:,}" if x is not None else "not reached" for x in reach),
                     f"{np.median([r['wall_s_per_1k_env_steps'] for r in rs]):.1f}"])
    tasks = sorted({r["task"] for r in results.values()})
    body = ("## Latent-noise steering (DSRL) from weak bases (2-core CPU)\n\n"
            "Weak bases, short training: " + "; ".join(f"`{t}` ({BASE_NOTES[t]}): `{' '.join(WEAK_BASES[t])}`" for t in tasks)
            + f". Steering settings: {STEER_DEFAULTS}, agent {DSRL_DEFAULTS}; sparse success reward. "
            "Success is measured on 50 held-out seeded episodes at each evaluation; per-seed values are listed.\n\n")
    body += table(["task", "method", "seeds", "env steps per run", "base success", "final success (per seed)", "best success (per seed)",
                   "env steps to reach 90% (per seed)", "wall s per 1k env steps (median)"], rows)
    if figure is not None:
        plot(groups, figure)
        body += (f"\n\n![DSRL success vs environment steps]({figure.as_posix()})\n\n"
                 "The figure: mean success over seeds, shaded by the 95% t-interval of that mean (clipped to [0, 1]).")
    return body


# two-sided 95% quantiles of Student's t by degrees of freedom (seeds - 1)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def plot(groups: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({k[0] for k in groups})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for (t, algo, eta), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2] or 0)):
            if t != task:
                continue
            xs = np.array([h["env_steps"] for h in rs[0]["history"]])
            n = min(len(r["history"]) for r in rs)
            ys = np.array([[h["success_rate"] for h in r["history"][:n]] for r in rs])
            label = f"DSRL-{algo.upper()}" + (" eta=1" if eta else "") + f" ({len(rs)} seed{'s' * (len(rs) > 1)})"
            mean = ys.mean(0)
            line, = ax.plot(xs[:n], mean, label=label)
            if len(rs) > 1:  # 95% t-interval of the mean over seeds, clipped to [0, 1]
                half = T975.get(len(rs) - 1, 1.96) * ys.std(0, ddof=1) / np.sqrt(len(rs))
                ax.fill_between(xs[:n], np.clip(mean - half, 0, 1), np.clip(mean + half, 0, 1), color=line.get_color(), alpha=0.2)
        ax.axhline(0.9, color="grey", ls=":", lw=1)
        ax.set(title=f"{task}", xlabel="environment steps", ylabel="success rate", ylim=(0, 1.02))
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def headroom_section(work: Path, tasks=("avoid", "push", "lift"), n_states: int = 20, n_noises: int = 8,
                     signal_steps: int = 30000, log=print) -> tuple[str, dict]:
    """How much the noise decides success for each weak base (``dpolicy.rl.headroom``): the room DSRL has
    over whole episodes, and whether one decision's noise carries value a critic can learn."""
    from dpolicy.policy import load_policy
    from dpolicy.rl.headroom import chunk_signal, noise_headroom
    from dpolicy.tasks import env_factory_for

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    results, rows, sig_rows, first_seed = {}, [], [], None
    for task in tasks:
        base_root, base_m = weak_base(work, task, log)
        policy = load_policy(base_root, "cpu")
        t0 = time.perf_counter()
        r = noise_headroom(policy, env_factory_for(policy), n_states=n_states, n_noises=n_noises)
        r["wall_s"] = time.perf_counter() - t0
        sig = chunk_signal(policy, env_factory_for(policy), env_steps=signal_steps)
        results[task] = {**r, "base_bc_success": base_m["success_rate"], "chunk_signal": sig}
        first_seed = r["state_seed"]
        log(f"[headroom] {task}: mixed {r['mixed']:.2f}, never {r['never']:.2f}, always {r['always']:.2f}; "
            f"held-out MSE V {sig['mse_v']:.4f} Q {sig['mse_q']:.4f}; best/worst of {sig['k']} by Q "
            f"{sig['best_of_k_success']:.2f}/{sig['worst_of_k_success']:.2f}")
        rows.append([task, f"{base_m['success_rate']:.2f}", f"{r['success']:.2f}", f"{r['mixed']:.2f}",
                     f"{r['never']:.2f}", f"{r['always']:.2f}", f"{r['best_noise_per_state']:.2f}"])
        sig_rows.append([task, f"{sig['decisions']:,}", f"{sig['return_var']:.4f}", f"{sig['mse_v']:.4f}",
                         f"{sig['mse_q']:.4f}", f"{sig['q_gain']:+.2f}", f"{sig['base_success']:.2f}",
                         f"{sig['best_of_k_success']:.2f}", f"{sig['worst_of_k_success']:.2f}"])
    (work / "headroom_results.json").write_text(json.dumps(results, indent=2, default=float))
    body = ("## DSRL noise headroom of the weak bases\n\n"
            f"Each of {n_states} seeded start states (seeds {first_seed}..{first_seed + n_states - 1}) is replayed with {n_noises} "
            "noise seeds, the base run as DSRL runs it (chunked, deterministic in its noise). A *mixed* state succeeds "
            "under some noises and fails under others: the room a noise-space policy has. *Some noise succeeds* is the "
            "share of states where at least one of the noise seeds succeeded (a floor on what choosing the noise can "
            "reach). Bases as in the DSRL section: "
            + "; ".join(f"`{t}`: `{' '.join(WEAK_BASES[t])}`" for t in tasks) + ".\n\n")
    body += table(["task", "base success (BC eval, 100 episodes)", "success over states x noises", "mixed states",
                   "states never solved", "states always solved", "some noise succeeds"], rows)
    k, eps = sig["k"], sig["episodes"]
    body += ("\n\n### Does one decision's noise carry value? (`dpolicy.rl.headroom.chunk_signal`)\n\n"
             f"Headroom over whole episodes is not what DSRL's critics learn from: they value one decision's chunk. "
             f"Each base is run as DSRL runs it, noise drawn from N(0, I), for {signal_steps:,} env steps; each decision's "
             "discounted return (gamma 0.99) is regressed on the state alone, V(s), and on the state and executed chunk, "
             "Q(s, a) (MLP 2 x 256, held-out 20% of the episodes). *Q gain* is the share of the held-out return variance "
             f"Q explains beyond V. Then the fitted Q acts: at every decision the best (or worst) of {k} noise draws, "
             f"against the base's own draw, {eps} episodes each.\n\n")
    body += table(["task", "decisions", "return variance (held out)", "MSE V(s)", "MSE Q(s, a)", "Q gain",
                   "success: base draw", f"best of {k} by Q", f"worst of {k} by Q"], sig_rows)
    body += ("\n\nReading the last three columns: a critic that ranks one decision's noises lifts best-of-k far above "
             "the base's draw and drops worst-of-k far below it, even where the return is too noisy for Q to beat V "
             "in mean squared error (later decisions add their own noise). A best-of-k *below* the base's draw means "
             "that maximizing the critic selects its own errors, which is what DSRL's actor would do with it.")
    return body, results


__all__ = ["steer_section", "headroom_section", "weak_base", "render", "WEAK_BASES"]
