"""``dpolicy-bench``: run the measured claims and write them into BENCHMARKS.md.

Sections: ``envs`` (task-suite speed, experts, adversarial actions), ``bc`` (behaviour cloning
success per task and process, the multimodal comparison; ``--ship`` refreshes checkpoints/),
``throughput`` (our training loop vs a Chi et al.-style loop).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="dpolicy-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="envs,throughput,bc", help="comma-separated: envs, throughput, bc")
    ap.add_argument("--tasks", default="avoid,push,lift", help="tasks for the bc section")
    ap.add_argument("--processes", default="diffusion,flow", help="processes for the bc section")
    ap.add_argument("--episodes", type=int, default=200, help="evaluation episodes per policy (bc)")
    ap.add_argument("--expert-episodes", type=int, default=1000, help="expert episodes per task (envs)")
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--work", default="runs/bench", help="where bench runs are written")
    ap.add_argument("--ship", action="store_true", help="copy the bc policies into checkpoints/ with a manifest")
    ap.add_argument("overrides", nargs="*", help="extra hydra overrides for the bc runs, e.g. train.steps=500")
    args = ap.parse_args(argv)
    from dpolicy.bench import suite
    from dpolicy.bench.report import write_section

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"envs", "throughput", "bc"}
    if unknown:
        print(f"error: unknown section(s) {sorted(unknown)}; choose from envs, throughput, bc.", file=sys.stderr)
        return 2
    command = "dpolicy-bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    work = Path(args.work)
    t0 = time.perf_counter()
    if "envs" in sections:
        write_section(args.out, "envs", suite.envs_section(args.expert_episodes, log=log), command)
    if "throughput" in sections:
        write_section(args.out, "throughput", suite.throughput_section(log=log), command)
    if "bc" in sections:
        body, results = suite.bc_section(work, tasks=args.tasks.split(","), processes=args.processes.split(","),
                                         episodes=args.episodes, ship=Path("checkpoints") if args.ship else None,
                                         extra=args.overrides, log=log)
        work.mkdir(parents=True, exist_ok=True)
        (work / "bc_results.json").write_text(json.dumps(results, indent=2, default=str))
        write_section(args.out, "bc:" + ",".join(args.tasks.split(",")), body, command)
    log(f"done in {time.perf_counter() - t0:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
