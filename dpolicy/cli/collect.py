"""``dpolicy-collect``: scripted-expert rollouts -> a robomimic-layout HDF5 dataset, with a summary.

``dpolicy-collect rerender=<file.hdf5> [task=<name>] [out=<new.hdf5>]`` instead renders a dataset's
observations anew from its states (a low-dimensional file -> an image file, say)."""

from __future__ import annotations

import json
from pathlib import Path

import hydra

from dpolicy.cli.common import CONFIG_DIR, checked, run_dir, settings, user_errors


def _task_chosen() -> bool:
    """Whether the command line chose the task (task=<name> or task.name=<name>) rather than the default."""
    from hydra.core.hydra_config import HydraConfig

    return any(o.lstrip("+~").split("=", 1)[0] in ("task", "task.name") for o in HydraConfig.get().overrides.task)


@user_errors
def _run(cfg) -> dict:
    from dpolicy.config import RECIPE_KEYS, CollectConfig

    c = settings(CollectConfig, cfg, drop=RECIPE_KEYS)  # a task file's training recipe does not concern collection
    if c.rerender:
        from dpolicy.data.rerender import rerender_dataset

        out = c.out or str(run_dir() / f"{Path(c.rerender).stem}_rerendered.hdf5")
        summary = rerender_dataset(c.rerender, out, c.task.name if _task_chosen() else None, env_kwargs=c.task.env_kwargs,
                                   compression=c.compression)
    else:
        from dpolicy.data.collect import collect_demos

        out = c.out or str(run_dir() / f"{c.task.name}_demos.hdf5")
        summary = collect_demos(c.task.name, c.n_demos, out, seed=c.seed, noise_std=c.noise_std, env_kwargs=c.task.env_kwargs,
                                expert_kwargs=c.task.expert_kwargs, keep_failures=c.keep_failures,
                                valid_fraction=c.valid_fraction, compression=c.compression)
    (run_dir() / "metrics.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


@checked("collect")
@hydra.main(config_path=CONFIG_DIR, config_name="collect", version_base="1.3")
def main(cfg) -> None:
    _run(cfg)


if __name__ == "__main__":
    main()
