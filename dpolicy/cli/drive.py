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
import sys
from pathlib import Path

import torch

from dpolicy.cli.common import CONFIG_DIR
from dpolicy.errors import CheckpointError, ConfigError, DPolicyError

COMMANDS = ("collect", "train", "rl", "eval")


def load_config(overrides) -> dict:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="drive", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"bad override in {list(overrides)}: {str(e).splitlines()[0]}") from None
    return OmegaConf.to_container(cfg, resolve=True)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"device {name!r} is unknown; use auto, cpu or cuda.")
    return torch.device(name)


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
    ck = torch.load(path, map_location=device, weights_only=True)
    if ck.get("format") != "dpolicy-drive-masked/1":
        raise CheckpointError(f"{path} is not a dpolicy-drive planner checkpoint (format {ck.get('format')!r}).")
    c = ck["cfg"]
    p = MaskedTokenPlanner(TrajectoryTokenizer(**c["tokenizer"]), d=c["d"], layers=c["layers"], heads=c["heads"]).to(device)
    p.load_state_dict(ck["state"])
    return p.eval()


def run(command: str, cfg: dict, log=print) -> dict:
    from dpolicy.drive.data import build_set, read_demos, write_demos
    from dpolicy.drive.masked import MaskedTokenPlanner
    from dpolicy.drive.plots import plot_curves, plot_scenes
    from dpolicy.drive.rl import RLConfig, rl_train
    from dpolicy.drive.tokenizer import TrajectoryTokenizer
    from dpolicy.drive.train import evaluate, plan_tokens, train_token_planner

    dev = _device(cfg["device"])
    out = Path(cfg["run_dir"])
    if command == "collect":
        d = cfg["data"]
        sets = {s: build_set(s, d[f"n_{s}"], dev) for s in ("train", "val", "test") if d[f"n_{s}"] > 0}
        path = write_demos(cfg["out"], sets)
        res = {"path": str(path), **{f"expert_pdms_{s}": float(v.expert_scores["pdms"].mean()) for s, v in sets.items()}}
        log(f"wrote {sum(v.n for v in sets.values())} demos to {path}; expert PDMS-like " +
            ", ".join(f"{s} {res[f'expert_pdms_{s}']:.3f}" for s in sets))
        return res
    data = cfg["data"]["path"]
    if not Path(data).exists():
        raise ConfigError(f"data.path {data} does not exist; run `dpolicy-drive collect` first.")
    test = read_demos(data, "test", dev)
    o = cfg["eval"]
    score_of = lambda p: float(evaluate(test, plan_tokens(p, test, steps=o["steps"], order=o["order"]))["pdms"].mean())  # noqa: E731
    if command == "train":
        train = read_demos(data, "train", dev)
        m = cfg["model"]
        planner = MaskedTokenPlanner(TrajectoryTokenizer(**cfg["tokenizer"]), m["d"], m["layers"], m["heads"]).to(dev)
        t = cfg["train"]
        losses = train_token_planner(planner, train, t["steps"], t["batch"], t["lr"], t["seed"], log=log)
        res = {"final_loss": losses[-1] if losses else None, "test_pdms": score_of(planner)}
        save_planner(planner, out)
    elif command == "rl":
        if cfg["init"] is None:
            raise ConfigError("rl needs init=<a train run directory> holding planner.pt.")
        planner = load_planner(cfg["init"], dev)
        train = read_demos(data, "train", dev)
        hist = rl_train(planner, train, score_of, RLConfig(**cfg["rl"]), log=log)
        plot_curves(out / "curve.png", {cfg["rl"]["algo"].upper(): hist}) if out.mkdir(parents=True, exist_ok=True) is None else None
        (out / "history.json").write_text(json.dumps(hist, indent=1))
        res = {"start_pdms": hist[0]["test_pdms"], "test_pdms": hist[-1]["test_pdms"]}
        save_planner(planner, out)
    elif command == "eval":
        if cfg["init"] is None:
            raise ConfigError("eval needs init=<a run directory> holding planner.pt.")
        planner = load_planner(cfg["init"], dev)
        traj = plan_tokens(planner, test, steps=o["steps"], order=o["order"])
        res = {k: float(v.mean()) for k, v in evaluate(test, traj).items()}
        res["expert_pdms"] = float(evaluate(test, test.expert)["pdms"].mean())
        out.mkdir(parents=True, exist_ok=True)
        n = min(o["scenes_in_picture"], test.n)
        plot_scenes(out / "scenes.png", test.index(slice(0, n)), {"expert": test.expert[:n], "planner": traj[:n]}, n=n)
    else:
        raise ConfigError(f"unknown command {command!r}; choose from {', '.join(COMMANDS)}.")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{command}.json").write_text(json.dumps(res, indent=1))
    log(f"{command}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items())
        + " (PDMS-like, not NAVSIM)")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="dpolicy-drive", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=COMMANDS)
    ap.add_argument("overrides", nargs="*", help="key=value overrides of configs/drive.yaml")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.overrides)
        run(args.command, cfg, log=lambda m: print(m, flush=True))
    except DPolicyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
