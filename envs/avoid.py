"""``dpolicy/Avoid-v0``: multimodal obstacle avoidance (in the spirit of D3IL's "Avoid").

A point mass (slide x, slide y, velocity-servoed) starts near the bottom of a walled plane and must
cross the goal line at the top. Three fixed cylinders block the way: one in the centre of row 1 and
two in row 2, leaving four equally good routes (left of A then left of B, left of A then between B
and C, right of A then between, right of A then right of C). Averaging the routes (what an MSE
regressor does with a balanced demo set) drives straight into the centre cylinder. Touching a
cylinder ends the episode as a failure. Collisions are checked geometrically (circle vs circle), so
MuJoCo contacts are only used for the arena walls via joint limits, which keeps stepping cheap.

``info["mode"]`` classifies the route from the trajectory: -1 until the agent crosses row 2, then the
route index (fixed for the rest of the episode): 0 left of B, 3 right of C, and between B and C it
is 1 or 2 depending on which side of A the agent passed in row 1.
"""

from __future__ import annotations

import numpy as np

from .base import CameraObs, MujocoTaskEnv, check_no_unknown, check_positive

NUM_MODES = 4
OBS_KEYS = ("agent_pos", "agent_vel")
AGENT_RADIUS = 0.04
OBSTACLE_RADIUS = 0.08
ROW1_Y, ROW2_Y = -0.2, 0.15
OBSTACLES = np.array([[0.0, ROW1_Y], [-0.25, ROW2_Y], [0.25, ROW2_Y]])
GOAL_Y = 0.45
START = np.array([0.0, -0.5])
X_LIMIT = 0.6
MAX_SPEED = 0.6  # m/s at |action| = 1

_XML = f"""
<mujoco model="avoid">
  <option timestep="0.01" integrator="implicitfast"/>
  <visual><global offwidth="640" offheight="640"/><headlight ambient="0.35 0.35 0.35" diffuse="0.3 0.3 0.3"/></visual>
  <worldbody>
    <light pos="0 0 3" dir="0 0 -1" directional="true" diffuse="0.5 0.5 0.5" castshadow="false"/>
    <geom name="floor" type="plane" size="0.7 0.7 0.05" rgba="0.92 0.92 0.9 1" contype="0" conaffinity="0"/>
    <geom name="goal" type="box" pos="0 {GOAL_Y + 0.05} 0.001" size="{X_LIMIT} 0.05 0.001" rgba="0.5 0.9 0.5 1"
          contype="0" conaffinity="0"/>
    <geom name="obs_a" type="cylinder" pos="{OBSTACLES[0, 0]} {OBSTACLES[0, 1]} 0.05" size="{OBSTACLE_RADIUS} 0.05"
          rgba="0.8 0.2 0.2 1" contype="0" conaffinity="0"/>
    <geom name="obs_b" type="cylinder" pos="{OBSTACLES[1, 0]} {OBSTACLES[1, 1]} 0.05" size="{OBSTACLE_RADIUS} 0.05"
          rgba="0.8 0.2 0.2 1" contype="0" conaffinity="0"/>
    <geom name="obs_c" type="cylinder" pos="{OBSTACLES[2, 0]} {OBSTACLES[2, 1]} 0.05" size="{OBSTACLE_RADIUS} 0.05"
          rgba="0.8 0.2 0.2 1" contype="0" conaffinity="0"/>
    <body name="agent" pos="0 0 0.04">
      <joint name="x" type="slide" axis="1 0 0" limited="true" range="-{X_LIMIT} {X_LIMIT}" damping="0.5"/>
      <joint name="y" type="slide" axis="0 1 0" limited="true" range="-0.65 0.65" damping="0.5"/>
      <geom name="agent" type="sphere" size="{AGENT_RADIUS}" mass="1" rgba="0.2 0.3 0.9 1" contype="0" conaffinity="0"/>
    </body>
    <camera name="top" pos="0 0 1.9" fovy="45"/>
    <camera name="agentview" pos="0 0 1.6" fovy="45"/>
  </worldbody>
  <actuator>
    <velocity name="vx" joint="x" kv="40" ctrlrange="-{MAX_SPEED} {MAX_SPEED}" forcerange="-40 40"/>
    <velocity name="vy" joint="y" kv="40" ctrlrange="-{MAX_SPEED} {MAX_SPEED}" forcerange="-40 40"/>
  </actuator>
</mujoco>
"""


def classify_row2(x: float, side1: int) -> int:
    """Route index from the x at which row 2 was crossed and the side (-1/+1) taken at row 1."""
    if x < OBSTACLES[1, 0]:
        return 0
    if x > OBSTACLES[2, 0]:
        return 3
    return 1 if side1 < 0 else 2


class AvoidEnv(MujocoTaskEnv):
    """See the module docstring. Extra kwarg: ``start_noise`` (uniform +- range of the start xy)."""

    OBS_KEYS = OBS_KEYS
    ACT_DIM = 2
    N_EXTRA = 2  # side taken at row 1 (0 = not yet), mode
    NUM_MODES = NUM_MODES

    def __init__(self, horizon: int = 100, reward_type: str = "sparse", terminate_on_success: bool = True,
                 render_mode=None, start_noise: float = 0.03, width: int = 240, height: int = 240, **unknown):
        check_no_unknown(type(self), unknown)
        self.start_noise = check_positive("start_noise", start_noise) if start_noise != 0 else 0.0
        super().__init__(_XML, frame_skip=5, horizon=horizon, reward_type=reward_type,
                         terminate_on_success=terminate_on_success, render_mode=render_mode, width=width, height=height)
        self._qpos, self._qvel, self._ctrl = self.data.qpos, self.data.qvel, self.data.ctrl
        self._side1, self._mode, self._hit = 0, -1, False

    def _obs_dims(self):
        return {"agent_pos": 2, "agent_vel": 2}

    def _reset_task(self, rng):
        self._qpos[:] = START + rng.uniform(-self.start_noise, self.start_noise, 2)
        self._side1, self._mode = 0, -1

    def _apply_action(self, a):
        self._ctrl[:] = a * MAX_SPEED

    def _get_obs(self):
        return {"agent_pos": self._qpos.astype(np.float32), "agent_vel": self._qvel.astype(np.float32)}

    def _evaluate(self):
        x, y = float(self._qpos[0]), float(self._qpos[1])
        # Route bookkeeping happens once per step, so a crossing is judged within one step (~3 cm).
        if self._side1 == 0 and y >= ROW1_Y:
            self._side1 = -1 if x < OBSTACLES[0, 0] else 1
        if self._mode < 0 and y >= ROW2_Y:
            self._mode = classify_row2(x, self._side1 if self._side1 else (-1 if x < 0 else 1))
        d = OBSTACLES - self._qpos
        collided = self._hit = bool(((d * d).sum(1) < (AGENT_RADIUS + OBSTACLE_RADIUS) ** 2).any())
        success = (not collided) and y >= GOAL_Y
        progress = min(max((y - START[1]) / (GOAL_Y - START[1]), 0.0), 1.0)
        dense = -1.0 if collided else (1.0 if success else progress)
        return success, collided, dense

    def _info(self):
        return {"mode": self._mode, "collided": self._hit}

    def _extra_state(self):
        return np.array([self._side1, self._mode], dtype=np.float64)

    def _set_extra_state(self, extra):
        self._side1, self._mode = int(round(extra[0])), int(round(extra[1]))


class AvoidImageEnv(CameraObs, AvoidEnv):
    """``dpolicy/AvoidImage-v0``: Avoid seen from above (the whole arena) plus the agent's position and velocity.

    Extra kwarg: ``image_size`` (square images, default 84). The cylinders are fixed, so the picture
    adds nothing the proprioception lacks here; the task checks that a camera policy keeps the modes.
    """

    OBS_KEYS = ("agent_pos", "agent_vel", "agentview_image")
    CAMERAS = ("agentview",)
