"""Shared machinery for the dpolicy MuJoCo tasks.

``MujocoTaskEnv`` is a thin gymnasium.Env over a raw ``mujoco.MjModel`` (not gymnasium's MujocoEnv,
which costs too much Python per step for our >= 2,000 steps/s target). It owns everything the three
tasks have in common: kwarg validation, action sanitising (non-finite -> 0, clip to [-1, 1]), stepping
with ``nstep=frame_skip``, detecting an unstable simulation (MuJoCo warnings or non-finite state) and
ending the episode with the last finite observation, the horizon/truncation, sparse/dense/progress rewards,
full-state get/set (physics integration state + task extras), and offscreen rendering. Subclasses
supply the MJCF, the reset distribution, the action mapping, the observation and the success test.

``CameraObs`` turns a state task into its image variant (``class LiftImageEnv(CameraObs, LiftEnv)``):
the observation keeps only the task's proprioceptive keys and adds one RGB uint8 image per camera
(robomimic's ``<camera>_image`` keys), while physics, state vector, rewards and success stay those of
the state task, so a state dataset's ``states`` re-render into images with ``set_state``.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import weakref

import gymnasium as gym
import numpy as np

# Offscreen GL must be chosen before mujoco is first imported; EGL (Mesa llvmpipe) works headless here,
# OSMesa (pure software) is the fallback where EGL is missing.
os.environ.setdefault("MUJOCO_GL", "egl")
logging.getLogger("OpenGL").setLevel(logging.WARNING)  # PyOpenGL's "no OpenGL_accelerate" INFO line


def _other_backend(gl: str) -> str:
    return "osmesa (software rendering; needs libOSMesa)" if gl.lower() == "egl" else "egl (or osmesa)"


try:
    import mujoco  # noqa: E402
except (ImportError, AttributeError, RuntimeError) as _e:  # mujoco loads the MUJOCO_GL backend on import
    if isinstance(_e, ModuleNotFoundError) and _e.name == "mujoco":
        raise
    _gl = os.environ.get("MUJOCO_GL", "")
    raise ImportError(f"mujoco could not load its MUJOCO_GL={_gl!r} GL backend ({type(_e).__name__}: {_e}); install "
                      f"that backend's library or set MUJOCO_GL={_other_backend(_gl)} before importing dpolicy_envs.") from _e

# Envs holding a GL renderer (the video one, the camera one or both). EGL contexts freed during
# interpreter teardown raise noisy errors, so we close them at exit. The hook is registered after the
# first Renderer exists, i.e. after mujoco's own EGL atexit hook (which terminates the display), so
# that ours runs first (atexit is LIFO).
_RENDERING = weakref.WeakSet()
_HOOKED = []
# GL driver state (EGL/OSMesa llvmpipe threads, GPU contexts) does not survive fork: a child forked after
# its parent rendered would hang in its first render. Such a child refuses to render instead.
_FORKED_AFTER_GL = []
_ORPHANED = []  # renderers inherited across fork, kept referenced so that nothing frees them


def _close_renderers():
    for env in list(_RENDERING):
        env.close()


def rendering_started() -> bool:
    """Whether this process has made an offscreen GL context (after which fork is no way to start renderers)."""
    egl = sys.modules.get("mujoco.egl")
    return bool(_HOOKED) or getattr(egl, "EGL_DISPLAY", None) is not None


def _after_fork_in_child():
    if rendering_started():
        _FORKED_AFTER_GL.append(True)
        # The parent's contexts and display: never use, free or terminate them here (that hangs too).
        _ORPHANED.extend(r for env in list(_RENDERING) for r in (env._renderer, env._camera_renderer) if r is not None)
        for env in list(_RENDERING):
            env._renderer = env._camera_renderer = None
        _RENDERING.clear()
        egl = sys.modules.get("mujoco.egl")
        if egl is not None:
            atexit.unregister(egl.EGL.eglTerminate)


os.register_at_fork(after_in_child=_after_fork_in_child)


# Round geoms (cylinders, spheres) drawn with MuJoCo's default 28 x 16 facets dominate llvmpipe's render
# time; at observation sizes 16 x 8 look the same and render about twice as fast.
_CAMERA_QUALITY = {"numslices": 16, "numstacks": 8}


def make_renderer(env, model, height: int, width: int, quality: dict | None = None):
    """A ``mujoco.Renderer`` closed with ``env`` at exit; a GL failure becomes one sentence naming MUJOCO_GL.

    ``quality`` overrides ``model.vis.quality`` fields for this renderer only (they are read when its
    GL context builds the geom meshes and restored right after)."""
    if _FORKED_AFTER_GL:
        raise RuntimeError("this process was forked from one that had already rendered offscreen (MUJOCO_GL="
                           f"{os.environ.get('MUJOCO_GL', '')!r}), and GL driver state does not survive fork: start "
                           "subprocess envs with the 'forkserver' or 'spawn' method, e.g. "
                           "gymnasium.vector.AsyncVectorEnv(env_fns, context='forkserver').")
    vis = model.vis.global_
    vis.offwidth, vis.offheight = max(vis.offwidth, width), max(vis.offheight, height)
    saved = {k: getattr(model.vis.quality, k) for k in quality or {}}
    try:
        for k, v in (quality or {}).items():
            setattr(model.vis.quality, k, v)
        renderer = mujoco.Renderer(model, height, width)
    except Exception as e:  # GL/EGL/OSMesa failures surface as many different types
        gl = os.environ.get("MUJOCO_GL", "")
        raise RuntimeError(f"offscreen rendering failed with MUJOCO_GL={gl!r} ({type(e).__name__}: {e}); this machine "
                           f"may lack that GL backend, so set MUJOCO_GL={_other_backend(gl)} before dpolicy_envs (or "
                           "mujoco) is first imported.") from e
    finally:
        for k, v in saved.items():
            setattr(model.vis.quality, k, v)
    _RENDERING.add(env)
    if not _HOOKED:
        atexit.register(_close_renderers)
        _HOOKED.append(True)
    return renderer


# sparse: 1 on success; dense: the task's shaped score of the state (1 on success); progress: that score's change
# over the step (a potential difference: every step is credited with what it moved, and an episode's undiscounted
# sum is its last score minus its first, so what it rewards is ending close to success, which scores 1)
REWARD_TYPES = ("sparse", "dense", "progress")
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


def image_key(camera: str) -> str:
    """robomimic's observation key for a camera's RGB image."""
    return f"{camera}_image"


class MujocoTaskEnv(gym.Env):
    """Base class; see the module docstring. Subclasses set OBS_KEYS, ACT_DIM and the hooks below."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}
    OBS_KEYS: tuple = ()
    ACT_DIM: int = 2
    N_EXTRA: int = 0  # task-state floats appended to the physics state by get_state
    CAMERAS: tuple = ()  # MJCF cameras rendered into every observation (image tasks, see CameraObs)
    image_size: int = 84

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
        self.cameras = list(self.CAMERAS)
        self._camera_renderer = None
        # Sites are markers for people (lift's eef dot would sit in the middle of the wrist camera's view).
        self._camera_option = mujoco.MjvOption()
        self._camera_option.sitegroup[:] = 0
        self._image_keys = tuple(image_key(c) for c in self.cameras)
        self._state_size = mujoco.mj_stateSize(self.model, _STATE_SPEC)
        self._phys = np.zeros(self._state_size)
        self._good = np.zeros(self._state_size)  # physics state after the last stable step
        self._t = 0
        self._score = 0.0  # the dense score of the last state (progress rewards are its change)
        self._last_obs = None
        self.action_space = gym.spaces.Box(-1.0, 1.0, (self.ACT_DIM,), np.float32)
        # a list of pairs keeps OBS_KEYS order (a plain dict would be sorted by gymnasium)
        dims, size = self._obs_dims(), self.image_size
        self.observation_space = gym.spaces.Dict([
            (k, gym.spaces.Box(0, 255, (size, size, 3), np.uint8) if k in self._image_keys else box(dims[k]))
            for k in self.OBS_KEYS])

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
        """The task's full low-dimensional observation (every key of the state task)."""
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
        success, _, self._score = self._evaluate()
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
        elif self.reward_type == "progress":
            reward = float(dense) - self._score
        else:
            reward = float(dense)
        self._score = float(dense)
        terminated = bool(failure or (success and self.terminate_on_success))
        info = self._info()
        info["is_success"] = bool(success)
        info["sim_unstable"] = False
        return obs, reward, terminated, truncated, info

    @property
    def score(self) -> float:
        """The task's dense score of the current state (1 on success), whatever the reward type."""
        return self._score

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
        self._score = float(self._evaluate()[2])

    def observation(self) -> dict:
        """The observation of the current state, as the last reset, step or set_state returned it (copies)."""
        return {k: np.array(v) for k, v in self._last_obs.items()}

    def state_obs(self) -> dict:
        """The full low-dimensional observation of the current state (an image task's includes object state)."""
        return self._get_obs()

    # ---- rendering ------------------------------------------------------------------------------
    def render(self):
        """The video frame (``width`` x ``height`` from the ``top`` camera), separate from camera observations."""
        if self.render_mode != "rgb_array":
            return None
        if self._renderer is None:
            self._renderer = make_renderer(self, self.model, self.height, self.width)
        self._renderer.update_scene(self.data, camera=self._camera)
        return self._renderer.render().copy()

    def _render_cameras(self) -> dict:
        """One fresh ``image_size`` x ``image_size`` RGB uint8 image per camera; one renderer serves them all."""
        if self._camera_renderer is None:
            self._camera_renderer = make_renderer(self, self.model, self.image_size, self.image_size, _CAMERA_QUALITY)
        r = self._camera_renderer
        # mj_step leaves body poses at the start of its last substep; draw the current qpos (as set_state does)
        mujoco.mj_kinematics(self.model, self.data)
        mujoco.mj_camlight(self.model, self.data)
        out = {}
        for cam, key in zip(self.cameras, self._image_keys):
            r.update_scene(self.data, camera=cam, scene_option=self._camera_option)
            out[key] = r.render()
        return out

    def close(self):
        for name in ("_renderer", "_camera_renderer"):
            renderer = getattr(self, name, None)
            if renderer is not None:
                renderer.close()
                setattr(self, name, None)


class CameraObs:
    """Mixin making a state task's image variant: ``class LiftImageEnv(CameraObs, LiftEnv)``.

    The subclass sets ``CAMERAS`` (MJCF camera names) and ``OBS_KEYS`` (the state task's proprioceptive
    keys, then ``<camera>_image`` per camera). Everything else is the state task's, so an image env's
    ``get_state`` vector is laid out exactly as the state env's. Object state is left out of the
    observation (the policy has to see it), but ``state_obs()`` still returns it for scripted experts.
    """

    def __init__(self, image_size: int = 84, **kwargs):
        self.image_size = check_positive_int("image_size", image_size)
        super().__init__(**kwargs)

    @classmethod
    def state_task(cls) -> type:
        """The state task this image task renders (the next MujocoTaskEnv in the method order)."""
        return next(k for k in cls.__mro__[1:] if issubclass(k, MujocoTaskEnv) and not issubclass(k, CameraObs))

    def _get_obs(self) -> dict:
        state = super()._get_obs()
        obs = {k: state[k] for k in self.OBS_KEYS if k not in self._image_keys}
        obs.update(self._render_cameras())
        return obs

    def state_obs(self) -> dict:
        return super()._get_obs()
