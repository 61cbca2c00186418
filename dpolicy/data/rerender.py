"""Observations rebuilt from a dataset's simulator states (robomimic's ``dataset_states_to_obs``): a
low-dimensional file of a task becomes an image file of the same demos, e.g. ``lift`` -> ``lift_image``.

For every demo the environment is set to each recorded state and its observation read back, so obs[t]
is the observation at states[t] and next_obs[t] the one at states[t + 1]; the last step's next
observation comes from replaying the last action from the last state, as robomimic does. Actions,
rewards, dones, states, the demos' attributes and the masks are copied; ``env_args`` become those of
the environment that rendered. The output is written atomically: an error leaves no file behind.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping, Sequence

import h5py
import numpy as np

from dpolicy.data.robomimic import (Demo, _demo_names, _read_demo, _reading, check_compression, read_env_args, storage,
                                    write_dataset)
from dpolicy.errors import ConfigError, DatasetError


def rerender_dataset(src, dst, env_args_or_task: str | Mapping | None = None, keys: Sequence[str] | None = None,
                     progress: bool = True, env_kwargs: Mapping | None = None, compression: str | None = "gzip") -> dict:
    """Write ``dst``: the demos of ``src`` with observations rendered from their states.

    The environment is ``env_args_or_task``: a task name (the settings it shares with ``src``'s own
    ``env_kwargs``, a horizon say, carry over), a full ``env_args`` dict, or None for ``src``'s own
    ``env_args``; ``env_kwargs`` override on top. ``keys`` keeps only those observation keys (None: all
    the environment gives). Returns a summary: demos, steps, keys with their shapes and dtypes, the file's
    size and the bytes of images in it.
    """
    from tqdm import tqdm

    from dpolicy import tasks

    src, dst = Path(src), Path(dst)
    check_compression(compression)
    if dst.resolve() == src.resolve():
        raise ConfigError(f"the re-rendered dataset must go to another file than its source {str(src)!r}.")
    names, masks, steps = _source_layout(src)
    args = _env_args(src, env_args_or_task, env_kwargs)
    env = tasks.make_env(args)
    if not callable(getattr(env.unwrapped, "set_state", None)):
        env.close()
        raise ConfigError(f"environment {args['env_name']!r} cannot be set to a recorded state (it has no set_state).")
    t0 = time.perf_counter()
    shapes = {}

    def demos():
        bar = tqdm(total=steps, desc=f"rerender {src.name}", disable=not progress, dynamic_ncols=True, leave=False)
        try:
            for name in names:
                with _reading(src) as f:
                    demo = _read_demo(src, f["data"][name], name, (), False)
                demo.obs, demo.next_obs = _render(env, demo, keys, f"{src}: data/{name}", args["env_name"])
                for k, v in demo.obs.items():
                    shapes.setdefault(k, (v.shape[1:], str(v.dtype)))
                bar.update(len(demo))
                yield demo
        finally:
            bar.close()
            env.close()

    path = write_dataset(dst, demos(), args, masks=masks, compression=compression)
    seconds = time.perf_counter() - t0
    return {"path": str(path), "source": str(src), "env_name": args["env_name"], "demos": len(names), "steps": steps,
            "obs": {k: {"shape": list(s), "dtype": d} for k, (s, d) in shapes.items()}, "seconds": round(seconds, 3),
            "steps_per_second": round(steps / max(seconds, 1e-9), 1), "compression": compression, **storage(path)}


def _source_layout(src: Path) -> tuple[list[str], dict, int]:
    """The demo names of ``src``, its masks with names as they will be written (demo_0, demo_1, ...) and its
    number of steps; one DatasetError naming the file when a demo has no states to render from."""
    with _reading(src) as f:
        names = _demo_names(f, src, None)
        steps = 0
        for name in names:
            g = f["data"][name]
            st = g.get("states") if isinstance(g, h5py.Group) else None
            if not isinstance(st, h5py.Dataset) or st.ndim != 2 or st.shape[1] == 0:
                shape = f" (its shape is {st.shape})" if isinstance(st, h5py.Dataset) else ""
                raise DatasetError(f"{src}: data/{name}/states holds no simulator states{shape}, so its observations "
                                   "cannot be re-rendered; the file must hold the (N, S) states it was recorded with.")
            steps += st.shape[0]
        renamed = {name: f"demo_{i}" for i, name in enumerate(names)}
        masks = {}
        for k, ds in (f["mask"].items() if isinstance(f.get("mask"), h5py.Group) else ()):
            listed = [n.decode() if isinstance(n, bytes) else str(n) for n in np.atleast_1d(ds[()])]
            missing = [n for n in listed if n not in renamed]
            if missing:
                raise DatasetError(f"{src}: mask/{k} lists {missing[:3]}, which are not demos under 'data'.")
            masks[k] = [renamed[n] for n in listed]
    return names, masks, steps


def _env_args(src: Path, spec, env_kwargs: Mapping | None) -> dict:
    from dpolicy import tasks

    if isinstance(spec, str):
        try:
            recorded = read_env_args(src).get("env_kwargs") or {}
        except DatasetError:
            recorded = {}
        accepted = tasks.env_args(spec)["env_kwargs"]
        args = tasks.env_args(spec, **{k: v for k, v in recorded.items() if k in accepted})
    elif isinstance(spec, Mapping):
        if "env_name" not in spec:
            raise ConfigError(f"env_args {dict(spec)!r} has no 'env_name'.")
        args = dict(spec)
    elif spec is None:
        args = read_env_args(src)
    else:
        raise ConfigError(f"the environment to render with must be a task name or an env_args dict, not {spec!r}.")
    return {**args, "env_kwargs": {**(args.get("env_kwargs") or {}), **dict(env_kwargs or {})}}


def _observation(env, where: str, env_name: str) -> dict:
    """A copy of the observation the environment holds after ``set_state``."""
    u = env.unwrapped
    read = getattr(u, "observation", None)
    obs = read() if callable(read) else getattr(u, "_last_obs", None)
    if not isinstance(obs, Mapping):
        raise ConfigError(f"environment {env_name!r} gives no observation after set_state, so {where} cannot be re-rendered.")
    return {k: np.array(v) for k, v in obs.items()}


def _render(env, demo: Demo, keys, where: str, env_name: str) -> tuple[dict, dict]:
    """(obs, next_obs) of ``demo`` from its states, each key stacked (N, ...) in the environment's dtype."""
    seed = demo.attrs.get("seed")
    env.reset(seed=int(seed) if isinstance(seed, (int, np.integer)) else None)
    frames = []
    for t, state in enumerate(demo.states):
        try:
            env.unwrapped.set_state(state)
        except ValueError as e:
            raise DatasetError(f"{where}/states row {t} does not fit the environment {env_name!r} ({e}).") from None
        frames.append(_observation(env, where, env_name))
    last, *_ = env.step(demo.actions[-1])
    last = {k: np.array(v) for k, v in last.items()}
    have = list(frames[0])
    wanted = list(keys) if keys else have
    missing = [k for k in wanted if k not in have]
    if missing:
        raise ConfigError(f"observation key(s) {missing} are not given by the environment {env_name!r} (it gives {have}).")
    obs = {k: np.stack([fr[k] for fr in frames]) for k in wanted}
    nxt = {k: np.concatenate([obs[k][1:], last[k][None]]) for k in wanted}
    return obs, nxt
