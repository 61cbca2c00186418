"""Driving data round trip (robomimic layout) and the dpolicy-drive CLI end to end, tiny sizes."""

import json

import pytest
import torch

from dpolicy.drive.data import read_demos, write_demos


@pytest.fixture(scope="module")
def drive_sets():
    from dpolicy.drive.data import build_set

    return build_set("train", 6), build_set("test", 4)


def test_demos_round_trip(tmp_path, drive_sets):
    train, test = drive_sets
    path = write_demos(tmp_path / "d.hdf5", {"train": train, "test": test})
    back = read_demos(path, "test")
    assert torch.allclose(back.expert, test.expert) and torch.allclose(back.best_progress, test.best_progress)
    assert torch.equal(back.scenes.seeds, test.scenes.seeds)
    assert all(torch.allclose(back.obs[k], test.obs[k]) for k in test.obs)


def test_cli_collect_train_rl_eval(tmp_path):
    from dpolicy.cli.drive import main

    data = tmp_path / "drive.hdf5"
    common = ["data.n_train=12", "data.n_val=2", "data.n_test=6"]
    assert main(["collect", f"out={data}", *common]) == 0
    assert main(["train", f"data.path={data}", f"run_dir={tmp_path / 'bc'}", "train.steps=4", "model.d=16"]) == 0
    assert (tmp_path / "bc" / "planner" / "model.safetensors").exists()
    assert main(["rl", f"data.path={data}", f"init={tmp_path / 'bc'}", f"run_dir={tmp_path / 'rl'}", "rl.iters=2",
                 "rl.group=2", "rl.scenes_per_iter=2", "rl.eval_every=1"]) == 0
    assert (tmp_path / "rl" / "curve.png").exists()
    assert main(["eval", f"data.path={data}", f"init={tmp_path / 'rl'}", f"run_dir={tmp_path / 'ev'}"]) == 0
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert 0 <= res["pdms"] <= 1 and (tmp_path / "ev" / "scenes.png").exists()
    assert main(["eval", f"data.path={data}", "init=nowhere"]) != 0
    assert main(["train", "rl.algo=ppo"]) != 0


def test_drive_bench_section_quick_writes_tables_and_pictures(tmp_path):
    from dpolicy.bench.drive import QUICK, drive_section

    body, res = drive_section(tmp_path, log=lambda *_: None, quick=True)
    assert {p.name for p in tmp_path.glob("*.png")} == {"drive_gspo_vs_grpo.png", "drive_group_size.png", "drive_scenes.png"}
    assert len(res["gspo_gain_points"]) == QUICK["seeds"] and len(res["grpo_final"]) == QUICK["seeds"]
    assert res["gspo_gain_points"][0] == pytest.approx(100 * (res["gspo_final"][0] - res["bc"]["pdms"]))
    assert f"drawn from {QUICK['n_rl']} train scenes" in body and "val PDMS-like" in body and "bc_val" in res
    assert (tmp_path / "drive_results.json").exists()


@pytest.mark.parametrize("name", ["drive_masked_bc", "drive_masked_gspo", "drive_anchor"])
def test_shipped_planners_load_through_the_common_loader_and_plan(name):
    from pathlib import Path

    from dpolicy.drive.data import build_set
    from dpolicy.drive.train import evaluate, plan
    from dpolicy.kinds import load_policy

    root = Path(__file__).resolve().parents[1] / "checkpoints"
    entry = json.loads((root / "manifest.json").read_text())[name]
    planner = load_policy(str(root / name), "cpu")
    assert type(planner).__name__ == {"masked": "MaskedTokenPlanner", "anchor": "AnchorDiffusionPlanner"}[entry["planner"]]
    assert sum(p.numel() for p in planner.parameters()) == entry["params"]
    ds = build_set("test", 8, encoder=planner.cfg["encoder"])
    traj = plan(planner, ds)
    assert traj.shape[0] == 8 and torch.isfinite(traj).all()
    pdms = evaluate(ds, traj)["pdms"]
    # the shipped planners score ~0.67 over 500 test scenes
    assert pdms.mean() > 0.4, pdms
