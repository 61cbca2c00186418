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
                 "rl.group=2", "rl.scenes_per_iter=2", "rl.eval_every=1", "rl.order=causal", "rl.baseline=greedy"]) == 0
    assert (tmp_path / "rl" / "curve.png").exists()
    # the planner keeps the order its RL decoded in: eval uses it unless eval.order says otherwise
    assert json.loads((tmp_path / "bc" / "planner" / "config.json").read_text())["order"] == "confidence"
    assert json.loads((tmp_path / "rl" / "planner" / "config.json").read_text())["order"] == "causal"
    assert main(["eval", f"data.path={data}", f"init={tmp_path / 'rl'}", f"run_dir={tmp_path / 'ev'}"]) == 0
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert 0 <= res["pdms"] <= 1 and (tmp_path / "ev" / "scenes.png").exists() and res["order"] == "causal"
    assert 0 <= res["expert_tokenized_pdms"] <= 1 and res["expert_tokenized_pdms"] != res["expert_pdms"]
    assert main(["eval", f"data.path={data}", f"init={tmp_path / 'rl'}", "eval.order=confidence", f"run_dir={tmp_path / 'evc'}"]) == 0
    assert json.loads((tmp_path / "evc" / "eval.json").read_text())["order"] == "confidence"
    assert main(["train", f"data.path={data}", "model.planner=scorer", f"init={tmp_path / 'bc'}", f"run_dir={tmp_path / 'sc'}",
                 "train.steps=3", "train.proposals=2"]) == 0
    assert main(["eval", f"data.path={data}", f"init={tmp_path / 'bc'}", f"eval.scorer={tmp_path / 'sc'}", "eval.rule=true",
                 "eval.samples=2", f"run_dir={tmp_path / 'ev2'}"]) == 0
    res = json.loads((tmp_path / "ev2" / "eval.json").read_text())
    assert res["chosen_by"] == "learned scorer" and 0 <= res["pdms"] <= 1
    assert main(["train", f"data.path={data}", f"train.teacher={tmp_path / 'sc'}", f"run_dir={tmp_path / 'st'}", "train.steps=2",
                 "model.d=16"]) == 0
    meta = json.loads((tmp_path / "st" / "planner" / "meta.json").read_text())
    assert meta["metadata"]["teacher"] == str(tmp_path / "sc") and meta["metadata"]["teacher_temperature"] == 0
    assert main(["train", f"data.path={data}", f"train.teacher={tmp_path / 'sc'}", "train.teacher_temperature=0.01",
                 "model.planner=anchor", "model.anchors=4", f"run_dir={tmp_path / 'sa'}", "train.steps=2", "model.d=16"]) == 0
    meta = json.loads((tmp_path / "sa" / "planner" / "meta.json").read_text())
    assert meta["metadata"]["teacher_temperature"] == 0.01
    assert main(["train", f"data.path={data}", "train.teacher_temperature=0.01", "train.steps=2"]) != 0  # no teacher
    assert main(["train", f"data.path={data}", f"train.teacher={tmp_path / 'sc'}", "train.teacher_temperature=-1"]) != 0
    # behaviour cloning continued from a planner: starts from its weights (a vanishing step size keeps them)
    assert main(["train", f"data.path={data}", f"init={tmp_path / 'bc'}", f"run_dir={tmp_path / 'more'}", "train.steps=1",
                 "train.lr=1e-12"]) == 0
    from dpolicy.cli.drive import load_planner

    before, after = (load_planner(tmp_path / r, "cpu").state_dict() for r in ("bc", "more"))
    assert before.keys() == after.keys() and all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    meta = json.loads((tmp_path / "more" / "planner" / "meta.json").read_text())
    assert meta["metadata"]["init"] == str(tmp_path / "bc")
    assert main(["train", f"data.path={data}", f"init={tmp_path / 'bc'}", "model.planner=anchor", "train.steps=1"]) != 0
    assert main(["train", f"data.path={data}", f"train.teacher={tmp_path / 'bc'}", "train.steps=2"]) != 0  # not a scorer
    assert main(["eval", f"data.path={data}", f"init={tmp_path / 'bc'}", f"eval.scorer={tmp_path / 'bc'}"]) != 0  # not a scorer
    assert main(["eval", f"data.path={data}", f"init={tmp_path / 'bc'}", "eval.samples=0"]) != 0  # no proposals
    assert main(["train", f"data.path={data}", "model.planner=scorer"]) != 0  # no proposer
    assert main(["train", f"data.path={data}", "model.experts=2", "model.top_k=3"]) != 0  # more experts chosen than exist
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


def test_scorer_throughput_section_times_each_device_and_batch():
    import torch

    from dpolicy.bench.drive import drive_throughput_section

    body, res = drive_throughput_section(log=lambda *_: None, n_scenes=8, cpu_sizes=(16, 64), gpu_sizes=(64,), repeats=1)
    rows = res["rows"]
    assert [(r[0], r[1]) for r in rows if r[0] == "cpu"] == [("cpu", 16), ("cpu", 64)]  # 8 scenes x 2 and x 8 plans
    assert all(r[2] > 0 for r in rows) and "| cpu | 64 |" in body
    assert (res["device"] is None) == (not torch.cuda.is_available()) == ("none in this run" in body)
    assert ("GPU rate / CPU rate" in body) == torch.cuda.is_available()


@pytest.mark.parametrize("name", ["drive_masked_bc", "drive_masked_gspo", "drive_anchor", "drive_masked_distilled",
                                  "drive_masked_route"])
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
    assert planner.cfg.get("frame", planner.cfg.get("tokenizer", {}).get("frame", "ego")) == entry.get("frame", "ego").split()[0]
    ds = build_set("test", 8, encoder=planner.cfg["encoder"])
    traj = plan(planner, ds)
    assert traj.shape[0] == 8 and torch.isfinite(traj).all()
    pdms = evaluate(ds, traj)["pdms"]
    # the shipped planners score 0.67-0.84 over 500 test scenes
    assert pdms.mean() > 0.4, pdms


def test_forecast_keeps_the_present_and_matches_constant_speed_traffic():
    from dataclasses import replace

    from dpolicy_envs.driving import forecast, generate_scenes

    sc = generate_scenes(list(range(12)))
    fs = forecast(sc)
    assert torch.equal(fs.agents[:, :, 0], sc.agents[:, :, 0]) and fs.agents.shape == sc.agents.shape
    # every agent keeps its speed at t = 0, so it covers speed x time (lane traffic advances its station at that
    # speed, so on a curve at a lateral offset its path is a few percent longer or shorter)
    step = (fs.agents[:, :, 1:, :2] - fs.agents[:, :, :-1, :2]).norm(dim=-1).sum(-1)
    expect = sc.agent_v[:, :, 0] * 0.1 * (sc.agents.shape[2] - 1)
    ok = sc.agent_valid
    assert torch.allclose(step[ok], expect[ok], rtol=0.06, atol=0.05)
    # crossing traffic moves on a straight line at constant speed in the log: there the forecast is the log
    cross = ok & (sc.cross[:, 2:3] > 0.5) & (sc.agents[:, :, :, 2].std(-1) < 1e-6) & (sc.agent_v.std(-1) < 1e-6)
    assert cross.any()
    assert torch.allclose(fs.agents[cross], sc.agents[cross], atol=1e-3)
    # nothing of the logged future reaches the forecast
    moved = replace(sc, agents=torch.cat([sc.agents[:, :, :1], sc.agents[:, :, 1:] + 5.0], 2))
    assert torch.equal(forecast(moved).agents, fs.agents)


def test_selection_among_samples_reads_no_log_and_prefers_its_best_forecast_score():
    from dataclasses import replace
    from pathlib import Path

    from dpolicy.drive.data import build_set
    from dpolicy.drive.selector import select
    from dpolicy.drive.train import plan
    from dpolicy.kinds import load_policy
    from dpolicy_envs.driving import forecast, score

    planner = load_policy(str(Path(__file__).resolve().parents[1] / "checkpoints" / "drive_masked_bc"), "cpu")
    ds = build_set("val", 6, encoder=planner.cfg["encoder"])
    pick = select(None, planner, ds, samples=6, rule=False)
    greedy = plan(planner, ds)
    fs = forecast(ds.scenes)
    both = score(fs, torch.stack([pick, greedy], 1))["pdms"]
    assert (both[:, 0] >= both[:, 1] - 1e-6).all()       # the greedy plan is one of the candidates
    assert torch.equal(select(None, planner, ds, samples=6, rule=False), pick)  # seeded
    fake = replace(ds, scenes=replace(ds.scenes, agents=torch.cat([ds.scenes.agents[:, :, :1], ds.scenes.agents[:, :, 1:] * 0], 2)))
    assert torch.equal(select(None, planner, fake, samples=6, rule=False), pick)


def test_shipped_scorer_loads_and_chooses_among_the_rule_candidates():
    from pathlib import Path

    from dpolicy.drive.data import build_set
    from dpolicy.drive.selector import TrajectoryScorer, select
    from dpolicy.drive.train import evaluate
    from dpolicy.kinds import load_policy

    root = Path(__file__).resolve().parents[1] / "checkpoints"
    entry = json.loads((root / "manifest.json").read_text())["drive_scorer"]
    scorer = load_policy(str(root / "drive_scorer"), "cpu")
    assert isinstance(scorer, TrajectoryScorer) and sum(p.numel() for p in scorer.parameters()) == entry["params"]
    ds = build_set("test", 12, encoder=scorer.cfg["encoder"])
    pdms = evaluate(ds, select(scorer, None, ds, samples=0, rule=True))["pdms"]
    # the shipped scorer's choices score ~0.88 over 500 test scenes
    assert pdms.mean() > 0.6, pdms


def test_seed_band_plot_reads_each_runs_history(tmp_path):
    from dpolicy.drive.plots import plot_seed_bands

    for s, end in ((0, 0.80), (1, 0.84)):
        d = tmp_path / f"s{s}"
        d.mkdir()
        (d / "history.json").write_text(json.dumps([{"iter": 0, "samples": 0, "test_pdms": 0.75}, {"iter": 1, "samples": 10},
                                                    {"iter": 2, "samples": 20, "test_pdms": end}]))
    out = plot_seed_bands(tmp_path / "bands.png", {"GSPO": [tmp_path / "s0", tmp_path / "s1"]}, reference={"start": 0.75})
    assert out.exists() and out.stat().st_size > 5000
    with pytest.raises(FileNotFoundError):
        plot_seed_bands(tmp_path / "x.png", {"GSPO": [tmp_path / "missing"]})
