"""Behaviour cloning end to end: data -> policy -> trainer -> evaluation -> metrics.json.

This is the library behind ``dpolicy-train``; the CLI only composes the config. Shapes are taken
from the dataset, checked against the environment before any training starts, and stored in
the checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from dpolicy.config import PolicyConfig, RunConfig
from dpolicy.data.robomimic import read_dataset, read_env_args
from dpolicy.data.windows import WindowDataset
from dpolicy.errors import ShapeError
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
                          "action_dim": data.action_dim})
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


def train_bc(cfg: RunConfig, run_dir, progress: bool = True) -> dict:
    """Run the whole job in ``run_dir``; returns (and writes) the metrics dict."""
    from dpolicy.eval import evaluate

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    rank, world_size, local = dist_utils.init_from_env(device.type)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local)
    seed_everything(cfg.seed + rank)
    t_start = time.perf_counter()

    path = prepare_dataset(cfg, run_dir, progress)
    env_args = read_env_args(path)
    if cfg.data.path and cfg.task.env_kwargs:  # user env kwargs override the dataset's (e.g. a longer horizon)
        env_args = {**env_args, "env_kwargs": {**env_args["env_kwargs"], **cfg.task.env_kwargs}}
    demos = read_dataset(path, cfg.task.obs_keys or None, cfg.data.filter_key, cfg.data.max_demos)
    obs_keys = cfg.task.obs_keys or list(demos[0].obs)
    data = WindowDataset(demos, obs_keys, cfg.policy.To, cfg.policy.Tp, device=device, seed=cfg.seed)
    policy = build_policy(cfg.policy, data)
    policy.metadata = {"env_args": env_args, "task": cfg.task.name, "dataset": str(path)}
    make_env = env_factory(env_args)
    probe = make_env()
    check_env_compat(probe, policy)
    probe.close()

    def eval_during(model, step):
        res = evaluate(model, make_env, n_episodes=cfg.eval.episodes_during, n_envs=cfg.eval.n_envs,
                       seed=cfg.eval.seed + 10_000, progress=False, steps=cfg.eval.steps)
        model.train(False)
        return {"success_rate": res.success_rate}

    train_cfg = cfg.train
    if not progress:
        train_cfg = type(train_cfg)(**{**train_cfg.__dict__, "progress": False})
    trainer = Trainer(policy, data, train_cfg, run_dir, eval_fn=eval_during if cfg.eval.every else None,
                      eval_every=cfg.eval.every)
    t0 = time.perf_counter()
    history = trainer.fit(resume=True)
    train_time = time.perf_counter() - t0
    metrics = {"task": cfg.task.name, "dataset": str(path), "demos": len(demos), "train_time_s": train_time,
               "train_steps": trainer.step, "final_loss": history[-1]["loss"] if history else None,
               "bad_steps": trainer.bad_steps, "params": sum(p.numel() for p in policy.parameters()),
               "process": cfg.policy.process.type, "net": cfg.policy.net.type, "device": str(device),
               "world_size": world_size}
    ckpt = trainer.ckpt_dir
    if dist_utils.is_main():
        ema_policy = trainer.ema.model.eval()
        video = run_dir / "rollout.mp4" if cfg.eval.video else None
        res = evaluate(ema_policy, make_env, n_episodes=cfg.eval.episodes, n_envs=cfg.eval.n_envs, seed=cfg.eval.seed,
                       video_path=video, video_episodes=cfg.eval.video_episodes, progress=progress, steps=cfg.eval.steps)
        metrics["eval"] = res.to_dict()
        metrics["success_rate"] = res.success_rate
        metrics["success_ci95"] = list(res.success_ci95)
        metrics["checkpoint"] = str(ckpt)
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
