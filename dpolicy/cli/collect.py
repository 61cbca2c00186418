"""``dpolicy-collect``: scripted-expert rollouts -> a robomimic-layout HDF5 dataset, with a summary."""

from __future__ import annotations

import json

import hydra

from dpolicy.cli.common import CONFIG_DIR, checked, run_dir, settings, user_errors


@user_errors
def _run(cfg) -> dict:
    from dpolicy.config import RECIPE_KEYS, CollectConfig
    from dpolicy.data.collect import collect_demos

    c = settings(CollectConfig, cfg, drop=RECIPE_KEYS)  # a task file's training recipe does not concern collection
    out = c.out or str(run_dir() / f"{c.task.name}_demos.hdf5")
    summary = collect_demos(c.task.name, c.n_demos, out, seed=c.seed, noise_std=c.noise_std, env_kwargs=c.task.env_kwargs,
                            expert_kwargs=c.task.expert_kwargs, keep_failures=c.keep_failures,
                            valid_fraction=c.valid_fraction)
    (run_dir() / "metrics.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


@checked("collect")
@hydra.main(config_path=CONFIG_DIR, config_name="collect", version_base="1.3")
def main(cfg) -> None:
    _run(cfg)


if __name__ == "__main__":
    main()
