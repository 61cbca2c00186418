"""robosuite tasks (optional extra) behind the robomimic ``env_args`` contract, with scripted experts.

robomimic stores ``data.attrs["env_args"] = {"env_name": "Lift", "type": 1, "env_kwargs": {...}}``
(type 1 is its ROBOSUITE_TYPE; ``env_kwargs`` are ``robosuite.make`` kwargs). ``RobosuiteEnv``
builds exactly that environment and exposes it as a gymnasium env with a Dict observation of the
low-dimensional keys robomimic uses (``robot0_eef_pos``, ``robot0_eef_quat``, ``robot0_gripper_qpos``
and ``object`` = robosuite's ``object-state``), the 7-D OSC_POSE action in [-1, 1], success from
``env._check_success()`` (``info["is_success"]``; the episode terminates on success, as robomimic's
rollouts do) and truncation at ``horizon`` steps (robomimic's datasets set ``ignore_done``).

Image observations: ``cameras=["agentview", "robot0_eye_in_hand"]`` (and ``image_size``, default 84)
turn on robosuite's camera observations, stored in ``env_kwargs`` as robomimic's image datasets store
them (``use_camera_obs``, ``camera_names``, ``camera_heights``, ``camera_widths``), so their
``env_args`` rebuild the same env. Each camera adds a ``<camera>_image`` key (RGB uint8, H x W x 3)
after the low-dimensional ones, flipped upright as robomimic does (robosuite renders them upside
down under its default OpenGL image convention).

Only ``import robosuite`` needs the extra, and it happens when an environment is built, so importing
this module (and ``envs``) never requires robosuite. Old-style (robosuite <= 1.4) controller
configs in public datasets are converted with robosuite's own ``refactor_composite_controller_config``.

Experts (``LiftExpert``, ``CanExpert``) read only the observation dict (plus fixed task constants
such as the goal bin read from the env at reset) and are small phase machines with proportional
position control; the orientation action stays 0 and the gripper command is exactly +-1.
"""

from __future__ import annotations

import copy
import importlib.util
import os

import gymnasium as gym
import numpy as np

ROBOSUITE_TYPE = 1  # robomimic's EnvType.ROBOSUITE_TYPE
LOW_DIM_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")
_KEY_ALIASES = {"object": "object-state"}  # robomimic name -> robosuite name
# short task name -> (robosuite env name, rollout horizon robomimic evaluates with)
TASKS = {"robosuite_lift": ("Lift", 400), "robosuite_can": ("PickPlaceCan", 400)}
ENV_NAMES = {v[0]: k for k, v in TASKS.items()}
_RENDER_MODES = (None, "rgb_array")
INSTALL_HINT = "pip install robosuite==1.5.2 (it needs mujoco 3.3.x)"
DEFAULT_IMAGE_SIZE = 84  # robomimic's image datasets


def available() -> bool:
    return importlib.util.find_spec("robosuite") is not None


def _import_robosuite():
    if not available():
        raise ValueError(f"robosuite tasks need the optional robosuite package: {INSTALL_HINT}")
    os.environ.setdefault("MUJOCO_GL", "egl")
    import logging

    import robosuite

    logging.getLogger("robosuite_logs").setLevel(logging.ERROR)  # the macro-file / optional-model warnings
    return robosuite


def default_env_kwargs(env_name: str) -> dict:
    """The ``robosuite.make`` kwargs robomimic's low-dim datasets store (Panda, OSC_POSE, 20 Hz, no cameras)."""
    _import_robosuite()
    from robosuite.controllers import load_composite_controller_config

    return {"robots": ["Panda"], "controller_configs": load_composite_controller_config(robot="Panda"),
            "has_renderer": False, "has_offscreen_renderer": False, "ignore_done": True, "use_object_obs": True,
            "use_camera_obs": False, "control_freq": 20, "reward_shaping": False, "camera_depths": False,
            "horizon": TASKS[ENV_NAMES[env_name]][1] if env_name in ENV_NAMES else 400}


def camera_kwargs(cameras, image_size=None) -> dict:
    """The ``robosuite.make`` kwargs of RGB camera observations, as robomimic's image datasets store them."""
    if isinstance(cameras, str) or not cameras or not all(isinstance(c, str) and c for c in cameras):
        raise ValueError(f"cameras={cameras!r} must be a non-empty list of robosuite camera names")
    size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"image_size={image_size!r} must be a positive integer")
    return {"use_camera_obs": True, "has_offscreen_renderer": True, "camera_names": list(cameras),
            "camera_heights": int(size), "camera_widths": int(size), "camera_depths": False}


def _with_cameras(env_kwargs: dict) -> dict:
    """``env_kwargs`` with our ``cameras``/``image_size`` replaced by robosuite's camera kwargs."""
    kw = dict(env_kwargs)
    cameras, size = kw.pop("cameras", None), kw.pop("image_size", None)
    if cameras is not None:
        kw.update(camera_kwargs(cameras, size))
    elif size is not None:
        raise ValueError(f"image_size={size!r} needs cameras=[...] (the robosuite cameras to render)")
    return kw


def env_args(task: str, **env_kwargs) -> dict:
    """robomimic-layout env_args for a short task name (``robosuite_lift``...); kwargs override the defaults
    (``cameras``/``image_size`` become robosuite's camera kwargs)."""
    if task not in TASKS:
        raise ValueError(f"unknown robosuite task {task!r}; known: {sorted(TASKS)}")
    name = TASKS[task][0]
    return {"env_name": name, "env_type": "robosuite", "type": ROBOSUITE_TYPE,
            "env_kwargs": {**default_env_kwargs(name), **_with_cameras(env_kwargs)}}


def is_robosuite_args(args: dict) -> bool:
    return args.get("env_type") == "robosuite" or args.get("type") == ROBOSUITE_TYPE


class RobosuiteEnv(gym.Env):
    """A robosuite environment as a gymnasium env (see the module docstring).

    ``cameras`` (robosuite camera names) and ``image_size`` add image observations; ``env_kwargs`` that
    already ask for them (``use_camera_obs`` with ``camera_names``, from a robomimic image dataset) do too.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, env_name: str, obs_keys=LOW_DIM_KEYS, render_mode=None, width: int = 256, height: int = 256,
                 camera: str = "agentview", terminate_on_success: bool = True, **env_kwargs):
        if render_mode not in _RENDER_MODES:
            raise ValueError(f"render_mode={render_mode!r} must be one of {list(_RENDER_MODES)}")
        kw = _with_cameras(copy.deepcopy(env_kwargs))  # checked before robosuite is imported
        robosuite = _import_robosuite()
        if env_name not in robosuite.ALL_ENVIRONMENTS:
            raise ValueError(f"robosuite has no environment {env_name!r}")
        kw.pop("env_name", None)
        kw.setdefault("hard_reset", False)  # reloading the model every reset is slow and changes nothing here
        kw["has_renderer"] = False
        if render_mode == "rgb_array":
            kw["has_offscreen_renderer"] = True
        cc = kw.get("controller_configs")
        if cc is not None:
            from robosuite.controllers.composite.composite_controller_factory import refactor_composite_controller_config

            robots = kw.get("robots", ["Panda"])
            robot = robots[0] if isinstance(robots, (list, tuple)) else robots
            kw["controller_configs"] = refactor_composite_controller_config(cc, robot, ["right"])
        try:
            self.env = robosuite.make(env_name, **kw)
        except TypeError as e:
            raise ValueError(f"bad robosuite kwargs for {env_name!r}: {e}") from None
        self.env_name, self.render_mode, self.width, self.height, self.camera = env_name, render_mode, width, height, camera
        self.terminate_on_success, self.horizon = bool(terminate_on_success), int(self.env.horizon)
        self.dt = 1.0 / float(self.env.control_freq)  # the control period a fixed-rate controller runs at
        names = kw.get("camera_names", []) if kw.get("use_camera_obs") else []
        self.cameras = [names] if isinstance(names, str) else list(names)
        self.image_keys = tuple(f"{c}_image" for c in self.cameras)
        # robosuite's default OpenGL convention renders images bottom row first; robomimic flips them upright
        from robosuite import macros

        self._flip = macros.IMAGE_CONVENTION == "opengl"
        obs = self.env.reset()
        self.obs_keys = tuple(k for k in obs_keys if k not in self.image_keys) + self.image_keys
        for k in self.obs_keys:
            if _KEY_ALIASES.get(k, k) not in obs:
                raise ValueError(f"observation key {k!r} not in robosuite {env_name!r} (has {sorted(obs)})")
        self.observation_space = gym.spaces.Dict(
            [(k, gym.spaces.Box(0, 255, np.shape(obs[k]), np.uint8) if k in self.image_keys else
              gym.spaces.Box(-np.inf, np.inf, (int(np.size(obs[_KEY_ALIASES.get(k, k)])),), np.float32))
             for k in self.obs_keys])
        low, high = self.env.action_spec
        self.action_space = gym.spaces.Box(np.asarray(low, np.float32), np.asarray(high, np.float32), dtype=np.float32)
        self._t = 0
        self.object_pos_slice = self._find_object_pos(obs)

    @staticmethod
    def _find_object_pos(raw):
        """Where the main object's position sits inside ``object-state`` (its layout differs per task and version)."""
        state = np.asarray(raw.get("object-state", ()), np.float64)
        for k, v in raw.items():
            if not k.endswith("_pos") or k.startswith("robot") or "_to_" in k or np.size(v) != 3:
                continue
            for i in range(len(state) - 2):
                if np.allclose(state[i:i + 3], v):
                    return slice(i, i + 3)
        return None

    def _obs(self, raw) -> dict:
        obs = {}
        for k in self.obs_keys:
            if k in self.image_keys:
                img = np.asarray(raw[k], np.uint8)
                obs[k] = np.ascontiguousarray(img[::-1] if self._flip else img)
            else:
                obs[k] = np.asarray(raw[_KEY_ALIASES.get(k, k)], np.float32).reshape(-1)
        return obs

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:  # the placement sampler holds a reference to env.rng: reseed it in place
            self.env.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        raw = self.env.reset()
        self._t = 0
        return self._obs(raw), {"is_success": False}

    def step(self, action):
        a = np.asarray(action, np.float64).reshape(-1)
        if a.shape != self.action_space.shape:
            raise ValueError(f"action shape {a.shape} != {self.action_space.shape}")
        a = np.clip(np.where(np.isfinite(a), a, 0.0), self.action_space.low, self.action_space.high)
        raw, reward, _, info = self.env.step(a)
        self._t += 1
        success = bool(self.env._check_success())
        info = dict(info)
        info["is_success"] = success
        terminated = success and self.terminate_on_success
        truncated = (not terminated) and self._t >= self.horizon
        return self._obs(raw), float(reward), terminated, truncated, info

    def get_state(self) -> np.ndarray:
        """The flattened MuJoCo state robomimic stores in ``states`` (time, qpos, qvel)."""
        return np.asarray(self.env.sim.get_state().flatten(), np.float64)

    def goal_position(self) -> np.ndarray | None:
        """Centre of the target bin region (PickPlace tasks), None for others."""
        placements = getattr(self.env, "target_bin_placements", None)
        if placements is None:
            return None
        return np.asarray(placements[self.env.object_to_id[str(self.env.obj_to_use).lower()]], np.float64)

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        return self.env.sim.render(camera_name=self.camera, width=self.width, height=self.height)[::-1].copy()

    def close(self):
        env = getattr(self, "env", None)
        if env is not None:
            env.close()
            self.env = None


def make_env(env_name: str, **kwargs) -> RobosuiteEnv:
    """Build a robosuite env by robosuite name (``Lift``) or short task name (``robosuite_lift``)."""
    if env_name in TASKS:
        name = TASKS[env_name][0]
        kwargs = {**default_env_kwargs(name), **_with_cameras(kwargs)}
        env_name = name
    return RobosuiteEnv(env_name, **kwargs)


# ----------------------------------------------------------------------------------------------- experts

def _object_pos(env, obs) -> np.ndarray:
    sl = env.unwrapped.object_pos_slice
    if sl is None:
        raise ValueError("cannot locate the object position inside the 'object' observation")
    return np.asarray(obs["object"][sl], np.float64)


class _Expert:
    """Phase-machine expert on the low-dim observation; ``noise_std`` adds Gaussian noise to the xyz action."""

    GAIN = 12.0     # action per metre of position error (1.0 = 5 cm OSC set-point step)

    def __init__(self, env, noise_std: float = 0.0, seed=None):
        if not (isinstance(noise_std, (int, float)) and np.isfinite(noise_std) and noise_std >= 0):
            raise ValueError(f"noise_std={noise_std!r} must be a finite number >= 0")
        self.env, self.noise_std, self.rng = env, float(noise_std), np.random.default_rng(seed)
        self.phase, self.count = 0, 0

    def reset(self, obs, info=None):
        self.phase, self.count = 0, 0

    def _action(self, eef, target, grip, max_step=1.0):
        a = np.zeros(7)
        a[:3] = np.clip(self.GAIN * (target - eef), -max_step, max_step)
        if self.noise_std > 0:
            a[:3] += self.rng.normal(0.0, self.noise_std, 3)
        a[:6] = np.clip(a[:6], -1.0, 1.0)
        a[6] = grip
        return a.astype(np.float32)


class LiftExpert(_Expert):
    """Above the cube, descend, close, lift."""

    def __call__(self, obs):
        eef = np.asarray(obs["robot0_eef_pos"], np.float64)
        cube = _object_pos(self.env, obs)
        grip, target = -1.0, cube.copy()
        if self.phase == 0:  # line up 6 cm above
            target[2] = cube[2] + 0.06
            if np.abs(eef[:2] - cube[:2]).max() < 0.006:
                self.phase = 1
        if self.phase == 1:  # descend around it
            target[2] = cube[2] - 0.005
            if eef[2] - target[2] < 0.01:
                self.phase = 2
        if self.phase == 2:  # close and wait for the fingers
            target[2] = cube[2] - 0.005
            grip = 1.0
            self.count += 1
            if self.count >= 8:
                self.phase = 3
        if self.phase == 3:  # lift straight up
            grip = 1.0
            target = np.array([eef[0], eef[1], cube[2] + 0.2])
        return self._action(eef, target, grip)


class CanExpert(_Expert):
    """Grasp the can from above, carry it high over the target bin region, lower it, release, back off."""

    CARRY_Z = 1.05

    def reset(self, obs, info=None):
        super().reset(obs, info)
        goal = self.env.unwrapped.goal_position()
        if goal is None:
            raise ValueError("CanExpert needs a PickPlace robosuite env")
        self.goal = goal

    def __call__(self, obs):
        if not hasattr(self, "goal"):
            self.reset(obs)
        eef = np.asarray(obs["robot0_eef_pos"], np.float64)
        can = _object_pos(self.env, obs)
        grip, target = -1.0, can.copy()
        if self.phase == 0:  # above the can
            target[2] = max(can[2] + 0.08, eef[2])
            if np.abs(eef[:2] - can[:2]).max() < 0.006:
                self.phase = 1
        if self.phase == 1:  # descend
            target[2] = can[2]
            if eef[2] - target[2] < 0.01:
                self.phase = 2
        if self.phase == 2:  # close
            target[2] = can[2]
            grip = 1.0
            self.count += 1
            if self.count >= 8:
                self.phase, self.count = 3, 0
        if self.phase == 3:  # up
            grip = 1.0
            target = np.array([can[0], can[1], self.CARRY_Z])
            if eef[2] > self.CARRY_Z - 0.03:
                self.phase = 4
        if self.phase == 4:  # over the goal
            grip = 1.0
            target = np.array([self.goal[0], self.goal[1], self.CARRY_Z])
            if np.abs(eef[:2] - self.goal[:2]).max() < 0.01:
                self.phase = 5
        if self.phase == 5:  # lower into the bin
            grip = 1.0
            target = np.array([self.goal[0], self.goal[1], self.goal[2] + 0.10])
            if eef[2] - target[2] < 0.015:
                self.phase = 6
        if self.phase == 6:  # release and back off upward
            target = np.array([self.goal[0], self.goal[1], self.goal[2] + 0.25])
            self.count += 1
            if self.count < 4:
                target = eef
        return self._action(eef, target, grip)


EXPERTS = {"Lift": LiftExpert, "PickPlaceCan": CanExpert}


def make_expert(env, noise_std: float = 0.0, seed=None, **kwargs):
    base = env.unwrapped
    if not isinstance(base, RobosuiteEnv):
        raise ValueError(f"{type(base).__name__} is not a robosuite env")
    if base.env_name not in EXPERTS:
        raise ValueError(f"no scripted expert for robosuite {base.env_name!r}; experts exist for {sorted(EXPERTS)}")
    if kwargs:
        raise ValueError(f"the robosuite experts take no kwargs, got {sorted(kwargs)}")
    return EXPERTS[base.env_name](env, noise_std, seed)
