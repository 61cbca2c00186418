"""gym-pusht's ``PushTEnv`` with the full-state accessors the dpolicy tasks have.

Imported only by ``adapters.make_pusht`` (it imports gym-pusht, an optional extra). ``get_state`` is
the flat float64 vector [agent x, y, block x, y, angle, agent vx, vy, block vx, vy, angular velocity]
(the physics of one control step depends on nothing else: the block's velocity is damped to zero
every physics step and the agent's follows a PD law on its position and velocity); ``set_state``
places the bodies exactly there, without gym-pusht's ``reset_to_state`` quirks (a physics step,
angle set after position). ``state_obs`` is the 5-D state observation of the current moment, which a
scripted expert reads when the policy sees pixels; ``observation`` is the observation of the current moment
as the task's adapter exposes it (so a dataset's states can be re-rendered as keypoints or pixels).
"""

from __future__ import annotations

import numpy as np
from gym_pusht.envs.pusht import PushTEnv

STATE_SIZE = 10


class PushTStateEnv(PushTEnv):
    def get_state(self) -> np.ndarray:
        a, b = self.agent, self.block
        return np.array([*a.position, *b.position, b.angle, *a.velocity, *b.velocity, b.angular_velocity], np.float64)

    def set_state(self, state) -> None:
        s = np.asarray(state, np.float64).reshape(-1)
        if s.shape[0] != STATE_SIZE:
            raise ValueError(f"state has {s.shape[0]} entries, expected {STATE_SIZE}")
        self.agent.position, self.agent.velocity = s[0:2].tolist(), s[5:7].tolist()
        self.block.angle = float(s[4])
        self.block.position, self.block.velocity = s[2:4].tolist(), s[7:9].tolist()
        self.block.angular_velocity = float(s[9])
        self.space.reindex_shapes_for_body(self.block)
        self.space.reindex_shapes_for_body(self.agent)

    def state_obs(self) -> dict:
        """{"state": [agent x, y, block x, y, angle mod 2 pi]} (float32), whatever ``obs_type`` the env has."""
        s = self.get_state()
        return {"state": np.array([*s[:4], s[4] % (2 * np.pi)], np.float32)}

    def observation(self) -> dict:
        """The observation of the current moment under this env's ``obs_type``, keyed and typed as
        ``adapters.make_pusht`` exposes it (gym-pusht's "pixels" as ``agentview_image``)."""
        obs = self.get_obs()
        if not isinstance(obs, dict):
            return {"state": np.asarray(obs, np.float32).reshape(-1)}
        return {("agentview_image" if k == "pixels" else k):
                (np.asarray(v, np.uint8) if k == "pixels" else np.asarray(v, np.float32).reshape(-1)) for k, v in obs.items()}
