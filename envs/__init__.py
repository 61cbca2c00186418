"""dpolicy benchmark tasks: three fast MuJoCo gymnasium envs with scripted experts.

Importing ``envs`` registers ``dpolicy/Avoid-v0`` (multimodal obstacle avoidance), ``dpolicy/Push-v0``
(planar pushing to a pose) and ``dpolicy/Lift-v0`` (cube lifting with a binary gripper) with gymnasium.
The short names ``avoid``, ``push`` and ``lift`` index ``TASKS``; ``make_env``, ``env_args``,
``make_env_from_args`` and ``make_expert`` are what the rest of dpolicy uses. Nothing here imports torch.
"""

from .adapters import DictObsAdapter, UnitActionAdapter, make_pusht
from .avoid import NUM_MODES, AvoidEnv
from .experts import AvoidExpert, LiftExpert, PushExpert
from .lift import LiftEnv
from .push import PushEnv
from .registry import TASKS, Task, env_args, make_env, make_env_from_args, make_expert, register_all, task_name

register_all()

__all__ = ["TASKS", "Task", "NUM_MODES", "AvoidEnv", "PushEnv", "LiftEnv", "AvoidExpert", "PushExpert", "LiftExpert",
           "DictObsAdapter", "UnitActionAdapter", "make_pusht", "make_env", "env_args", "make_env_from_args",
           "make_expert", "register_all", "task_name"]
