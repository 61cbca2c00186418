"""Behaviour cloning end to end: data -> policy -> trainer -> evaluation -> metrics.json.

This is the library behind ``dpolicy-train``; the CLI only composes the config. Shapes are taken
from the dataset, checked against the environment before any training starts, and stored in
the checkpoint.

``task.name`` null means "the task of the dataset" (``dpolicy-train data.path=...`` with no task):
the observation keys are the file's low-dimensional ones, the environment is the one its
``env_args`` name when it can be built here, and without one the policy is trained and evaluation
is skipped, saying why.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from dpolicy.config import PolicyConfig, RunConfig
from dpolicy.data.robomimic import low_dim_obs_dims, read_dataset, read_env_args
from dpolicy.data.windows import WindowDataset
from dpolicy.errors import ConfigError, DatasetError, ShapeError
from dpolicy.policy.chunk_policy import ChunkPolicy
from dpolicy.tasks import env_factory
from dpolicy.train import distributed as dist_utils
from dpolicy.train.trainer import Trainer
from dpolicy.utils import resolve_device, seed_everything


def check_env_compat(env, policy: ChunkPolicy) -> None:
    """Raise ShapeError unless the env's observation keys/dims and action dim match the policy."""
    space = env.observation_space
    keys = getattr(space, "spaces", {})
    missing = [k for k in policy.obs_keys if k not in keys]
    if missing:
        raise ShapeError(f"the environment has no observation key(s) {missing}; it provides {sorted(keys)}.")
    for k in policy.obs_keys:
        d = int(torch.tensor(keys[k].shape).prod())
        if d != policy.obs_dims[k]:
            raise ShapeError(f"observation {k!r} has dimension {d} in the environment but {policy.obs_dims[k]} in the dataset/policy.")
    da = int(torch.tensor(env.action_space.shape).prod())
    if da != policy.action_dim:
        raise ShapeError(f"the environment's action dimension is {da} but the dataset/policy has {policy.action_dim}.")


def build_policy(policy_cfg: PolicyConfig, data: WindowDataset) -> ChunkPolicy:
    cfg = PolicyConfig(**{**policy_cfg.__dict__, "obs_keys": data.obs_keys, "obs_dims": data.obs_dims,
                          "image_shapes": {k: list(v) for k, v in data.image_shapes.items()}, "action_dim": data.action_dim})
    normalizer = data.fit_normalizer(cfg.obs_norm, cfg.action_norm)
    if cfg.action_scale is not None:  # RTI-DP "scale": shrink chosen dimensions in the normalized action space
        normalizer.action = normalizer.action.rescaled(cfg.action_scale)
    return ChunkPolicy(cfg, normalizer)


def prepare_dataset(cfg: RunConfig, run_dir: Path, progress: bool = True) -> Path:
    """The dataset path: ``data.path`` if given, else expert demos collected into the run directory."""
    if cfg.data.path:
        return Path(cfg.data.path)
    from dpolicy.data.collect import collect_demos

    out = run_dir / "demos.hdf5"
    if not out.exists() and dist_utils.is_main():
        summary = collect_demos(cfg.task.name, cfg.task.n_demos, out, seed=cfg.seed, noise_std=cfg.task.demo_noise,
                                env_kwargs=cfg.task.env_kwargs, expert_kwargs=cfg.task.expert_kwargs,
                                keep_failures=cfg.task.keep_failures, progress=progress)
        (run_dir / "collect_summary.json").write_text(json.dumps(summary, indent=2))
    dist_utils.barrier()
    return out


def _with_env_kwargs(env_args: dict, env_kwargs: dict | None) -> dict:
    """User env kwargs override the dataset's (e.g. a longer horizon)."""
    if not env_kwargs:
        return env_args
    return {**env_args, "env_kwargs": {**(env_args.get("env_kwargs") or {}), **env_kwargs}}


def env_of_dataset(cfg: RunConfig, path: Path, say=print) -> tuple[list[str], dict | None, object, str | None]:
    """For a run whose task comes from the data: ``(obs_keys, env_args, probe_env, why_no_eval)``.

    The keys are ``task.obs_keys`` when given, else the file's low-dimensional observation keys (those the
    environment also provides, when it provides only some). The environment is the one the file's
    ``env_args`` name; when that is missing, cannot be built here or does not fit the data, ``env_args`` and
    ``probe_env`` are None and ``why_no_eval`` says why."""
    dims, skipped, action_dim = low_dim_obs_dims(path, cfg.data.filter_key)
    if skipped and not cfg.task.obs_keys:
        say("observation key(s) " + ", ".join(f"{k!r} ({why})" for k, why in skipped.items()) +
            " are left out: a policy reads the file's vectors unless task.obs_keys names its cameras.")
    keys = list(cfg.task.obs_keys) or list(dims)
    if not keys:
        raise DatasetError(f"{path}: the first demo has no numeric observation key to train on (skipped: {skipped}).")
    try:
        env_args = _with_env_kwargs(read_env_args(path), cfg.task.env_kwargs)
    except DatasetError as e:
        return keys, None, None, str(e)
    name = env_args.get("env_name")
    try:
        probe = env_factory(env_args)()
    except Exception as e:  # noqa: BLE001 - any failure to build the named env (unknown id, missing extra) means no evaluation
        return keys, None, None, (f"{path} names the environment {name!r}, which cannot be built here "
                                  f"({type(e).__name__}: {str(e).rstrip('.')}).")
    space = getattr(probe.observation_space, "spaces", {})
    provided = {k: int(np.prod(v.shape, dtype=np.int64)) for k, v in space.items()}
    use = keys if cfg.task.obs_keys else [k for k in keys if k in provided]
    why = None
    if not use:
        why = f"the environment {name!r} that {path} names provides observation keys {list(provided)}, none of the dataset's {keys}."
    elif int(np.prod(probe.action_space.shape, dtype=np.int64)) != action_dim:
        why = (f"the environment {name!r} that {path} names has action dimension "
               f"{int(np.prod(probe.action_space.shape, dtype=np.int64))}, the dataset {action_dim}.")
    else:
        bad = [k for k in use if k not in provided or k in dims and provided[k] != dims[k]]
        if bad:
            why = (f"the environment {name!r} that {path} names does not provide observation(s) {bad} as the dataset "
                   f"has them (dataset {({k: dims.get(k) for k in bad})}, environment {({k: provided.get(k) for k in bad})}).")
    if why is not None:
        probe.close()
        return keys, None, None, why
    if len(use) < len(keys):
        say(f"observation key(s) {[k for k in keys if k not in use]} are in the dataset but not in the "
            f"environment {name!r}; the policy reads {use}.")
    return use, env_args, probe, None


def train_bc(cfg: RunConfig, run_dir, progress: bool = True) -> dict:
    """Run the whole job in ``run_dir``; returns (and writes) the metrics dict."""
    from dpolicy.eval import evaluate

    run_dir = Path(run_dir)

    def check_video():  # the video is written after training and evaluation: its encoder is checked before both
        if cfg.eval.video and cfg.eval.episodes:
            from dpolicy.eval.video import check_video_writer

            check_video_writer(run_dir / "rollout.mp4")

    if cfg.task.name is not None:  # a named task has an environment: checked before any demos are collected
        check_video()
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    rank, world_size, local = dist_utils.init_from_env(device.type)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local)
    seed_everything(cfg.seed + rank)
    t_start = time.perf_counter()

    from_data = cfg.task.name is None
    if from_data and not cfg.data.path:
        raise ConfigError("task.name is null, which means the task of the dataset, but data.path names no dataset; "
                          "give data.path=<file.hdf5> or a task.")
    if (cfg.train.keep_best or cfg.train.early_stop) and not cfg.eval.every:
        raise ConfigError("train.keep_best and train.early_stop choose steps by the evaluations during training, "
                          "and eval.every=0 asks for none; set eval.every to a number of steps.")
    pretrained = cfg.policy.vision.pretrained
    if pretrained is not None and not Path(pretrained).is_file():  # before any demos are collected
        raise ConfigError(f"policy.vision.pretrained={pretrained!r} is not a file; give a local ResNet-18 weights file "
                          f"(nothing is downloaded) or leave it null to train the encoder from scratch.")
    say = print if dist_utils.is_main() else (lambda *a, **k: None)
    path = prepare_dataset(cfg, run_dir, progress)
    probe, why_no_eval = None, None
    if from_data:
        obs_keys, env_args, probe, why_no_eval = env_of_dataset(cfg, path, say)
    else:
        env_args = read_env_args(path)
        if cfg.data.path:
            env_args = _with_env_kwargs(env_args, cfg.task.env_kwargs)
        obs_keys = cfg.task.obs_keys or None
    demos = read_dataset(path, obs_keys, cfg.data.filter_key, cfg.data.max_demos)
    obs_keys = obs_keys or list(demos[0].obs)
    data = WindowDataset(demos, obs_keys, cfg.policy.To, cfg.policy.Tp, device=device, seed=cfg.seed)
    policy = build_policy(cfg.policy, data)
    dataset = str(Path(path).resolve())
    policy.metadata = {"task": cfg.task.name, "dataset": dataset}
    if env_args is not None:
        policy.metadata["env_args"] = env_args
    make_env = env_factory(env_args) if env_args is not None else None
    if make_env is not None:
        probe = make_env() if probe is None else probe
        try:
            check_env_compat(probe, policy)
        except ShapeError as e:
            if not from_data:
                raise
            make_env, why_no_eval = None, f"the environment {env_args['env_name']!r} that {path} names does not fit it: {e}"
        finally:
            probe.close()
    if from_data and make_env is not None:  # the dataset's own environment will be evaluated and filmed
        check_video()
    if why_no_eval is not None:
        say(f"evaluation skipped: {why_no_eval.rstrip('.')}; the policy is trained on the dataset alone.")
        if cfg.train.keep_best or cfg.train.early_stop:
            raise ConfigError(f"train.keep_best and train.early_stop need evaluations during training, and there is no "
                              f"environment to evaluate in: {why_no_eval}")

    def eval_during(model, step):
        res = evaluate(model, make_env, n_episodes=cfg.eval.episodes_during, n_envs=cfg.eval.n_envs,
                       seed=cfg.eval.seed + 10_000, progress=False, steps=cfg.eval.steps)
        model.train(False)
        return {"success_rate": res.success_rate}

    train_cfg = cfg.train
    if not progress:
        train_cfg = type(train_cfg)(**{**train_cfg.__dict__, "progress": False})
    trainer = Trainer(policy, data, train_cfg, run_dir, eval_fn=eval_during if (cfg.eval.every and make_env) else None,
                      eval_every=cfg.eval.every if make_env else 0)
    t0 = time.perf_counter()
    history = trainer.fit(resume=True)
    train_time = time.perf_counter() - t0
    metrics = {"task": cfg.task.name, "dataset": dataset, "env": env_args.get("env_name") if env_args else None,
               "obs_keys": list(obs_keys), "action_dim": data.action_dim, "demos": len(demos), "train_time_s": train_time,
               "train_steps": trainer.step, "final_loss": history[-1]["loss"] if history else None,
               "bad_steps": trainer.bad_steps, "params": sum(p.numel() for p in policy.parameters()),
               "process": cfg.policy.process.type, "net": cfg.policy.net.type, "device": str(device),
               "world_size": world_size}
    sel = trainer.selection()
    metrics.update({k: sel[k] for k in ("best_step", "best_success", "stopped_early_at", "time_to_success")})
    # training seconds over every session of the run (a resumed run's own ``train_time_s`` counts only this one),
    # evaluations during training left out
    metrics["train_time_total_s"] = sel["seconds"] - sel["eval_seconds"]
    ckpt = trainer.ckpt_dir
    if (ckpt / "best").is_dir() and cfg.train.keep_best:
        metrics["best_checkpoint"] = str(ckpt / "best")
    if why_no_eval is not None:
        metrics["eval_skipped"] = why_no_eval
    if dist_utils.is_main():
        metrics["checkpoint"] = str(ckpt)
        if make_env is not None:
            ema_policy = trainer.ema.model.eval()
            video = run_dir / "rollout.mp4" if cfg.eval.video else None
            res = evaluate(ema_policy, make_env, n_episodes=cfg.eval.episodes, n_envs=cfg.eval.n_envs, seed=cfg.eval.seed,
                           video_path=video, video_episodes=cfg.eval.video_episodes, progress=progress, steps=cfg.eval.steps)
            metrics["eval"] = res.to_dict()
            metrics["success_rate"] = res.success_rate
            metrics["success_ci95"] = list(res.success_ci95)
            metrics["video"] = str(video) if video and video.exists() else None
        if cfg.eval.plot and history:
            from dpolicy.eval import plot_learning_curve

            plot = run_dir / "learning_curve.png"
            plot_learning_curve(history, plot, eval_key="eval_success_rate")
            metrics["plot"] = str(plot)
        metrics["total_time_s"] = time.perf_counter() - t_start
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    dist_utils.barrier()
    return metrics
