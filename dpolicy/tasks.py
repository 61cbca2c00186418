"""The bridge to the task suite in ``envs/``: environment construction with user-facing errors.

``envs`` raises ValueError for an unknown task, id or kwarg; here those become ConfigErrors so the
CLIs print one sentence naming the culprit instead of a traceback.
"""

from __future__ import annotations

import functools

from dpolicy.errors import ConfigError


def env_args(name: str, **env_kwargs) -> dict:
    """robomimic-style ``env_args`` for a task name or gymnasium id."""
    import dpolicy_envs as envs

    try:
        return envs.env_args(name, **env_kwargs)
    except ValueError as e:
        raise ConfigError(f"task {name!r}: {e}") from None


def make_env(args: dict, **overrides):
    """Build the environment an ``env_args`` dict describes (``overrides`` such as render_mode win)."""
    import dpolicy_envs as envs

    try:
        return envs.make_env_from_args(args, **overrides)
    except ValueError as e:
        raise ConfigError(f"cannot build environment {args.get('env_name', args)!r}: {e}") from None


def env_factory(args: dict):
    """A picklable env factory (vector envs call it once per sub-env); accepts render_mode=..."""
    return functools.partial(make_env, args)


def policy_env_args(policy, missing: str, task: str | None = None, env_kwargs: dict | None = None) -> dict:
    """The ``env_args`` to run ``policy`` on: ``task``'s when given, else the ones stored with the checkpoint,
    with ``env_kwargs`` on top. ``missing`` is the error sentence when neither exists."""
    args = env_args(task) if task else getattr(policy, "metadata", {}).get("env_args")
    if args is None:
        raise ConfigError(missing)
    return {**args, "env_kwargs": {**args.get("env_kwargs", {}), **(env_kwargs or {})}}


def env_factory_for(policy, **env_kwargs):
    """The env factory for the task a checkpoint was trained on (its stored ``env_args``), with overrides."""
    return env_factory(policy_env_args(
        policy, "the checkpoint stores no env_args, so the environment it was trained on cannot be rebuilt.",
        env_kwargs=env_kwargs))


def make_expert(env, noise_std: float = 0.0, seed=None, **expert_kwargs):
    import dpolicy_envs as envs

    try:
        return envs.make_expert(env, noise_std=noise_std, seed=seed, **expert_kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"expert for {env.spec.id if env.spec else env!r}: {e}") from None
