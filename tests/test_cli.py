"""End-to-end CLI runs (tiny budgets) and the bad-input table: every malformed dataset, config,
checkpoint or observation exits non-zero with one line naming the culprit, and no traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

TINY = ["task.n_demos=4", "train.steps=30", "train.batch_size=32", "train.log_every=10", "train.ckpt_every=15",
        "eval.episodes=3", "eval.n_envs=3", "eval.every=0", "train.progress=false", "policy.net.hidden=32",
        "policy.net.depth=1", "eval.video_episodes=1"]


def run(module, *args, cwd=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", f"dpolicy.cli.{module}", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def test_training_without_the_mp4_encoder_stops_before_it_trains(tmp_path, monkeypatch):
    from dpolicy.bench.suite import compose_run
    from dpolicy.eval.video import RenderError
    from dpolicy.train.bc import train_bc

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    cfg = compose_run(["task=avoid", *TINY])
    with pytest.raises(RenderError, match="pip install imageio-ffmpeg"):
        train_bc(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # nothing trained, collected or written


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    res = run("train", "task=avoid", "process=flow", *TINY, f"hydra.run.dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res.stdout


def test_train_writes_metrics_checkpoint_plot_and_prints_where(trained):
    out, stdout = trained
    m = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= m["success_rate"] <= 1.0 and m["eval"]["n_episodes"] == 3 and m["train_steps"] == 30
    assert "success rate" in stdout and str(out / "metrics.json") in stdout
    assert (out / "checkpoints" / "latest").exists() and (out / "learning_curve.png").stat().st_size > 0
    assert (out / "demos.hdf5").exists() and (out / "tb").is_dir()
    from dpolicy.policy import load_policy

    pol = load_policy(out / "checkpoints")
    assert pol.metadata["env_args"]["env_name"] == "dpolicy/Avoid-v0"


def test_eval_cli_on_the_trained_checkpoint(trained, tmp_path):
    out, _ = trained
    res = run("evaluate", f"checkpoint={out}/checkpoints", "episodes=4", "n_envs=2", "video=false", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "metrics.json").read_text())["n_episodes"] == 4


def test_collect_cli_writes_a_dataset(tmp_path):
    out = tmp_path / "d.hdf5"
    res = run("collect", "task=lift", "n_demos=3", f"out={out}", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["demos"] == 3 and summary["expert_success_rate"] > 0
    with h5py.File(out) as f:
        assert len([k for k in f["data"] if k.startswith("demo_")]) == 3


def _dataset(tmp_path, name, mutate):
    from dpolicy.data.collect import collect_demos

    path = tmp_path / f"{name}.hdf5"
    collect_demos("avoid", 3, path, progress=False)
    with h5py.File(path, "a") as f:
        mutate(f)
    return path


def _replace(f, key, value):
    del f[key]
    f[key] = value


BAD_DATASETS = {
    "missing_key": (lambda f: f["data/demo_0/obs"].__delitem__("agent_vel"), "agent_vel is missing"),
    "nan_actions": (lambda f: f["data/demo_1/actions"].__setitem__((2, 0), np.nan), "actions holds NaN"),
    "wrong_obs_shape": (lambda f: [_replace(f, f"data/demo_{i}/obs/agent_pos", np.zeros((f[f"data/demo_{i}/actions"].shape[0], 3))) for i in range(3)],
                        "'agent_pos' has dimension 3 in the dataset"),
    "no_env_args": (lambda f: f["data"].attrs.__delitem__("env_args"), "env_args is missing"),
    "length_mismatch": (lambda f: _replace(f, "data/demo_2/actions", np.zeros((3, 2))), "demo_2"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATASETS))
def test_bad_datasets_exit_with_one_clear_line(tmp_path, case):
    mutate, match = BAD_DATASETS[case]
    path = _dataset(tmp_path, case, mutate)
    res = run("train", "task=avoid", f"data.path={path}", *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode != 0
    err = res.stderr.strip().splitlines()
    assert "Traceback" not in res.stderr and err[-1].startswith("error:"), res.stderr[-2000:]
    assert match.replace("'agent_pos' has dimension 3 in the dataset", "agent_pos") in err[-1], err[-1]


@pytest.mark.parametrize("args,match", [
    (["data.path=/nonexistent/demos.hdf5"], "/nonexistent/demos.hdf5"),
    (["policy.Ta=40"], "policy.Ta=40"),
    (["process=flow", "policy.process.sampler=ddim"], "sampler='ddim'"),
    (["task.name=NoSuchTask-v9"], "NoSuchTask-v9"),
    (["device=cuda:7"] if not __import__("torch").cuda.is_available() else ["policy.net.type=transformer"], "cuda" if not __import__("torch").cuda.is_available() else "transformer"),
])
def test_bad_configs_exit_with_one_clear_line(tmp_path, args, match):
    res = run("train", *TINY, *args, f"hydra.run.dir={tmp_path}")
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert match in res.stderr.strip().splitlines()[-1], res.stderr[-2000:]


@pytest.mark.parametrize("args,match", [(["train.no_such_key=1"], "no_such_key"), (["process=nonexistent"], "nonexistent")])
def test_unknown_config_keys_and_options_fail_in_hydra(tmp_path, args, match):
    res = run("train", *args, f"hydra.run.dir={tmp_path}")
    assert res.returncode != 0 and match in res.stderr


@pytest.mark.parametrize("corrupt,match", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100]), "truncated"),
    (lambda d: (d / "meta.json").write_text('{"format": "torch-pickle"}'), "does not describe a dpolicy policy"),
    (lambda d: (d / "normalizer.json").unlink(), "normalizer.json is missing"),
])
def test_bad_checkpoints_exit_with_one_clear_line(trained, tmp_path, corrupt, match):
    import shutil

    from dpolicy.policy import resolve_checkpoint

    src = resolve_checkpoint(trained[0] / "checkpoints")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    corrupt(bad)
    res = run("evaluate", f"checkpoint={bad}", "episodes=1", "n_envs=1", "video=false", f"hydra.run.dir={tmp_path / 'e'}")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert match in res.stderr.strip().splitlines()[-1], res.stderr[-2000:]


def test_task_keep_failures_reaches_the_demo_collection(tmp_path):
    """task.keep_failures=true keeps a careless operator's failed episodes; without it, collection gives up
    with a sentence naming the way out."""
    from dpolicy.bench.suite import compose_run
    from dpolicy.errors import ConfigError
    from dpolicy.train.bc import prepare_dataset

    over = ["task=lift", "task.n_demos=2", "task.expert_kwargs={early_close:1.0}"]
    path = prepare_dataset(compose_run(over + ["task.keep_failures=true"]), tmp_path / "kept", progress=False)
    with h5py.File(path, "r") as f:
        assert sorted(f["data"].keys()) == ["demo_0", "demo_1"]
        assert all(f["data"][k].attrs["success"] == 0 for k in f["data"])
    (tmp_path / "strict").mkdir()
    with pytest.raises(ConfigError, match="keep_failures"):
        prepare_dataset(compose_run(over), tmp_path / "strict", progress=False)


# ---- bad input on every command: checked before anything runs, one sentence, exit status 2 ----
# Each case is (command, arguments, a text the one stderr line must hold: the key at fault). The hydra
# commands run in this process (hydra.main with sys.argv), drive and bench through their main(argv).

from dpolicy.bench.reliability import BAD_INPUT, CASES, CKPT, run_command  # noqa: E402  (the table the reliability bench tallies)


def run_in_process(capsys, tmp_path, command, args):
    """Exit status, stdout and stderr of a command run in this process (the reliability bench's runner)."""
    return run_command(command, args, tmp_path)


def test_the_bad_input_table_covers_every_command():
    assert set(BAD_INPUT) == {"train", "evaluate", "collect", "deploy", "compose", "steer", "finetune", "drive", "bench"}
    assert len(CASES) >= 150


@pytest.mark.parametrize("command,args,key", CASES, ids=[f"{c}:{' '.join(a) if isinstance(a, list) else a}" for c, a, _ in CASES])
def test_bad_input_is_one_sentence_naming_the_key(capsys, tmp_path, command, args, key):
    code, _, err = run_in_process(capsys, tmp_path, command, args if isinstance(args, list) else [args])
    lines = err.strip().splitlines()
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err[-2000:]
    assert key in lines[0], lines[0]
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "B.md").exists()


@pytest.mark.parametrize("command,args,key", [
    ("train", ["train.steps=abc"], "train.steps='abc' must be an integer"),
    ("evaluate", [f"checkpoint={CKPT}", "episodes=abc"], "episodes='abc' must be an integer"),
    ("collect", ["valid_fraction=2"], "valid_fraction"),
    ("deploy", [f"checkpoint={CKPT}", "execute=0"], "execute=0 must be at least 1"),
    ("compose", ["parents=[a,b]", "episodes=0"], "episodes=0"),
    ("steer", [f"base={CKPT}", "env_steps=abc"], "env_steps='abc'"),
    ("drive", ["collect", "data.n_train=-1"], "data.n_train=-1"),
    ("bench", ["--episodes", "0"], "--episodes"),
])
def test_bad_input_in_a_real_process_exits_2_without_traceback(tmp_path, command, args, key):
    extra = {"drive": [], "bench": ["--out", str(tmp_path / "B.md")]}.get(command, [f"hydra.run.dir={tmp_path}"])
    res = run(command, *args, *extra, cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and key in res.stderr, res.stderr


@pytest.fixture(scope="module")
def drive_data(tmp_path_factory):
    from dpolicy.cli.drive import main

    path = tmp_path_factory.mktemp("drive") / "d.hdf5"
    assert main(["collect", f"out={path}", "data.n_train=2", "data.n_val=0", "data.n_test=1"]) == 0
    return path


def _planner_dir(d):
    from dpolicy.drive import MaskedTokenPlanner, TrajectoryTokenizer

    return MaskedTokenPlanner(TrajectoryTokenizer(), d=16, layers=1, heads=4, encoder="flat").save(d / "planner")


@pytest.mark.parametrize("corrupt,culprit,match", [
    (lambda p: (p / "model.safetensors").write_bytes(b"\x80\x04garbage, not a checkpoint" * 20), "model.safetensors", "cannot be read"),
    (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:1000]), "model.safetensors", "cannot be read"),
    (lambda p: (p / "model.safetensors").write_bytes(b""), "model.safetensors", "cannot be read"),
    (lambda p: (p / "model.safetensors").unlink(), "model.safetensors", "is missing"),
    (lambda p: (p / "meta.json").write_text("{not json"), "meta.json", "not valid JSON"),
    (lambda p: (p / "meta.json").write_text('{"format": "dpolicy-policy", "format_version": 1, "kind": "drive_tokens"}'),
     "drive_tokens", "no loaded module registers"),
    (lambda p: (p / "config.json").write_text("{}"), "config.json", "does not describe a MaskedTokenPlanner"),
    (lambda p: (p / "config.json").write_text((p / "config.json").read_text().replace('"d": 16', '"d": 32')), "model.safetensors",
     "wrong shape"),
])
@pytest.mark.parametrize("command", ["eval", "rl"])
def test_corrupt_planner_checkpoint_is_one_sentence(capsys, tmp_path, drive_data, corrupt, culprit, match, command):
    from dpolicy.cli.drive import main

    corrupt(_planner_dir(tmp_path / "run"))
    code = main([command, f"data.path={drive_data}", f"init={tmp_path / 'run'}", f"run_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and culprit in err[0] and match in err[0], err
    assert not (tmp_path / "out").exists()


def test_missing_planner_directory_is_one_sentence(capsys, tmp_path, drive_data):
    from dpolicy.cli.drive import main

    assert main(["eval", f"data.path={drive_data}", f"init={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0] and "does not exist" in err[0], err


def test_corrupt_planner_in_a_real_process(tmp_path, drive_data):
    (_planner_dir(tmp_path / "run") / "model.safetensors").write_bytes(b"\x80\x04garbage, not a checkpoint" * 20)
    res = subprocess.run([sys.executable, "-m", "dpolicy.cli.drive", "eval", f"data.path={drive_data}", f"init={tmp_path / 'run'}",
                          f"run_dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "cannot be read" in res.stderr, res.stderr[-2000:]
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
