"""dpolicy-train into a run directory whose checkpoint has another network, process or shape stops
before training with one sentence naming the differing settings (exit code 2), and keeps the run."""

import os
import subprocess
import sys

from test_byo_dataset import CLI_TINY, write_robomimic_like


def _train(*args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "dpolicy.cli.train", *args, *CLI_TINY], capture_output=True, text=True,
                          timeout=300, env=env)


def test_resuming_a_run_with_another_process_exits_2_naming_it_and_keeps_the_run(tmp_path):
    path = write_robomimic_like(tmp_path / "mine.hdf5", obs_dims={"joint_angles": 7}, action_dim=7, env_args=None)
    run = tmp_path / "run"
    res = _train(f"data.path={path}", f"hydra.run.dir={run}")
    assert res.returncode == 0, res.stderr[-3000:]
    before = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    res = _train(f"data.path={path}", "process=flow", "train.steps=40", f"hydra.run.dir={run}")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "step_0000020 was trained with" in last and "process.type='diffusion'" in last
    assert "this run asks for" in last and "process.type='flow'" in last and "use a new hydra.run.dir or the same settings" in last
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == before
    res = _train(f"data.path={path}", "train.keep_best=true", "eval.every=0", f"hydra.run.dir={tmp_path / 'other'}")
    assert res.returncode == 2 and "set eval.every" in res.stderr.strip().splitlines()[-1]
