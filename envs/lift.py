"""``dpolicy/Lift-v0``: pick a cube off the table with a two-finger gripper on an xyz gantry.

The hand is moved by three velocity-servoed slide joints (x, y, z) and carries two fingers on slide
joints. The last action entry is a binary gripper command: > 0 closes both fingers, <= 0 opens them
(position servos driven to fully open/closed; a closed finger blocked by the cube squeezes it with a
bounded force). The hand and fingers are gravity compensated so velocity commands mean the same
thing at every height. Grasping is made reliable by high-friction pads with torsional friction
(condim 4), soft-but-stiff contacts and a cube that is light relative to the grip force. Fingers do
not collide with the table (only with the cube and each other), so a low grasp never jams.
Success: the cube is at least ``lift_height`` above its resting height and still between the fingers.
"""

from __future__ import annotations

import numpy as np

from .base import CameraObs, MujocoTaskEnv, check_no_unknown, check_positive

OBS_KEYS = ("eef_pos", "eef_vel", "gripper_state", "object_pos", "object_quat", "object_to_eef")
CUBE_HALF = 0.02
MAX_SPEED = 0.3        # m/s per hand axis at |action| = 1
FINGER_TRAVEL = 0.045  # open (0) -> fully closed; a held cube stops the fingers at about 0.024
GRASP_Z = 0.022        # eef height at which the pads straddle the cube's middle
HOME = np.array([0.0, 0.0, 0.15])

_XML = f"""
<mujoco model="lift">
  <option timestep="0.002" integrator="implicitfast" cone="elliptic" impratio="5"/>
  <visual><global offwidth="640" offheight="640"/><headlight ambient="0.35 0.35 0.35" diffuse="0.3 0.3 0.3"/></visual>
  <worldbody>
    <light pos="0.3 -0.3 1.2" dir="-0.3 0.3 -1" directional="true" diffuse="0.5 0.5 0.5" castshadow="false"/>
    <geom name="table" type="plane" size="1.2 1.2 0.15" rgba="0.8 0.75 0.65 1" contype="1" conaffinity="1"
          friction="1 0.005 0.0001"/>
    <body name="cube" pos="0 0 {CUBE_HALF}">
      <freejoint name="cube"/>
      <geom name="cube" type="box" size="{CUBE_HALF} {CUBE_HALF} {CUBE_HALF}" mass="0.05" rgba="0.85 0.2 0.2 1"
            contype="3" conaffinity="3" condim="4" friction="1.5 0.01 0.0001"/>
    </body>
    <body name="hand" pos="0 0 0" gravcomp="1">
      <joint name="hand_x" type="slide" axis="1 0 0" limited="true" range="-0.3 0.3"/>
      <joint name="hand_y" type="slide" axis="0 1 0" limited="true" range="-0.3 0.3"/>
      <joint name="hand_z" type="slide" axis="0 0 1" limited="true" range="0.012 0.35"/>
      <site name="eef" pos="0 0 0" size="0.005" rgba="0 1 0 1"/>
      <camera name="robot0_eye_in_hand" pos="0 0 0.045" fovy="75"/>
      <geom name="palm" type="box" pos="0 0 0.055" size="0.02 0.065 0.008" mass="0.3" rgba="0.3 0.3 0.35 1"
            contype="2" conaffinity="2"/>
      <body name="finger_l" pos="0 0.0505 0" gravcomp="1">
        <joint name="finger_l" type="slide" axis="0 -1 0" limited="true" range="0 {FINGER_TRAVEL}" damping="2"/>
        <geom name="pad_l" type="box" pos="0 0 0.017" size="0.015 0.0065 0.03" mass="0.03" rgba="0.2 0.2 0.25 1"
              contype="2" conaffinity="2" condim="4" friction="1.5 0.01 0.0001" solref="0.01 1"/>
      </body>
      <body name="finger_r" pos="0 -0.0505 0" gravcomp="1">
        <joint name="finger_r" type="slide" axis="0 1 0" limited="true" range="0 {FINGER_TRAVEL}" damping="2"/>
        <geom name="pad_r" type="box" pos="0 0 0.017" size="0.015 0.0065 0.03" mass="0.03" rgba="0.2 0.2 0.25 1"
              contype="2" conaffinity="2" condim="4" friction="1.5 0.01 0.0001" solref="0.01 1"/>
      </body>
    </body>
    <camera name="top" pos="0.32 -0.32 0.3" xyaxes="1 1 0 -0.45 0.45 0.75" fovy="45"/>
    <camera name="agentview" pos="0.344 0 0.331" xyaxes="0 1 0 -0.574 0 0.819" fovy="45"/>
  </worldbody>
  <contact><exclude body1="finger_l" body2="finger_r"/></contact>
  <actuator>
    <velocity name="vx" joint="hand_x" kv="150" ctrlrange="-{MAX_SPEED} {MAX_SPEED}" forcerange="-60 60"/>
    <velocity name="vy" joint="hand_y" kv="150" ctrlrange="-{MAX_SPEED} {MAX_SPEED}" forcerange="-60 60"/>
    <velocity name="vz" joint="hand_z" kv="150" ctrlrange="-{MAX_SPEED} {MAX_SPEED}" forcerange="-60 60"/>
    <position name="grip_l" joint="finger_l" kp="300" kv="6" ctrlrange="0 {FINGER_TRAVEL}" forcerange="-8 8"/>
    <position name="grip_r" joint="finger_r" kp="300" kv="6" ctrlrange="0 {FINGER_TRAVEL}" forcerange="-8 8"/>
  </actuator>
</mujoco>
"""


class LiftEnv(MujocoTaskEnv):
    """See the module docstring. Extra kwargs: ``lift_height``, ``object_range``, ``object_yaw_range``."""

    OBS_KEYS = OBS_KEYS
    ACT_DIM = 4
    N_EXTRA = 0

    def __init__(self, horizon: int = 100, reward_type: str = "sparse", terminate_on_success: bool = True,
                 render_mode=None, lift_height: float = 0.06, object_range: float = 0.1,
                 object_yaw_range: float = 0.3, width: int = 240, height: int = 240, **unknown):
        check_no_unknown(type(self), unknown)
        self.lift_height = check_positive("lift_height", lift_height)
        self.object_range = check_positive("object_range", object_range)
        self.object_yaw_range = check_positive("object_yaw_range", object_yaw_range) if object_yaw_range != 0 else 0.0
        super().__init__(_XML, frame_skip=25, horizon=horizon, reward_type=reward_type,
                         terminate_on_success=terminate_on_success, render_mode=render_mode, width=width, height=height)
        m = self.model
        self._qpos, self._qvel, self._ctrl = self.data.qpos, self.data.qvel, self.data.ctrl
        self._c = m.jnt_qposadr[m.joint("cube").id]          # cube xyz + quat
        self._h = m.jnt_qposadr[m.joint("hand_x").id]        # hand x, y, z consecutive
        self._hv = m.jnt_dofadr[m.joint("hand_x").id]
        self._f = m.jnt_qposadr[m.joint("finger_l").id]      # finger_l, finger_r consecutive

    def _obs_dims(self):
        return {"eef_pos": 3, "eef_vel": 3, "gripper_state": 2, "object_pos": 3, "object_quat": 4, "object_to_eef": 3}

    def _reset_task(self, rng):
        c, h = self._c, self._h
        r = self.object_range
        yaw = rng.uniform(-self.object_yaw_range, self.object_yaw_range) if self.object_yaw_range else 0.0
        self._qpos[c:c + 3] = (*rng.uniform(-r, r, 2), CUBE_HALF)
        self._qpos[c + 3:c + 7] = (np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2))
        self._qpos[h:h + 3] = HOME + rng.uniform(-0.02, 0.02, 3)

    def _apply_action(self, a):
        self._ctrl[:3] = a[:3] * MAX_SPEED
        self._ctrl[3:5] = FINGER_TRAVEL if a[3] > 0 else 0.0

    def _get_obs(self):
        q, c, h, f = self._qpos, self._c, self._h, self._f
        eef, obj = q[h:h + 3], q[c:c + 3]
        return {"eef_pos": eef.astype(np.float32), "eef_vel": self._qvel[self._hv:self._hv + 3].astype(np.float32),
                "gripper_state": (q[f:f + 2] / FINGER_TRAVEL).astype(np.float32), "object_pos": obj.astype(np.float32),
                "object_quat": q[c + 3:c + 7].astype(np.float32), "object_to_eef": (obj - eef).astype(np.float32)}

    def _evaluate(self):
        q, c, h = self._qpos, self._c, self._h
        d = q[c:c + 3] - q[h:h + 3]
        near = d[0] * d[0] + d[1] * d[1] + d[2] * d[2] < 0.04 ** 2
        lift = q[c + 2] - CUBE_HALF
        success = bool(near and lift >= self.lift_height)
        dense = 1.0 if success else (0.3 * (1.0 - np.tanh(10.0 * np.sqrt(d @ d))) + 0.3 * near * (q[self._f] > 0.3)
                                     + 0.4 * near * min(max(lift, 0.0) / self.lift_height, 1.0))
        return success, False, float(dense)

    def _info(self):
        return {"lift": float(self._qpos[self._c + 2] - CUBE_HALF)}


class LiftImageEnv(CameraObs, LiftEnv):
    """``dpolicy/LiftImage-v0``: Lift from an angled third-person camera and a wrist camera looking down between
    the fingers, plus the hand's position, velocity and finger openings (no cube state).
    Extra kwarg: ``image_size`` (square images, default 84)."""

    OBS_KEYS = ("eef_pos", "eef_vel", "gripper_state", "agentview_image", "robot0_eye_in_hand_image")
    CAMERAS = ("agentview", "robot0_eye_in_hand")
