"""Visuomotor policies on the task suite's camera tasks: behaviour cloning from pixels, RTI on pixels,
and where a decision's time goes (image encoder vs denoising).

``image_bc_section`` runs, per camera task, the exact ``dpolicy-train task=<task>_image process=<p>``
job on one shared set of scripted demos (collected once, the file reused by every process, as a user
would), and reports success with Wilson intervals, training time, the demos' image storage and the
memory the training windows take on the device. The avoid task also gets its route coverage (four
routes in the demos; a policy that collapses to one would show it). ``rti_rows`` compares RTI with two
network evaluations per decision against chunked 10-step execution on the trained image checkpoints
(the same seeded episodes) and ``encoder_share`` times the image encoder inside batch-1 decisions.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from dpolicy.bench.report import table

IMAGE_TASKS = ("push_image", "lift_image")


def _same(stamp: Path, overrides: list) -> bool:
    return stamp.exists() and json.loads(stamp.read_text()) == overrides


def _collect(task: str, cfg, path: Path, log) -> dict:
    from dpolicy.data.collect import collect_demos

    t0 = time.perf_counter()
    summary = collect_demos(task, cfg.task.n_demos, path, seed=cfg.seed, noise_std=cfg.task.demo_noise,
                            env_kwargs=cfg.task.env_kwargs, expert_kwargs=cfg.task.expert_kwargs,
                            keep_failures=cfg.task.keep_failures, progress=False)
    summary["collect_s"] = time.perf_counter() - t0
    log(f"[image] {task}: {summary['demos']} demos, {summary['steps']} steps in {summary['collect_s']:.0f} s")
    return summary


def _where(cfg) -> str:
    """The training device in words: the GPU's name, else the CPU's core count."""
    from dpolicy.bench.report import usable_cores
    from dpolicy.utils import resolve_device

    dev = resolve_device(cfg.device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{usable_cores()}-core CPU"


def _setup(cfg, episodes: int) -> str:
    """What the section's policies see and are made of, read from the configuration they were trained with."""
    v, net = cfg.policy.vision, cfg.policy.net
    if v.encoder == "resnet18":
        enc = ("Diffusion Policy's ResNet-18 (`policy.vision.encoder=resnet18`: GroupNorm, spatial-softmax keypoints "
               f"instead of global pooling, {'randomly initialised' if v.pretrained is None else 'weights from ' + str(v.pretrained)})")
    else:
        enc = "the CPU default (`policy.vision.encoder=conv`, spatial-softmax keypoints)"
    cams = "one backbone shared by the cameras" if v.share else "one per camera"
    dims = f" ({', '.join(map(str, net.down_dims))} channels)" if net.type == "unet" else ""
    crop = (f"random {v.crop} x {v.crop} crops while training, the centre crop at evaluation" if v.crop
            else "no crop")
    return (f"Observations: 84 x 84 RGB from a fixed third-person camera (`agentview_image`; lift adds the wrist "
            f"camera `robot0_eye_in_hand_image`) plus proprioception only, no object state. Encoder: {enc}, {cams}, "
            f"trained end to end with the denoiser ({net.type}{dims}; {cfg.policy.process.type}, "
            f"{cfg.policy.process.steps} sampling steps) and its EMA; {crop}; batch {cfg.train.batch_size}, "
            f"lr {cfg.train.lr:g}. The demos of a task are collected once and every process trains on that file. "
            f"Success over {episodes} seeded episodes of the EMA policy.\n\n")


def image_bc_section(work, tasks=IMAGE_TASKS, processes=("diffusion", "flow"), episodes: int = 200,
                     ship: Path | None = None, extra: list[str] | None = None, log=print) -> tuple[str, dict]:
    """Collect once per task, train and evaluate each process on it; success, CI, time, image memory."""
    from dpolicy.bench.suite import _ship, compose_run
    from dpolicy.train.bc import train_bc

    work = Path(work)
    rows, mode_rows, results = [], [], {}
    for task in tasks:
        task_dir = work / task
        # a rerun with the same settings reuses the demos and resumes each training run from its checkpoints
        # (exactly, as dpolicy-train does), so an interrupted section only redoes what it had not finished
        demos = task_dir / "demos.hdf5"
        collect_over = [f"task={task}", *(extra or [])]
        if not _same(task_dir / "collect.json", collect_over) or not demos.exists():
            if task_dir.exists():
                shutil.rmtree(task_dir)
            task_dir.mkdir(parents=True)
            summary = _collect(task, compose_run(collect_over), demos, log)
            (task_dir / "collect_summary.json").write_text(json.dumps(summary, indent=2))
            (task_dir / "collect.json").write_text(json.dumps(collect_over))
        summary = json.loads((task_dir / "collect_summary.json").read_text())
        for proc in processes:
            overrides = [f"task={task}", f"process={proc}", f"eval.episodes={episodes}", *(extra or [])]
            cfg = compose_run(overrides + ["train.progress=false", f"data.path={demos}", "eval.video_episodes=1"])
            run_dir = task_dir / proc
            if not _same(run_dir / "overrides.json", overrides) and run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "overrides.json").write_text(json.dumps(overrides))
            t0 = time.perf_counter()
            m = train_bc(cfg, run_dir, progress=False)
            m["wall_s"] = time.perf_counter() - t0
            m["command"] = "dpolicy-train " + " ".join(overrides)
            from dpolicy.policy import load_policy

            pol = load_policy(run_dir / "checkpoints")
            frame = int(sum(np.prod(s) for s in pol.image_shapes.values()))
            m["image_bytes_per_frame"] = frame
            m["image_windows_mb"] = frame * summary["steps"] / 2**20
            m["encoder_params"] = sum(p.numel() for p in pol.encoder.parameters())
            m["collect"] = summary
            results[f"{task}_{proc}"] = m
            lo, hi = m["success_ci95"]
            log(f"[image] {task}/{proc}: success {m['success_rate']:.3f} [{lo:.3f}, {hi:.3f}], train {m.get('train_time_total_s', m['train_time_s']):.0f} s")
            rows.append([task, proc, m["demos"], ", ".join(pol.image_shapes), f"{m['success_rate']:.3f}", f"[{lo:.3f}, {hi:.3f}]",
                         f"{m.get('train_time_total_s', m['train_time_s']) / 60:.1f}", m["train_steps"], f"{m['params']:,} ({m['encoder_params']:,})",
                         f"{frame:,} B / {m['image_windows_mb']:.0f} MB"])
            if task.startswith("avoid"):
                mode_rows.append((proc, m["eval"].get("mode_counts") or {}, summary.get("mode_frequencies", {}), m["success_rate"]))
            if m.get("video"):
                tag = "" if cfg.policy.vision.encoder == "conv" else f"_{cfg.policy.vision.encoder}"
                dest = Path("docs/img") / f"{task}_{proc}{tag}.mp4"
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(m["video"], dest)
                m["video_shipped"] = str(dest)
            if ship is not None:
                _ship(run_dir, ship / f"{task}_{proc}", m)
        (task_dir / "summary.json").write_text(json.dumps({k: v for k, v in results.items() if k.startswith(task)},
                                                          indent=2, default=str))
    body = f"## Visuomotor behaviour cloning: policies that see the task through cameras ({_where(cfg)})\n\n" + _setup(cfg, episodes)
    body += table(["task", "process", "demos", "cameras", f"success ({episodes} ep.)", "95% CI (Wilson)", "train min",
                   "steps", "parameters (encoder)", "images per frame / on device"], rows)
    if mode_rows:
        from dpolicy.eval.stats import mode_frequencies

        mrows = []
        for proc, counts, demo, succ in mode_rows:
            freq = mode_frequencies({int(k): v for k, v in counts.items()}) if counts else {}
            mrows.append([proc, f"{succ:.3f}", ", ".join(f"{k}: {v:.2f}" for k, v in sorted(freq.items())) or "none",
                          len([v for v in freq.values() if v > 0]),
                          ", ".join(f"{k}: {float(v):.2f}" for k, v in sorted(demo.items(), key=lambda kv: int(kv[0])))])
        body += "\n\n### Routes on avoid_image (four in the demos)\n\n"
        body += table(["process", "success", "route frequencies (rollouts)", "routes reproduced", "demos"], mrows)
    videos = [m["video_shipped"] for m in results.values() if m.get("video_shipped")]
    if videos:
        body += ("\n\nRollout videos (the scene, then what the policy saw: its camera images at the policy's own "
                 "resolution): " + ", ".join(f"[{Path(v).stem}]({v})" for v in videos) + ".")
    return body, results


def encoder_share(policy, decisions: int = 200, k: int = 2, seed: int = 0, threads: int = 1) -> dict:
    """Batch-1 decision latency of an image policy under the RTI controller and the chunked controller, and the
    part of it spent in the image encoder (timed by hooks around the encoder's forward)."""
    from dpolicy.bench.latency import torch_threads
    from dpolicy.deploy import Controller

    rng = np.random.default_rng(seed)
    spec = policy.spec
    shapes = policy.obs_shapes
    obs = [{k_: (rng.integers(0, 256, s, dtype=np.uint8) if k_ in spec.image_shapes else rng.normal(size=s).astype(np.float32))
            for k_, s in shapes.items()} for _ in range(16)]
    out = {}
    with torch_threads(threads):
        for label, kw in (("RTI K'=2", dict(mode="rti", k=k)), ("chunked 10 steps", dict(mode="chunked", steps=10))):
            c = Controller(policy, seed=seed, **kw)
            enc: list[float] = []
            start = []
            h1 = policy.encoder.register_forward_pre_hook(lambda *a: start.append(time.perf_counter()))
            h2 = policy.encoder.register_forward_hook(lambda *a: enc.append(time.perf_counter() - start[-1]))
            try:
                c.reset(seed=seed)
                for o in obs[:4]:  # warm-up
                    c.step(o)
                total, encs = [], []
                for i in range(decisions):
                    n = len(enc)
                    t0 = time.perf_counter()
                    c.step(obs[i % len(obs)])
                    dt = time.perf_counter() - t0
                    if len(enc) > n:  # a step that made a decision (chunked execution replans every Ta steps)
                        total.append(dt)
                        encs.append(sum(enc[n:]))
            finally:
                h1.remove()
                h2.remove()
            out[label] = {"decision_p50_ms": 1e3 * statistics.median(total),
                          "decision_p99_ms": 1e3 * float(np.percentile(total, 99)),
                          "encoder_p50_ms": 1e3 * statistics.median(encs),
                          "encoder_share": statistics.median(e / t for e, t in zip(encs, total)),
                          "decisions": len(total), "nfe_per_decision": c.total_evals / max(c.decisions, 1)}
    return out


def image_rti_section(checkpoints, episodes: int = 200, n_envs: int = 10, select_episodes: int = 50,
                      log=print) -> tuple[str, dict]:
    """RTI with two evaluations per decision vs chunked 10-step execution on image checkpoints: K'=2 and the
    two-evaluation timestep list chosen on selection seeds (as the state section does), with the encoder's share
    of a decision's latency."""
    from dpolicy.bench.latency import SPACED, checkpoint_label, rti_success_section
    from dpolicy.policy import load_policy

    two = tuple(c for c in SPACED if len(c) == 2)
    body, res = rti_success_section(checkpoints, episodes=episodes, n_envs=n_envs, ks=(2,), candidates=two,
                                    select_episodes=select_episodes, latency_episodes=2, log=log)
    body = body.replace("## Deployment: RTI warm-started control vs chunked execution",
                        "## Deployment from pixels: RTI warm-started control vs chunked execution")
    rows = []
    for ckpt in checkpoints:
        pol = load_policy(ckpt, "cpu")
        share = encoder_share(pol)
        res[checkpoint_label(ckpt)]["encoder"] = share
        for label, s in share.items():
            rows.append([checkpoint_label(ckpt), label, f"{s['nfe_per_decision']:.2f}", f"{s['decision_p50_ms']:.2f}",
                         f"{s['decision_p99_ms']:.2f}", f"{s['encoder_p50_ms']:.2f}", f"{100 * s['encoder_share']:.0f}%"])
            log(f"[image-rti] {checkpoint_label(ckpt)} {label}: decision p50 {s['decision_p50_ms']:.2f} ms, "
                f"encoder {s['encoder_p50_ms']:.2f} ms")
    body += ("\n\n### Where a decision's time goes (batch 1, one CPU thread, 200 decisions on recorded-size inputs)\n\n"
             "The encoder runs once per decision (both cameras), before the denoising steps; its share is the median "
             "over decisions of encoder time / decision time.\n\n")
    body += table(["checkpoint", "controller", "NFE / control step", "decision p50 ms", "decision p99 ms", "encoder p50 ms",
                   "encoder share"], rows)
    return body, res
