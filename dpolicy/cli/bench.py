"""``dpolicy-bench``: run the measured claims and write them into BENCHMARKS.md.

Sections (each rewrites its own part of BENCHMARKS.md):

  envs        task-suite speed (with camera rendering for the image tasks), experts, adversarial actions
  throughput  our training loop vs a Chi et al.-style DataLoader loop
  image-throughput
              the same for a policy that reads two 84x84 cameras (synthetic lift_image-shaped demos)
  bc          behaviour-cloning success per task and process, the multimodal comparison
              (``--ship`` refreshes checkpoints/ and its manifest)
  steer       DSRL (NA, SAC, stochastic-sampler ablation) from weak bases, several seeds
  headroom    how much the noise decides success for each DSRL weak base (the room steering has)
  rti         warm-started RTI control vs chunked execution: success per K' and latency (shipped checkpoints)
  latency     batch-1 CPU latency: RTI vs DDIM-10, DDPM-100 and a diffusers scheduler loop
  compose     test-time composition (GPC): mixtures vs their best parent, weights searched on held-out seeds
  drive       driving planning benchmark: PDMS-like expert, masked-token planner + GSPO/GRPO, anchor diffusion
  robosuite   robosuite Lift/Can from scripted demos (optional extra)
  pusht       gym-pusht PushT evaluation (optional extra)
  peers       our diffusion policy vs a diffusers-scheduler loop: inference latency and training throughput
  finetune    RL on the denoising chain (PPO, GRPO, GSPO, AWM) from DSRL's weak bases, several seeds
  async       asynchronous execution under inference delay: success vs delay per strategy (naive, ensemble,
              bid, rtc) on the shipped flow checkpoints of --tasks, switch discontinuity, a plot
  rollouts    evaluation on worker processes and Ray actors: throughput per worker count, the same results
              under every backend, a worker killed mid-evaluation, the costs to size a cluster with

--backend/--workers place every rollout of the other sections (evaluations, DSRL's envs) on that backend.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shlex
import sys
import time
from pathlib import Path


ASYNC_STRATEGIES = ("naive", "ensemble", "bid", "rtc")
# the async section's defaults (dpolicy.bench.asynchronous)
ASYNC_DELAYS, ASYNC_SEED, ASYNC_FORWARD_ROLLOUTS, ASYNC_SELECT_EPISODES = (0, 1, 2, 4, 6), 100000, 0, 100
# the finetune section's methods (dpolicy.bench.finetune.METHODS)
FINETUNE_METHODS = ("ppo", "grpo", "gspo", "awm", "awm-exp", "filtered", "grpo-branch", "grpo-restart")
SECTIONS = ("envs", "throughput", "image-throughput", "bc", "image", "image-rti", "steer", "headroom", "rti", "latency", "gpu-latency", "compose",
            "drive", "drive-throughput", "robosuite", "pusht", "peers", "reliability", "rollouts", "async", "finetune")


def _count(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def _names(option: str, text: str, valid) -> list[str]:
    from dpolicy.errors import ConfigError

    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in valid]
    if bad or not names:
        what = f"has unknown name(s) {bad}" if bad else "names nothing"
        raise ConfigError(f"{option}={text!r} {what}; choose from {', '.join(valid)}.")
    return names


def _delays(text: str) -> tuple[int, ...]:
    """``--async-delays``: comma-separated whole numbers of control steps, 0 among them (the reference)."""
    from dpolicy.errors import ConfigError

    try:
        ds = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--async-delays={text!r} must be comma-separated whole numbers of control steps, e.g. 0,2.") from None
    if 0 not in ds or min(ds) < 0:
        raise ConfigError(f"--async-delays={text!r} must include 0 (each strategy's reference) and no negative delay.")
    return tuple(sorted(set(ds)))


def _async_checkpoints(args) -> dict:
    """The async section's checkpoint per task (tasks without one are left out; none at all is an error)."""
    from dpolicy.errors import ConfigError

    ckpt = {t: Path("checkpoints") / args.async_checkpoint.replace("{task}", t) for t in args.tasks.split(",")}
    found = {t: c for t, c in ckpt.items() if c.exists()}
    if not found:
        raise ConfigError(f"--async-checkpoint={args.async_checkpoint!r}: no such checkpoint in checkpoints/ for the "
                          f"tasks {args.tasks} ({', '.join(str(c) for c in ckpt.values())}).")
    return found


def check_args(args, sections: list[str]) -> None:
    """Everything dpolicy-bench is asked to run is checked before the first section starts: the task,
    process and steer-task names, and the extra overrides composed into each bc run's RunConfig."""
    from dpolicy.cli.common import CONFIG_DIR, compose, settings
    from dpolicy.config import RunConfig

    tasks = _names("--tasks", args.tasks, sorted(p.stem for p in (Path(CONFIG_DIR) / "task").glob("*.yaml")))
    procs = _names("--processes", args.processes, sorted(p.stem for p in (Path(CONFIG_DIR) / "process").glob("*.yaml")))
    if "steer" in sections:
        from dpolicy.bench.steer import WEAK_BASES

        _names("--steer-tasks", args.steer_tasks, list(WEAK_BASES))
        _names("--steer-algos", args.steer_algos, ["na", "sac"])
    if "async" in sections:
        _async_checkpoints(args)
        _delays(args.async_delays)
        _names("--async-strategies", args.async_strategies, list(ASYNC_STRATEGIES))
        if args.async_forward_rollouts < 0:
            from dpolicy.errors import ConfigError

            raise ConfigError(f"--async-forward-rollouts={args.async_forward_rollouts} must be 0 or more.")
    if "finetune" in sections:
        _names("--finetune-tasks", args.finetune_tasks, ["avoid", "push", "lift"])
        _names("--finetune-algos", args.finetune_algos, list(FINETUNE_METHODS))
    if "bc" in sections or args.overrides:
        runs = [[f"task={t}", f"process={p}"] for t in tasks for p in procs] if "bc" in sections else [[]]
        for over in runs:
            settings(RunConfig, compose("train", over + list(args.overrides)))


def main(argv=None) -> int:
    from dpolicy.cli.common import Parser
    from dpolicy.errors import DPolicyError

    ap = Parser(prog="dpolicy-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="envs,throughput,bc", help="comma-separated: " + ", ".join(SECTIONS))
    ap.add_argument("--tasks", default="avoid,push,lift", help="tasks for the bc section")
    ap.add_argument("--processes", default="diffusion,flow,edm", help="processes for the bc section")
    ap.add_argument("--episodes", type=_count, default=200, help="evaluation episodes per policy (bc)")
    ap.add_argument("--expert-episodes", type=_count, default=1000, help="expert episodes per task (envs)")
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--work", default="runs/bench", help="where bench runs are written")
    ap.add_argument("--steer-tasks", default="avoid,lift", help="tasks for the steer section")
    ap.add_argument("--seeds", type=_count, default=3, help="seeds per method (steer)")
    ap.add_argument("--steer-algos", default="na,sac", help="DSRL variants for the steer section: na, sac")
    ap.add_argument("--async-checkpoint", default="{task}_flow",
                    help="async section: the checkpoint of each task in checkpoints/, {task} replaced by its name "
                         "(e.g. {task}_flow_rtc, trained with committed prefixes)")
    ap.add_argument("--async-strategies", default=",".join(ASYNC_STRATEGIES), help="async section: strategies to run")
    ap.add_argument("--async-predict", action="store_true",
                    help="async section: also naive and rtc planning from forward-predicted observations")
    ap.add_argument("--async-seed", type=int, default=ASYNC_SEED,
                    help="async section: first evaluation seed (another value checks the figures on other episodes)")
    ap.add_argument("--async-delays", default=",".join(map(str, ASYNC_DELAYS)), help="async section: delays d in control steps")
    ap.add_argument("--async-forward-rollouts", type=int, default=ASYNC_FORWARD_ROLLOUTS,
                    help="async section: episodes of the policy itself added to the forward model's scripted demos")
    ap.add_argument("--async-select-episodes", type=_count, default=ASYNC_SELECT_EPISODES,
                    help="async section: selection episodes per RTC setting (more resolve finer success differences)")
    ap.add_argument("--async-horizon", choices=["Ta", "half"], default="Ta",
                    help="async section: a new inference every max(Ta, d) (Ta) or max(Ta / 2, d) (half) steps")
    ap.add_argument("--finetune-tasks", default="push", help="weak bases for the finetune section: avoid, push, lift")
    ap.add_argument("--finetune-algos", default="ppo,grpo,gspo,awm,filtered", help="methods for the finetune section: " + ", ".join(FINETUNE_METHODS))
    ap.add_argument("--ablation-seeds", type=int, default=1, help="seeds of the stochastic-sampler ablation (steer; 0: none)")
    ap.add_argument("--ship", action="store_true", help="copy the bc policies into checkpoints/ with a manifest")
    ap.add_argument("--backend", default="local", help="where the sections' rollouts run: local, subprocess, ray")
    ap.add_argument("--workers", type=_count, default=1, help="worker processes or Ray actors (--backend)")
    ap.add_argument("--address", default=None, help="ray: an existing cluster's address (default: a local one)")
    ap.add_argument("--placement", default="learner", help="evaluations: learner (policy here) or workers (a copy each)")
    ap.add_argument("overrides", nargs="*", help="extra hydra overrides for the bc runs, e.g. train.steps=500")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:  # a usage error (one line, from Parser) or --help
        return e.code
    from dpolicy.bench import suite
    from dpolicy.bench.report import write_section

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        print(f"error: unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}.", file=sys.stderr)
        return 2
    try:
        check_args(args, sections)
        from dpolicy.eval.backends import RolloutBackend, set_default_backend

        set_default_backend(RolloutBackend(args.backend, args.workers, args.address, placement=args.placement))
    except DPolicyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = "dpolicy-bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    work = Path(args.work)
    t0 = time.perf_counter()
    if "envs" in sections:
        write_section(args.out, "envs", suite.envs_section(args.expert_episodes, log=log), command)
    if "throughput" in sections:
        write_section(args.out, "throughput", suite.throughput_section(log=log), command)
    if "image-throughput" in sections:
        import torch

        key = "image-throughput" + (":cuda" if torch.cuda.is_available() else "")  # the CPU's figures stay beside a GPU's
        write_section(args.out, key, suite.image_throughput_section(log=log), command)
    if "bc" in sections:
        body, results = suite.bc_section(work, tasks=args.tasks.split(","), processes=args.processes.split(","),
                                         episodes=args.episodes, ship=Path("checkpoints") if args.ship else None,
                                         extra=args.overrides, log=log)
        work.mkdir(parents=True, exist_ok=True)
        (work / "bc_results.json").write_text(json.dumps(results, indent=2, default=str))
        write_section(args.out, "bc:" + ",".join(args.tasks.split(",")), body, command)
    if "image" in sections:
        from dpolicy.bench.image import image_bc_section

        tasks = [t for t in args.tasks.split(",") if t.endswith("_image")] or ["push_image", "lift_image"]
        body, results = image_bc_section(work / "image", tasks=tasks, processes=[p for p in args.processes.split(",") if p != "edm"]
                                         or ["diffusion"], episodes=args.episodes,
                                         ship=Path("checkpoints") if args.ship else None, extra=args.overrides, log=log)
        (work / "image_results.json").write_text(json.dumps(results, indent=2, default=str))
        encoder = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("policy.vision.encoder=")), "conv")
        write_section(args.out, "image:" + ",".join(tasks) + ("" if encoder == "conv" else f":{encoder}"), body, command)
    if "image-rti" in sections:
        from dpolicy.bench.image import image_rti_section

        ckpts = [Path("checkpoints") / f"{t}_{p}" for t in ("push_image", "lift_image") for p in ("diffusion", "flow")]
        body, res = image_rti_section([c for c in ckpts if c.exists()], episodes=args.episodes, log=log)
        work.mkdir(parents=True, exist_ok=True)
        (work / "image_rti_results.json").write_text(json.dumps(res, indent=2, default=str))
        write_section(args.out, "image-rti", body, command)
    shipped = [Path("checkpoints") / n for n in ("avoid_diffusion", "avoid_flow", "push_diffusion", "push_flow",
                                                  "lift_diffusion", "lift_flow")]
    if "steer" in sections:
        from dpolicy.bench.steer import steer_section

        tasks = args.steer_tasks.split(",")
        body, _ = steer_section(work / "steer", tasks=tasks, seeds=range(args.seeds), algos=args.steer_algos.split(","),
                                ablation_seeds=range(max(args.ablation_seeds, 0)),
                                figure=Path(f"docs/img/dsrl_{'_'.join(tasks)}.png"), log=log)
        write_section(args.out, "steer:" + ",".join(tasks), body, command)
    if "rti" in sections:
        from dpolicy.bench.latency import rti_success_section

        body, res = rti_success_section(shipped, episodes=args.episodes, plot_path="docs/img/rti_success_latency.png", log=log)
        work.mkdir(parents=True, exist_ok=True)
        (work / "rti_results.json").write_text(json.dumps(res, indent=2, default=str))
        write_section(args.out, "rti", body, command)
    if "gpu-latency" in sections:  # a machine without CUDA says so and leaves a GPU's figures where they are
        from dpolicy.bench.latency import gpu_latency_section

        body, res = gpu_latency_section(shipped[0], log=log)
        if res:
            write_section(args.out, "gpu-latency", body, command)
        else:
            log("gpu-latency: no CUDA device on this machine; the section is not written.")
    if "drive-throughput" in sections:
        from dpolicy.bench.drive import drive_throughput_section

        body, res = drive_throughput_section(log=log)
        # keyed by device, as image-throughput: a CPU-only run does not replace a GPU's rows
        write_section(args.out, "drive-throughput" + (":cuda" if res["device"] else ""), body, command)
    if "reliability" in sections:
        from dpolicy.bench.reliability import reliability_section

        write_section(args.out, "reliability", reliability_section(log=log)[0], command)
    if "latency" in sections:
        from dpolicy.bench.latency import latency_section, latency_summary, unet_policy

        # controller thread at SCHED_FIFO (where permitted), as on a robot; the same for every row
        # the shipped residual MLP: 60 episodes (~2,200 decisions per row), so a p99 rests on ~22 decisions, not ~7
        body, res = latency_section(shipped[0], episodes=60, priority=10, log=log)
        unet = unet_policy(work / "avoid_unet", demos=work / "avoid_diffusion" / "demos.hdf5", log=log)
        body_unet, res_unet = latency_section(unet, priority=10, log=log)  # the same measurement with the 1-D U-Net
        write_section(args.out, "latency", "\n\n".join([body, body_unet, latency_summary([res, res_unet])]), command)
    # sections that take (work dir, log) and return (markdown body, results)
    plain = {"headroom": ("dpolicy.bench.steer", "headroom_section"),
             "compose": ("dpolicy.bench.compose", "compose_section"), "drive": ("dpolicy.bench.drive", "drive_section"),
             "robosuite": ("dpolicy.bench.standard", "robosuite_section"),
             "rollouts": ("dpolicy.bench.rollouts", "rollouts_section")}
    if "finetune" in sections:
        from dpolicy.bench.finetune import finetune_section

        tasks = args.finetune_tasks.split(",")
        body, _ = finetune_section(work / "finetune", log=log, tasks=tasks, algos=args.finetune_algos.split(","),
                                   seeds=range(args.seeds), figure=Path(f"docs/img/finetune_{'_'.join(tasks)}.png"))
        write_section(args.out, "finetune:" + ",".join(tasks), body, command)
    if "async" in sections:
        from dpolicy.bench.asynchronous import async_section

        ckpt = _async_checkpoints(args)
        tasks = list(ckpt)
        delays = _delays(args.async_delays)
        variant = [v for v, on in (("predict", args.async_predict), (f"horizon {args.async_horizon}", args.async_horizon != "Ta"),
                                   (args.async_checkpoint, args.async_checkpoint != "{task}_flow"),
                                   (f"seeds {args.async_seed}", args.async_seed != ASYNC_SEED),
                                   (f"forward {args.async_forward_rollouts} rollouts",
                                    args.async_predict and args.async_forward_rollouts != ASYNC_FORWARD_ROLLOUTS),
                                   (f"select {args.async_select_episodes}", args.async_select_episodes != ASYNC_SELECT_EPISODES),
                                   (f"d {','.join(map(str, delays))}", delays != ASYNC_DELAYS)) if on]
        # one picture per section: a variant's plot must not overwrite the plain section's
        stem = "_".join(tasks + [re.sub(r"[^A-Za-z0-9]+", "-", v).strip("-") for v in variant])
        body, _ = async_section(work / "async", log=log, checkpoints=[ckpt[t] for t in tasks],
                                strategies=_names("--async-strategies", args.async_strategies, list(ASYNC_STRATEGIES)),
                                predict=args.async_predict, horizon=args.async_horizon,
                                episodes=args.episodes, plot_path=f"docs/img/async_delay_{stem}.png", seed=args.async_seed,
                                delays=delays, forward_rollouts=args.async_forward_rollouts,
                                select_episodes=args.async_select_episodes)
        write_section(args.out, "async:" + ",".join(tasks) + (":" + ",".join(variant) if variant else ""), body, command)
    if "pusht" in sections:  # with the shipped PushT checkpoints, if any
        from dpolicy.bench.standard import pusht_section

        body, _ = pusht_section(work / "pusht", log=log, checkpoints=sorted(Path("checkpoints").glob("pusht*")))
        write_section(args.out, "pusht", body, command)
    for name, (module, func) in plain.items():
        if name in sections:
            body, _ = getattr(importlib.import_module(module), func)(work / name, log=log)
            write_section(args.out, name, body, command)
    if "peers" in sections:
        from dpolicy.bench.standard import peers_section

        body, _ = peers_section(log=log)
        write_section(args.out, "peers", body, command)
    log(f"done in {time.perf_counter() - t0:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
