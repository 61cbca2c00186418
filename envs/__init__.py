"""dpolicy benchmark tasks: three fast MuJoCo gymnasium envs with scripted experts.

Importing ``envs`` registers ``dpolicy/Avoid-v0`` (multimodal obstacle avoidance), ``dpolicy/Push-v0``
(planar pushing to a pose) and ``dpolicy/Lift-v0`` (cube lifting with a binary gripper) with gymnasium,
plus their camera variants ``dpolicy/AvoidImage-v0``, ``dpolicy/PushImage-v0`` and ``dpolicy/LiftImage-v0``
(RGB images and proprioception only). The short names ``avoid``, ``push``, ``lift``, ``avoid_image``,
``push_image`` and ``lift_image`` index ``TASKS``; ``make_env``, ``env_args``,
``make_env_from_args`` and ``make_expert`` are what the rest of dpolicy uses. Nothing here imports torch.
"""

from .adapters import DictObsAdapter, UnitActionAdapter, make_pusht
from .avoid import NUM_MODES, AvoidEnv, AvoidImageEnv
from .base import CameraObs
from .experts import AvoidExpert, LiftExpert, PushExpert, StateObsExpert
from .lift import LiftEnv, LiftImageEnv
from .push import PushEnv, PushImageEnv
from .registry import TASKS, Task, env_args, make_env, make_env_from_args, make_expert, register_all, task_name

register_all()

__all__ = ["TASKS", "Task", "NUM_MODES", "AvoidEnv", "PushEnv", "LiftEnv", "AvoidImageEnv", "PushImageEnv", "LiftImageEnv",
           "CameraObs", "AvoidExpert", "PushExpert", "LiftExpert", "StateObsExpert", "DictObsAdapter", "UnitActionAdapter",
           "make_pusht", "make_env", "env_args", "make_env_from_args", "make_expert", "register_all", "task_name"]
