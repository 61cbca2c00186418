"""``dpolicy-collect``: scripted-expert rollouts -> a robomimic-layout HDF5 dataset, with a summary."""

from __future__ import annotations

import json

import hydra

from dpolicy.cli.common import CONFIG_DIR, container, run_dir, user_errors


@user_errors
def _run(cfg) -> dict:
    from dpolicy.data.collect import collect_demos
    from dpolicy.errors import ConfigError

    c = container(cfg)
    for recipe_key in ("train", "policy", "eval"):  # a task file's training recipe does not concern collection
        c.pop(recipe_key, None)
    allowed = {"task", "n_demos", "out", "seed", "noise_std", "keep_failures", "valid_fraction"}
    unknown = sorted(set(c) - allowed)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown} for dpolicy-collect; valid keys are {sorted(allowed)}.")
    task = c["task"]
    out = c["out"] or str(run_dir() / f"{task['name']}_demos.hdf5")
    summary = collect_demos(task["name"], int(c["n_demos"]), out, seed=int(c["seed"]), noise_std=float(c["noise_std"]),
                            env_kwargs=task.get("env_kwargs") or {}, expert_kwargs=task.get("expert_kwargs") or {},
                            keep_failures=bool(c["keep_failures"]), valid_fraction=float(c["valid_fraction"]))
    (run_dir() / "metrics.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


@hydra.main(config_path=CONFIG_DIR, config_name="collect", version_base="1.3")
def main(cfg) -> None:
    _run(cfg)


if __name__ == "__main__":
    main()
