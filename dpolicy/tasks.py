"""The bridge to the task suite in ``envs/``: environment construction with user-facing errors.

``envs`` raises ValueError for an unknown task, id or kwarg; here those become ConfigErrors so the
CLIs print one sentence naming the culprit instead of a traceback.
"""

from __future__ import annotations

import functools

from dpolicy.errors import ConfigError


def env_args(name: str, **env_kwargs) -> dict:
    """robomimic-style ``env_args`` for a task name or gymnasium id."""
    import envs

    try:
        return envs.env_args(name, **env_kwargs)
    except ValueError as e:
        raise ConfigError(f"task {name!r}: {e}") from None


def make_env(args: dict, **overrides):
    """Build the environment an ``env_args`` dict describes (``overrides`` such as render_mode win)."""
    import envs

    try:
        return envs.make_env_from_args(args, **overrides)
    except ValueError as e:
        raise ConfigError(f"cannot build environment {args.get('env_name', args)!r}: {e}") from None


def env_factory(args: dict):
    """A picklable env factory (vector envs call it once per sub-env); accepts render_mode=..."""
    return functools.partial(make_env, args)


def env_factory_for(policy, **env_kwargs):
    """The env factory for the task a checkpoint was trained on (its stored ``env_args``), with overrides."""
    args = getattr(policy, "metadata", {}).get("env_args")
    if args is None:
        raise ConfigError("the checkpoint stores no env_args, so the environment it was trained on cannot be rebuilt.")
    if env_kwargs:
        args = {**args, "env_kwargs": {**args.get("env_kwargs", {}), **env_kwargs}}
    return env_factory(args)


def make_expert(env, noise_std: float = 0.0, seed=None, **expert_kwargs):
    import envs

    try:
        return envs.make_expert(env, noise_std=noise_std, seed=seed, **expert_kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"expert for {env.spec.id if env.spec else env!r}: {e}") from None
