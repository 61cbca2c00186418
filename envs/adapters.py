"""Adapters that give foreign gymnasium envs the interface the dpolicy tasks have.

Policies in dpolicy consume a Dict observation of flat float32 vectors and uint8 (H, W, C) images and a
Box action in [-1, 1] (or at least a Box), and rollouts read ``info["is_success"]``. ``DictObsAdapter``
wraps any env with a Box action space into that shape; ``make_pusht`` builds gym-pusht's PushT
(optional dependency) with its [0, 512] pixel action rescaled to [-1, 1], from its state or from its
96 x 96 camera image and the agent's position.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import gymnasium as gym
import numpy as np

PUSHT_ID = "gym_pusht/PushT-v0"
PUSHT_OBS_TYPES = ("state", "pixels_agent_pos", "environment_state_agent_pos")


def _env_name(env) -> str:
    spec = getattr(env, "spec", None)
    return spec.id if spec is not None else type(env.unwrapped).__name__


def _is_image(space: gym.spaces.Box) -> bool:
    return space.dtype == np.uint8 and len(space.shape) == 3 and 1 <= space.shape[2] <= 4


def _flat_box(space: gym.spaces.Box) -> gym.spaces.Box:
    if _is_image(space):
        return space
    return gym.spaces.Box(np.asarray(space.low, np.float32).reshape(-1), np.asarray(space.high, np.float32).reshape(-1),
                          (int(np.prod(space.shape)),), np.float32)


class DictObsAdapter(gym.ObservationWrapper):
    """Box observation -> {"state": obs}; Dict observation -> the listed keys, each flattened to float32,
    except uint8 (H, W, C) images, which stay as they are. ``rename`` maps an env key to the name it is
    exposed under (e.g. {"pixels": "agentview_image"}).

    ``info["is_success"]`` is added (from ``is_success`` or ``success`` when the env reports one,
    else False) so the same rollout code works for every env.
    """

    def __init__(self, env: gym.Env, keys=None, rename: dict | None = None):
        super().__init__(env)
        self.rename = dict(rename or {})
        if not isinstance(env.action_space, gym.spaces.Box):
            raise ValueError(f"env {_env_name(env)!r} has a {type(env.action_space).__name__} action space; "
                             "dpolicy needs a continuous Box action space")
        space = env.observation_space
        if isinstance(space, gym.spaces.Box):
            if keys not in (None, ["state"], ("state",)):
                raise ValueError(f"env {_env_name(env)!r} has a Box observation, exposed as key 'state'; got keys={keys!r}")
            self.keys = ("state",)
            self._box = True
            self.observation_space = gym.spaces.Dict({"state": _flat_box(space)})
        elif isinstance(space, gym.spaces.Dict):
            keys = tuple(space.spaces) if keys is None else tuple(keys)
            for k in keys:
                if k not in space.spaces:
                    raise ValueError(f"observation key {k!r} not in env {_env_name(env)!r} (has {list(space.spaces)})")
                if not isinstance(space.spaces[k], gym.spaces.Box):
                    raise ValueError(f"observation key {k!r} of env {_env_name(env)!r} is not a Box")
            self.keys, self._box = keys, False
            self._image = {k: _is_image(space.spaces[k]) for k in keys}
            self.observation_space = gym.spaces.Dict([(self.rename.get(k, k), _flat_box(space.spaces[k])) for k in keys])
        else:
            raise ValueError(f"env {_env_name(env)!r} has a {type(space).__name__} observation space; "
                             "only Box and Dict observations can be adapted")

    def observation(self, obs):
        if self._box:
            return {"state": np.asarray(obs, np.float32).reshape(-1)}
        return {self.rename.get(k, k): np.array(obs[k], np.uint8) if self._image[k] else
                np.asarray(obs[k], np.float32).reshape(-1) for k in self.keys}

    @staticmethod
    def _success(info) -> dict:
        info = dict(info)
        info["is_success"] = bool(info.get("is_success", info.get("success", False)))
        return info

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return self.observation(obs), self._success(info)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self.observation(obs), reward, terminated, truncated, self._success(info)


class UnitActionAdapter(gym.ActionWrapper):
    """Expose a bounded Box action as Box(-1, 1); non-finite entries map to the centre of the range."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        space = env.action_space
        if not isinstance(space, gym.spaces.Box) or not (np.isfinite(space.low).all() and np.isfinite(space.high).all()):
            raise ValueError(f"env {_env_name(env)!r} needs a bounded Box action space to rescale")
        self._low, self._high = space.low.astype(np.float64), space.high.astype(np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, space.shape, np.float32)

    def action(self, action):
        a = np.asarray(action, np.float64)
        a = np.clip(np.where(np.isfinite(a), a, 0.0), -1.0, 1.0)
        return (self._low + (a + 1.0) * 0.5 * (self._high - self._low)).astype(self.env.action_space.dtype)


def make_pusht(**kwargs) -> gym.Env:
    """gym-pusht's PushT with a [-1, 1] action and ``is_success`` in info.

    ``obs_type="state"`` (default): {"state": (5,)} = agent xy, block xy, block angle. ``obs_type=
    "pixels_agent_pos"``: {"agent_pos": (2,) float32, "agentview_image": (96, 96, 3) uint8}, drawn
    off-screen (SDL_VIDEODRIVER defaults to "dummy"). ``obs_type="environment_state_agent_pos"``:
    {"agent_pos": (2,), "environment_state": (16,)} = the T's 8 outline keypoints in pixels (Diffusion
    Policy's low-dimensional PushT observation; no angle to wrap around). Either way ``env.unwrapped`` has ``get_state`` /
    ``set_state`` / ``state_obs`` (see ``pusht_sim``); gymnasium's ``max_episode_steps`` kwarg shortens
    the 300-step episodes.
    """
    if importlib.util.find_spec("gym_pusht") is None:
        raise ValueError("task 'pusht' needs the optional gym-pusht package: pip install dpolicy[pusht]")
    kwargs.setdefault("obs_type", "state")
    if kwargs["obs_type"] not in PUSHT_OBS_TYPES:
        raise ValueError(f"pusht obs_type={kwargs['obs_type']!r}: only {list(PUSHT_OBS_TYPES)} are supported")
    if kwargs["obs_type"] != "state":
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    import gym_pusht  # noqa: F401  (registers gym_pusht/PushT-v0)

    from .pusht_sim import PushTStateEnv

    spec = dataclasses.replace(gym.spec(PUSHT_ID), entry_point=PushTStateEnv)
    env = UnitActionAdapter(gym.make(spec, **kwargs))
    if kwargs["obs_type"] == "state":
        return DictObsAdapter(env)
    if kwargs["obs_type"] == "environment_state_agent_pos":
        return DictObsAdapter(env, keys=("agent_pos", "environment_state"))
    return DictObsAdapter(env, keys=("agent_pos", "pixels"), rename={"pixels": "agentview_image"})
