"""``dpolicy/Push-v0``: planar non-prehensile pushing of a square block to a target pose (PushT-like).

A round pusher (slide x, slide y, velocity-servoed) pushes a square block that moves in the plane
(slide x, slide y, hinge z). There is no floor contact: the block's joints carry viscous damping, so
it is quasi-static (stops as soon as it is not pushed) and its "limit surface" is an exact ellipsoid,
which makes pushing predictable enough for a scripted expert. Success: block centre within
``pos_tolerance`` of the goal and yaw within ``yaw_tolerance`` of the goal yaw, modulo the square's
90 degree symmetry. The block's start pose is random; the goal is fixed at the origin with yaw 0
unless ``randomize_goal=True``. Observations carry the goal, so a policy sees all it needs.
"""

from __future__ import annotations

import numpy as np

from .base import CameraObs, MujocoTaskEnv, check_no_unknown, check_positive

OBS_KEYS = ("pusher_pos", "pusher_vel", "object_pose", "goal_pose")
HALF = 0.05           # block half side (m)
PUSHER_RADIUS = 0.015
MAX_SPEED = 0.3       # m/s at |action| = 1
LIN_DAMPING = 10.0    # N s/m on the block's slide joints
ROT_RADIUS = 0.04     # sqrt(rot damping / lin damping): how easily the block turns vs translates
ARENA = 0.4           # pusher workspace half width
SYMMETRY = np.pi / 2  # the square looks the same every 90 degrees

_XML = f"""
<mujoco model="push">
  <option timestep="0.005" gravity="0 0 0" integrator="implicitfast"/>
  <visual><global offwidth="640" offheight="640"/><headlight ambient="0.35 0.35 0.35" diffuse="0.3 0.3 0.3"/></visual>
  <default><geom contype="0" conaffinity="0"/></default>
  <worldbody>
    <light pos="0 0 3" dir="0 0 -1" directional="true" diffuse="0.5 0.5 0.5" castshadow="false"/>
    <geom name="floor" type="plane" size="0.5 0.5 0.05" rgba="0.92 0.92 0.9 1"/>
    <body name="goal" mocap="true" pos="0 0 0.0005">
      <geom name="goal" type="box" size="{HALF} {HALF} 0.0005" rgba="0.4 0.85 0.4 1"/>
      <geom type="box" pos="{HALF * 0.6} 0 0.0003" size="{HALF * 0.3} 0.004 0.0005" rgba="0.1 0.5 0.1 1"/>
    </body>
    <body name="object" pos="0 0 0.02">
      <joint name="obj_x" type="slide" axis="1 0 0" damping="{LIN_DAMPING}"/>
      <joint name="obj_y" type="slide" axis="0 1 0" damping="{LIN_DAMPING}"/>
      <joint name="obj_yaw" type="hinge" axis="0 0 1" damping="{LIN_DAMPING * ROT_RADIUS ** 2}"/>
      <geom name="object" type="box" size="{HALF} {HALF} 0.02" mass="0.2" rgba="0.85 0.55 0.2 1"
            contype="1" conaffinity="1" friction="0.5 0.005 0.0001" condim="3"/>
      <geom type="box" pos="{HALF * 0.6} 0 0.02" size="{HALF * 0.3} 0.004 0.001" rgba="0.4 0.2 0.05 1"/>
    </body>
    <body name="pusher" pos="0 0 0.02">
      <joint name="pusher_x" type="slide" axis="1 0 0" limited="true" range="-{ARENA} {ARENA}"/>
      <joint name="pusher_y" type="slide" axis="0 1 0" limited="true" range="-{ARENA} {ARENA}"/>
      <geom name="pusher" type="sphere" size="{PUSHER_RADIUS}" mass="0.1" rgba="0.2 0.3 0.9 1"
            contype="1" conaffinity="1" friction="0.5 0.005 0.0001" condim="3"/>
    </body>
    <camera name="top" pos="0 0 0.9" fovy="45"/>
    <camera name="agentview" pos="0 0 1.05" fovy="45"/>
  </worldbody>
  <actuator>
    <velocity name="vx" joint="pusher_x" kv="20" ctrlrange="-{MAX_SPEED} {MAX_SPEED}" forcerange="-10 10"/>
    <velocity name="vy" joint="pusher_y" kv="20" ctrlrange="-{MAX_SPEED} {MAX_SPEED}" forcerange="-10 10"/>
  </actuator>
</mujoco>
"""


def wrap_sym(angle):
    """Wrap an angle difference into [-SYMMETRY/2, SYMMETRY/2)."""
    return (angle + SYMMETRY / 2) % SYMMETRY - SYMMETRY / 2


class PushEnv(MujocoTaskEnv):
    """See the module docstring. Extra kwargs: tolerances, ``randomize_goal``, ``object_range``."""

    OBS_KEYS = OBS_KEYS
    ACT_DIM = 2
    N_EXTRA = 3  # goal x, y, yaw

    def __init__(self, horizon: int = 200, reward_type: str = "sparse", terminate_on_success: bool = True,
                 render_mode=None, pos_tolerance: float = 0.02, yaw_tolerance: float = 0.2,
                 randomize_goal: bool = False, object_range: float = 0.1, width: int = 240, height: int = 240, **unknown):
        check_no_unknown(type(self), unknown)
        self.pos_tolerance = check_positive("pos_tolerance", pos_tolerance)
        self.yaw_tolerance = check_positive("yaw_tolerance", yaw_tolerance)
        self.object_range = check_positive("object_range", object_range)
        if not isinstance(randomize_goal, (bool, np.bool_)):
            raise ValueError(f"randomize_goal={randomize_goal!r} must be a bool")
        self.randomize_goal = bool(randomize_goal)
        super().__init__(_XML, frame_skip=10, horizon=horizon, reward_type=reward_type,
                         terminate_on_success=terminate_on_success, render_mode=render_mode, width=width, height=height)
        m = self.model
        self._qpos, self._qvel, self._ctrl = self.data.qpos, self.data.qvel, self.data.ctrl
        self._o = m.jnt_qposadr[m.joint("obj_x").id]       # block x, y, yaw are consecutive
        self._p = m.jnt_qposadr[m.joint("pusher_x").id]    # pusher x, y are consecutive
        self._pv = m.jnt_dofadr[m.joint("pusher_x").id]
        self._goal = np.zeros(3)
        self._goal_obs = np.zeros(4, np.float32)

    def _obs_dims(self):
        return {"pusher_pos": 2, "pusher_vel": 2, "object_pose": 4, "goal_pose": 4}

    def _set_goal(self, goal):
        self._goal[:] = goal
        self._goal_obs[:] = (goal[0], goal[1], np.cos(goal[2]), np.sin(goal[2]))
        self.data.mocap_pos[0, :2] = goal[:2]
        self.data.mocap_quat[0] = (np.cos(goal[2] / 2), 0.0, 0.0, np.sin(goal[2] / 2))

    def _reset_task(self, rng):
        goal = np.zeros(3)
        if self.randomize_goal:
            goal = np.array([*rng.uniform(-0.1, 0.1, 2), rng.uniform(-np.pi, np.pi)])
        self._set_goal(goal)
        r = self.object_range
        while True:  # a start that is not already solved, inside the pusher's reach
            obj = np.array([*(goal[:2] + rng.uniform(-r, r, 2)), rng.uniform(-np.pi, np.pi)])
            if (np.hypot(*(obj[:2] - goal[:2])) > 2 * self.pos_tolerance
                    and np.abs(obj[:2]).max() < ARENA - 0.15):
                break
        while True:  # a pusher start clear of the block
            pusher = rng.uniform(-0.25, 0.25, 2)
            if np.hypot(*(pusher - obj[:2])) > HALF * np.sqrt(2) + PUSHER_RADIUS + 0.02:
                break
        o, p = self._o, self._p
        self._qpos[o:o + 3] = obj
        self._qpos[p:p + 2] = pusher

    def _apply_action(self, a):
        self._ctrl[:] = a * MAX_SPEED

    def _get_obs(self):
        o, p, pv = self._o, self._p, self._pv
        q = self._qpos
        yaw = q[o + 2]
        return {"pusher_pos": q[p:p + 2].astype(np.float32), "pusher_vel": self._qvel[pv:pv + 2].astype(np.float32),
                "object_pose": np.array([q[o], q[o + 1], np.cos(yaw), np.sin(yaw)], np.float32),
                "goal_pose": self._goal_obs.copy()}

    def pose_error(self):
        """(position error in m, absolute yaw error in rad modulo the square's symmetry)."""
        o = self._o
        dx, dy = self._qpos[o] - self._goal[0], self._qpos[o + 1] - self._goal[1]
        return float(np.sqrt(dx * dx + dy * dy)), abs(float(wrap_sym(self._qpos[o + 2] - self._goal[2])))

    def _evaluate(self):
        pos_err, yaw_err = self.pose_error()
        success = pos_err < self.pos_tolerance and yaw_err < self.yaw_tolerance
        dense = 1.0 if success else 1.0 - 0.5 * min(pos_err / 0.2, 1.0) - 0.5 * yaw_err / (SYMMETRY / 2)
        return success, False, dense

    def _info(self):
        pos_err, yaw_err = self.pose_error()
        return {"pos_error": pos_err, "yaw_error": yaw_err}

    def _extra_state(self):
        return self._goal.copy()

    def _set_extra_state(self, extra):
        self._set_goal(extra[:3])


class PushImageEnv(CameraObs, PushEnv):
    """``dpolicy/PushImage-v0``: Push seen from above (the pusher's whole workspace) plus the pusher's position
    and velocity; the block and the goal marker (a mocap body, so a randomised goal is drawn where it is)
    are only in the picture. Extra kwarg: ``image_size`` (square images, default 84)."""

    OBS_KEYS = ("pusher_pos", "pusher_vel", "agentview_image")
    CAMERAS = ("agentview",)
