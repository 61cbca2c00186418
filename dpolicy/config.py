"""Typed configuration: dataclasses validated on construction, built from plain dicts.

YAML (hydra) only composes and overrides; these classes own the defaults, the checks and the
error messages. ``from_dict`` rejects unknown keys, naming them, so a typo never passes silently.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from dpolicy.errors import ConfigError


def from_dict(cls, d: Mapping[str, Any] | None, where: str = ""):
    """Build dataclass ``cls`` from ``d``; nested dataclass fields are built recursively.

    Every value is checked against its field's annotation before the dataclass is made, so its
    ``__post_init__`` range checks see the right types: ``int`` takes integers (an integral float such
    as 1e4 too, never 2.5 or "abc"), ``float`` takes any real number, ``bool`` only true/false, ``str``
    a string (a bare number is read as its text), ``list``/``tuple`` a sequence (element types checked
    when given), ``dict`` a mapping, a dataclass a mapping (recursively). ``X | None`` also takes null;
    null given to a field that is not Optional stands for that field's default.
    """
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
    return cls(**{k: parse_field(cls, k, v, where) for k, v in d.items()})


def parse_field(cls, name: str, value, where: str = ""):
    """``value`` checked and converted for field ``name`` of dataclass ``cls`` (see ``from_dict``)."""
    f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if f is None:
        raise ConfigError(f"{cls.__name__} has no field {name!r}.")
    key = f"{where}.{name}" if where else name
    tp = _hints(cls).get(name, f.type)
    if value is None and not _optional(tp):
        if f.default is not dataclasses.MISSING:
            return f.default
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
    return _coerce(value, tp, key)


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be resolved: fall back to the registry by name
        return {f.name: _DATACLASSES.get(f.type if isinstance(f.type, str) else "", f.type) for f in dataclasses.fields(cls)}


def _optional(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list", tuple: "a list",
          dict: "a mapping"}


def _describe(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if typing.get_origin(tp) is list and typing.get_args(tp):
        return f"a list of {_describe(typing.get_args(tp)[0]).split(' ', 1)[1]}s"
    return _WORDS.get(typing.get_origin(tp) or tp, getattr(tp, "__name__", str(tp)))


def _coerce(v, tp, key: str):
    """``v`` as type ``tp``, or a ConfigError naming ``key``."""
    if isinstance(tp, str):
        tp = _DATACLASSES.get(tp, Any)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    shown = "null" if v is None else repr(v)
    bad = ConfigError(f"{key}={shown} must be {_describe(tp)}.")
    if tp is Any:
        return v
    if origin in (typing.Union, types.UnionType):
        if v is None:
            if type(None) in args:
                return None
            raise bad
        numeric = isinstance(v, (int, float)) and not isinstance(v, bool) and (int in args or float in args)
        for a in args:
            if a is not type(None) and not (a is str and numeric):  # 2.5 for `int | str` is no text
                try:
                    return _coerce(v, a, key)
                except ConfigError as e:
                    if not str(e).startswith(f"{key}="):  # about a part of the value (an element, a nested key)
                        raise
        raise bad
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, v, key)
    if tp is bool:
        if isinstance(v, bool):
            return v
        raise bad
    if tp is int:
        if isinstance(v, bool):
            raise bad
        if isinstance(v, int):
            return v
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            return int(v)
        if isinstance(v, str):
            try:
                return int(v.strip())
            except ValueError:
                pass
        raise bad
    if tp is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, str):
            try:
                return float(v.strip())
            except ValueError:
                pass
        raise bad
    if tp is str:
        if isinstance(v, str):
            return v
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)
        raise bad
    if tp in (list, tuple) or origin in (list, tuple):
        if not isinstance(v, (list, tuple)):
            raise bad
        if origin is list and args:
            v = [_coerce(x, args[0], f"{key}[{i}]") for i, x in enumerate(v)]
        return tuple(v) if (tp is tuple or origin is tuple) else list(v)
    if tp is dict or origin is dict:
        if not isinstance(v, Mapping):
            raise bad
        return dict(v)
    return v


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def _check(cond: bool, msg: str):
    if not cond:
        raise ConfigError(msg)


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def check_min(obj, where: str, lo, *names: str, null: str = ""):
    """Each field in ``names`` of ``obj`` is None (when Optional) or at least ``lo``; ``null`` says what null means."""
    for name in names:
        v = getattr(obj, name)
        if v is not None and not v >= lo:
            tail = f" (null: {null})" if null else ""
            raise ConfigError(f"{_key(where, name)}={v!r} must be at least {lo}{tail}.")


def check_fraction(obj, where: str, *names: str, top_open: bool = False):
    """Each field in ``names`` of ``obj`` lies in [0, 1] (``top_open``: [0, 1))."""
    for name in names:
        v = getattr(obj, name)
        if v is not None and not (0 <= v < 1 if top_open else 0 <= v <= 1):
            raise ConfigError(f"{_key(where, name)}={v!r} must lie in [0, 1{')' if top_open else ']'}.")


def check_choice(obj, where: str, name: str, choices):
    v = getattr(obj, name)
    if v not in choices:
        raise ConfigError(f"{_key(where, name)}={v!r} is unknown; choose one of {', '.join(map(str, choices))}.")


DEVICES = "auto, cpu, cuda, cuda:N or mps"


def check_device(name, key: str = "device") -> str:
    """``name`` if it is a device name dpolicy accepts (auto, cpu, cuda, cuda:N, mps), else one ConfigError."""
    s = str(name)
    if s in ("auto", "cpu", "cuda", "mps") or (s.startswith("cuda:") and s[5:].isdigit()):
        return s
    raise ConfigError(f"{key}={name!r} is not a device; use {DEVICES}.")


@dataclass
class NetConfig:
    type: str = "mlp"  # "mlp" (residual MLP, DPPO design) or "unet" (1-D conditional U-Net, Diffusion Policy design)
    hidden: int = 256  # mlp width
    depth: int = 3  # mlp residual blocks
    down_dims: list[int] = field(default_factory=lambda: [64, 128, 256])  # unet channels per level
    kernel_size: int = 5
    n_groups: int = 8
    time_dim: int = 32  # time-embedding width
    film: str = "residual"  # unet FiLM: "residual" h*(1+scale)+bias, "plain" h*scale+bias (Diffusion Policy, LeRobot), "bias" h+bias

    def __post_init__(self):
        _check(self.type in ("mlp", "unet"), f"policy.net.type={self.type!r} is unknown; choose 'mlp' or 'unet'.")
        _check(self.hidden > 0 and self.depth >= 0, f"policy.net.hidden={self.hidden} must be positive and "
                                                         f"policy.net.depth={self.depth} at least 0.")
        _check(len(self.down_dims) >= 1 and all(int(d) > 0 for d in self.down_dims),
               f"policy.net.down_dims={list(self.down_dims)} must be a non-empty list of positive ints.")
        _check(self.time_dim > 0 and self.time_dim % 2 == 0, f"policy.net.time_dim={self.time_dim} must be a positive even int.")
        check_min(self, "policy.net", 1, "kernel_size", "n_groups")
        self.down_dims = [int(d) for d in self.down_dims]
        _check(self.film in ("residual", "plain", "bias"), f"net.film={self.film!r} is unknown; choose 'residual', 'plain' or 'bias'.")


@dataclass
class ProcessConfig:
    type: str = "diffusion"  # a registered process: "diffusion", "flow", "edm" or "regression" (deterministic MSE baseline)
    train_steps: int = 100  # diffusion levels (DDPM)
    prediction: str = "epsilon"  # diffusion target: "epsilon" or "sample"
    sampler: str = "ddim"  # diffusion: "ddim" | "ddpm"; flow: "euler" | "heun"; edm: "heun" | "euler"
    eta: float = 0.0  # DDIM stochasticity (0 = deterministic)
    clip_sample: bool = True
    time_sampling: str = "uniform"  # flow training times: "uniform" | "logit_normal"
    steps: int = 10  # default number of sampling steps
    options: dict = field(default_factory=dict)  # settings of the process type itself (e.g. edm's sigma_max), checked by it

    def __post_init__(self):
        from dpolicy.process import check_process_config, process_class

        self.options = dict(self.options or {})
        samplers = process_class(self.type).samplers
        if len(samplers) == 1:  # a process with one way to sample (regression) needs no choice
            self.sampler = samplers[0]
        check_process_config(self)
        _check(self.steps >= 1, f"process.steps={self.steps} must be at least 1.")


@dataclass
class VisionConfig:
    """The image encoder of a policy that reads cameras (``policy.image_shapes`` non-empty); ignored otherwise."""
    encoder: str = "conv"  # "conv": a small convolutional encoder sized for CPUs; "resnet18": Diffusion Policy's (GroupNorm)
    share: bool = False  # one encoder for every camera (true) or one per camera (false, Diffusion Policy's choice)
    crop: int = 76  # random crop of this size while training, centre crop at inference (0: no crop)
    color_jitter: float = 0.0  # strength of random brightness / contrast / saturation changes while training (0: off)
    keypoints: int = 32  # spatial-softmax keypoints per camera; the features are their 2-D positions (2 * keypoints)
    # conv encoder: channels per stride-2 stage; [8, 16, 32] trains a batch of 128 76x76 frames in 50-90 ms on one
    # CPU thread, [32, 64, 64] (9x the multiply-adds) in 280-400 ms
    channels: list[int] = field(default_factory=lambda: [8, 16, 32])
    pretrained: str | None = None  # a local weights file for the resnet18 (never downloaded); loaded loudly or refused

    def __post_init__(self):
        _check(self.encoder in ("conv", "resnet18"), f"policy.vision.encoder={self.encoder!r} is unknown; choose 'conv' or 'resnet18'.")
        check_min(self, "policy.vision", 0, "crop", "color_jitter")
        check_min(self, "policy.vision", 1, "keypoints")
        _check(len(self.channels) >= 1 and all(int(c) > 0 for c in self.channels),
               f"policy.vision.channels={list(self.channels)} must be a non-empty list of positive ints.")
        self.channels = [int(c) for c in self.channels]
        _check(self.pretrained is None or self.encoder == "resnet18",
               f"policy.vision.pretrained names a weights file, which only the resnet18 encoder loads (encoder={self.encoder!r}).")


@dataclass
class PolicyConfig:
    obs_keys: list = field(default_factory=list)  # observation keys, in order
    obs_dims: dict = field(default_factory=dict)  # key -> dimension (filled from the dataset; an image's is H * W * C)
    image_shapes: dict = field(default_factory=dict)  # camera key -> [H, W, C] uint8 image (filled from the dataset)
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
    # training-time real-time chunking: the denoiser is also conditioned on up to ``prefix`` committed actions at the
    # chunk's start (the actions an asynchronous executor runs while the chunk is computed), drawn 0..prefix per
    # training sample; a call without them is a call with none, so the policy is an ordinary one otherwise (0: off)
    prefix: int = 0
    net: NetConfig = field(default_factory=NetConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)

    def __post_init__(self):
        _check(self.To >= 1, f"policy.To={self.To} must be at least 1.")
        check_min(self, "policy", 0, "action_dim")
        _check(self.Tp >= 1, f"policy.Tp={self.Tp} must be at least 1.")
        _check(1 <= self.Ta <= self.Tp, f"policy.Ta={self.Ta} must be between 1 and Tp={self.Tp}.")
        _check(0.0 <= float(self.obs_noise) < float("inf"), f"policy.obs_noise={self.obs_noise} must be a finite number >= 0.")
        _check(isinstance(self.prefix, int) and not isinstance(self.prefix, bool) and 0 <= self.prefix < self.Tp,
               f"policy.prefix={self.prefix!r} must be a whole number of committed actions in [0, Tp={self.Tp}).")
        self.obs_keys = list(self.obs_keys)
        self.obs_dims = {str(k): int(v) for k, v in dict(self.obs_dims).items()}
        shapes = {}
        for k, v in dict(self.image_shapes).items():
            _check(isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(n, int) and n > 0 for n in v),
                   f"policy.image_shapes[{k!r}]={v!r} must be [H, W, C] with positive integers.")
            shapes[str(k)] = [int(n) for n in v]
            _check(k not in self.obs_dims or self.obs_dims[k] == shapes[k][0] * shapes[k][1] * shapes[k][2],
                   f"policy.obs_dims[{k!r}]={self.obs_dims.get(k)} is not H * W * C of its image shape {shapes[k]}.")
        self.image_shapes = shapes
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
    steps: int = 4000  # gradient steps
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.95, 0.999])
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_power: float = 0.75
    ema_max: float = 0.9999
    log_every: int = 50
    ckpt_every: int = 1000
    keep_checkpoints: int = 2
    seed: int = 0
    amp: bool = True  # bf16 autocast, CUDA only
    compile: bool = False  # torch.compile the training step (inductor on a CPU: 1.1-1.8x the eager samples/s for an image policy)
    max_bad_steps: int = 20  # consecutive non-finite steps before giving up
    progress: bool = True
    keep_best: bool = False  # keep checkpoints/best: the step with the highest success of the evaluations during training
    early_stop: int = 0  # stop once N evaluations in a row reach stop_success (0: train all steps)
    stop_success: float = 1.0  # the success rate early_stop waits for

    def __post_init__(self):
        _check(self.steps >= 1, f"train.steps={self.steps} must be at least 1.")
        _check(self.batch_size >= 1, f"train.batch_size={self.batch_size} must be at least 1.")
        _check(self.lr > 0, f"train.lr={self.lr} must be positive.")
        _check(self.ckpt_every >= 1 and self.log_every >= 1, "train.ckpt_every and train.log_every must be at least 1.")
        _check(self.keep_checkpoints >= 1, f"train.keep_checkpoints={self.keep_checkpoints} must be at least 1.")
        _check(isinstance(self.early_stop, int) and not isinstance(self.early_stop, bool) and self.early_stop >= 0,
               f"train.early_stop={self.early_stop!r} must be a whole number of evaluations >= 0 (0: off).")
        _check(isinstance(self.stop_success, (int, float)) and 0.0 < self.stop_success <= 1.0,
               f"train.stop_success={self.stop_success!r} must be a success rate in (0, 1].")
        check_min(self, "train", 0, "weight_decay", "warmup_steps")
        check_min(self, "train", 1, "max_bad_steps")
        _check(self.grad_clip > 0 and self.ema_power > 0, f"train.grad_clip={self.grad_clip} and train.ema_power={self.ema_power} "
                                                          "must be positive.")
        check_fraction(self, "train", "ema_max")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               f"train.betas={list(self.betas)} must be two numbers in [0, 1).")


@dataclass
class TaskConfig:
    name: str | None = "avoid"  # short task name (dpolicy_envs.TASKS) or any gymnasium id with a Box action space; None: from data.path
    env_kwargs: dict = field(default_factory=dict)  # passed to the environment constructor
    obs_keys: list = field(default_factory=list)  # observation keys the policy sees (empty: all of the dataset's)
    n_demos: int = 100  # expert demos collected when data.path is not given
    demo_noise: float = 0.0  # expert action noise for collected demos
    expert_kwargs: dict = field(default_factory=dict)  # e.g. mode_probs for the multimodal task
    keep_failures: bool = False  # keep the expert's failed episodes in the collected demos (mixed-quality data)

    def __post_init__(self):
        _check(self.n_demos >= 1, f"task.n_demos={self.n_demos} must be at least 1.")
        check_min(self, "task", 0, "demo_noise")
        self.env_kwargs, self.expert_kwargs = dict(self.env_kwargs or {}), dict(self.expert_kwargs or {})
        self.obs_keys = list(self.obs_keys or [])


@dataclass
class DataConfig:
    path: str | None = None  # robomimic-layout HDF5; None: collect expert demos into the run directory
    filter_key: str | None = None  # mask/<filter_key> selects demos (e.g. "train")
    max_demos: int | None = None

    def __post_init__(self):
        check_min(self, "data", 1, "max_demos", null="all of them")


@dataclass
class EvalConfig:
    episodes: int = 100
    n_envs: int = 10
    seed: int = 100000  # evaluation seeds start here, far from the demo seeds
    steps: int | None = None  # sampling steps (None: the process default)
    video: bool = True
    video_episodes: int = 2
    plot: bool = True
    every: int = 1000  # evaluate every N training steps for the learning curve (0: only at the end)
    episodes_during: int = 20  # episodes per evaluation during training

    def __post_init__(self):
        _check(self.episodes >= 1 and self.n_envs >= 1, f"eval.episodes={self.episodes} and eval.n_envs={self.n_envs} must be at least 1.")
        check_min(self, "eval", 1, "steps", null="the policy's default")
        check_min(self, "eval", 1, "episodes_during")
        check_min(self, "eval", 0, "video_episodes", "every")


@dataclass
class RunConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "auto"
    seed: int = 0

    def __post_init__(self):
        check_device(self.device)


# The settings of the other hydra commands (configs/<command>.yaml holds the same defaults; the comments there
# say what each one does). ``task=<name>`` selects configs/task/<name>.yaml, whose training recipe (train, policy,
# eval) the commands drop.
RECIPE_KEYS = ("train", "policy", "eval")


def task_name(task: TaskConfig | None) -> str | None:
    return None if task is None else task.name


@dataclass
class EvaluateConfig:
    """``dpolicy-eval``: evaluate a checkpoint on the environment stored with it."""
    checkpoint: str | None = None  # required: a policy directory, a step directory or a run's checkpoints/
    task: TaskConfig | None = None  # task=<name> (configs/task/): run on that task instead of the stored one
    env_kwargs: dict | None = None  # override the stored env kwargs
    episodes: int = 100
    n_envs: int = 10
    seed: int = 100000
    steps: int | None = None  # sampling steps (None: the policy's default)
    video: bool = True
    video_episodes: int = 2
    device: str = "auto"
    backend: str = "local"  # where the envs run: local | subprocess | ray
    workers: int = 1  # worker processes or Ray actors
    address: str | None = None  # ray: an existing cluster's address (None: start a local one)
    placement: str = "learner"  # learner (policy here, envs in workers) | workers (a policy copy per worker)
    shard: int | None = None  # placement=workers: episodes per shard (None: n_envs)

    def __post_init__(self):
        _check(bool(self.checkpoint), "checkpoint=<path> is required.")
        RolloutBackend.from_settings(self)
        check_min(self, "", 1, "episodes", "n_envs")
        check_min(self, "", 1, "steps", null="the policy's default")
        check_min(self, "", 0, "video_episodes")
        check_device(self.device)


@dataclass
class CollectConfig:
    """``dpolicy-collect``: scripted-expert demonstrations in robomimic's HDF5 layout."""
    task: TaskConfig = field(default_factory=TaskConfig)
    n_demos: int = 100  # configs/collect.yaml: task.n_demos
    noise_std: float = 0.0  # expert action noise; configs/collect.yaml: task.demo_noise
    out: str | None = None  # None: <run dir>/<task>_demos.hdf5
    seed: int = 0
    keep_failures: bool = False
    valid_fraction: float = 0.1  # share of the demos in mask/valid (0: no masks)
    compression: str | None = "gzip"  # of the images: gzip (level 4), lzf or null
    rerender: str | None = None  # a dataset whose observations are rendered anew from its states (no expert runs)

    def __post_init__(self):
        check_min(self, "", 1, "n_demos")
        check_min(self, "", 0, "noise_std")
        check_fraction(self, "", "valid_fraction", top_open=True)
        _check(self.compression in ("gzip", "lzf", None),
               f"compression={self.compression!r} is unknown; choose one of gzip, lzf or null.")
        _check(self.rerender != "", "rerender='' names no dataset; give rerender=<file.hdf5>.")


# where a rollout's envs run (dpolicy/eval/backends.py): the settings, here with the other configs
BACKENDS = ("local", "subprocess", "ray")


@dataclass
class RolloutBackend:
    kind: str = "local"        # local | subprocess | ray
    workers: int = 1           # worker processes or Ray actors (capped at the number of env slots)
    address: str | None = None  # ray: an existing cluster ("auto", "ray://host:10001"); None: a local one
    cpus_per_worker: float = 1.0  # ray: CPUs each actor reserves (its env stepping is single-threaded)
    max_restarts: int = 3      # replacements per worker before the rollout gives up
    placement: str = "learner"  # evaluation only: learner (the caller's batched policy steps envs in the workers)
                                # | workers (each worker holds a CPU copy of the policy and plays whole shards)
    shard: int | None = None   # placement=workers: episodes per shard (None: n_envs), each on that many slots

    def __post_init__(self):
        if self.placement not in ("learner", "workers"):
            raise ConfigError(f"placement={self.placement!r} is not a policy placement; use learner or workers.")
        if self.shard is not None and not (isinstance(self.shard, int) and self.shard >= 1):
            raise ConfigError(f"shard={self.shard!r} must be an integer of at least 1 (or None for n_envs).")
        if self.kind not in BACKENDS:
            raise ConfigError(f"backend={self.kind!r} is not a rollout backend; use one of {', '.join(BACKENDS)}.")
        if not (isinstance(self.workers, int) and self.workers >= 1):
            raise ConfigError(f"workers={self.workers!r} must be an integer of at least 1.")
        if self.max_restarts < 0:
            raise ConfigError(f"max_restarts={self.max_restarts} must be at least 0.")
        if not self.cpus_per_worker >= 0:
            raise ConfigError(f"cpus_per_worker={self.cpus_per_worker} must be at least 0.")

    @classmethod
    def of(cls, backend: "RolloutBackend | str | None", workers: int | None = None, address: str | None = None,
           **kwargs) -> "RolloutBackend":
        """``backend`` itself, or one made from a kind; None is the process default (``set_default_backend``)."""
        if isinstance(backend, RolloutBackend):
            return backend
        if backend is None and workers is None and address is None and not kwargs:
            return _DEFAULT[0]
        return cls(kind=backend or "local", workers=1 if workers is None else workers, address=address, **kwargs)

    @classmethod
    def from_settings(cls, c) -> "RolloutBackend":
        """From a command's settings (``backend``, ``workers``, ``address``, ``placement``, ``shard`` fields);
        ``backend=None`` is the process default."""
        if c.backend is None:  # the other settings are still checked
            cls(kind="local", workers=c.workers, address=c.address, placement=c.placement, shard=c.shard)
            return _DEFAULT[0]
        return cls(kind=c.backend, workers=c.workers, address=c.address, placement=c.placement, shard=c.shard)


_DEFAULT = [RolloutBackend()]


def set_default_backend(backend: RolloutBackend) -> None:
    """The backend of every rollout in this process that names none (``dpolicy-bench --backend``)."""
    _DEFAULT[0] = backend



# asynchronous execution (dpolicy/deploy/asynchronous.py): the settings, here with the other configs
STRATEGIES = ("naive", "ensemble", "bid", "rtc")
MASKS = ("soft", "hard")
GUIDANCE = ("vjp", "direct", "trained")


@dataclass
class AsyncConfig:
    strategy: str = "rtc"        # naive | ensemble | bid | rtc
    delay: int = 0               # control steps an inference takes (the injected delay)
    horizon: int | None = None   # s: actions executed per chunk (None: max(Ta, delay))
    steps: int | None = None     # sampling steps of a full solve (None: the policy's default)
    mask: str = "soft"           # rtc: soft (frozen prefix + decaying overlap) | hard (frozen prefix only)
    beta: float = 5.0            # rtc: the largest guidance weight
    overlap: int | None = None   # rtc, soft mask: entries after the frozen prefix pulled towards the current chunk
                                 # (None: the whole overlap [delay, Tp - horizon), as in the paper)
    decay: float = 0.01          # ensemble: ACT's m in exp(-m i)
    candidates: int = 8          # bid: chunks sampled per inference
    rho: float = 0.9             # bid: weight rho^j of overlap entry j in the coherence distance
    warm: list[int] | None = None  # RTI warm start: descending timesteps ending at 0 (None: solve from noise)
    guidance: str = "vjp"        # rtc: vjp (RTC's vector-Jacobian product through the network) | direct (no
                                 # backward pass: the correction applied to the predicted clean chunk) | trained
                                 # (a policy trained with policy.prefix >= delay: the committed actions are its
                                 # conditioning, no guidance)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy={self.strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}.")
        if self.guidance not in GUIDANCE:
            raise ConfigError(f"guidance={self.guidance!r} is unknown; choose one of {', '.join(GUIDANCE)}.")
        if self.mask not in MASKS:
            raise ConfigError(f"mask={self.mask!r} is unknown; choose soft or hard.")
        if isinstance(self.delay, bool) or not isinstance(self.delay, int) or self.delay < 0:
            raise ConfigError(f"delay={self.delay!r} must be a whole number of control steps, at least 0.")
        if self.horizon is not None and (not isinstance(self.horizon, int) or self.horizon < 1):
            raise ConfigError(f"horizon={self.horizon!r} must be at least 1 (or None for max(Ta, delay)).")
        if not (self.beta >= 0 and math.isfinite(self.beta)):
            raise ConfigError(f"beta={self.beta!r} must be a finite number of at least 0.")
        if not self.decay >= 0:
            raise ConfigError(f"decay={self.decay!r} must be at least 0.")
        if self.overlap is not None and (isinstance(self.overlap, bool) or not isinstance(self.overlap, int)
                                         or self.overlap < 1):
            raise ConfigError(f"overlap={self.overlap!r} must be at least 1 (or None for the whole overlap).")
        if not (isinstance(self.candidates, int) and self.candidates >= 1):
            raise ConfigError(f"candidates={self.candidates!r} must be an integer of at least 1.")
        if not 0 < self.rho <= 1:
            raise ConfigError(f"rho={self.rho!r} must be in (0, 1].")



DEPLOY_MODES = ("rti", "chunked", "async")
SAMPLERS = ("ddim", "ddpm", "euler", "heun", "direct")


@dataclass
class DeployConfig:
    """``dpolicy-deploy``: a checkpoint as a controller in a fixed-rate loop (see dpolicy/deploy)."""
    checkpoint: str | None = None  # required
    task: TaskConfig | None = None  # task=<name> (configs/task/): run on that task instead of the stored one
    env_kwargs: dict | None = None
    mode: str = "rti"  # rti | chunked
    k: int | str = 3  # rti: network evaluations per decision, or "full"
    timesteps: list[int] | None = None  # rti: explicit descending timesteps ending at 0; overrides k
    steps: int | None = None  # full-solve steps (None: the policy's default)
    sampler: str | None = None  # None: the policy's own
    renoise: bool = True
    execute: int | None = None  # chunked: actions executed per solve (None: the policy's Ta)
    discrete: dict | None = None  # binary action dimensions and their remedy, e.g. {-1: clip}
    rate_hz: float | None = None  # None: the env's own rate
    realtime: bool = True
    prime: bool = True
    episodes: int = 10
    seed: int = 100000
    max_steps: int | None = None
    device: str = "auto"
    threads: int | None = 1  # torch CPU threads (None: torch's default)
    compile: bool = False
    cuda_graph: bool | None = None  # None: on when the device is CUDA
    export: str | None = None  # path of a .pt2 file for the exported decision step
    eval_episodes: int = 0  # also a batched success evaluation over this many episodes (0: none)
    n_envs: int = 10
    # mode=async (dpolicy/deploy/asynchronous.py): the policy thinks while the chunk executes
    strategy: str = "rtc"  # naive | ensemble | bid | rtc
    delay: int = 0  # the batched evaluation's injected delay, in control steps (and the live loop's first guess)
    horizon: int | None = None  # actions executed per chunk (None: max(Ta, delay))
    mask: str = "soft"  # rtc: soft | hard
    beta: float = 5.0  # rtc: the largest guidance weight
    overlap: int | None = None  # rtc, soft mask: entries after the frozen prefix that are guided (None: the whole overlap)
    guidance: str = "vjp"  # rtc: vjp (through the network) | direct (on the predicted clean chunk) | trained (policy.prefix)
    candidates: int = 8  # bid: chunks sampled per inference
    predict: str | None = None  # a forward model dir, or demos (.hdf5) to fit one on: the batched evaluation plans
                                # each chunk from the observation predicted for its switch step
    predict_rollouts: int = 0  # predict=<demos>: also fit on this many of the policy's own episodes (synchronous
                               # chunked, seeds predict_seed..): the states the policy visits, which scripted demos miss
    predict_seed: int = 600000

    def __post_init__(self):
        _check(bool(self.checkpoint), "checkpoint=<path> is required.")
        check_choice(self, "", "mode", DEPLOY_MODES)
        self.async_config()  # the async settings' checks (they are read only with mode=async)
        _check(self.k == "full" if isinstance(self.k, str) else self.k >= 1, f"k={self.k!r} must be a positive integer or 'full'.")
        if self.sampler is not None:
            check_choice(self, "", "sampler", SAMPLERS)
        check_min(self, "", 1, "steps", null="the policy's default")
        check_min(self, "", 1, "execute", null="the policy's Ta")
        check_min(self, "", 1, "episodes", "n_envs")
        check_min(self, "", 1, "max_steps", null="the environment's own limit")
        check_min(self, "", 1, "threads", null="torch's default")
        check_min(self, "", 0, "eval_episodes", "predict_rollouts", "predict_seed")
        _check(not self.predict_rollouts or self.predict,
               f"predict_rollouts={self.predict_rollouts} adds the policy's own episodes to a forward model's fit: it "
               "needs predict=<demos .hdf5> to fit one on.")
        _check(self.rate_hz is None or self.rate_hz > 0, f"rate_hz={self.rate_hz!r} must be positive (null: the env's own rate).")
        check_device(self.device)

    def async_config(self):
        return AsyncConfig(strategy=self.strategy, delay=self.delay, horizon=self.horizon, steps=self.steps, mask=self.mask,
                           beta=self.beta, overlap=self.overlap, guidance=self.guidance, candidates=self.candidates,
                           warm=self.timesteps)


@dataclass
class CEMConfig:
    """The cross-entropy weight search of ``dpolicy-compose search=cem``."""
    iterations: int = 4
    population: int = 8
    elite_frac: float = 0.25
    rng_seed: int = 0

    def __post_init__(self):
        check_min(self, "cem", 1, "iterations")
        check_min(self, "cem", 2, "population")
        _check(0 < self.elite_frac <= 1, f"cem.elite_frac={self.elite_frac!r} must lie in (0, 1].")


@dataclass
class ComposeConfig:
    """``dpolicy-compose``: compose checkpoints (GPC), choose the weights on selection seeds, report on others."""
    parents: list[str] = field(default_factory=list)  # required: checkpoint paths
    operator: str = "convex"  # convex | product | mixture
    search: str = "grid"  # grid | cem | none
    weights: list[float] | None = None  # search=none: the weights, one per parent
    resolution: int = 10
    cem: CEMConfig = field(default_factory=CEMConfig)
    select_episodes: int = 50
    select_seed: int = 200000
    episodes: int = 200
    seed: int = 100000
    n_envs: int = 10
    steps: int | None = None  # None: the base parent's default
    Ta: int | None = None  # None: the smallest of the parents'
    action_norm_tol: float = 0.1
    relative: bool = True
    task: TaskConfig | None = None  # task=<name> (configs/task/): that task instead of the parents' stored one
    env_kwargs: dict | None = None
    device: str = "auto"

    def __post_init__(self):
        _check(len(self.parents) >= 1, "parents=[path,path,...] is required (checkpoint paths of the policies to compose).")
        check_choice(self, "", "operator", ("convex", "product", "mixture"))
        check_choice(self, "", "search", ("grid", "cem", "none"))
        _check(self.operator != "product" or self.search == "none",
               "the product operator takes fixed weights (any non-negative values); use search=none weights=[...].")
        if self.search == "none":
            _check(self.weights is not None, "search=none needs weights=[...] (one per parent).")
        if self.weights is not None:
            _check(len(self.weights) == len(self.parents) and all(w >= 0 for w in self.weights),
                   f"weights={self.weights} must be {len(self.parents)} non-negative numbers, one per parent.")
        check_min(self, "", 1, "resolution", "select_episodes", "episodes", "n_envs")
        check_min(self, "", 1, "steps", null="the base parent's default")
        check_min(self, "", 1, "Ta", null="the smallest of the parents'")
        check_min(self, "", 0, "action_norm_tol")
        if self.search != "none":
            a, b = (self.select_seed, self.select_seed + self.select_episodes), (self.seed, self.seed + self.episodes)
            _check(not (a[0] < b[1] and b[0] < a[1]), f"selection seeds [{a[0]}, {a[1]}) overlap evaluation seeds "
                   f"[{b[0]}, {b[1]}); choose select_seed and seed so the weights are not chosen on the seeds that report them.")
        check_device(self.device)


_DATACLASSES = {c.__name__: c for c in (NetConfig, ProcessConfig, VisionConfig, PolicyConfig, TrainConfig, TaskConfig, DataConfig,
                                         EvalConfig, RunConfig, EvaluateConfig, CollectConfig, DeployConfig, CEMConfig,
                                         ComposeConfig)}


def register(*classes) -> None:
    """Let ``from_dict`` build these dataclasses when they appear as fields of another config."""
    _DATACLASSES.update({c.__name__: c for c in classes})
