"""``dpolicy-eval``: evaluate a checkpoint on its task (rebuilt from the env_args stored with it)."""

from __future__ import annotations

import json

import hydra

from dpolicy.cli.common import CONFIG_DIR, container, run_dir, user_errors


@user_errors
def _run(cfg) -> dict:
    from dpolicy.errors import ConfigError
    from dpolicy.eval import evaluate
    from dpolicy.policy import load_policy
    from dpolicy.tasks import env_factory, policy_env_args
    from dpolicy.train.bc import check_env_compat
    from dpolicy.utils import resolve_device

    c = container(cfg)
    allowed = {"checkpoint", "episodes", "n_envs", "seed", "steps", "video", "video_episodes", "device", "env_kwargs", "task"}
    unknown = sorted(set(c) - allowed)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown} for dpolicy-eval; valid keys are {sorted(allowed)}.")
    if not c["checkpoint"]:
        raise ConfigError("checkpoint=<path> is required.")
    policy = load_policy(c["checkpoint"], resolve_device(c["device"]))
    env_args = policy_env_args(policy, f"checkpoint {c['checkpoint']!r} stores no env_args; pass task=<name>.",
                               c["task"], c["env_kwargs"])
    make_env = env_factory(env_args)
    probe = make_env()
    check_env_compat(probe, policy)
    probe.close()
    out = run_dir()
    res = evaluate(policy, make_env, n_episodes=int(c["episodes"]), n_envs=int(c["n_envs"]), seed=int(c["seed"]),
                   video_path=out / "rollout.mp4" if c["video"] else None, video_episodes=int(c["video_episodes"]),
                   steps=c["steps"])
    metrics = {"checkpoint": str(c["checkpoint"]), "env_args": env_args, **res.to_dict()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    lo, hi = res.success_ci95
    print(f"success rate {res.success_rate:.3f} (95% CI {lo:.3f}-{hi:.3f}) over {res.n_episodes} episodes; "
          f"mean return {res.mean_return:.2f}, mean length {res.mean_length:.1f}")
    print(f"metrics    : {out / 'metrics.json'}")
    return metrics


@hydra.main(config_path=CONFIG_DIR, config_name="eval", version_base="1.3")
def main(cfg) -> None:
    _run(cfg)


if __name__ == "__main__":
    main()
