"""``dpolicy-eval``: evaluate a checkpoint on its task (rebuilt from the env_args stored with it)."""

from __future__ import annotations

import json

import hydra

from dpolicy.cli.common import CONFIG_DIR, checked, device, run_dir, settings, user_errors


@user_errors
def _run(cfg) -> dict:
    from dpolicy.config import RECIPE_KEYS, EvaluateConfig, task_name
    from dpolicy.eval import evaluate
    from dpolicy.policy import load_policy
    from dpolicy.tasks import env_factory, policy_env_args
    from dpolicy.train.bc import check_env_compat

    c = settings(EvaluateConfig, cfg, drop=RECIPE_KEYS)
    policy = load_policy(c.checkpoint, device(c.device))
    env_args = policy_env_args(policy, f"checkpoint {c.checkpoint!r} stores no env_args; pass task=<name>.",
                               task_name(c.task), c.env_kwargs)
    make_env = env_factory(env_args)
    probe = make_env()
    check_env_compat(probe, policy)
    probe.close()
    out = run_dir()
    from dpolicy.eval.backends import RolloutBackend

    res = evaluate(policy, make_env, n_episodes=c.episodes, n_envs=c.n_envs, seed=c.seed,
                   video_path=out / "rollout.mp4" if c.video else None, video_episodes=c.video_episodes, steps=c.steps,
                   backend=RolloutBackend.from_settings(c))
    metrics = {"checkpoint": str(c.checkpoint), "env_args": env_args, **res.to_dict()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    lo, hi = res.success_ci95
    print(f"success rate {res.success_rate:.3f} (95% CI {lo:.3f}-{hi:.3f}) over {res.n_episodes} episodes; "
          f"mean return {res.mean_return:.2f}, mean length {res.mean_length:.1f}")
    if res.backend != "local":
        print(f"rollouts   : {res.backend}, {res.workers} worker(s), policy on the {res.placement}; "
              f"{res.worker_restarts} worker(s) replaced; {res.wall_time_s:.1f} s")
    print(f"metrics    : {out / 'metrics.json'}")
    return metrics


@checked("eval")
@hydra.main(config_path=CONFIG_DIR, config_name="eval", version_base="1.3")
def main(cfg) -> None:
    _run(cfg)


if __name__ == "__main__":
    main()
