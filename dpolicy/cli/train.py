"""``dpolicy-train``: behaviour cloning on a task (collecting expert demos when no dataset is
given), then evaluation; writes metrics.json, checkpoints, a learning curve and a rollout video
into the hydra run directory and prints where they are."""

from __future__ import annotations

import hydra

from dpolicy.cli.common import CONFIG_DIR, checked, container, run_dir, settings, user_errors


def task_from_data(cfg, overrides) -> bool:
    """Whether the task comes from the dataset: ``data.path`` is given and the command line chose no task
    (neither ``task=...`` nor ``task.name=...``), or chose none explicitly (``~task``, ``task.name=null``)."""
    if not cfg.data.path:
        return False
    chosen = {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1] if "=" in o else "" for o in overrides}
    return all(chosen.get(k, "null") in ("null", "") for k in ("task", "task.name"))


def compose_from_data(overrides, config_name: str = "train"):
    """The config without a task group (so the default task's recipe, its observation keys and budget, does not
    apply to someone else's file), with the command line's overrides and task.name null: "from the data"."""
    from hydra import compose
    from omegaconf import open_dict

    keep = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("task", "task.name")]
    cfg = compose(config_name=config_name, overrides=[("++" + o if o.startswith("task.") else o) for o in keep] + ["~task"])
    with open_dict(cfg):
        cfg.task.name = None
    return cfg


@user_errors
def _run(cfg) -> dict:
    from hydra.core.hydra_config import HydraConfig

    from dpolicy.config import RunConfig
    from dpolicy.train.bc import train_bc
    from dpolicy.train.distributed import is_main

    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    if task_from_data(cfg, overrides):
        cfg = compose_from_data(overrides, hc.job.config_name)
    c = container(cfg)
    c.setdefault("task", {}).setdefault("name", None)  # ~task: no task group, so the task comes from the data
    run_cfg = settings(RunConfig, c)
    out = run_dir()
    metrics = train_bc(run_cfg, out, progress=run_cfg.train.progress)
    if is_main() and "success_rate" not in metrics:
        print(f"\ntrained {metrics['train_steps']} steps in {metrics['train_time_s']:.0f} s; no evaluation")
        print(f"checkpoint : {metrics['checkpoint']}")
        print(f"metrics    : {out / 'metrics.json'}")
    if is_main() and "success_rate" in metrics:
        lo, hi = metrics["success_ci95"]
        print(f"\nsuccess rate {metrics['success_rate']:.3f} (95% CI {lo:.3f}-{hi:.3f}) over "
              f"{metrics['eval']['n_episodes']} episodes; trained {metrics['train_steps']} steps in {metrics['train_time_s']:.0f} s")
        print(f"checkpoint : {metrics['checkpoint']}")
        if metrics.get("stopped_early_at") is not None:
            print(f"stopped    : early, at step {metrics['stopped_early_at']} (train.early_stop evaluations in a row "
                  f"reached train.stop_success)")
        if metrics.get("best_checkpoint"):
            print(f"best       : {metrics['best_checkpoint']} (step {metrics['best_step']}, success {metrics['best_success']:.3f} during training)")
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
