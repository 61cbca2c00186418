"""The measured claims: task-suite speed and experts, behaviour cloning per task and process,
the multimodal comparison, and training throughput. Each function returns a markdown body."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from dpolicy.bench.report import table, usable_cores

TASKS = ("avoid", "push", "lift")
IMAGE_TASKS = {"avoid": "avoid_image", "push": "push_image", "lift": "lift_image"}  # state task -> its camera variant


def compose_run(overrides: list[str]):
    """The exact RunConfig ``dpolicy-train <overrides>`` would use."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from dpolicy.cli.common import CONFIG_DIR
    from dpolicy.config import RunConfig, from_dict

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    d = OmegaConf.to_container(cfg, resolve=False)
    d.pop("hydra", None)
    return from_dict(RunConfig, OmegaConf.to_container(OmegaConf.create(d), resolve=True))


def envs_section(episodes: int = 1000, steps: int = 20000, log=print) -> str:
    from dpolicy_envs import TASKS as ENV_TASKS
    from dpolicy_envs import benchmark as eb

    rows, adv_rows, modes, image_rows = [], [], {}, []
    for name in TASKS:
        sps = eb.steps_per_second(name, n_steps=steps)
        # camera rendering is ~100x slower than physics: a few hundred steps keep this to seconds per task
        image = IMAGE_TASKS[name]
        isps = eb.steps_per_second(image, n_steps=max(steps // 40, 50))
        rps = eb.renders_per_second(image, n_renders=max(steps // 80, 25))
        cams = [k for k in ENV_TASKS[image].obs_keys if k.endswith("_image")]
        log(f"[envs] {image}: {isps:.0f} steps/s, {rps:.0f} renders/s")
        image_rows.append([image, ", ".join(f"`{c}`" for c in cams), f"{sps:,.0f}", f"{isps:,.0f}", f"{rps:,.0f}"])
        st = eb.expert_stats(name, n_episodes=episodes)
        adv = eb.adversarial_check(name, n_sequences=24)
        log(f"[envs] {name}: {sps:.0f} steps/s, expert success {st['success_rate']:.3f}")
        rows.append([name, f"{sps:,.0f}", f"{st['success_rate']:.3f}", f"{st['mean_length']:.1f}", episodes])
        adv_rows.append([name, adv["sequences"], adv["steps"], adv["exceptions"], adv["nonfinite_obs"],
                         adv["unstable_ended"], adv["unstable_not_ended"]])
        if "mode_frequencies" in st:
            modes[name] = st["mode_frequencies"]
    body = "## Task suite: speed, experts, robustness\n\n"
    body += table(["task", "env steps/s (1 core, random actions)", "expert success", "mean episode length", "episodes"], rows)
    for name, freq in modes.items():
        body += f"\n\nExpert mode frequencies on `{name}` (uniform mix requested): " + ", ".join(
            f"mode {k}: {v:.3f}" for k, v in sorted(freq.items(), key=lambda kv: int(kv[0])))
    body += ("\n\nImage observations (84 x 84 RGB per camera plus proprioception; MuJoCo offscreen rendering, "
             f"MUJOCO_GL={os.environ.get('MUJOCO_GL', '')}; renders/s counts camera images, without physics):\n\n")
    body += table(["image task", "cameras", "state task steps/s", "image task steps/s", "renders/s"], image_rows)
    body += "\n\nAdversarial actions (±1e6, NaN, ±inf, bang-bang, mixed):\n\n"
    body += table(["task", "sequences", "steps", "uncaught exceptions", "non-finite observations",
                   "unstable steps flagged and ended", "unstable but not ended"], adv_rows)
    return body


def bc_section(work: Path, tasks=TASKS, processes=("diffusion", "flow"), episodes: int = 200, ship: Path | None = None,
               extra: list[str] | None = None, log=print) -> tuple[str, dict]:
    """Train and evaluate every (task, process); the multimodal task also gets the MSE baseline."""
    from dpolicy.train.bc import train_bc

    results = {}
    rows = []
    mode_rows = []
    for task in tasks:
        procs = list(processes) + (["regression"] if task == "avoid" else [])
        for proc in procs:
            # evaluations during training (every 1,000 steps, 50 episodes) give the time to 90% success
            overrides = [f"task={task}", f"process={proc}", f"eval.episodes={episodes}", "eval.video=false", "eval.every=1000",
                         "eval.episodes_during=50", "train.progress=false", *(extra or [])]
            cfg = compose_run(overrides)
            run_dir = work / f"{task}_{proc}"
            if run_dir.exists():
                shutil.rmtree(run_dir)
            t0 = time.perf_counter()
            m = train_bc(cfg, run_dir, progress=False)
            m["wall_s"] = time.perf_counter() - t0
            m["command"] = "dpolicy-train " + " ".join(o for o in overrides if not o.startswith(("eval.video", "eval.every", "train.progress")))
            results[f"{task}_{proc}"] = m
            lo, hi = m["success_ci95"]
            log(f"[bc] {task}/{proc}: success {m['success_rate']:.3f} [{lo:.3f}, {hi:.3f}], train {m['train_time_s']:.0f}s")
            tts = m.get("time_to_success") or {}
            reach = (f"{tts['step']:,} / {tts['seconds_without_eval']:.0f} s" if tts.get("step") is not None else "not reached")
            rows.append([task, proc, m["demos"], f"{m['success_rate']:.3f}", f"[{lo:.3f}, {hi:.3f}]",
                         f"{m['train_time_s']:.0f}", m["train_steps"], reach, f"{m['params']:,}"])
            modes = m["eval"].get("mode_counts") or {}
            if task == "avoid":
                summary = json.loads((run_dir / "collect_summary.json").read_text())
                mode_rows.append((proc, modes, summary.get("mode_frequencies", {}), m["success_rate"]))
            if ship is not None and proc != "regression":
                _ship(run_dir, ship / f"{task}_{proc}", m)
    body = "## Behaviour cloning on the task suite (100 expert demos per task, 2-core CPU)\n\n"
    body += table(["task", "process", "demos", f"success ({episodes} episodes)", "95% CI (Wilson)", "train time (s)", "steps",
                   "first >= 90% (step / train s)", "parameters"], rows)
    body += ("\n\nTime to 90%: the first evaluation during training (every 1,000 steps, 50 episodes each) with success "
             ">= 0.9, as the step and the training seconds up to it (evaluation time excluded); a 50-episode estimate, "
             "so a noisy lower bound on what a recipe needs.")
    if mode_rows:
        body += "\n\n### Multimodal task: mode frequencies of successful rollouts vs the demos\n\n"
        from dpolicy.eval.stats import mode_frequencies, total_variation

        demo = mode_rows[0][2]
        body += "Demos: " + ", ".join(f"mode {k}: {float(v):.3f}" for k, v in sorted(demo.items(), key=lambda kv: int(kv[0]))) + "\n\n"
        mrows = []
        for proc, counts, demo_freq, succ in mode_rows:
            freq = mode_frequencies({int(k): v for k, v in counts.items()}) if counts else {}
            tv = total_variation(freq, {int(k): float(v) for k, v in demo_freq.items()}) if freq else float("nan")
            mrows.append([proc, f"{succ:.3f}", ", ".join(f"{k}: {v:.2f}" for k, v in sorted(freq.items())) or "none",
                          len([v for v in freq.values() if v > 0]), f"{tv:.3f}"])
        body += table(["policy", "success", "mode frequencies (rollouts)", "modes reproduced", "total variation vs demos"], mrows)
    return body, results


def _ship(run_dir: Path, dest: Path, m: dict) -> None:
    from dpolicy.policy.checkpoint import resolve_checkpoint

    src = resolve_checkpoint(run_dir / "checkpoints")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest)
    manifest_path = dest.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest[dest.name] = {"success_rate": m["success_rate"], "success_ci95": m["success_ci95"],
                           "episodes": m["eval"]["n_episodes"], "train_time_s": round(m["train_time_s"], 1),
                           "train_steps": m["train_steps"], "params": m["params"], "command": m["command"],
                           "process": m["process"], "net": m["net"], "demos": m["demos"]}
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def task_windows(task: str, nets, device):
    """For each network config: ``(net, cfg, data, make)`` over 100 fresh expert demos of ``task``
    (a temporary file), where ``make()`` builds the untrained policy with a fixed seed."""
    import tempfile

    import torch

    from dpolicy.data.collect import collect_demos
    from dpolicy.data.robomimic import read_dataset
    from dpolicy.data.windows import WindowDataset
    from dpolicy.train.bc import build_policy

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "demos.hdf5"
        collect_demos(task, 100, path, progress=False)
        for net in nets:
            cfg = compose_run([f"task={task}", f"net={net}"])
            demos = read_dataset(path, cfg.task.obs_keys or None)
            data = WindowDataset(demos, cfg.task.obs_keys or list(demos[0].obs), cfg.policy.To, cfg.policy.Tp, device=device)

            def make(cfg=cfg, data=data):
                torch.manual_seed(0)
                return build_policy(cfg.policy, data)
            yield net, cfg, data, make


def throughput_section(task: str = "avoid", batch_size: int = 256, steps: int = 100, repeats: int = 3,
                       nets=("mlp", "unet"), log=print) -> str:
    from dpolicy.bench.throughput import compare
    from dpolicy.utils import resolve_device

    device = resolve_device("auto")
    rows = []
    for net, cfg, data, make in task_windows(task, nets, device):
        n_steps = steps if net == "mlp" or device.type == "cuda" else max(steps // 5, 10)
        r = compare(make, data, batch_size, n_steps, repeats, compile=device.type == "cuda")
        log(f"[throughput] {net}: ours {r['ours_samples_per_s']:.0f}/s, reference {r['reference_samples_per_s']:.0f}/s, ratio {r['ratio']:.2f}")
        params = sum(p.numel() for p in make().parameters())
        rows.append([net, f"{params:,}", batch_size, n_steps, f"{r['reference_samples_per_s']:,.0f}",
                     f"{r['ours_samples_per_s']:,.0f}", f"{r['ratio']:.2f}x"])
    body = f"## Training throughput: our loop vs a Chi et al.-style DataLoader loop ({device.type})\n\n"
    body += ("Same network, batch size, optimizer and EMA; the reference builds windows per sample in a `Dataset`, "
             "collates with a `DataLoader` (num_workers=1, as in Diffusion Policy's low-dim configs) and copies each batch "
             f"to the device in fp32. Medians of {repeats} alternating repeats in one process.\n\n")
    body += table(["network", "parameters", "batch", "timed steps", "reference samples/s", "ours samples/s", "ratio"], rows)
    return body


def image_throughput_section(batch_sizes=(64, 256), steps: int = 15, repeats: int = 5, n_demos: int = 50, length: int = 100,
                             log=print, all_cores: bool = True, codecs=("zlib", "jpeg2k"), compiled: bool = True) -> str:
    """``throughput_section`` for a policy that reads two 84x84 cameras, on synthetic lift_image-shaped demos, against
    the reference with each frame store of ``codecs``. On a CPU with more than one core (``all_cores``) the loops are
    also timed using the whole machine, eager and (``compiled``) with both training steps compiled."""
    import torch

    from dpolicy.bench.throughput import (CAMERAS, PROPRIO, ImageHostWindows, compare_images, host_batch_rate, image_memory,
                                          synthetic_image_demos)
    from dpolicy.config import PolicyConfig
    from dpolicy.data.windows import WindowDataset
    from dpolicy.train.bc import build_policy
    from dpolicy.utils import resolve_device

    device = resolve_device("auto")
    cfg = PolicyConfig(To=2, Tp=16)
    data = WindowDataset(synthetic_image_demos(n_demos, length), list(PROPRIO) + list(CAMERAS), cfg.To, cfg.Tp, device=device)

    def make():
        torch.manual_seed(0)
        return build_policy(cfg, data)

    policy = make()
    mem = image_memory(data)
    cores = usable_cores()
    # on a GPU: more steps per timing (a step is short), fewer repeats, and the reference's loader gets Diffusion
    # Policy's own worker count for image training (8), as it would on such a machine
    n_steps = steps if device.type == "cpu" else 4 * steps
    repeats = repeats if device.type == "cpu" else min(repeats, 3)
    workers = 1 if device.type == "cpu" else max(1, min(8, cores - 2))
    rows, core_rows, compiled_rows, waits, stores = [], [], [], [], {}
    for codec in codecs:
        t0 = time.perf_counter()
        windows = ImageHostWindows(data, codec=codec)
        stores[codec] = windows
        log(f"[image-throughput] {codec}: {windows.compressed_bytes_per_frame:,.0f} bytes per step compressed, "
            f"encoded in {time.perf_counter() - t0:.0f} s")
        for batch_size in batch_sizes:
            r = compare_images(make, data, batch_size, n_steps, repeats, windows=windows, workers=workers)
            ceiling = host_batch_rate(windows, batch_size)
            log(f"[image-throughput] {codec}, batch {batch_size}: ours {r['ours_samples_per_s']:.0f}/s, reference "
                f"{r['reference_samples_per_s']:.0f}/s, ratio {r['ratio']:.2f}, reference waits {r['reference_wait_share']:.0%}, "
                f"its loader alone {ceiling:.0f}/s")
            waits.append(r["reference_wait_share"])
            rows.append([codec, batch_size, n_steps, f"{r['reference_samples_per_s']:,.0f}", f"{r['ours_samples_per_s']:,.0f}",
                         f"{r['ratio']:.2f}x", f"{r['reference_wait_share']:.0%}", f"{1 - r['reference_wait_share']:.0%}",
                         f"{ceiling:,.0f}"])
        # the same machine used as each loop can use it: ours has no loader process, so its step may take every core;
        # the reference's step shares the machine with its loader worker (timed with one thread and with every core)
        if device.type == "cpu" and cores > 1 and all_cores:
            for batch_size in batch_sizes:
                r = compare_images(make, data, batch_size, n_steps, repeats, windows=windows, threads=cores,
                                   reference_threads=(1, cores))
                by = r["reference_by_threads"]
                log(f"[image-throughput] {codec}, every core, batch {batch_size}: ours {r['ours_samples_per_s']:.0f}/s, "
                    f"reference {by[1]:.0f}/s (1 thread) / {by[cores]:.0f}/s ({cores} threads), ratio {r['ratio']:.2f}")
                core_rows.append([codec, batch_size, f"{r['ours_samples_per_s']:,.0f}", f"{by[1]:,.0f}", f"{by[cores]:,.0f}",
                                  f"{r['ratio']:.2f}x", f"{r['reference_wait_share']:.0%}"])
                if compiled:
                    # both steps compiled: the network is faster in both loops, so what is left of the reference's
                    # time is its input pipeline; the ratio is against the fastest reference, compiled or not
                    c = compare_images(make, data, batch_size, n_steps, repeats, windows=windows, threads=cores,
                                       reference_threads=(1, cores), compile=True)
                    cby = c["reference_by_threads"]
                    fastest = max(c["reference_samples_per_s"], r["reference_samples_per_s"])
                    log(f"[image-throughput] {codec}, every core, compiled, batch {batch_size}: ours "
                        f"{c['ours_samples_per_s']:.0f}/s, reference {cby[1]:.0f}/s (1 thread) / {cby[cores]:.0f}/s "
                        f"({cores} threads), ratio {c['ours_samples_per_s'] / fastest:.2f} against the fastest reference")
                    compiled_rows.append([codec, batch_size, f"{c['ours_samples_per_s']:,.0f}", f"{cby[1]:,.0f}",
                                          f"{cby[cores]:,.0f}", f"{c['reference_wait_share']:.0%}", f"{fastest:,.0f}",
                                          f"{c['ours_samples_per_s'] / fastest:.2f}x",
                                          f"{c['ours_samples_per_s'] / r['ours_samples_per_s']:.2f}x"])
    h, w, c = data.image_shapes[CAMERAS[0]]
    crop = cfg.vision.crop
    body = f"## Training throughput with cameras: our loop vs a Chi et al.-style DataLoader loop ({device.type})\n\n"
    body += (f"{n_demos} synthetic demos x {length} steps shaped like lift_image: cameras {', '.join(f'`{k}`' for k in CAMERAS)} "
             f"({h}x{w}x{c} uint8) and a {sum(PROPRIO.values())}-D proprio vector; To={cfg.To}, Tp={cfg.Tp}. Frames are a "
             f"colour ramp with a moving block and a sparse dither, so they compress where uniform noise would be "
             f"stored raw and decode at copy speed. Policy: {policy.encoder.describe()}, {cfg.net.type} denoiser, "
             f"{sum(p.numel() for p in policy.parameters()):,} parameters in all; the same network, batch size, "
             f"optimizer and EMA in both loops.\n\n"
             f"Reference (Diffusion Policy / robomimic style): every frame is held compressed on its own, read from "
             f"memory (no file or HDF5 cost); a `Dataset.__getitem__` decodes the window's frames and converts them to "
             f"float32; a `DataLoader` (shuffle, num_workers={workers}, persistent workers) collates and each batch is copied to "
             f"the device, where the same policy's encoder crops each frame {h} -> {crop} at a random place (as "
             f"robomimic's `CropRandomizer` does inside Diffusion Policy's model). Frame stores: "
             + "; ".join(f"`{k}`: {v.codec.description}" for k, v in stores.items())
             + f". Ours: the `Trainer` step on a `WindowDataset` with the uint8 frames resident on the device, "
             f"cropped {h} -> {crop} inside the encoder. Medians of {repeats} alternating repeats in one process; the "
             f"loader wait is the time the training loop spends blocked on the next batch, the rest is copy and "
             f"training step. The last column is the rate at which one process builds and collates the reference's "
             f"batches with no training: " + ("the most its one-worker loop can reach" if workers == 1 else
                                               f"with {workers} workers its loop can reach about {workers} times that, "
                                               f"where the cores allow") + ".\n\n")
    body += table(["reference frame store", "batch", "timed steps", "reference samples/s", "ours samples/s", "ratio",
                   "reference: waiting for loader", "reference: copy + step", "reference loader alone (samples/s)"], rows)
    lo, hi = min(waits), max(waits)
    span = f"{lo:.0%}" if f"{lo:.0%}" == f"{hi:.0%}" else f"{lo:.0%}-{hi:.0%}"
    if hi < 0.25:
        body += (f"\n\nOn this {device.type} the training step, not the loader, sets the pace with every frame store: the "
                 f"reference waits for its loader {span} of the time, its worker building batches on another core while "
                 f"the step runs. A step faster than the loader-alone rate would leave the reference input-bound at "
                 f"that rate; ours has no per-sample host stage.")
    else:
        body += (f"\n\nThe reference waits for its loader {span} of the time on this {device.type} (by frame store and "
                 f"batch, in the table): where that share is large it is input-bound and trains at most at the "
                 f"loader-alone rate; ours has no per-sample host stage.")
    if core_rows:
        body += (f"\n\nThe same loops using the whole machine ({cores} cores) as each can: ours with {cores} torch threads "
                 f"(it has no loader process); the reference's training process with 1 and with {cores} threads beside "
                 f"its loader worker, the faster counted. Medians of {repeats} alternating repeats.\n\n")
        body += table(["reference frame store", "batch", f"ours samples/s ({cores} threads)",
                       "reference samples/s (1 thread + worker)", f"reference samples/s ({cores} threads + worker)",
                       "ratio (vs the faster reference)", "reference: waiting for loader"], core_rows)
    if compiled_rows:
        body += (f"\n\nBoth loops again using the whole machine, with their training steps compiled (`torch.compile`, "
                 f"inductor; our `Trainer` with `train.compile=true`, the reference's loss function likewise; compilation "
                 f"happens in the warm-up steps, outside the clock). The network is then faster in both loops, so what "
                 f"remains of the reference's time is its input pipeline. The ratio is against the fastest reference of "
                 f"the four timings (1 or {cores} threads, eager or compiled). Medians of {repeats} alternating repeats.\n\n")
        body += table(["reference frame store", "batch", f"ours samples/s ({cores} threads, compiled)",
                       "reference samples/s (1 thread + worker, compiled)",
                       f"reference samples/s ({cores} threads + worker, compiled)",
                       "reference (compiled): waiting for loader", "fastest reference samples/s (eager or compiled)",
                       "ratio (vs the fastest reference)", "ours compiled / ours eager"], compiled_rows)
    body += (f"\n\nImage bytes per step (both cameras): {mem['bytes_per_frame']:,} as uint8, "
             + ", ".join(f"{v.compressed_bytes_per_frame:,.0f} in the `{k}` store" for k, v in stores.items())
             + f", {4 * mem['bytes_per_frame']:,} as float32. Resident image windows of ours on the {device.type}: "
             f"{mem['resident_uint8'] / 2**20:,.0f} MiB uint8 for {len(data):,} steps; as float32 they would take "
             f"{mem['as_float32'] / 2**20:,.0f} MiB.")
    return body
