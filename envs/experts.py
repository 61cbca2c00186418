"""Scripted experts for the three tasks, used to collect behaviour-cloning demonstrations.

``make_expert(env, noise_std, seed, **task_kwargs)`` returns an object with ``reset(obs, info)`` and
``__call__(obs) -> float32 action in [-1, 1]``. The experts work from the observation dict only (the
tasks' layouts are fixed module constants), so they behave identically on a restored state. Each
is a small feedback controller, which keeps its actions smooth and consistent across episodes, as
behaviour cloning of action chunks needs. ``noise_std`` adds Gaussian action noise (clipped to the
box; the lift gripper stays exactly +-1) for deliberately weak demonstration sets.

* avoid: picks a route per episode from ``mode_probs`` and follows jittered waypoints around the
  cylinders at full speed.
* push: chooses, every step, the contact (face, offset along it) whose push most reduces a
  quadratic pose error under the block's known quasi-static motion model (translation along the push,
  turning rate offset / ROT_RADIUS^2 per metre), walks around the block to reach it, then pushes.
* lift: hover above the cube, descend, close, wait for the fingers, lift.
* gym-pusht's PushT (state or pixels): ``pusht.PushTExpert``, a push planner that reads the simulator's
  state and tries its pushes on a copy of gym-pusht's physics.

On the image tasks the observation has no object state, so ``make_expert`` wraps the state task's
expert in ``StateObsExpert``, which feeds it ``env.unwrapped.state_obs()`` instead.
"""

from __future__ import annotations

import numpy as np

import sys

from . import avoid, lift, push, pusht
from .base import CameraObs


class _Expert:
    def __init__(self, env, noise_std: float = 0.0, seed=None):
        if not (isinstance(noise_std, (int, float)) and np.isfinite(noise_std) and noise_std >= 0):
            raise ValueError(f"noise_std={noise_std!r} must be a finite number >= 0")
        self.env, self.noise_std = env, float(noise_std)
        self.rng = np.random.default_rng(seed)

    def reset(self, obs, info=None):
        pass

    def _finish(self, a):
        a = np.asarray(a, np.float64)
        if self.noise_std > 0:
            a = a + self.rng.normal(0.0, self.noise_std, a.shape)
        return np.clip(a, -1.0, 1.0).astype(np.float32)


class AvoidExpert(_Expert):
    """Waypoint follower; the route is drawn per episode from ``mode_probs`` (default uniform)."""

    def __init__(self, env, noise_std=0.0, seed=None, mode_probs=None, jitter: float = 0.02):
        super().__init__(env, noise_std, seed)
        if mode_probs is None:
            mode_probs = [1.0 / avoid.NUM_MODES] * avoid.NUM_MODES
        p = np.asarray(mode_probs, np.float64)
        if p.shape != (avoid.NUM_MODES,) or not np.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
            raise ValueError(f"mode_probs={mode_probs!r} must be {avoid.NUM_MODES} non-negative weights, not all 0")
        self.mode_probs, self.jitter = p / p.sum(), float(jitter)
        self.route, self.waypoints, self.idx = -1, None, 0

    # x positions at row 1 and row 2 for each route (clear of the cylinders by ~5-8 cm)
    _ROUTES = {0: (-0.2, -0.45), 1: (-0.2, 0.0), 2: (0.2, 0.0), 3: (0.2, 0.45)}

    def reset(self, obs, info=None):
        self.route = int(self.rng.choice(avoid.NUM_MODES, p=self.mode_probs))
        x1, x2 = self._ROUTES[self.route]
        j = self.rng.uniform(-self.jitter, self.jitter, 3)
        self.waypoints = np.array([[x1 + j[0], avoid.ROW1_Y], [x2 + j[1], avoid.ROW2_Y],
                                   [x2 + j[2], avoid.GOAL_Y + 0.1]])
        self.idx = 0

    def __call__(self, obs):
        if self.waypoints is None:
            self.reset(obs)
        pos = np.asarray(obs["agent_pos"], np.float64)
        # advance once the agent has come level with a waypoint (they are ordered bottom to top)
        while self.idx < len(self.waypoints) - 1 and pos[1] >= self.waypoints[self.idx, 1] - 0.02:
            self.idx += 1
        d = self.waypoints[self.idx] - pos
        n = np.linalg.norm(d)
        return self._finish(d / max(n, 0.05))


class PushExpert(_Expert):
    """Greedy contact-selection pusher; see the module docstring."""

    SIGMA_P, SIGMA_R = 0.01, 0.1   # error scales (m, rad) of the quadratic cost being reduced
    OFFSETS = np.linspace(-0.8, 0.8, 9) * push.HALF
    STANDOFF = 0.012               # gap kept from the face while lining up a push

    def reset(self, obs, info=None):
        self.face = -1

    def _candidates(self, c, yaw, e_p, e_r):
        """Per (face, offset): pusher contact position, push direction, predicted cost decrease, step."""
        ang = yaw + np.arange(4) * (np.pi / 2)
        n = np.stack([np.cos(ang), np.sin(ang)], 1)            # outward face normals
        t = np.stack([-n[:, 1], n[:, 0]], 1)                   # face tangents
        s = self.OFFSETS
        r = push.HALF * n[:, None, :] + s[None, :, None] * t[:, None, :]   # contact point - centre
        d = -n[:, None, :]                                      # push direction
        w = (r[..., 0] * d[..., 1] - r[..., 1] * d[..., 0]) / push.ROT_RADIUS ** 2   # turn rate per metre
        num = (-(n @ e_p))[:, None] / self.SIGMA_P ** 2 + e_r * w / self.SIGMA_R ** 2
        den = 1.0 / self.SIGMA_P ** 2 + w ** 2 / self.SIGMA_R ** 2
        gain = np.where(num > 0, num * num / den, 0.0)
        return n, t, gain, np.maximum(num / den, 0.0)

    def __call__(self, obs):
        if not hasattr(self, "face"):
            self.reset(obs)
        q = np.asarray(obs["pusher_pos"], np.float64)
        op, gp = np.asarray(obs["object_pose"], np.float64), np.asarray(obs["goal_pose"], np.float64)
        c, yaw = op[:2], np.arctan2(op[3], op[2])
        e_p = gp[:2] - c
        e_r = float(push.wrap_sym(np.arctan2(gp[3], gp[2]) - yaw))
        n, t, gain, step = self._candidates(c, yaw, e_p, e_r)
        best_face = int(np.argmax(gain.max(1)))
        # stick with the current face unless another one is clearly better (switching costs a walk)
        if self.face < 0 or gain[self.face].max() < 0.5 * gain[best_face].max():
            self.face = best_face
        k = self.face
        j = int(np.argmax(gain[k]))
        s, length = self.OFFSETS[j], step[k, j]
        rel = q - c
        along, lateral = rel @ n[k], rel @ t[k]
        contact = push.HALF + push.PUSHER_RADIUS
        if along < contact + self.STANDOFF + 0.006 and abs(lateral - s) < 0.012 and along > contact - 0.01:
            # pushing: forward along -n, sliding sideways to hold the chosen offset
            speed = min(1.0, 0.25 + 6.0 * length / push.MAX_SPEED)
            v = -n[k] * speed * push.MAX_SPEED + 8.0 * (s - lateral) * t[k]
        else:
            target = c + (contact + self.STANDOFF) * n[k] + s * t[k]
            v = 8.0 * (self._waypoint(q, c, n[k], t[k], target) - q)
        return self._finish(v / push.MAX_SPEED)

    def _waypoint(self, q, c, n, t, target):
        """Next point on a collision-free way from q to target around the block (in its frame)."""
        rot = np.array([n, t])                    # world -> face frame (x along the face normal)
        p, g = rot @ (q - c), rot @ (target - c)
        big = push.HALF + push.PUSHER_RADIUS + 0.006
        if not _segment_hits_square(p, g, big):
            return target
        radius = big * np.sqrt(2) + 0.015
        a_p, a_g = np.arctan2(p[1], p[0]), np.arctan2(g[1], g[0])
        da = (a_g - a_p + np.pi) % (2 * np.pi) - np.pi
        a = a_p + np.clip(da, -0.6, 0.6)
        return c + radius * (np.cos(a) * n + np.sin(a) * t)


class LiftExpert(_Expert):
    """Phase machine: hover above the cube, descend, close, wait for the fingers to settle, lift.

    ``early_close`` is the share of episodes run by a careless operator (drawn per episode, like the
    worse operators of robomimic's multi-human datasets): lined up above the cube, it closes the
    gripper without descending and lifts empty-handed, so the episode fails. Demos with such episodes
    (kept with ``keep_failures``) teach a base that, at the hover pose, sometimes closes too early.
    """

    HOVER = 0.06  # eef height above the grasp height while lining up

    def __init__(self, env, noise_std=0.0, seed=None, early_close: float = 0.0):
        super().__init__(env, noise_std, seed)
        if not 0.0 <= float(early_close) <= 1.0:
            raise ValueError(f"early_close={early_close!r} must lie in [0, 1]")
        self.early_close = float(early_close)

    def reset(self, obs, info=None):
        self.phase, self.wait = 0, 0
        self.careless = self.early_close > 0 and self.rng.random() < self.early_close

    def __call__(self, obs):
        if not hasattr(self, "phase"):
            self.reset(obs)
        eef, obj = np.asarray(obs["eef_pos"], np.float64), np.asarray(obs["object_pos"], np.float64)
        grip = -1.0
        target = obj.copy()
        if self.phase == 0:    # line up above the cube
            target[2] = lift.GRASP_Z + self.HOVER
            if np.abs(eef[:2] - obj[:2]).max() < 0.006:
                self.phase = 2 if self.careless else 1
        if self.phase == 1:    # descend onto it
            target[2] = lift.GRASP_Z + obj[2] - lift.CUBE_HALF
            if eef[2] - target[2] < 0.004:
                self.phase = 2
        if self.phase == 2:    # close and wait for a firm grip (the careless operator: at the hover height)
            target[2] = lift.GRASP_Z + (self.HOVER if self.careless else obj[2] - lift.CUBE_HALF)
            grip = 1.0
            self.wait += 1
            if self.wait >= 4:
                self.phase = 3
        if self.phase == 3:    # lift straight up
            grip = 1.0
            target = np.array([eef[0], eef[1], lift.GRASP_Z + 0.15])
        v = np.clip(12.0 * (target - eef), -lift.MAX_SPEED, lift.MAX_SPEED) / lift.MAX_SPEED
        a = self._finish(np.array([*v, 0.0]))
        a[3] = grip  # the gripper command stays exactly +-1, noise or not
        return a


def _segment_hits_square(p, g, half):
    """Slab test: does the segment p->g pass through the square [-half, half]^2?"""
    d = g - p
    lo, hi = 0.0, 1.0
    for i in range(2):
        if abs(d[i]) < 1e-12:
            if abs(p[i]) > half:
                return False
            continue
        t1, t2 = (-half - p[i]) / d[i], (half - p[i]) / d[i]
        lo, hi = max(lo, min(t1, t2)), min(hi, max(t1, t2))
        if lo > hi:
            return False
    return True


class StateObsExpert:
    """A state task's expert driving its image task: it reads the simulator's low-dimensional observation.

    ``reset(obs, info)`` and ``__call__(obs)`` ignore the image observation passed in and use
    ``env.unwrapped.state_obs()``, the same moment's full state observation (after an unstable step the
    env is rolled back to the state of the observation it returned, so the two still agree).
    """

    def __init__(self, env, expert):
        self.env, self.expert = env, expert

    def reset(self, obs, info=None):
        self.expert.reset(self.env.unwrapped.state_obs(), info)

    def __call__(self, obs):
        return self.expert(self.env.unwrapped.state_obs())

    def __getattr__(self, name):  # the wrapped expert's settings and episode state (route, phase, ...)
        if name == "expert":
            raise AttributeError(name)
        return getattr(self.expert, name)


def make_expert(env, noise_std: float = 0.0, seed=None, **task_kwargs):
    """Scripted expert for the task behind ``env`` (any wrapper of AvoidEnv, PushEnv or LiftEnv or their image
    variants)."""
    base = env.unwrapped
    if _is_pusht(base):
        return pusht.PushTExpert(env, noise_std, seed, **task_kwargs)
    if isinstance(base, CameraObs):
        return StateObsExpert(env, _state_expert(env, base, noise_std, seed, **task_kwargs))
    return _state_expert(env, base, noise_std, seed, **task_kwargs)


def _state_expert(env, base, noise_std, seed, **task_kwargs):
    if isinstance(base, avoid.AvoidEnv):
        return AvoidExpert(env, noise_std, seed, **task_kwargs)
    if isinstance(base, push.PushEnv):
        return PushExpert(env, noise_std, seed, **task_kwargs)
    if isinstance(base, lift.LiftEnv):
        return LiftExpert(env, noise_std, seed, **task_kwargs)
    raise ValueError(f"no scripted expert for {type(base).__name__}; experts exist for avoid, push, lift and pusht")


def _is_pusht(base) -> bool:
    """gym-pusht's PushT (never imports the optional package: an env of it exists only once it is imported)."""
    mod = sys.modules.get("gym_pusht.envs.pusht")
    return mod is not None and isinstance(base, mod.PushTEnv)
