"""Bring your own dataset: ``dpolicy-train data.path=...`` with no task takes the observation keys,
dims, action dim and environment from the file (written here with plain h5py, the way robomimic
writes it: gzip, chunks, extra keys and attributes), trains without an environment when the file
names none that can be built, and records where everything came from."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from dpolicy.config import RunConfig, from_dict
from dpolicy.policy import load_policy

LIFT_KEYS = {"eef_pos": 3, "eef_vel": 3, "gripper_state": 2, "object_pos": 3, "object_quat": 4, "object_to_eef": 3}
LIFT_ENV_ARGS = {"env_name": "dpolicy/Lift-v0", "env_type": "gymnasium", "env_kwargs": {"horizon": 12}}


def write_robomimic_like(path, obs_dims=None, action_dim=4, env_args=LIFT_ENV_ARGS, n_demos=4, length=25):
    """A robomimic-layout file as another tool writes it: gzip-compressed chunked datasets, an image key,
    a key the environment does not have, extra per-demo datasets and attributes, masks."""
    obs_dims = dict(LIFT_KEYS if obs_dims is None else obs_dims)
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["total"] = n_demos * length
        data.attrs["date"] = "2024-01-01"
        data.attrs["repository_version"] = "0.3.0"
        if env_args is not None:
            data.attrs["env_args"] = json.dumps(env_args)
        for i in range(n_demos):
            g = data.create_group(f"demo_{i}")
            g.attrs["num_samples"] = length
            g.attrs["model_file"] = "<mujoco model='x'/>"
            for k, d in {**obs_dims, "robot0_joint_vel": 7}.items():
                for grp in ("obs", "next_obs"):
                    g.create_dataset(f"{grp}/{k}", data=rng.normal(size=(length, d)), compression="gzip", chunks=True)
            g.create_dataset("obs/agentview_image", data=rng.integers(0, 255, (length, 8, 8, 3), dtype=np.uint8),
                             compression="gzip", chunks=(1, 8, 8, 3))
            g.create_dataset("actions", data=rng.uniform(-1, 1, (length, action_dim)), compression="gzip", chunks=(8, action_dim))
            g.create_dataset("rewards", data=np.zeros(length), compression="gzip")
            g.create_dataset("dones", data=np.r_[np.zeros(length - 1), 1].astype(np.int64))
            g.create_dataset("states", data=rng.normal(size=(length, 11)), compression="gzip", chunks=True)
            g.create_dataset("action_dict/abs_pos", data=rng.normal(size=(length, 3)))  # newer robomimic extras
        f.create_dataset("mask/train", data=np.array([f"demo_{i}".encode() for i in range(n_demos - 1)]))
        f.create_dataset("mask/valid", data=np.array([f"demo_{n_demos - 1}".encode()]))
    return path


TINY = {"policy": {"To": 2, "Tp": 8, "Ta": 4, "net": {"hidden": 32, "depth": 1}, "process": {"steps": 3}},
        "train": {"steps": 20, "batch_size": 16, "log_every": 10, "ckpt_every": 10, "progress": False},
        "eval": {"episodes": 2, "n_envs": 2, "every": 0, "video": False, "plot": False}}


def run_cfg(path, **sections):
    d = {k: dict(v) for k, v in TINY.items()}
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v}
    d["task"] = {"name": None, **d.get("task", {})}
    d["data"] = {"path": str(path), **d.get("data", {})}
    return from_dict(RunConfig, d)


def test_a_dataset_without_an_environment_trains_where_no_video_could_be_written(tmp_path, monkeypatch):
    import sys

    from dpolicy.train.bc import train_bc

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # no mp4 encoder: nothing here is filmed, so no error
    path = write_robomimic_like(tmp_path / "mine.hdf5", obs_dims={"joint_angles": 7, "gripper_state": 2}, action_dim=7,
                                env_args={"env_name": "dpolicy/Lift-v0", "env_type": "gymnasium", "env_kwargs": {}})
    m = train_bc(run_cfg(path, eval={"video": True, "episodes": 2}), tmp_path / "run", progress=False)
    assert "eval_skipped" in m and m["train_steps"] == 20


def test_keys_dims_action_dim_and_env_come_from_the_file(tmp_path, capsys):
    from dpolicy.train.bc import train_bc

    path = write_robomimic_like(tmp_path / "lift_like.hdf5")
    m = train_bc(run_cfg(path), tmp_path / "run", progress=False)
    out = capsys.readouterr().out
    assert "'agentview_image' (per-step shape (8, 8, 3), an image)" in out
    assert "['robot0_joint_vel'] are in the dataset but not in the environment 'dpolicy/Lift-v0'" in out
    assert m["task"] is None and m["dataset"] == str(path) and m["env"] == "dpolicy/Lift-v0"
    assert m["obs_keys"] == sorted(LIFT_KEYS) and m["action_dim"] == 4 and m["eval"]["n_episodes"] == 2
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["task"] is None
    pol = load_policy(tmp_path / "run" / "checkpoints")
    assert pol.obs_dims == LIFT_KEYS and pol.action_dim == 4
    assert pol.metadata["env_args"]["env_name"] == "dpolicy/Lift-v0" and pol.metadata["task"] is None


def test_explicit_obs_keys_and_filter_key_still_apply(tmp_path):
    from dpolicy.train.bc import train_bc

    path = write_robomimic_like(tmp_path / "lift_like.hdf5")
    m = train_bc(run_cfg(path, task={"obs_keys": ["object_pos", "eef_pos"]}, data={"filter_key": "train"}),
                 tmp_path / "run", progress=False)
    assert m["obs_keys"] == ["object_pos", "eef_pos"] and m["demos"] == 3 and "success_rate" in m


@pytest.mark.parametrize("env_args,why", [
    (None, "attribute data.env_args is missing, so the environment cannot be rebuilt"),
    ({"env_name": "MyLab/ArmReach-v3", "env_type": "gymnasium", "env_kwargs": {}}, "names the environment 'MyLab/ArmReach-v3', which cannot be built here"),
    ({"env_name": "dpolicy/Avoid-v0", "env_type": "gymnasium", "env_kwargs": {}}, "provides observation keys ['agent_pos', 'agent_vel'], none of the dataset's"),
    ({"env_name": "dpolicy/Lift-v0", "env_type": "gymnasium", "env_kwargs": {}}, "has action dimension 4, the dataset 7"),
])
def test_without_an_env_that_fits_training_runs_and_evaluation_is_skipped_saying_why(tmp_path, capsys, env_args, why):
    from dpolicy.train.bc import train_bc

    path = write_robomimic_like(tmp_path / "mine.hdf5", obs_dims={"joint_angles": 7, "object_state": 10, "gripper_state": 2},
                                action_dim=7, env_args=env_args)
    m = train_bc(run_cfg(path), tmp_path / "run", progress=False)
    out = capsys.readouterr().out
    assert "evaluation skipped: " in out and why in out and "the policy is trained on the dataset alone" in out
    assert why in m["eval_skipped"] and "success_rate" not in m and m["train_steps"] == 20 and m["task"] is None
    pol = load_policy(tmp_path / "run" / "checkpoints")
    assert pol.action_dim == 7 and pol.obs_keys == ["gripper_state", "joint_angles", "object_state", "robot0_joint_vel"]
    assert "env_args" not in pol.metadata and pol.metadata["dataset"] == str(path)


def test_robomimic_robosuite_env_args_without_robosuite_skip_evaluation(tmp_path, capsys):
    from dpolicy.train.bc import train_bc

    pytest.importorskip("envs")
    import importlib.util

    if importlib.util.find_spec("robosuite") is not None:
        pytest.skip("robosuite is installed: the env would be built")
    path = write_robomimic_like(tmp_path / "low_dim_v15.hdf5", env_args={"env_name": "Lift", "type": 1, "env_kwargs": {"horizon": 400}})
    m = train_bc(run_cfg(path), tmp_path / "run", progress=False)
    assert "robosuite" in m["eval_skipped"] and "'Lift'" in m["eval_skipped"] and "evaluation skipped" in capsys.readouterr().out


def test_keep_best_without_an_environment_is_refused_before_training(tmp_path):
    from dpolicy.errors import ConfigError
    from dpolicy.train.bc import train_bc

    path = write_robomimic_like(tmp_path / "mine.hdf5", env_args=None)
    with pytest.raises(ConfigError, match="need evaluations during training, and there is no environment"):
        train_bc(run_cfg(path, train={"keep_best": True}, eval={"every": 10}), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_null_task_without_a_dataset_is_a_config_error(tmp_path):
    from dpolicy.errors import ConfigError
    from dpolicy.train.bc import train_bc

    cfg = run_cfg("x")
    cfg.data.path = None
    with pytest.raises(ConfigError, match="task.name is null"):
        train_bc(cfg, tmp_path / "run", progress=False)


@pytest.mark.parametrize("overrides,from_data", [
    ([], False),
    (["data.path=d.hdf5"], True),
    (["data.path=d.hdf5", "task.obs_keys=[a]", "train.steps=7"], True),
    (["data.path=d.hdf5", "task=lift"], False),
    (["data.path=d.hdf5", "task.name=avoid"], False),
    (["data.path=d.hdf5", "~task"], True),
    (["data.path=d.hdf5", "task.name=null"], True),
    (["task=push"], False),
])
def test_the_cli_takes_the_task_from_the_data_only_when_none_was_chosen(overrides, from_data):
    from hydra import compose, initialize_config_dir

    from dpolicy.cli.common import CONFIG_DIR
    from dpolicy.cli.train import compose_from_data, task_from_data

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
        assert task_from_data(cfg, overrides) is from_data
        if from_data:
            cfg = compose_from_data(overrides)
            assert cfg.task.name is None and cfg.data.path == "d.hdf5"
            assert list(cfg.task.get("obs_keys") or []) == (["a"] if "task.obs_keys=[a]" in overrides else [])
            plain = compose(config_name="train", overrides=["~task"])
            assert cfg.train.steps == (7 if "train.steps=7" in overrides else plain.train.steps)  # not avoid's budget
            assert cfg.policy.process.type == "diffusion"
        elif not overrides:
            assert cfg.task.name == "avoid" and cfg.data.path is None  # plain dpolicy-train: avoid demos, as before


def _cli(module, *args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", f"dpolicy.cli.{module}", *args], capture_output=True, text=True,
                          timeout=300, env=env)


CLI_TINY = ["train.steps=20", "train.batch_size=16", "train.log_every=10", "train.ckpt_every=10", "train.progress=false",
            "policy.net.hidden=32", "policy.net.depth=1", "eval.episodes=2", "eval.n_envs=2", "eval.video=false"]


def test_the_readme_command_on_a_foreign_file_then_dpolicy_eval_on_the_best_checkpoint(tmp_path):
    path = write_robomimic_like(tmp_path / "my_demos.hdf5")
    run = tmp_path / "run"
    res = _cli("train", f"data.path={path}", *CLI_TINY, "eval.every=10", "eval.episodes_during=2", "train.keep_best=true",
               f"hydra.run.dir={run}")
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["task"] is None and m["dataset"] == str(path) and m["env"] == "dpolicy/Lift-v0"
    assert m["obs_keys"] == sorted(LIFT_KEYS) and m["train_steps"] == 20
    assert m["best_step"] in (10, 20) and m["best_checkpoint"] == str(run / "checkpoints" / "best")
    assert set(m) >= {"best_success", "stopped_early_at", "time_to_success"}
    assert "best       :" in res.stdout
    res = _cli("evaluate", f"checkpoint={run}/checkpoints/best", "episodes=2", "n_envs=2", "video=false",
               f"hydra.run.dir={tmp_path / 'eval'}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["env_args"]["env_name"] == "dpolicy/Lift-v0"


def test_the_cli_trains_on_a_file_naming_no_env_and_says_evaluation_was_skipped(tmp_path):
    path = write_robomimic_like(tmp_path / "mine.hdf5", obs_dims={"joint_angles": 7}, action_dim=7, env_args=None)
    run = tmp_path / "run"
    res = _cli("train", f"data.path={path}", *CLI_TINY, f"hydra.run.dir={run}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "evaluation skipped: " in res.stdout and "env_args is missing" in res.stdout and "no evaluation" in res.stdout
    m = json.loads((run / "metrics.json").read_text())
    assert m["task"] is None and m["env"] is None and "success_rate" not in m and m["obs_keys"] == ["joint_angles", "robot0_joint_vel"]


def test_an_env_whose_observation_dims_differ_is_not_used(tmp_path, capsys):
    from dpolicy.train.bc import train_bc

    path = write_robomimic_like(tmp_path / "mine.hdf5", obs_dims={"eef_pos": 3, "gripper_state": 3})
    m = train_bc(run_cfg(path), tmp_path / "run", progress=False)
    assert "does not provide observation(s) ['gripper_state'] as the dataset has them (dataset {'gripper_state': 3}, " \
           "environment {'gripper_state': 2})" in m["eval_skipped"]
    assert m["obs_keys"] == ["eef_pos", "gripper_state", "robot0_joint_vel"] and m["env"] is None
