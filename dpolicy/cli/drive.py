"""``dpolicy-drive``: the driving planning benchmark (PDMS-like scorer, not NAVSIM).

  dpolicy-drive collect [out=... data.n_train=...]      expert demos in the robomimic layout
  dpolicy-drive train   [data.path=... | data.cache=DIR] [model.planner=masked|anchor] [model.encoder=vector|flat]
                                                        behaviour-clone a planner; saved to RUN/planner (safetensors + JSON)
  dpolicy-drive train   model.planner=scorer init=RUN   a learned scorer for RUN's proposals and the rule candidates
  dpolicy-drive train   init=RUN                        behaviour cloning continued from RUN's planner (same kind)
  dpolicy-drive rl      init=RUN [rl.algo=gspo|grpo]    group RL from a trained masked planner, with a curve
  dpolicy-drive eval    init=RUN [eval.split=test|val]  PDMS-like sub-scores, a scene picture; the last line is
                        [eval.samples=K eval.rule=true  "PDMS-like <score>"; with several proposals, the one the
                         eval.scorer=RUN]               learned scorer (or the forecast) rates best is driven

Settings come from configs/drive.yaml; override them as key=value.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dpolicy.cli.common import Parser, compose, device, settings
from dpolicy.errors import CheckpointError, ConfigError, DPolicyError

COMMANDS = ("collect", "train", "rl", "eval")


def load_config(overrides):
    """configs/drive.yaml with ``overrides`` as a checked DriveConfig (dpolicy/drive/config.py)."""
    from dpolicy.drive.config import DriveConfig

    return settings(DriveConfig, compose("drive", overrides))


def load_planner(path, device, kinds=None, sub: str = "planner"):
    """The driving planner saved at ``path`` (a planner directory, or a run directory holding ``planner/``); with
    ``kinds`` and ``sub`` another driving model (the learned scorer: ``scorer/``)."""
    from dpolicy.drive.anchor import AnchorDiffusionPlanner
    from dpolicy.drive.masked import MaskedTokenPlanner
    from dpolicy.kinds import load_policy

    kinds = (MaskedTokenPlanner, AnchorDiffusionPlanner) if kinds is None else kinds
    p = Path(str(path))
    if (p / sub / "meta.json").exists():
        p = p / sub
    planner = load_policy(p, device)
    if not isinstance(planner, kinds):
        raise CheckpointError(f"{p} holds a {type(planner).__name__}, not a driving {sub}; pass a dpolicy-drive train "
                              f"run directory holding {sub}/ (or the {sub} directory itself).")
    return planner


def _load_scorer(path, device, encoder: str, key: str):
    """The learned scorer at ``path`` (a scorer directory or a run holding ``scorer/``), checked to read the
    ``encoder``'s observation; ``key`` names the setting that gave the path."""
    from dpolicy.drive.selector import TrajectoryScorer

    scorer = load_planner(path, device, TrajectoryScorer, "scorer")
    if scorer.cfg["encoder"] != encoder:
        raise ConfigError(f"{key} {path} reads the {scorer.cfg['encoder']} observation, the planner the {encoder} one.")
    return scorer


def _split(cfg, split: str, dev, encoder: str):
    """The scenes of ``split`` for ``encoder``: from the scene cache when data.cache is set, else from data.path."""
    from dpolicy.drive.cache import cached_set
    from dpolicy.drive.data import read_demos

    n = getattr(cfg.data, f"n_{split}")
    if cfg.data.cache is not None:
        if n < 1:
            raise ConfigError(f"data.n_{split}={n}: the {split} split is empty.")
        return cached_set(split, n, cfg.data.cache, dev, encoder, log=print)
    if not Path(cfg.data.path).exists():
        raise ConfigError(f"data.path {cfg.data.path} does not exist; run `dpolicy-drive collect` first or set data.cache.")
    return read_demos(cfg.data.path, split, dev).observed(encoder)


def _new_planner(cfg, train, dev):
    from dataclasses import asdict

    from dpolicy.drive.anchor import AnchorDiffusionPlanner, kmeans, to_norm
    from dpolicy.drive.frenet import to_frame
    from dpolicy.drive.masked import MaskedTokenPlanner
    from dpolicy.drive.tokenizer import TrajectoryTokenizer

    m = cfg.model
    torch.manual_seed(cfg.train.seed)
    if m.planner == "masked":
        return MaskedTokenPlanner(TrajectoryTokenizer(**asdict(cfg.tokenizer), frame=m.frame), m.d, m.layers, m.heads, m.encoder,
                                  m.encoder_layers, m.ego_dropout, experts=m.experts, expert_hidden=m.expert_hidden,
                                  top_k=m.top_k).to(dev)
    anchors = kmeans(to_norm(to_frame(m.frame, train.obs, train.expert)), m.anchors, seed=cfg.train.seed)
    return AnchorDiffusionPlanner(anchors, d=m.d, encoder=m.encoder, layers=m.layers, heads=m.heads,
                                  encoder_layers=m.encoder_layers, ego_dropout=m.ego_dropout, frame=m.frame).to(dev)


def run(command: str, cfg, log=print) -> dict:
    """Run ``command`` with ``cfg``, a DriveConfig or a dict of its sections (checked here)."""
    import time

    from dpolicy.drive.config import DriveConfig
    from dpolicy.drive.data import build_set, write_demos
    from dpolicy.drive.plots import plot_curves, plot_scenes
    from dpolicy.drive.rl import rl_train
    from dpolicy.drive.selector import (TrajectoryScorer, rated_candidates, scene_chooser, scoring_set, select,
                                        train_scorer)
    from dpolicy.drive.train import closed_loop, evaluate, plan, scene_planner, train_continuous, train_token_planner

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
    scoring = command == "train" and cfg.model.planner == "scorer"
    if (command in ("rl", "eval") or scoring) and cfg.init is None:
        what = "the planner whose proposals the scorer rates" if scoring else "a planner checkpoint or a run directory"
        raise ConfigError(f"{command}{' model.planner=scorer' if scoring else ''} needs init=<{what}>.")
    # train with init: behaviour cloning continues from that planner's weights
    resuming = command == "train" and not scoring and cfg.init is not None
    planner = load_planner(cfg.init, dev) if command in ("rl", "eval") or scoring or resuming else None
    if resuming and hasattr(planner, "decode") != (cfg.model.planner == "masked"):
        held_kind = "a masked-token" if hasattr(planner, "decode") else "an anchor-diffusion"
        raise ConfigError(f"init={cfg.init} holds {held_kind} planner; model.planner={cfg.model.planner} trains another kind.")
    encoder = planner.cfg["encoder"] if planner is not None else cfg.model.encoder
    if command == "rl" and not hasattr(planner, "decode"):
        raise ConfigError(f"rl fine-tunes the masked-token planner; {cfg.init} holds an anchor-diffusion planner.")
    o = cfg.eval
    split = o.split if command in ("eval", "rl") else "test"  # rl's curve is measured on eval.split
    held = _split(cfg, split, dev, encoder)

    def order_of(p):  # eval.order, else the planner's own
        return o.order if o.order is not None else (p.cfg.get("order", "confidence") if hasattr(p, "decode") else "confidence")

    def score_of(p, ds=None):
        ds = held if ds is None else ds
        return float(evaluate(ds, plan(p, ds, o.steps, order_of(p)))["pdms"].mean())
    o_select = dict(samples=o.samples, rule=o.rule, steps=o.steps, order=order_of(planner))
    if command == "train" and scoring:
        train = _split(cfg, "train", dev, encoder)
        t, pc = cfg.train, planner.cfg
        log(f"scoring {t.proposals} proposal(s) of {cfg.init} and the rule candidates on {train.n} train scenes against the log")
        trajs, labels = scoring_set(planner, train, t.proposals, rule=True, seed=t.seed, log=log)
        torch.manual_seed(t.seed)
        scorer = TrajectoryScorer(pc["d"], cfg.model.layers, pc["heads"], encoder, pc["encoder_layers"]).to(dev)
        scorer.encoder.load_state_dict(planner.encoder.state_dict())  # start from the proposer's scene encoder
        t0 = time.perf_counter()
        losses = train_scorer(scorer, train, trajs, labels, t.steps, t.batch, lr=t.lr, seed=t.seed, log=log)
        res = {"final_loss": losses[-1] if losses else None, "train_s": time.perf_counter() - t0, "n_train": train.n,
               "test_pdms": float(evaluate(held, select(scorer, planner, held, **o_select))["pdms"].mean())}
        scorer.save(out / "scorer", {"test_pdms": res["test_pdms"], "n_train": train.n, "steps": t.steps, "proposer": str(cfg.init),
                                     "eval": o_select})
    elif command == "train":
        train, soft = _split(cfg, "train", dev, encoder), None
        if cfg.train.teacher is not None:
            from dataclasses import replace

            teacher = _load_scorer(cfg.train.teacher, dev, encoder, "train.teacher")
            cand, ratings = rated_candidates(teacher, train)
            train = replace(train, expert=cand[torch.arange(train.n, device=cand.device), ratings.argmax(1)])
            top2 = ratings.topk(2, 1).values
            log(f"imitating {cfg.train.teacher}'s choices: PDMS-like {float(evaluate(train, train.expert)['pdms'].mean()):.3f} "
                f"on the train scenes (median gap between its two best ratings {float((top2[:, 0] - top2[:, 1]).median()):.4f})")
            if cfg.train.teacher_temperature > 0:
                soft = (cand, torch.softmax(ratings / cfg.train.teacher_temperature, 1))
                log(f"  targets drawn among its {cand.shape[1]} candidates at temperature {cfg.train.teacher_temperature:g}: "
                    f"the best one's mean weight {float(soft[1].max(1).values.mean()):.2f}")
        planner = _new_planner(cfg, train, dev) if planner is None else planner
        t = cfg.train
        fit = train_token_planner if cfg.model.planner == "masked" else train_continuous
        t0 = time.perf_counter()
        losses = fit(planner, train, t.steps, t.batch, t.lr, t.seed, log=log, soft=soft)
        res = {"final_loss": losses[-1] if losses else None, "train_s": time.perf_counter() - t0, "n_train": train.n,
               "test_pdms": score_of(planner)}
        planner.save(out / "planner", {"test_pdms": res["test_pdms"], "n_train": train.n, "steps": t.steps,
                                       "teacher": t.teacher or "expert",
                                       "teacher_temperature": t.teacher_temperature, "init": None if cfg.init is None else str(cfg.init)})
    elif command == "rl":
        train = _split(cfg, "train", dev, encoder)
        planner.cfg["order"] = cfg.rl.order  # the planner is saved to decode as its rollouts did (so is the curve,
                                             # unless eval.order says otherwise)
        hist = rl_train(planner, train, score_of, cfg.rl, log=log)
        out.mkdir(parents=True, exist_ok=True)
        plot_curves(out / "curve.png", {cfg.rl.algo.upper(): hist}, ylabel=f"{split} PDMS-like")
        (out / "history.json").write_text(json.dumps(hist, indent=1))
        res = {"split": split, "start_pdms": hist[0]["test_pdms"], "final_pdms": hist[-1]["test_pdms"]}
        if split != "test":
            res["test_pdms"] = score_of(planner, _split(cfg, "test", dev, encoder))
        planner.save(out / "planner", {f"{split}_pdms": res["final_pdms"], "rl": cfg.rl.algo, "advantage": cfg.rl.advantage,
                                       "baseline": cfg.rl.baseline, "init": str(cfg.init)})
    else:  # eval
        from dpolicy_envs.driving import expert_plan, forecast

        scorer = None if o.scorer is None else _load_scorer(o.scorer, dev, encoder, "eval.scorer")
        choosing = o.samples > 1 or o.rule or scorer is not None
        traj = select(scorer, planner, held, **o_select) if choosing else plan(planner, held, o.steps, order_of(planner))
        res = {k: float(v.mean()) for k, v in evaluate(held, traj).items()}
        res["proposals"] = f"{o.samples} planner{' + rule' if o.rule else ''}"
        if hasattr(planner, "decode"):
            res["order"] = order_of(planner)
        if choosing:
            res["chosen_by"] = "learned scorer" if scorer is not None else "forecast"
        ex = evaluate(held, held.expert)
        res["expert_pdms"], res["expert_nc"] = float(ex["pdms"].mean()), float(ex["nc"].mean())
        if hasattr(planner, "tok"):  # what the planner's tokens alone cost: the expert's plans through its tokenizer
            res["expert_tokenized_pdms"] = float(evaluate(held, planner.tok.decode(planner.tok.encode(held.expert, held.obs), held.obs))["pdms"].mean())
        # the same rule-based planner without the log: its candidates scored against a constant-speed forecast
        blind = evaluate(held, expert_plan(forecast(held.scenes))[0])
        res["expert_forecast_pdms"], res["expert_forecast_nc"] = float(blind["pdms"].mean()), float(blind["nc"].mean())
        res["split"], res["scenes"] = split, held.n
        if o.closed_loop:  # rates over scenes: at-fault collision, leaving the drivable area; mean progress (m)
            for who, fn in (("cl", scene_chooser(scorer, planner, encoder, o.samples, o.rule, o.steps, order_of(planner)) if choosing
                                   else scene_planner(planner, encoder, o.steps, order_of(planner))), ("expert_cl", lambda s: expert_plan(s)[0]),
                            ("expert_forecast_cl", lambda s: expert_plan(forecast(s))[0])):
                m = closed_loop(held.scenes, fn)
                res.update({f"{who}_collision_rate": float(1 - m["nc"].mean()), f"{who}_offroad_rate": float(1 - m["dac"].mean()),
                            f"{who}_progress_m": float(m["progress"].mean())})
        out.mkdir(parents=True, exist_ok=True)
        n = min(o.scenes_in_picture, held.n)
        plot_scenes(out / "scenes.png", held.index(slice(0, n)), {"expert": held.expert[:n], "planner": traj[:n]}, n=n)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{command}.json").write_text(json.dumps(res, indent=1))
    log(f"{command}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items())
        + " (PDMS-like, not NAVSIM)")
    if command == "eval":
        log(f"PDMS-like {res['pdms']:.4f}")  # the last line: the figure, for scripts
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
