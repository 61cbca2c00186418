"""``dpolicy-compose``: compose checkpoints (GPC), search the weights, report them on disjoint seeds.

``dpolicy-compose parents=[a,b] search=grid`` evaluates the weight grid on the selection seeds,
then the chosen weights and each parent alone on the evaluation seeds, and writes ``metrics.json``,
the composed checkpoint ``composed/`` (parents by reference) and ``weight_sweep.png`` into the run
directory.
"""

from __future__ import annotations

import json

import hydra

from dpolicy.cli.common import CONFIG_DIR, checked, device, run_dir, settings, user_errors


@user_errors
def _run(cfg) -> dict:
    import dataclasses

    from dpolicy.compose import ComposedPolicy, select_and_report
    from dpolicy.compose.plots import plot_weight_sweep
    from dpolicy.config import RECIPE_KEYS, ComposeConfig, task_name
    from dpolicy.tasks import env_factory, policy_env_args
    from dpolicy.train.bc import check_env_compat

    c = settings(ComposeConfig, cfg, drop=RECIPE_KEYS)
    parents = c.parents
    n = len(parents)
    policy = ComposedPolicy.from_checkpoints(parents, device=device(c.device), operator=c.operator,
                                             weights=c.weights if c.search == "none" else [1.0 / n] * n,
                                             steps=c.steps, Ta=c.Ta, action_norm_tol=c.action_norm_tol)
    env_args = policy_env_args(policy, "the parents store no env_args; pass task=<name>.", task_name(c.task), c.env_kwargs)
    make_env = env_factory(env_args)
    probe = make_env()
    for p in policy.parents:
        check_env_compat(probe, p)
    probe.close()
    out = run_dir()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    report = select_and_report(policy, make_env, search=c.search, select_episodes=c.select_episodes,
                               select_seed=c.select_seed, eval_episodes=c.episodes, eval_seed=c.seed, n_envs=c.n_envs,
                               steps=c.steps, resolution=c.resolution, cem=dataclasses.asdict(c.cem), weights=c.weights,
                               log=log)
    plot = plot_weight_sweep(report, out / "weight_sweep.png", parent_names=[f"parent {i}" for i in range(n)])
    ckpt = policy.save(out / "composed", relative=c.relative)
    metrics = {"parents": [str(p) for p in parents], "env_args": env_args, "composition": policy.describe(),
               "checkpoint": str(ckpt), "plot": str(plot), **report}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    comp, best = report["composed"], report["parents"][report["best_parent"]]
    lo, hi = comp["success_ci95"]
    print(f"weights {report['weights']}: success rate {comp['success_rate']:.3f} (95% CI {lo:.3f}-{hi:.3f}) over "
          f"{comp['n_episodes']} evaluation episodes; best parent ({report['best_parent']}) {best['success_rate']:.3f}")
    print(f"checkpoint : {ckpt}")
    print(f"plot       : {plot}")
    print(f"metrics    : {out / 'metrics.json'}")
    return metrics


@checked("compose")
@hydra.main(config_path=CONFIG_DIR, config_name="compose", version_base="1.3")
def main(cfg) -> None:
    _run(cfg)


if __name__ == "__main__":
    main()
