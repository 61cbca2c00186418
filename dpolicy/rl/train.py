"""The DSRL training loop behind ``dpolicy-steer``: frozen base, noise-space RL, periodic evaluation."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dpolicy.config import register
from dpolicy.errors import ConfigError
from dpolicy.rl.agent import DSRLAgent, DSRLConfig
from dpolicy.rl.noise_env import NoiseActionEnv
from dpolicy.rl.replay import ReplayBuffer
from dpolicy.rl.steered import SteeredPolicy

logger = logging.getLogger("dpolicy.steer")


@dataclass
class SteerConfig:
    base: str = ""                 # base policy checkpoint (policy dir, step dir or run checkpoints/)
    env_kwargs: dict = field(default_factory=dict)  # override the base's stored env kwargs
    dsrl: DSRLConfig = field(default_factory=DSRLConfig)
    env_steps: int = 50000         # environment steps of RL (the chunk's executed actions count one each)
    n_envs: int = 4
    init_steps: int = 1500         # env steps with w ~ N(0, I) (the base policy itself) before learning
    buffer_size: int = 1000000
    reward_offset: float = 0.0     # added to every env reward (e.g. -1: a cost per step)
    sampling_steps: int | None = None  # base sampling steps (None: the base's own)
    base_eta: float | None = None  # diffusion bases only: override DDIM's eta (1.0: stochastic DDPM-style
                                   # sampling, the ablation DSRL's determinism argument predicts to hurt)
    sample_noise: bool | None = None  # the steered policy samples its noise from the actor (None: when
                                      # dsrl.regularizer=prior) instead of taking the actor's mean
    eval_every: int = 5000         # env steps between evaluations
    eval_episodes: int = 50
    eval_seed: int = 100000
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    backend: str | None = None     # where the envs run: local | subprocess | ray (None: the process default, local
                                   # unless dpolicy-bench --backend says otherwise); the base and the agent stay here
    workers: int = 1               # worker processes or Ray actors
    address: str | None = None     # ray: an existing cluster's address (None: start a local one)
    placement: str = "learner"     # the evaluations: learner | workers (a policy copy per worker)
    shard: int | None = None       # placement=workers: episodes per shard

    def __post_init__(self):
        from dpolicy.eval.backends import RolloutBackend

        RolloutBackend.from_settings(self)
        if not self.base:
            raise ConfigError("base=<checkpoint> is required: the frozen policy to steer.")
        if self.env_steps < 1 or self.n_envs < 1 or self.eval_episodes < 1:
            raise ConfigError("env_steps, n_envs and eval_episodes must be at least 1.")
        self.env_kwargs = dict(self.env_kwargs or {})


register(DSRLConfig, SteerConfig)


def _evaluate(policy, env_fn, cfg: SteerConfig) -> dict:
    from dpolicy.eval import evaluate

    from dpolicy.eval.backends import RolloutBackend

    r = evaluate(policy, env_fn, n_episodes=cfg.eval_episodes, n_envs=min(10, cfg.eval_episodes), seed=cfg.eval_seed,
                 progress=False, steps=cfg.sampling_steps, backend=RolloutBackend.from_settings(cfg))
    return {"success_rate": r.success_rate, "success_ci95": list(r.success_ci95), "mean_return": r.mean_return}


def steer(cfg: SteerConfig, run_dir, log=None) -> dict:
    """Steer ``cfg.base`` with DSRL; writes metrics.json, steering_curve.png, tb/ and steered/ into ``run_dir``."""
    from tqdm import tqdm

    from dpolicy.eval import plot_success_vs
    from dpolicy.kinds import load_policy
    from dpolicy.policy.checkpoint import resolve_checkpoint
    from dpolicy.tasks import env_factory, policy_env_args
    from dpolicy.utils import resolve_device, seed_everything

    log = log or logger.info
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    base_dir = resolve_checkpoint(cfg.base)
    base = load_policy(base_dir, device)
    if not hasattr(base, "cond_dim"):
        raise ConfigError(f"base {str(base_dir)!r} is a {type(base).__name__}; DSRL steers the noise of one trained chunk "
                          f"policy (not a composed or an already steered one): steer one of its parents instead.")
    if cfg.base_eta is not None:
        if not 0.0 <= cfg.base_eta <= 1.0:
            raise ConfigError(f"base_eta={cfg.base_eta} must lie in [0, 1].")
        try:  # DDIM with eta > 0 (eta = 1: DDPM), a sampler of diffusion bases
            base = base.with_sampler("ddpm" if cfg.base_eta == 1.0 else "ddim", eta=float(cfg.base_eta))
        except ConfigError:
            raise ConfigError(f"base_eta={cfg.base_eta} applies to diffusion bases only; {str(base_dir)!r} is a "
                              f"{base.process.name} policy.") from None
    env_args = policy_env_args(base, f"base checkpoint {str(base_dir)!r} stores no env_args, so its environment cannot be "
                                     "rebuilt.", env_kwargs=cfg.env_kwargs)
    env_fn = env_factory(env_args)
    from dpolicy.eval.backends import RolloutBackend

    env = NoiseActionEnv(base, env_fn, cfg.n_envs, cfg.seed, cfg.dsrl.action_magnitude, cfg.sampling_steps, cfg.reward_offset,
                         backend=RolloutBackend.from_settings(cfg))
    agent = DSRLAgent(cfg.dsrl, env.state_dim, env.noise_dim, env.exec_dim,
                      decode=lambda s, w: env.executed_part(env.decode(s, w)), device=device)
    buf = ReplayBuffer(min(cfg.buffer_size, cfg.env_steps + cfg.n_envs * base.Ta), {
        "state": (env.state_dim,), "next_state": (env.state_dim,), "noise": (env.noise_dim,),
        "executed": (env.exec_dim,), "reward": (), "terminated": ()}, device, cfg.seed)
    sample = cfg.dsrl.regularizer == "prior" if cfg.sample_noise is None else bool(cfg.sample_noise)
    steered = SteeredPolicy(base, agent.actor, str(base_dir), cfg.sampling_steps, sample)

    from torch.utils.tensorboard import SummaryWriter

    tb = SummaryWriter(str(run_dir / "tb"))
    history, train_succ = [], []
    t0 = time.perf_counter()
    first = _evaluate(base, env_fn, cfg)
    history.append({"env_steps": 0, **first, "wall_s": 0.0})
    log(f"base policy: success {first['success_rate']:.3f} over {cfg.eval_episodes} episodes")
    state = env.reset()
    steps, next_eval, updates, stats = 0, cfg.eval_every, 0, {}
    bar = tqdm(total=cfg.env_steps, desc=f"steer ({cfg.dsrl.algo})", disable=not cfg.progress, dynamic_ncols=True, leave=False)
    while steps < cfg.env_steps:
        if steps < cfg.init_steps:
            w = torch.randn(cfg.n_envs, env.noise_dim, device=device).clamp(-cfg.dsrl.action_magnitude, cfg.dsrl.action_magnitude)
        else:
            w = agent.act(state)
        st = env.step(state, w)
        buf.add(state=state, next_state=st.next_state, noise=w, executed=st.executed, reward=st.reward, terminated=st.terminated)
        state = st.state
        steps += st.env_steps
        bar.update(st.env_steps)
        train_succ += st.success[st.done].tolist()
        if steps >= cfg.init_steps and len(buf) >= cfg.dsrl.batch_size:
            for _ in range(cfg.dsrl.utd):
                stats = agent.update(buf.sample(cfg.dsrl.batch_size))
                updates += 1
        if steps >= next_eval or steps >= cfg.env_steps:
            next_eval += cfg.eval_every
            rec = {"env_steps": steps, **_evaluate(steered, env_fn, cfg), "wall_s": time.perf_counter() - t0,
                   "updates": updates, "train_success": float(np.mean(train_succ[-100:])) if train_succ else float("nan"),
                   **{k: v for k, v in stats.items()}}
            history.append(rec)
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "env_steps" and np.isfinite(v):
                    tb.add_scalar(f"steer/{k}", v, steps)
            tb.flush()
            log(f"env steps {steps}: success {rec['success_rate']:.3f} [{rec['success_ci95'][0]:.3f}, {rec['success_ci95'][1]:.3f}]"
                f", critic loss {stats.get('critic_loss', float('nan')):.4g}, alpha {stats.get('alpha', float('nan')):.3g}")
            bar.set_postfix(success=f"{rec['success_rate']:.2f}")
    bar.close()
    tb.close()
    env.close()
    wall = time.perf_counter() - t0
    steered.save(run_dir / "steered")
    plot = plot_success_vs([h["env_steps"] for h in history], [h["success_rate"] for h in history],
                           [tuple(h["success_ci95"]) for h in history], "environment steps", run_dir / "steering_curve.png",
                           title=f"DSRL-{cfg.dsrl.algo.upper()} on {env_args['env_name']}")
    metrics = {"algo": cfg.dsrl.algo, "base": str(base_dir), "env_args": env_args, "env_steps": steps, "updates": updates,
               "base_success": first["success_rate"], "final_success": history[-1]["success_rate"],
               "final_success_ci95": history[-1]["success_ci95"], "wall_s": wall,
               "wall_s_per_1k_env_steps": wall / max(steps, 1) * 1000, "deterministic_base": env.deterministic,
               "base_eta": cfg.base_eta,
               "history": history, "checkpoint": str(run_dir / "steered"), "plot": str(plot)}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    return metrics
