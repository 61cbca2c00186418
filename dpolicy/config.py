"""Typed configuration: dataclasses validated on construction, built from plain dicts.

YAML (hydra) only composes and overrides; these classes own the defaults, the checks and the
error messages. ``from_dict`` rejects unknown keys, naming them, so a typo never passes silently.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from dpolicy.errors import ConfigError


def from_dict(cls, d: Mapping[str, Any] | None, where: str = ""):
    """Build dataclass ``cls`` from ``d``; nested dataclass fields are built recursively."""
    if d is None:
        return cls()
    if isinstance(d, cls):
        return d
    if not isinstance(d, Mapping):
        raise ConfigError(f"config section {where or cls.__name__!r} must be a mapping, got {type(d).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(repr(f'{where}.{k}' if where else k) for k in unknown)}; "
                          f"valid keys are {sorted(fields)}.")
    kwargs = {}
    for k, v in d.items():
        ftype = fields[k].type
        sub = _DATACLASSES.get(ftype if isinstance(ftype, str) else getattr(ftype, "__name__", ""))
        kwargs[k] = from_dict(sub, v, f"{where}.{k}" if where else k) if sub is not None else v
    return cls(**kwargs)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def _check(cond: bool, msg: str):
    if not cond:
        raise ConfigError(msg)


@dataclass
class NetConfig:
    type: str = "mlp"  # "mlp" (residual MLP, DPPO design) or "unet" (1-D conditional U-Net, Diffusion Policy design)
    hidden: int = 256  # mlp width
    depth: int = 3  # mlp residual blocks
    down_dims: list = field(default_factory=lambda: [64, 128, 256])  # unet channels per level
    kernel_size: int = 5
    n_groups: int = 8
    time_dim: int = 32  # time-embedding width
    film: str = "residual"  # unet FiLM: "residual" h*(1+scale)+bias, "plain" h*scale+bias (Diffusion Policy, LeRobot), "bias" h+bias

    def __post_init__(self):
        _check(self.type in ("mlp", "unet"), f"net.type={self.type!r} is unknown; choose 'mlp' or 'unet'.")
        _check(self.hidden > 0 and self.depth >= 0, f"net.hidden={self.hidden} / net.depth={self.depth} must be positive.")
        _check(len(self.down_dims) >= 1 and all(int(d) > 0 for d in self.down_dims),
               f"net.down_dims={list(self.down_dims)} must be a non-empty list of positive ints.")
        _check(self.time_dim > 0 and self.time_dim % 2 == 0, f"net.time_dim={self.time_dim} must be a positive even int.")
        self.down_dims = [int(d) for d in self.down_dims]
        _check(self.film in ("residual", "plain", "bias"), f"net.film={self.film!r} is unknown; choose 'residual', 'plain' or 'bias'.")


@dataclass
class ProcessConfig:
    type: str = "diffusion"  # "diffusion", "flow" or "regression" (deterministic MSE baseline)
    train_steps: int = 100  # diffusion levels (DDPM)
    prediction: str = "epsilon"  # diffusion target: "epsilon" or "sample"
    sampler: str = "ddim"  # diffusion: "ddim" | "ddpm"; flow: "euler" | "heun"
    eta: float = 0.0  # DDIM stochasticity (0 = deterministic)
    clip_sample: bool = True
    time_sampling: str = "uniform"  # flow training times: "uniform" | "logit_normal"
    steps: int = 10  # default number of sampling steps

    def __post_init__(self):
        _check(self.type in ("diffusion", "flow", "regression"),
               f"process.type={self.type!r} is unknown; choose 'diffusion', 'flow' or 'regression'.")
        ok = {"diffusion": ("ddim", "ddpm"), "flow": ("euler", "heun"), "regression": ("direct",)}[self.type]
        if self.type == "regression":
            self.sampler = "direct"
        _check(self.sampler in ok, f"process.sampler={self.sampler!r} does not fit process.type={self.type!r}; choose one of {ok}.")
        _check(self.steps >= 1, f"process.steps={self.steps} must be at least 1.")


@dataclass
class PolicyConfig:
    obs_keys: list = field(default_factory=list)  # observation keys, in order
    obs_dims: dict = field(default_factory=dict)  # key -> dimension (filled from the dataset)
    action_dim: int = 0  # filled from the dataset
    To: int = 2  # observation history
    Tp: int = 16  # predicted chunk length
    Ta: int = 8  # executed actions per chunk
    obs_norm: str = "limits"
    action_norm: str = "limits"
    obs_noise: float = 0.0  # training only: std of Gaussian noise on the normalized observations (robustness to drift)
    # per action dimension, a factor applied after normalization (RTI-DP "scale": e.g. [1, 1, 1, 0.1] shrinks a binary
    # gripper to +-0.1 so a warm start can flip it in a few denoising steps); None = all 1, checkpoints without it load as before
    action_scale: list | None = None
    net: NetConfig = field(default_factory=NetConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)

    def __post_init__(self):
        _check(self.To >= 1, f"policy.To={self.To} must be at least 1.")
        _check(self.Tp >= 1, f"policy.Tp={self.Tp} must be at least 1.")
        _check(1 <= self.Ta <= self.Tp, f"policy.Ta={self.Ta} must be between 1 and Tp={self.Tp}.")
        _check(0.0 <= float(self.obs_noise) < float("inf"), f"policy.obs_noise={self.obs_noise} must be a finite number >= 0.")
        self.obs_keys = list(self.obs_keys)
        self.obs_dims = {str(k): int(v) for k, v in dict(self.obs_dims).items()}
        if self.action_scale is not None:
            import math

            s = self.action_scale
            _check(isinstance(s, (list, tuple)) and len(s) > 0 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in s),
                f"policy.action_scale={s!r} must be a list of finite positive numbers, one per action dimension.")
            _check(self.action_dim == 0 or len(s) == self.action_dim,
                   f"policy.action_scale has {len(s)} entries but the action dimension is {self.action_dim}.")
            self.action_scale = [float(v) for v in s]


@dataclass
class TrainConfig:
    steps: int = 3000  # gradient steps
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-6
    betas: list = field(default_factory=lambda: [0.95, 0.999])
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_power: float = 0.75
    ema_max: float = 0.9999
    log_every: int = 50
    ckpt_every: int = 1000
    keep_checkpoints: int = 2
    seed: int = 0
    amp: bool = True  # bf16 autocast, CUDA only
    compile: bool = False  # torch.compile the denoiser, CUDA only
    max_bad_steps: int = 20  # consecutive non-finite steps before giving up
    progress: bool = True

    def __post_init__(self):
        _check(self.steps >= 1, f"train.steps={self.steps} must be at least 1.")
        _check(self.batch_size >= 1, f"train.batch_size={self.batch_size} must be at least 1.")
        _check(self.lr > 0, f"train.lr={self.lr} must be positive.")
        _check(self.ckpt_every >= 1 and self.log_every >= 1, "train.ckpt_every and train.log_every must be at least 1.")
        _check(self.keep_checkpoints >= 1, f"train.keep_checkpoints={self.keep_checkpoints} must be at least 1.")


@dataclass
class TaskConfig:
    name: str = "avoid"  # short task name (envs.TASKS) or any gymnasium id with a Box action space
    env_kwargs: dict = field(default_factory=dict)  # passed to the environment constructor
    obs_keys: list = field(default_factory=list)  # observation keys the policy sees (empty: all of the dataset's)
    n_demos: int = 100  # expert demos collected when data.path is not given
    demo_noise: float = 0.0  # expert action noise for collected demos
    expert_kwargs: dict = field(default_factory=dict)  # e.g. mode_probs for the multimodal task
    keep_failures: bool = False  # keep the expert's failed episodes in the collected demos (mixed-quality data)

    def __post_init__(self):
        _check(self.n_demos >= 1, f"task.n_demos={self.n_demos} must be at least 1.")
        self.env_kwargs, self.expert_kwargs = dict(self.env_kwargs or {}), dict(self.expert_kwargs or {})
        self.obs_keys = list(self.obs_keys or [])


@dataclass
class DataConfig:
    path: str | None = None  # robomimic-layout HDF5; None: collect expert demos into the run directory
    filter_key: str | None = None  # mask/<filter_key> selects demos (e.g. "train")
    max_demos: int | None = None


@dataclass
class EvalConfig:
    episodes: int = 100
    n_envs: int = 10
    seed: int = 100000  # evaluation seeds start here, far from the demo seeds
    steps: int | None = None  # sampling steps (None: the process default)
    video: bool = True
    video_episodes: int = 2
    plot: bool = True
    every: int = 0  # evaluate every N training steps for the learning curve (0: only at the end)
    episodes_during: int = 20  # episodes per evaluation during training

    def __post_init__(self):
        _check(self.episodes >= 1 and self.n_envs >= 1, f"eval.episodes={self.episodes} and eval.n_envs={self.n_envs} must be at least 1.")


@dataclass
class RunConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "auto"
    seed: int = 0


_DATACLASSES = {c.__name__: c for c in (NetConfig, ProcessConfig, PolicyConfig, TrainConfig, TaskConfig, DataConfig,
                                         EvalConfig, RunConfig)}


def register(*classes) -> None:
    """Let ``from_dict`` build these dataclasses when they appear as fields of another config."""
    _DATACLASSES.update({c.__name__: c for c in classes})
