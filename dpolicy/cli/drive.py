"""``dpolicy-drive``: the driving planning benchmark (PDMS-like scorer, not NAVSIM).

  dpolicy-drive collect [out=... data.n_train=...]      expert demos in the robomimic layout
  dpolicy-drive train   [data.path=... run_dir=...]     behaviour-clone the masked-token planner
  dpolicy-drive rl      init=RUN [rl.algo=gspo|grpo]    group RL from a trained planner, with a curve
  dpolicy-drive eval    init=RUN [eval.order=...]       PDMS-like sub-scores on the test split, a scene picture

Settings come from configs/drive.yaml; override them as key=value.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import warnings
import zipfile
from pathlib import Path

import torch

from dpolicy.cli.common import Parser, compose, device, settings
from dpolicy.errors import CheckpointError, ConfigError, DPolicyError

COMMANDS = ("collect", "train", "rl", "eval")


def load_config(overrides):
    """configs/drive.yaml with ``overrides`` as a checked DriveConfig (dpolicy/drive/config.py)."""
    from dpolicy.drive.config import DriveConfig

    return settings(DriveConfig, compose("drive", overrides))


def save_planner(planner, run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "planner.pt"
    tmp = run_dir / f".planner.pt.tmp-{os.getpid()}"
    torch.save({"format": "dpolicy-drive-masked/1", "cfg": planner.cfg, "state": planner.state_dict()}, tmp)
    os.replace(tmp, path)
    return path


def load_planner(run_dir, device):
    from dpolicy.drive.masked import MaskedTokenPlanner
    from dpolicy.drive.tokenizer import TrajectoryTokenizer

    path = Path(str(run_dir)) / "planner.pt"
    if not path.exists():
        raise CheckpointError(f"no planner checkpoint at {path}; pass init=<a train or rl run directory>.")
    try:
        with warnings.catch_warnings():  # torch's remarks on a garbled pickle header would precede the sentence below
            warnings.simplefilter("ignore")
            ck = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated (torch.load: {type(e).__name__}); "
                              "train the planner again or point init= at another run.") from None
    if not isinstance(ck, dict) or ck.get("format") != "dpolicy-drive-masked/1":
        fmt = ck.get("format") if isinstance(ck, dict) else type(ck).__name__
        raise CheckpointError(f"{path} is not a dpolicy-drive planner checkpoint (format {fmt!r}).")
    try:
        c = ck["cfg"]
        p = MaskedTokenPlanner(TrajectoryTokenizer(**c["tokenizer"]), d=c["d"], layers=c["layers"], heads=c["heads"]).to(device)
        p.load_state_dict(ck["state"])
    except (KeyError, TypeError, RuntimeError) as e:
        what = f"missing {e}" if isinstance(e, KeyError) else " ".join(str(e).split())[:200]
        raise CheckpointError(f"{path} does not hold a planner this version can load ({what}).") from None
    return p.eval()


def run(command: str, cfg, log=print) -> dict:
    """Run ``command`` with ``cfg``, a DriveConfig or a dict of its sections (checked here)."""
    from dataclasses import asdict

    from dpolicy.drive.config import DriveConfig
    from dpolicy.drive.data import build_set, read_demos, write_demos
    from dpolicy.drive.masked import MaskedTokenPlanner
    from dpolicy.drive.plots import plot_curves, plot_scenes
    from dpolicy.drive.rl import rl_train
    from dpolicy.drive.tokenizer import TrajectoryTokenizer
    from dpolicy.drive.train import evaluate, plan_tokens, train_token_planner

    if command not in COMMANDS:
        raise ConfigError(f"unknown command {command!r}; choose from {', '.join(COMMANDS)}.")
    cfg = settings(DriveConfig, cfg)
    dev = device(cfg.device)
    out = Path(cfg.run_dir)
    if command == "collect":
        d = cfg.data
        sets = {s: build_set(s, getattr(d, f"n_{s}"), dev) for s in ("train", "val", "test") if getattr(d, f"n_{s}") > 0}
        path = write_demos(cfg.out, sets)
        res = {"path": str(path), **{f"expert_pdms_{s}": float(v.expert_scores["pdms"].mean()) for s, v in sets.items()}}
        log(f"wrote {sum(v.n for v in sets.values())} demos to {path}; expert PDMS-like " +
            ", ".join(f"{s} {res[f'expert_pdms_{s}']:.3f}" for s in sets))
        return res
    if command in ("rl", "eval") and cfg.init is None:
        raise ConfigError(f"{command} needs init=<a {'train ' if command == 'rl' else ''}run directory> holding planner.pt.")
    data = cfg.data.path
    if not Path(data).exists():
        raise ConfigError(f"data.path {data} does not exist; run `dpolicy-drive collect` first.")
    planner = load_planner(cfg.init, dev) if command in ("rl", "eval") else None
    test = read_demos(data, "test", dev)
    o = cfg.eval
    score_of = lambda p: float(evaluate(test, plan_tokens(p, test, steps=o.steps, order=o.order))["pdms"].mean())  # noqa: E731
    if command == "train":
        train = read_demos(data, "train", dev)
        m = cfg.model
        planner = MaskedTokenPlanner(TrajectoryTokenizer(**asdict(cfg.tokenizer)), m.d, m.layers, m.heads).to(dev)
        t = cfg.train
        losses = train_token_planner(planner, train, t.steps, t.batch, t.lr, t.seed, log=log)
        res = {"final_loss": losses[-1] if losses else None, "test_pdms": score_of(planner)}
        save_planner(planner, out)
    elif command == "rl":
        train = read_demos(data, "train", dev)
        hist = rl_train(planner, train, score_of, cfg.rl, log=log)
        plot_curves(out / "curve.png", {cfg.rl.algo.upper(): hist}) if out.mkdir(parents=True, exist_ok=True) is None else None
        (out / "history.json").write_text(json.dumps(hist, indent=1))
        res = {"start_pdms": hist[0]["test_pdms"], "test_pdms": hist[-1]["test_pdms"]}
        save_planner(planner, out)
    elif command == "eval":
        traj = plan_tokens(planner, test, steps=o.steps, order=o.order)
        res = {k: float(v.mean()) for k, v in evaluate(test, traj).items()}
        res["expert_pdms"] = float(evaluate(test, test.expert)["pdms"].mean())
        out.mkdir(parents=True, exist_ok=True)
        n = min(o.scenes_in_picture, test.n)
        plot_scenes(out / "scenes.png", test.index(slice(0, n)), {"expert": test.expert[:n], "planner": traj[:n]}, n=n)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{command}.json").write_text(json.dumps(res, indent=1))
    log(f"{command}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items())
        + " (PDMS-like, not NAVSIM)")
    return res


def main(argv=None) -> int:
    ap = Parser(prog="dpolicy-drive", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=COMMANDS)
    ap.add_argument("overrides", nargs="*", help="key=value overrides of configs/drive.yaml")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:  # a usage error (one line, from Parser) or --help
        return e.code
    try:
        cfg = load_config(args.overrides)
        run(args.command, cfg, log=lambda m: print(m, flush=True))
    except (DPolicyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
