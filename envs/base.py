"""Shared machinery for the dpolicy MuJoCo tasks.

``MujocoTaskEnv`` is a thin gymnasium.Env over a raw ``mujoco.MjModel`` (not gymnasium's MujocoEnv,
which costs too much Python per step for our >= 2,000 steps/s target). It owns everything the three
tasks have in common: kwarg validation, action sanitising (non-finite -> 0, clip to [-1, 1]), stepping
with ``nstep=frame_skip``, detecting an unstable simulation (MuJoCo warnings or non-finite state) and
ending the episode with the last finite observation, the horizon/truncation, sparse/dense rewards,
full-state get/set (physics integration state + task extras), and offscreen rendering. Subclasses
supply the MJCF, the reset distribution, the action mapping, the observation and the success test.
"""

from __future__ import annotations

import atexit
import logging
import os
import weakref

import gymnasium as gym
import numpy as np

# Offscreen GL must be chosen before mujoco is first imported; EGL (Mesa llvmpipe) works headless here.
os.environ.setdefault("MUJOCO_GL", "egl")
logging.getLogger("OpenGL").setLevel(logging.WARNING)  # PyOpenGL's "no OpenGL_accelerate" INFO line
import mujoco  # noqa: E402

# Envs holding a GL renderer. EGL contexts freed during interpreter teardown raise noisy errors, so
# we close them at exit. The hook is registered after the first Renderer exists, i.e. after mujoco's
# own EGL atexit hook (which terminates the display), so that ours runs first (atexit is LIFO).
_RENDERING = weakref.WeakSet()
_HOOKED = []


def _close_renderers():
    for env in list(_RENDERING):
        env.close()


REWARD_TYPES = ("sparse", "dense")
RENDER_MODES = (None, "rgb_array")
# Warnings after which MuJoCo's solution is garbage (it silently resets the state on BADQACC).
_BAD_WARNINGS = (int(mujoco.mjtWarning.mjWARN_BADQACC), int(mujoco.mjtWarning.mjWARN_BADQPOS),
                 int(mujoco.mjtWarning.mjWARN_BADQVEL))
_STATE_SPEC = int(mujoco.mjtState.mjSTATE_INTEGRATION)


def check_no_unknown(cls, unknown: dict) -> None:
    # gymnasium.make passes kwargs straight to the constructor; a ValueError naming them beats a TypeError.
    if unknown:
        raise ValueError(f"unknown {cls.__name__} kwarg(s) {sorted(unknown)}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return int(value)


def check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive finite number")
    return float(value)


# Observation bound: finite (gymnasium's checker rejects infinite ones) and consistent with the
# instability test below, which ends an episode before any velocity can exceed it.
OBS_BOUND = 1e3


def box(n: int) -> gym.spaces.Box:
    return gym.spaces.Box(-OBS_BOUND, OBS_BOUND, (n,), np.float32)


class MujocoTaskEnv(gym.Env):
    """Base class; see the module docstring. Subclasses set OBS_KEYS, ACT_DIM and the hooks below."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}
    OBS_KEYS: tuple = ()
    ACT_DIM: int = 2
    N_EXTRA: int = 0  # task-state floats appended to the physics state by get_state

    def __init__(self, xml: str, frame_skip: int, horizon: int, reward_type: str = "sparse",
                 terminate_on_success: bool = True, render_mode=None, width: int = 240, height: int = 240,
                 camera: str = "top"):
        check_choice("reward_type", reward_type, REWARD_TYPES)
        check_choice("render_mode", render_mode, RENDER_MODES)
        if not isinstance(terminate_on_success, (bool, np.bool_)):
            raise ValueError(f"terminate_on_success={terminate_on_success!r} must be a bool")
        self.horizon = check_positive_int("horizon", horizon)
        self.width, self.height = check_positive_int("width", width), check_positive_int("height", height)
        self.frame_skip = check_positive_int("frame_skip", frame_skip)
        self.reward_type, self.terminate_on_success, self.render_mode = reward_type, bool(terminate_on_success), render_mode
        self.model = mujoco.MjModel.from_xml_string(xml)
        self.data = mujoco.MjData(self.model)
        self.dt = self.model.opt.timestep * self.frame_skip
        self.metadata = dict(self.metadata, render_fps=int(round(1.0 / self.dt)))
        self._camera = camera
        self._renderer = None
        self._state_size = mujoco.mj_stateSize(self.model, _STATE_SPEC)
        self._phys = np.zeros(self._state_size)
        self._good = np.zeros(self._state_size)  # physics state after the last stable step
        self._t = 0
        self._last_obs = None
        self.action_space = gym.spaces.Box(-1.0, 1.0, (self.ACT_DIM,), np.float32)
        # a list of pairs keeps OBS_KEYS order (a plain dict would be sorted by gymnasium)
        self.observation_space = gym.spaces.Dict([(k, box(n)) for k, n in self._obs_dims().items()])

    # ---- hooks for subclasses -------------------------------------------------------------------
    def _obs_dims(self) -> dict:
        raise NotImplementedError

    def _reset_task(self, rng: np.random.Generator) -> None:
        """Set qpos/qvel/goal for a new episode from ``rng`` (data has just been mj_resetData'd)."""
        raise NotImplementedError

    def _apply_action(self, a: np.ndarray) -> None:
        """Write ``data.ctrl`` from a finite action in [-1, 1]."""
        raise NotImplementedError

    def _get_obs(self) -> dict:
        raise NotImplementedError

    def _evaluate(self) -> tuple[bool, bool, float]:
        """Called after each stable step: (success, failure, dense_reward)."""
        raise NotImplementedError

    def _extra_state(self) -> np.ndarray:
        return np.zeros(0)

    def _set_extra_state(self, extra: np.ndarray) -> None:
        pass

    def _info(self) -> dict:
        return {}

    # ---- gymnasium API --------------------------------------------------------------------------
    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        mujoco.mj_resetData(self.model, self.data)
        self._reset_task(self.np_random)
        mujoco.mj_forward(self.model, self.data)
        self._t = 0
        mujoco.mj_getState(self.model, self.data, self._good, _STATE_SPEC)
        self._last_obs = self._get_obs()
        success, _, _ = self._evaluate()
        info = self._info()
        info["is_success"] = bool(success)
        info["sim_unstable"] = False
        return self._last_obs, info

    def step(self, action):
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape[0] != self.ACT_DIM:
            raise ValueError(f"action has {a.shape[0]} entries, expected {self.ACT_DIM}")
        # Non-finite entries mean "no command" (0); huge ones saturate. Both are deterministic.
        a = np.clip(np.where(np.isfinite(a), a, 0.0), -1.0, 1.0)
        self._apply_action(a)
        warn = self.data.warning
        before = sum(warn[i].number for i in _BAD_WARNINGS)
        mujoco.mj_step(self.model, self.data, nstep=self.frame_skip)
        self._t += 1
        truncated = self._t >= self.horizon
        unstable = (sum(warn[i].number for i in _BAD_WARNINGS) != before
                    or not (np.isfinite(self.data.qpos).all() and np.isfinite(self.data.qvel).all())
                    or np.abs(self.data.qvel).max() > OBS_BOUND)
        if unstable:
            # Roll the physics back to the last stable state so the env stays usable, and report the
            # last finite observation rather than anything from after MuJoCo's silent reset.
            mujoco.mj_setState(self.model, self.data, self._good, _STATE_SPEC)
            mujoco.mj_forward(self.model, self.data)
            info = self._info()
            info["is_success"] = False
            info["sim_unstable"] = True
            return self._last_obs, 0.0, True, truncated, info
        mujoco.mj_getState(self.model, self.data, self._good, _STATE_SPEC)
        obs = self._get_obs()
        self._last_obs = obs
        success, failure, dense = self._evaluate()
        if self.reward_type == "sparse":
            reward = 1.0 if success else 0.0
        else:
            reward = float(dense)
        terminated = bool(failure or (success and self.terminate_on_success))
        info = self._info()
        info["is_success"] = bool(success)
        info["sim_unstable"] = False
        return obs, reward, terminated, truncated, info

    # ---- full state -----------------------------------------------------------------------------
    def get_state(self) -> np.ndarray:
        """Flat float64 [physics integration state (time, qpos, qvel, warmstart, ctrl...), step, extras]."""
        mujoco.mj_getState(self.model, self.data, self._phys, _STATE_SPEC)
        return np.concatenate([self._phys, [float(self._t)], self._extra_state()]).astype(np.float64)

    def set_state(self, state) -> None:
        state = np.asarray(state, dtype=np.float64).reshape(-1)
        n = self._state_size
        if state.shape[0] != n + 1 + self.N_EXTRA:
            raise ValueError(f"state has {state.shape[0]} entries, expected {n + 1 + self.N_EXTRA}")
        mujoco.mj_setState(self.model, self.data, state[:n], _STATE_SPEC)
        mujoco.mj_forward(self.model, self.data)
        self._t = int(round(state[n]))
        self._set_extra_state(state[n + 1:])
        mujoco.mj_getState(self.model, self.data, self._good, _STATE_SPEC)
        self._last_obs = self._get_obs()

    def observation(self) -> dict:
        """A copy of the current observation (after reset, step or set_state)."""
        return {k: np.array(v) for k, v in self._last_obs.items()}

    # ---- rendering ------------------------------------------------------------------------------
    def render(self):
        if self.render_mode != "rgb_array":
            return None
        if self._renderer is None:
            self._renderer = mujoco.Renderer(self.model, self.height, self.width)
            _RENDERING.add(self)
            if not _HOOKED:
                atexit.register(_close_renderers)
                _HOOKED.append(True)
        self._renderer.update_scene(self.data, camera=self._camera)
        return self._renderer.render().copy()

    def close(self):
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
