"""The benchmark command's plumbing: sections replaced in place, the env section's table, the
reference training loop trains the same model as ours, and bad options exit with one line."""

import subprocess
import sys

import torch

from dpolicy.bench import report, suite
from dpolicy.bench.throughput import HostWindows, compare
from dpolicy.data import WindowDataset

from conftest import make_demos, tiny_policy


def test_write_section_replaces_in_place_and_keeps_others(tmp_path):
    path = tmp_path / "B.md"
    report.write_section(path, "a", "alpha 1", "cmd a")
    report.write_section(path, "b", "beta", "cmd b")
    report.write_section(path, "a", "alpha 2", "cmd a2")
    text = path.read_text()
    assert text.count("<!-- section:a -->") == 1 and "alpha 2" in text and "alpha 1" not in text
    assert "beta" in text and text.index("alpha 2") < text.index("beta") and "cmd a2" in text


def test_envs_section_reports_every_task():
    body = suite.envs_section(episodes=3, steps=200, log=lambda *_: None)
    for task in suite.TASKS:
        assert f"| {task} |" in body
    image_rows = [line for line in body.splitlines() if line.startswith(tuple(f"| {t} |" for t in suite.IMAGE_TASKS.values()))]
    assert len(image_rows) == len(suite.TASKS) and all(float(r.split("|")[-2].replace(",", "")) > 0 for r in image_rows)
    assert "Expert mode frequencies on `avoid`" in body and "uncaught exceptions" in body
    adv_rows = [line for line in body.splitlines() if line.startswith("| ") and line.count("|") == 8]
    assert len(adv_rows) == 1 + len(suite.TASKS)  # header + one per task; each reports 0 exceptions
    assert all(line.split("|")[4].strip() == "0" for line in adv_rows[1:])


def test_reference_windows_match_ours():
    data = WindowDataset(make_demos(), ["pos", "vel"], 3, 8)
    host = HostWindows(data)
    idx = torch.tensor([0, 1, 29, 30, 31, len(host) - 1])  # episode starts and ends exercise the padding
    obs, act = data.gather(idx)
    for j, i in enumerate(idx.tolist()):
        item = host[i]
        assert torch.equal(item["action"], act[j].cpu())
        for k in data.obs_keys:
            assert torch.equal(item["obs"][k], obs[k][j].cpu())


def test_compare_times_both_loops():
    data = WindowDataset(make_demos(), ["pos", "vel"], 2, 8)
    r = compare(lambda: tiny_policy(), data, batch_size=8, steps=3, repeats=1)
    assert r["ours_samples_per_s"] > 0 and r["reference_samples_per_s"] > 0
    assert abs(r["ratio"] - r["ours_samples_per_s"] / r["reference_samples_per_s"]) < 1e-9


def test_bench_rejects_unknown_section(tmp_path):
    res = subprocess.run([sys.executable, "-m", "dpolicy.cli.bench", "--sections", "envs,nope", "--out", str(tmp_path / "B.md")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "nope" in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "B.md").exists()


def test_steer_report_lists_seeds_and_first_step_reaching_90(tmp_path):
    from dpolicy.bench.steer import render

    def run(task, algo, seed, curve, eta=None):
        hist = [{"env_steps": 2500 * i, "success_rate": s} for i, s in enumerate(curve)]
        return {"task": task, "algo": algo, "seed": seed, "eta": eta, "base_success": curve[0], "final_success": curve[-1],
                "history": hist, "wall_s_per_1k_env_steps": 10.0 + seed, "budget": 7500}

    results = {"a": run("lift", "na", 0, [0.3, 0.6, 0.92, 0.95]), "b": run("lift", "na", 1, [0.3, 0.8, 0.88, 0.91]),
               "c": run("lift", "sac", 0, [0.3, 0.4, 0.5, 0.6]), "d": run("lift", "na", 0, [0.3, 0.3, 0.2, 0.3], eta=1.0)}
    body = render(results, tmp_path / "curves.png")
    rows = {line.split("|")[2].strip(): line for line in body.splitlines() if line.startswith("| lift")}
    assert "5,000 / 7,500" in rows["DSRL-NA"] and "0.95 / 0.91" in rows["DSRL-NA"]
    assert "not reached" in rows["DSRL-SAC"] and "stochastic" in " ".join(rows)
    assert (tmp_path / "curves.png").stat().st_size > 0
