"""Task table and env construction helpers (robomimic ``env_args`` layout).

``TASKS`` maps the short names (avoid, push, lift and their camera variants avoid_image, push_image,
lift_image) to their gymnasium id, default constructor kwargs, observation keys and expert factory.
``make_env`` builds one of our tasks by short name or id, the optional gym-pusht task ("pusht"), or
its camera variant ("pusht_image": 96 x 96 RGB ``agentview_image`` and ``agent_pos``), its keypoint variant
("pusht_keypoints": the T's 8 outline keypoints ``environment_state`` and ``agent_pos``), or any other
registered gymnasium id wrapped in DictObsAdapter.
``env_args``/``make_env_from_args`` write and read the ``{"env_name", "env_type", "env_kwargs"}``
dict that robomimic stores as ``data.attrs["env_args"]``, so a dataset can rebuild its env.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from typing import Callable

import gymnasium as gym

from . import adapters, avoid, experts, lift, push, robosuite_tasks
from .base import RENDER_MODES, CameraObs, check_choice


@dataclass(frozen=True)
class Task:
    env_id: str
    entry_point: str
    env_class: type
    obs_keys: tuple
    act_dim: int
    expert: Callable
    default_kwargs: dict = field(default_factory=dict)


def _params(cls) -> dict:
    """Named constructor parameters; an image task takes its own plus those of the state task it forwards to."""
    params = {k: p for k, p in inspect.signature(cls.__init__).parameters.items()
              if k != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if issubclass(cls, CameraObs):
        params = {**_params(cls.state_task()), **params}
    return params


def _defaults(cls) -> dict:
    """Constructor defaults, minus render-only settings (they do not change the task)."""
    skip = {"render_mode", "width", "height"}
    return {k: p.default for k, p in _params(cls).items() if k not in skip and p.default is not inspect.Parameter.empty}


def _task(env_id, cls, expert) -> Task:
    return Task(env_id, f"{cls.__module__}:{cls.__name__}", cls, tuple(cls.OBS_KEYS), cls.ACT_DIM, expert, _defaults(cls))


TASKS = {
    "avoid": _task("dpolicy/Avoid-v0", avoid.AvoidEnv, experts.AvoidExpert),
    "push": _task("dpolicy/Push-v0", push.PushEnv, experts.PushExpert),
    "lift": _task("dpolicy/Lift-v0", lift.LiftEnv, experts.LiftExpert),
    "avoid_image": _task("dpolicy/AvoidImage-v0", avoid.AvoidImageEnv, experts.make_expert),
    "push_image": _task("dpolicy/PushImage-v0", push.PushImageEnv, experts.make_expert),
    "lift_image": _task("dpolicy/LiftImage-v0", lift.LiftImageEnv, experts.make_expert),
}
_BY_ID = {t.env_id: name for name, t in TASKS.items()}
PUSHT_NAMES = ("pusht", adapters.PUSHT_ID)
PUSHT_IMAGE = {"obs_type": "pixels_agent_pos"}   # "pusht_image": gym-pusht's PushT seen through its camera
PUSHT_KEYPOINTS = {"obs_type": "environment_state_agent_pos"}   # "pusht_keypoints": the T's outline keypoints
PUSHT_VARIANTS = {"pusht_image": PUSHT_IMAGE, "pusht_keypoints": PUSHT_KEYPOINTS}


def register_all() -> None:
    """Register our ids with gymnasium (idempotent). No max_episode_steps: the envs truncate themselves."""
    for t in TASKS.values():
        if t.env_id not in gym.registry:
            gym.register(id=t.env_id, entry_point=t.entry_point, disable_env_checker=False)


def task_name(name_or_id: str):
    """Short task name for a short name or one of our ids; None for anything else."""
    if name_or_id in TASKS:
        return name_or_id
    return _BY_ID.get(name_or_id)


def make_env(name_or_id: str, **kwargs) -> gym.Env:
    """Build a task by short name / id; 'pusht' for gym-pusht; any other gymnasium id gets DictObsAdapter."""
    if not isinstance(name_or_id, str):
        raise ValueError(f"env name {name_or_id!r} must be a string")
    name = task_name(name_or_id)
    if name is not None:
        # gymnasium.make would quietly turn render_mode="human" into a HumanRendering wrapper (needs a display)
        check_choice("render_mode", kwargs.get("render_mode"), RENDER_MODES)
        register_all()
        return gym.make(TASKS[name].env_id, **kwargs)
    if name_or_id in PUSHT_NAMES:
        return adapters.make_pusht(**kwargs)
    if name_or_id in PUSHT_VARIANTS:
        return adapters.make_pusht(**{**PUSHT_VARIANTS[name_or_id], **kwargs})
    if name_or_id in robosuite_tasks.TASKS:  # optional extra; robosuite is imported only here
        return robosuite_tasks.make_env(name_or_id, **kwargs)
    try:
        env = gym.make(name_or_id, **kwargs)
    except gym.error.Error as e:
        raise ValueError(f"unknown env {name_or_id!r}: not one of {list(TASKS)} / 'pusht' / {list(PUSHT_VARIANTS)} and gymnasium says: {e}") from e
    return adapters.DictObsAdapter(env)


def env_args(name: str, **kwargs) -> dict:
    """robomimic-style env_args for ``name`` with our defaults filled in (JSON-serialisable)."""
    if name in robosuite_tasks.TASKS:
        return robosuite_tasks.env_args(name, **kwargs)
    task = task_name(name)
    if task is not None:
        t = TASKS[task]
        unknown = set(kwargs) - set(_params(t.env_class))
        if unknown:
            raise ValueError(f"unknown {task!r} env kwarg(s) {sorted(unknown)}")
        env_kwargs, env_name = {**t.default_kwargs, **kwargs}, t.env_id
    elif name in PUSHT_VARIANTS:
        env_kwargs, env_name = {**PUSHT_VARIANTS[name], **kwargs}, adapters.PUSHT_ID
    else:
        env_kwargs, env_name = dict(kwargs), (adapters.PUSHT_ID if name == "pusht" else name)
    try:
        json.dumps(env_kwargs)
    except TypeError as e:
        raise ValueError(f"env kwargs for {name!r} must be JSON-serialisable: {e}") from e
    return {"env_name": env_name, "env_type": "gymnasium", "env_kwargs": env_kwargs}


def make_env_from_args(args: dict, **overrides) -> gym.Env:
    """Rebuild the env described by an ``env_args`` dict (``overrides`` e.g. render_mode win)."""
    if not isinstance(args, dict) or "env_name" not in args:
        raise ValueError(f"env_args {args!r} must be a dict with 'env_name'")
    if robosuite_tasks.is_robosuite_args(args):  # robomimic's {"type": 1} or our {"env_type": "robosuite"}
        return robosuite_tasks.RobosuiteEnv(args["env_name"], **{**dict(args.get("env_kwargs") or {}), **overrides})
    env_type = args.get("env_type", "gymnasium")
    if env_type != "gymnasium":
        raise ValueError(f"env_type={env_type!r} is not supported (only 'gymnasium' and 'robosuite')")
    return make_env(args["env_name"], **{**dict(args.get("env_kwargs") or {}), **overrides})


def make_expert(env, noise_std: float = 0.0, seed=None, **task_kwargs):
    if isinstance(env.unwrapped, robosuite_tasks.RobosuiteEnv):
        return robosuite_tasks.make_expert(env, noise_std=noise_std, seed=seed, **task_kwargs)
    return experts.make_expert(env, noise_std=noise_std, seed=seed, **task_kwargs)
