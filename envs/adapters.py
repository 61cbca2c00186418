"""Adapters that give foreign gymnasium envs the interface the dpolicy tasks have.

Policies in dpolicy consume a Dict observation of flat float32 vectors and a Box action in [-1, 1]
(or at least a Box), and rollouts read ``info["is_success"]``. ``DictObsAdapter`` wraps any env with
a Box action space into that shape; ``make_pusht`` builds gym-pusht's PushT (optional dependency)
with its [0, 512] pixel action rescaled to [-1, 1].
"""

from __future__ import annotations

import importlib.util

import gymnasium as gym
import numpy as np

PUSHT_ID = "gym_pusht/PushT-v0"


def _env_name(env) -> str:
    spec = getattr(env, "spec", None)
    return spec.id if spec is not None else type(env.unwrapped).__name__


def _flat_box(space: gym.spaces.Box) -> gym.spaces.Box:
    return gym.spaces.Box(np.asarray(space.low, np.float32).reshape(-1), np.asarray(space.high, np.float32).reshape(-1),
                          (int(np.prod(space.shape)),), np.float32)


class DictObsAdapter(gym.ObservationWrapper):
    """Box observation -> {"state": obs}; Dict observation -> the listed keys, each flattened to float32.

    ``info["is_success"]`` is added (from ``is_success`` or ``success`` when the env reports one,
    else False) so the same rollout code works for every env.
    """

    def __init__(self, env: gym.Env, keys=None):
        super().__init__(env)
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
            self.observation_space = gym.spaces.Dict([(k, _flat_box(space.spaces[k])) for k in keys])
        else:
            raise ValueError(f"env {_env_name(env)!r} has a {type(space).__name__} observation space; "
                             "only Box and Dict observations can be adapted")

    def observation(self, obs):
        if self._box:
            return {"state": np.asarray(obs, np.float32).reshape(-1)}
        return {k: np.asarray(obs[k], np.float32).reshape(-1) for k in self.keys}

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
    """gym-pusht's PushT with state observations, a [-1, 1] action and ``is_success`` in info."""
    if importlib.util.find_spec("gym_pusht") is None:
        raise ValueError("task 'pusht' needs the optional gym-pusht package: pip install dpolicy[pusht]")
    import gym_pusht  # noqa: F401  (registers gym_pusht/PushT-v0)

    kwargs.setdefault("obs_type", "state")
    if kwargs["obs_type"] != "state":
        raise ValueError(f"pusht obs_type={kwargs['obs_type']!r}: only 'state' is supported")
    return DictObsAdapter(UnitActionAdapter(gym.make(PUSHT_ID, **kwargs)))
