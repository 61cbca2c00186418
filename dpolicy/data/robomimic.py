"""Read and write demonstrations in robomimic's HDF5 layout, validating everything on load.

Layout::

    data/                       attrs: total (int), env_args (JSON: env_name, env_type, env_kwargs)
    data/demo_<i>/              attrs: num_samples
        obs/<key>, next_obs/<key>   (N, ...)
        actions (N, Da), rewards (N,), dones (N,), states (N, S)
    mask/<filter>               array of demo names (bytes), e.g. train / valid

Any file with this layout works, whoever wrote it. Errors name the file, the group and the key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import h5py
import numpy as np

from dpolicy.errors import DatasetError


@dataclass
class Demo:
    """One demonstration; arrays share their first axis N."""

    obs: dict
    actions: np.ndarray
    rewards: np.ndarray | None = None
    dones: np.ndarray | None = None
    states: np.ndarray | None = None
    next_obs: dict | None = None
    attrs: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.actions)


def write_dataset(path, demos: Sequence[Demo], env_args: Mapping, masks: Mapping[str, Iterable[str]] | None = None,
                  valid_fraction: float = 0.0, seed: int = 0) -> Path:
    """Write ``demos`` to ``path`` (atomically: a temp file renamed into place).

    Missing ``next_obs``/``rewards``/``dones``/``states`` are filled (obs shifted by one; zeros;
    done on the last step; empty states). ``valid_fraction`` adds ``mask/train`` and ``mask/valid``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    names = [f"demo_{i}" for i in range(len(demos))]
    try:
        with h5py.File(tmp, "w") as f:
            data = f.create_group("data")
            total = 0
            for name, demo in zip(names, demos):
                n = len(demo)
                g = data.create_group(name)
                g.attrs["num_samples"] = n
                for k, v in demo.attrs.items():
                    g.attrs[k] = v
                for k, v in demo.obs.items():
                    g.create_dataset(f"obs/{k}", data=np.asarray(v))
                nxt = demo.next_obs or {k: np.concatenate([np.asarray(v)[1:], np.asarray(v)[-1:]]) for k, v in demo.obs.items()}
                for k, v in nxt.items():
                    g.create_dataset(f"next_obs/{k}", data=np.asarray(v))
                g.create_dataset("actions", data=np.asarray(demo.actions, dtype=np.float32))
                g.create_dataset("rewards", data=np.zeros(n, np.float32) if demo.rewards is None else np.asarray(demo.rewards, np.float32))
                dones = np.zeros(n, np.int64) if demo.dones is None else np.asarray(demo.dones, np.int64)
                if demo.dones is None and n:
                    dones[-1] = 1
                g.create_dataset("dones", data=dones)
                g.create_dataset("states", data=np.zeros((n, 0)) if demo.states is None else np.asarray(demo.states, np.float64))
                total += n
            data.attrs["total"] = total
            data.attrs["env_args"] = json.dumps(dict(env_args))
            all_masks = dict(masks or {})
            if valid_fraction > 0 and names:
                order = np.random.default_rng(seed).permutation(len(names))
                n_valid = max(1, int(round(valid_fraction * len(names))))
                all_masks.setdefault("valid", [names[i] for i in sorted(order[:n_valid])])
                all_masks.setdefault("train", [names[i] for i in sorted(order[n_valid:])])
            for k, v in all_masks.items():
                f.create_dataset(f"mask/{k}", data=np.array([s.encode() for s in v], dtype="S"))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _open(path) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset file {str(path)!r} does not exist.")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DatasetError(f"dataset file {str(path)!r} is not a readable HDF5 file ({e}).") from None


def read_env_args(path) -> dict:
    """The ``data.attrs['env_args']`` JSON of a dataset, parsed and checked."""
    with _open(path) as f:
        if "data" not in f:
            raise DatasetError(f"{path}: group 'data' is missing; not a robomimic-layout file.")
        raw = f["data"].attrs.get("env_args")
        if raw is None:
            raise DatasetError(f"{path}: attribute data.env_args is missing, so the environment cannot be rebuilt.")
        try:
            args = json.loads(raw)
        except (TypeError, json.JSONDecodeError):
            raise DatasetError(f"{path}: attribute data.env_args is not valid JSON.") from None
    if "env_type" not in args and args.get("type") == 1:  # robomimic's own files: EnvType.ROBOSUITE_TYPE = 1
        args = {**args, "env_type": "robosuite"}
    for k in ("env_name", "env_type", "env_kwargs"):
        if k not in args:
            raise DatasetError(f"{path}: data.env_args has no {k!r} entry.")
    return args


def _demo_sort_key(name: str):
    tail = name.rsplit("_", 1)[-1]
    return (0, int(tail)) if tail.isdigit() else (1, name)


def _demo_names(f: h5py.File, path, filter_key: str | None) -> list[str]:
    """The demo names to read, in order: ``mask/<filter_key>``'s, else every ``data/demo*`` group."""
    if "data" not in f:
        raise DatasetError(f"{path}: group 'data' is missing; not a robomimic-layout file.")
    if filter_key is not None:
        if f"mask/{filter_key}" not in f:
            have = sorted(f["mask"].keys()) if "mask" in f else []
            raise DatasetError(f"{path}: filter key mask/{filter_key} does not exist (available: {have}).")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f[f"mask/{filter_key}"][()]]
    else:
        names = sorted((k for k in f["data"].keys() if k.startswith("demo")), key=_demo_sort_key)
    if not names:
        raise DatasetError(f"{path}: no demo_<i> groups under 'data'.")
    return names


def low_dim_obs_dims(path, filter_key: str | None = None) -> tuple[dict[str, int], dict[str, str], int]:
    """What a low-dimensional policy can read from a dataset, from its first demo (nothing is loaded):
    ``(obs_dims, skipped, action_dim)``; ``obs_dims`` maps each numeric vector or scalar key (sorted) to its
    flattened dimension, ``skipped`` each other key (an image, text) to the reason it was left out."""
    with _open(path) as f:
        name = _demo_names(f, path, filter_key)[0]
        g = f["data"].get(name)
        if not isinstance(g, h5py.Group) or not isinstance(g.get("obs"), h5py.Group):
            raise DatasetError(f"{path}: data/{name}/obs is missing.")
        if not isinstance(g.get("actions"), h5py.Dataset) or len(g["actions"].shape) != 2:
            raise DatasetError(f"{path}: data/{name}/actions is missing or not (N, action_dim).")
        dims, skipped = {}, {}
        for k in sorted(g["obs"].keys()):
            ds = g["obs"][k]
            if not isinstance(ds, h5py.Dataset):
                skipped[k] = "a group, not an array"
            elif not (np.issubdtype(ds.dtype, np.number) or np.issubdtype(ds.dtype, np.bool_)):
                skipped[k] = f"of dtype {ds.dtype}, not numbers"
            elif len(ds.shape) > 2:
                skipped[k] = f"per-step shape {ds.shape[1:]}, an image"
            else:
                dims[k] = int(np.prod(ds.shape[1:], dtype=np.int64))
        return dims, skipped, int(g["actions"].shape[1])


def read_dataset(path, obs_keys: Sequence[str] | None = None, filter_key: str | None = None,
                 max_demos: int | None = None, load_next_obs: bool = False) -> list[Demo]:
    """Load and validate demos. ``obs_keys=None`` loads every key of the first demo."""
    with _open(path) as f:
        names = _demo_names(f, path, filter_key)
        data = f["data"]
        if max_demos is not None:
            names = names[:max_demos]
        demos, shapes = [], {}
        for name in names:
            if name not in data:
                raise DatasetError(f"{path}: demo {name!r} listed in the mask is missing from 'data'.")
            demo = _read_demo(path, data[name], name, obs_keys, load_next_obs)
            obs_keys = obs_keys or list(demo.obs)
            for k, v in list(demo.obs.items()) + [("actions", demo.actions)]:
                s = v.shape[1:]
                if shapes.setdefault(k, s) != s:
                    raise DatasetError(f"{path}: data/{name}/{k} has per-step shape {s} but earlier demos have {shapes[k]}.")
            demos.append(demo)
    return demos


def _read_demo(path, g: h5py.Group, name: str, obs_keys, load_next_obs: bool) -> Demo:
    where = f"{path}: data/{name}"
    if "actions" not in g:
        raise DatasetError(f"{where}/actions is missing.")
    if "obs" not in g:
        raise DatasetError(f"{where}/obs is missing.")
    actions = np.asarray(g["actions"][()], dtype=np.float32)
    if actions.ndim != 2:
        raise DatasetError(f"{where}/actions has shape {actions.shape}; expected (N, action_dim).")
    n = len(actions)
    if n == 0:
        raise DatasetError(f"{where} is empty (0 steps).")
    if "num_samples" in g.attrs and int(g.attrs["num_samples"]) != n:
        raise DatasetError(f"{where} says num_samples={int(g.attrs['num_samples'])} but actions has {n} rows.")
    keys = list(obs_keys) if obs_keys else sorted(g["obs"].keys())
    obs = {}
    for k in keys:
        if k not in g["obs"]:
            raise DatasetError(f"{where}/obs/{k} is missing (available keys: {sorted(g['obs'].keys())}).")
        obs[k] = _checked(g["obs"][k], f"{where}/obs/{k}", n)
    _checked_array(actions, f"{where}/actions", n)
    next_obs = None
    if load_next_obs:
        next_obs = {k: _checked(g["next_obs"][k], f"{where}/next_obs/{k}", n) if f"next_obs/{k}" in g else None for k in keys}
    opt = {k: np.asarray(g[k][()]) if k in g else None for k in ("rewards", "dones", "states")}
    for k, v in opt.items():
        if v is not None and len(v) != n:
            raise DatasetError(f"{where}/{k} has {len(v)} rows but actions has {n}.")
    return Demo(obs=obs, actions=actions, next_obs=next_obs, attrs=dict(g.attrs), **opt)


def _checked(ds: h5py.Dataset, where: str, n: int) -> np.ndarray:
    a = np.asarray(ds[()])
    if a.ndim == 1:  # robomimic stores scalar observations as (N,); treat as (N, 1)
        a = a[:, None]
    return _checked_array(a.reshape(len(a), -1).astype(np.float32), where, n)


def _checked_array(a: np.ndarray, where: str, n: int) -> np.ndarray:
    if len(a) != n:
        raise DatasetError(f"{where} has {len(a)} rows but actions has {n}.")
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).any(axis=tuple(range(1, a.ndim))).argmax()) if a.ndim > 1 else int((~np.isfinite(a)).argmax())
        raise DatasetError(f"{where} holds NaN or infinite values (first at row {bad}).")
    return a
