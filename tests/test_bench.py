"""The benchmark command's plumbing: sections replaced in place, the env section's table, the
reference training loops (state and image) train the same model on the same inputs as ours, and
bad options exit with one line."""

import json
import subprocess
from pathlib import Path
import sys

import numpy as np
import pytest
import torch

from dpolicy.bench import report, suite
from dpolicy.bench.throughput import (HostWindows, ImageHostWindows, compare, compare_images, synthetic_image_demos,
                                      to_device)
from dpolicy.config import NetConfig, PolicyConfig, VisionConfig
from dpolicy.data import Demo, WindowDataset
from dpolicy.train.bc import build_policy

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


def coded_image_demos(n=3, length=12, size=20):
    """Frames whose pixel (y, x) holds (y, x, step): a crop names where it was taken and from which frame."""
    yy, xx = np.mgrid[0:size, 0:size]
    demos = []
    for d in range(n):
        steps = np.arange(length)[:, None, None] + 16 * d
        cam = np.stack(np.broadcast_arrays(yy[None], xx[None], steps), -1).astype(np.uint8)
        demos.append(Demo(obs={"pos": np.full((length, 2), d, np.float32), "cam": cam},
                          actions=np.arange(length * 2, dtype=np.float32).reshape(length, 2)))
    return demos


def small_image_policy(data, crop):
    torch.manual_seed(0)
    cfg = PolicyConfig(To=2, Tp=4, Ta=2, net=NetConfig(type="mlp", hidden=32, depth=1),
                       vision=VisionConfig(crop=crop, keypoints=4, channels=[8]))
    return build_policy(cfg, data)


def test_reference_image_sample_is_the_decoded_window_in_float():
    data = WindowDataset(coded_image_demos(), ["pos", "cam"], 2, 4)
    host = ImageHostWindows(data)
    idx = torch.tensor([0, 1, 11, 12, 20, len(host) - 1])
    obs, act = data.gather(idx)
    for j, i in enumerate(idx.tolist()):
        item = host[i]
        img = item["obs"]["cam"]
        assert img.shape == (2, 20, 20, 3) and img.dtype == torch.float32
        assert torch.equal(img, obs["cam"][j].float())  # zlib is lossless: the window's own pixels, 0..255
        assert item["action"].dtype == torch.float32 and torch.equal(item["action"], act[j])
        assert torch.equal(item["obs"]["pos"], obs["pos"][j])
    assert host.compressed_bytes_per_frame < data.image_bytes_per_frame


@pytest.mark.parametrize("backend", ["imagecodecs", "Pillow"])
def test_jpeg2k_reference_store_decodes_close_to_the_frame_and_crops_like_zlib(backend):
    if backend == "imagecodecs":
        pytest.importorskip("imagecodecs")
    data = WindowDataset(synthetic_image_demos(2, 12, size=20), ["robot0_eef_pos", "agentview_image"], 2, 4)
    host = ImageHostWindows(data, codec="jpeg2k")
    host.codec.backend = backend
    host.frames = {k: [host.codec.encode(np.ascontiguousarray(f)) for f in data.obs[k].cpu().numpy()] for k in host.shapes}
    assert host.compressed_bytes_per_frame < data.image_bytes_per_frame
    obs, _ = data.gather(torch.arange(len(host)))
    for i in (0, 5, len(host) - 1):
        got = host[i]["obs"]["agentview_image"]
        want = obs["agentview_image"][i].float()
        assert got.shape == want.shape
        psnr = 10 * torch.log10(255.0 ** 2 / ((got - want) ** 2).mean().clamp_min(1e-9))
        assert psnr > 40, f"{backend} decodes frame {i} at {psnr:.1f} dB"  # lossy at a 50 dB target, not garbage


def test_unknown_reference_frame_store_is_named():
    data = WindowDataset(synthetic_image_demos(1, 6, size=8), ["agentview_image"], 2, 4)
    with pytest.raises(ValueError, match="unknown frame codec 'png'"):
        ImageHostWindows(data, codec="png")


def test_reference_and_ours_feed_the_same_inputs_to_the_same_network():
    data = WindowDataset(synthetic_image_demos(2, 12, size=16), ["robot0_eef_pos", "agentview_image", "robot0_eye_in_hand_image"], 2, 4)
    ours = small_image_policy(data, crop=12)
    host = ImageHostWindows(data)
    idx = torch.tensor([0, 3, 11, 12, 17, 23])
    obs, act = data.gather(idx)
    batch = torch.utils.data.default_collate([host[i] for i in idx.tolist()])
    ref_obs, ref_act = to_device(batch, data.device)
    assert torch.equal(ref_act, act)
    for k in ref_obs:
        assert torch.equal(ref_obs[k], obs[k].float())  # the same pixel values, float instead of uint8
    # the encoder crops both on the device at the same places from the same generator, and uint8 / 255 equals
    # float / 255, so the same network gives the same loss
    want = ours.loss(obs, act, torch.Generator().manual_seed(3))
    got = ours.loss(ref_obs, ref_act, torch.Generator().manual_seed(3))
    assert torch.equal(got, want)
    other = ours.loss(ref_obs, ref_act, torch.Generator().manual_seed(4))
    assert not torch.equal(other, want)  # the crop (and the noise) do depend on the generator


def test_compare_images_times_both_loops_and_the_loader_wait():
    data = WindowDataset(synthetic_image_demos(2, 12, size=16), ["robot0_eef_pos", "agentview_image"], 2, 4)
    r = compare_images(lambda: small_image_policy(data, crop=12), data, batch_size=4, steps=2, repeats=1)
    assert r["ours_samples_per_s"] > 0 and r["reference_samples_per_s"] > 0
    assert abs(r["ratio"] - r["ours_samples_per_s"] / r["reference_samples_per_s"]) < 1e-9
    assert 0 <= r["reference_wait_share"] < 1
    before = torch.get_num_threads()
    r = compare_images(lambda: small_image_policy(data, crop=12), data, batch_size=4, steps=2, repeats=1, threads=2,
                       reference_threads=(1, 2))
    assert set(r["reference_by_threads"]) == {1, 2} and torch.get_num_threads() == before  # threads restored
    assert r["reference_samples_per_s"] == max(r["reference_by_threads"].values())  # the faster reference counts


def test_image_throughput_section_reports_both_loops_and_the_memory(monkeypatch):
    compiled = []  # compiling for real takes minutes here: record what would be compiled and run it eagerly

    def fake_compile(fn, *a, **k):
        compiled.append(type(getattr(fn, "__self__", fn)).__name__)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    body = suite.image_throughput_section(batch_sizes=(4,), steps=1, repeats=1, n_demos=2, length=10, log=lambda *_: None)
    for codec in ("zlib", "jpeg2k"):  # one row per reference frame store
        row = next(line for line in body.splitlines() if line.startswith(f"| {codec} | 4 |"))
        assert row.count("|") == 10 and "x |" in row
    assert "agentview_image" in body and "Jpeg2k(level=50)" in body
    assert "in the `zlib` store" in body and "in the `jpeg2k` store" in body
    assert "uint8" in body and "float32 they would take" in body
    on_gpu = torch.cuda.is_available()  # there the reference gets Diffusion Policy's loader workers, not one
    assert ("num_workers=1," in body) != on_gpu
    if report.usable_cores() > 1 and not on_gpu:  # the whole CPU as each loop can use it: a second table, per store and batch
        cores = [line for line in body.split("using the whole machine")[1].splitlines() if line.startswith("| ")
                 and "| 4 |" in line]
        assert len(cores) == 2 and all(c.count("|") == 8 for c in cores)
        # and with both training steps compiled: the reference's loss and our Trainer's model, per store and batch
        table = body.split("with their training steps compiled")[1]
        rows = [line for line in table.splitlines() if line.startswith("| ") and "| 4 |" in line]
        assert len(rows) == 2 and all(r.count("|") == 10 for r in rows)
        # per store: our model once, the reference's loss with 1 and with every thread; always the policy itself
        assert len(compiled) == 2 * 3 and set(compiled) == {"ChunkPolicy"}, compiled
    else:
        assert "training steps compiled" not in body and not compiled


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA leaves alone")
def test_gpu_sections_without_a_gpu_leave_a_gpus_figures_in_place(tmp_path):
    from dpolicy.bench import drive as drive_bench
    from dpolicy.cli.bench import main

    out = tmp_path / "B.md"
    gpu = ("<!-- section:gpu-latency -->\nmeasured on a GPU\n<!-- /section:gpu-latency -->\n\n"
           "<!-- section:drive-throughput:cuda -->\nGPU rows\n<!-- /section:drive-throughput:cuda -->\n")
    out.write_text("# Benchmarks\n\n" + gpu)
    full = drive_bench.drive_throughput_section
    small = lambda log=print: full(log=log, n_scenes=4, cpu_sizes=(8,), repeats=1)  # noqa: E731
    import unittest.mock as mock

    with mock.patch.object(drive_bench, "drive_throughput_section", small):
        assert main(["--sections", "gpu-latency,drive-throughput", "--out", str(out)]) == 0
    text = out.read_text()
    assert gpu.strip() in text  # both GPU sections untouched
    assert "<!-- section:drive-throughput -->" in text and "| cpu | 8 |" in text  # the CPU's rows beside them


def test_bench_rejects_unknown_section(tmp_path):
    res = subprocess.run([sys.executable, "-m", "dpolicy.cli.bench", "--sections", "envs,nope", "--out", str(tmp_path / "B.md")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "nope" in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "B.md").exists()


@pytest.mark.parametrize("delays", ["1,2", "0,x", "0,-2"])
def test_bench_rejects_async_delays_without_a_reference_or_not_numbers(tmp_path, delays):
    res = subprocess.run([sys.executable, "-m", "dpolicy.cli.bench", "--sections", "async", "--async-delays", delays,
                          "--out", str(tmp_path / "B.md")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--async-delays" in res.stderr.strip().splitlines()[-1]
    assert "Traceback" not in res.stderr and not (tmp_path / "B.md").exists()


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


def test_async_section_reports_every_strategy_delay_and_reference(tmp_path):
    from dpolicy.bench.asynchronous import async_section

    ck = Path(__file__).resolve().parents[1] / "checkpoints" / "avoid_flow"
    body, cells = async_section(tmp_path, log=lambda m: None, checkpoints=[ck], episodes=2, select_episodes=2,
                                delays=(0, 4), plot_path=str(tmp_path / "delay.png"), rti_select_episodes=2)
    assert "| d = 0 | d = 4 |" in body and "synchronous chunked" in body and "synchronous RTI (K'=2)" in body
    # RTI's two-evaluation list, chosen among the RTI section's candidates, has its own reference row
    picked = cells["avoid_flow|rti-select|n2"]
    assert len(picked["scores"]) == 5 and picked["success_rate"] == max(picked["scores"].values())
    assert f"| synchronous RTI {picked['timesteps']} (selected) |" in body
    for strat in ("naive", "ensemble", "bid", "rtc ("):
        assert f"| {strat}" in body
    assert (tmp_path / "delay.png").stat().st_size > 0
    assert len([k for k in cells if "|select|" in k]) == 5  # three whole-overlap settings, two short windows
    # selection cells on another episode count than the default are cells of their own
    assert all(k.endswith("|n2") for k in cells if "|select|" in k)
    assert "soft, beta 10, overlap 4" in body  # avoid_flow's Ta = 8: the window of Ta / 2
    again, _ = async_section(tmp_path, log=lambda m: (_ for _ in ()).throw(AssertionError(m)), checkpoints=[ck],
                             episodes=2, select_episodes=2, delays=(0, 4), plot_path=None, rti_select_episodes=2)
    assert again.rstrip() == body.split("![")[0].rstrip()  # every cell came from the saved results


def test_the_bench_command_repeats_the_sections_defaults():
    from dpolicy.bench import asynchronous, finetune
    from dpolicy.cli import bench

    assert bench.ASYNC_STRATEGIES == asynchronous.STRATEGIES and bench.ASYNC_DELAYS == asynchronous.DELAYS
    assert bench.ASYNC_SEED == asynchronous.SEED and bench.ASYNC_FORWARD_ROLLOUTS == asynchronous.FORWARD_ROLLOUTS
    assert bench.ASYNC_SELECT_EPISODES == asynchronous.SELECT_EPISODES
    assert bench.FINETUNE_METHODS == finetune.METHODS


def test_rtc_settings_choice_prefers_the_smoothest_of_the_nearly_best():
    from dpolicy.bench.asynchronous import choose

    cands = [(0.94, 0.18, "hard", {}), (0.91, 0.06, "window", {}), (0.80, 0.02, "strong", {}), (0.90, 0.09, "soft", {})]
    # one standard error of 0.94 on 100 episodes is 2.4 points: only the best is inside it
    assert choose(cands, 100)[2] == "hard"
    # on 25 episodes it is 4.7 points: 0.91 and 0.90 are tied with the best and the smoothest of them wins
    assert choose(cands, 25)[2] == "window"
    assert choose(cands, 100, tolerance=0.2)[2] == "strong"
    # every setting perfect: no error to speak of, the smoothest wins
    assert choose([(1.0, 0.05, "a", {}), (1.0, 0.01, "b", {}), (0.99, 0.0, "c", {})], 100)[2] == "b"


def test_async_section_adds_rows_planned_from_predicted_observations(tmp_path):
    from dpolicy.bench.asynchronous import async_section

    ck = Path(__file__).resolve().parents[1] / "checkpoints" / "push_flow"
    body, cells = async_section(tmp_path, log=lambda m: None, checkpoints=[ck], episodes=2, select_episodes=2,
                                delays=(0, 2), strategies=("naive", "rtc"), predict=True, horizon="half",
                                forward_demos=3, forward_steps=50, plot_path=None, rti_select_episodes=2)
    for row in ("| naive |", "| rtc (", "| naive + predicted obs |", "| rtc + predicted obs ("):
        assert row in body, row
    assert "ensemble" not in body and "bid" not in body
    assert "rtc + predicted obs at d = Ta/2 = 2" in body
    assert (tmp_path / "forward_push_flow_fm3d50s" / "forward.json").exists()
    assert "fitted for 50 steps on" in body
    pred = [v for k, v in cells.items() if "predicted" in k]
    assert pred and all(v["predicted"] and v["horizon"] == 2 for v in pred)  # max(Ta / 2, d) with Ta = 4
    # a cell planned from predictions names the forward model's recipe, so another model cannot reuse it
    assert all(k.endswith("|fm3d50s|n2" if "|select" in k else "|fm3d50s") for k in cells if "predicted" in k)
    # RTC's settings are chosen under the rows' own horizon, once from stale and once from predicted observations
    select = {k: v for k, v in cells.items() if "|select" in k}
    assert len(select) == 10 and all(v["horizon"] == 2 and k.split("|")[4] == "hhalf" for k, v in select.items())
    assert sum(v["predicted"] for v in select.values()) == 5


def test_forward_model_error_ignores_observations_that_do_not_change():
    from dpolicy.bench.asynchronous import worst_error

    # push's goal never moves: float noise in its held-out error must not read as a 1.7x error
    stats = {"val_rmse": [0.002, 0.001, 1.7e-9, 0.0], "val_delta_std": [0.01, 0.004, 0.0, 1e-12]}
    assert worst_error(stats) == pytest.approx(0.25)
    assert worst_error({"val_rmse": [1e-9], "val_delta_std": [0.0]}) == 0.0


def test_async_cells_written_by_another_run_are_kept(tmp_path):
    from dpolicy.bench.asynchronous import _add_cell

    store = tmp_path / "async_push_flow.json"
    _add_cell(store, "push_flow|naive|d0", {"success_rate": 0.9})
    # another bench process adds a cell to the same store after this one loaded it
    other = json.loads(store.read_text()) | {"push_flow|rtc|d2": {"success_rate": 0.8}}
    store.write_text(json.dumps(other))
    _add_cell(store, "push_flow|naive|d2", {"success_rate": 0.7})
    assert set(json.loads(store.read_text())) == {"push_flow|naive|d0", "push_flow|rtc|d2", "push_flow|naive|d2"}
    assert [p.name for p in tmp_path.iterdir()] == [store.name]  # no temporary file left behind
