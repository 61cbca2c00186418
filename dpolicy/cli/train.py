"""``dpolicy-train``: behaviour cloning on a task (collecting expert demos when no dataset is
given), then evaluation; writes metrics.json, checkpoints, a learning curve and a rollout video
into the hydra run directory and prints where they are."""

from __future__ import annotations

import hydra

from dpolicy.cli.common import CONFIG_DIR, checked, run_dir, settings, user_errors


@user_errors
def _run(cfg) -> dict:
    from dpolicy.config import RunConfig
    from dpolicy.train.bc import train_bc
    from dpolicy.train.distributed import is_main

    run_cfg = settings(RunConfig, cfg)
    out = run_dir()
    metrics = train_bc(run_cfg, out, progress=run_cfg.train.progress)
    if is_main() and "success_rate" in metrics:
        lo, hi = metrics["success_ci95"]
        print(f"\nsuccess rate {metrics['success_rate']:.3f} (95% CI {lo:.3f}-{hi:.3f}) over "
              f"{metrics['eval']['n_episodes']} episodes; trained {metrics['train_steps']} steps in {metrics['train_time_s']:.0f} s")
        print(f"checkpoint : {metrics['checkpoint']}")
        print(f"metrics    : {out / 'metrics.json'}")
        if metrics.get("plot"):
            print(f"plot       : {metrics['plot']}")
        if metrics.get("video"):
            print(f"video      : {metrics['video']}")
    return metrics


@checked("train")
@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(cfg) -> None:
    _run(cfg)


if __name__ == "__main__":
    main()
