"""Read and write demonstrations in robomimic's HDF5 layout, validating everything on load.

Layout::

    data/                       attrs: total (int), env_args (JSON: env_name, env_type, env_kwargs)
    data/demo_<i>/              attrs: num_samples
        obs/<key>, next_obs/<key>   (N,), (N, d) or (N, ...) low-dimensional; (N, H, W, C) uint8 images
        actions (N, Da), rewards (N,), dones (N,), states (N, S)
    mask/<filter>               array of demo names (bytes), e.g. train / valid

An observation whose per-step shape has three dimensions is an image, (H, W, C) with 1 to 4 channels
last, and is read as uint8 (N, H, W, C) in one slice per demo, never copied to floats. Other tools'
float images are taken when their values lie in [0, 1] (scaled by 255; an image whose maximum is at
most 1 counts as one of these) or in [0, 255], and integer images when their values lie in [0, 255];
both are rounded to uint8. Every other observation is read as float32 (N, d), flattened. Images are
written uint8, one frame per chunk, compressed. Any file with this layout works, whoever wrote it
(compressed or chunked datasets, extra groups, keys and attributes). Errors name the file, the group
and the key.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import h5py
import numpy as np

from dpolicy.errors import ConfigError, DatasetError


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


COMPRESSIONS = ("gzip", "lzf", None)
GZIP_LEVEL = 4


def write_dataset(path, demos: Iterable[Demo], env_args: Mapping, masks: Mapping[str, Iterable[str]] | None = None,
                  valid_fraction: float = 0.0, seed: int = 0, compression: str | None = "gzip") -> Path:
    """Write ``demos`` (any iterable: a generator is written demo by demo) to ``path``, atomically: a temp
    file renamed into place, so an error on the way leaves no file behind.

    Missing ``next_obs``/``rewards``/``dones``/``states`` are filled (obs shifted by one; zeros;
    done on the last step; empty states). ``valid_fraction`` adds ``mask/train`` and ``mask/valid``.
    Images ((T, H, W, C) observations) are stored uint8, one frame per chunk, with ``compression``
    ("gzip" at level 4, "lzf" or None); other observations float32.
    """
    check_compression(compression)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    names = []
    try:
        with h5py.File(tmp, "w") as f:
            data = f.create_group("data")
            total = 0
            for demo in demos:
                name = f"demo_{len(names)}"
                names.append(name)
                n = len(demo)
                g = data.create_group(name)
                g.attrs["num_samples"] = n
                for k, v in demo.attrs.items():
                    g.attrs[k] = v
                nxt = demo.next_obs or {k: np.concatenate([np.asarray(v)[1:], np.asarray(v)[-1:]]) for k, v in demo.obs.items()}
                for group, obs in (("obs", demo.obs), ("next_obs", nxt)):
                    for k, v in obs.items():
                        _write_obs(g, f"{group}/{k}", np.asarray(v), f"{path}: data/{name}/{group}/{k}", compression)
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


def check_compression(compression) -> None:
    if compression not in COMPRESSIONS:
        raise ConfigError(f"compression={compression!r} is unknown; choose one of gzip, lzf or null.")


def _write_obs(g: h5py.Group, key: str, a: np.ndarray, where: str, compression: str | None) -> None:
    if a.ndim == 4:
        a = _as_image(a, where)
        opts = {}
        if len(a):  # one frame per chunk: a window of frames reads only its own frames
            opts = {"chunks": (1, *a.shape[1:]), "compression": compression,
                    "compression_opts": GZIP_LEVEL if compression == "gzip" else None}
        g.create_dataset(key, data=a, **opts)
    elif np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.bool_):
        g.create_dataset(key, data=a.astype(np.float32, copy=False))
    else:
        g.create_dataset(key, data=a)


def storage(path) -> dict:
    """What a dataset file holds on disk: ``file_bytes``, and over every demo's obs and next_obs images,
    ``image_keys`` (sorted), ``image_bytes`` (uint8 frames, uncompressed) and ``image_bytes_stored`` (as
    stored, compressed)."""
    keys, raw, stored = set(), 0, 0
    with _reading(path) as f:
        for demo in (f["data"].values() if isinstance(f.get("data"), h5py.Group) else ()):
            for group in ("obs", "next_obs"):
                g = demo.get(group) if isinstance(demo, h5py.Group) else None
                for k, ds in (g.items() if isinstance(g, h5py.Group) else ()):
                    if isinstance(ds, h5py.Dataset) and ds.ndim == 4:
                        keys.add(k)
                        raw += int(np.prod(ds.shape, dtype=np.int64)) * ds.dtype.itemsize
                        stored += int(ds.id.get_storage_size())
    return {"file_bytes": Path(path).stat().st_size, "image_keys": sorted(keys), "image_bytes": raw,
            "image_bytes_stored": stored}


@contextlib.contextmanager
def _reading(path):
    """The open file; h5py's errors on a damaged file (a truncated or garbled block) become one DatasetError."""
    try:
        with _open(path) as f:
            yield f
    except (OSError, RuntimeError, KeyError) as e:
        raise DatasetError(f"{path} cannot be read; the file is damaged ({_first_line(e)}).") from None


def _read(ds: h5py.Dataset, where: str) -> np.ndarray:
    """All of ``ds`` in one read."""
    try:
        return ds[()]
    except (OSError, RuntimeError) as e:
        raise DatasetError(f"{where} cannot be read; the file is damaged ({_first_line(e)}).") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0].strip("'\"")


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
    with _reading(path) as f:
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


def _first_demo(f: h5py.File, path, filter_key: str | None) -> h5py.Group:
    name = _demo_names(f, path, filter_key)[0]
    g = f["data"].get(name)
    if not isinstance(g, h5py.Group) or not isinstance(g.get("obs"), h5py.Group):
        raise DatasetError(f"{path}: data/{name}/obs is missing.")
    if not isinstance(g.get("actions"), h5py.Dataset) or len(g["actions"].shape) != 2:
        raise DatasetError(f"{path}: data/{name}/actions is missing or not (N, action_dim).")
    return g


def obs_shapes(path, filter_key: str | None = None) -> tuple[dict[str, tuple], dict[str, str], int]:
    """Every observation key of the first demo, as stored (nothing is loaded): ``(shapes, dtypes, action_dim)``;
    ``shapes`` maps each key (sorted) to its per-step shape, e.g. ``(3,)``, ``()`` for a scalar (read as
    ``(1,)``) or ``(84, 84, 3)`` for an image, and ``dtypes`` to its numpy dtype name, e.g. ``"uint8"``;
    a key that is a group rather than an array has shape ``()`` and dtype ``"group"``."""
    with _reading(path) as f:
        g = _first_demo(f, path, filter_key)
        shapes, dtypes = {}, {}
        for k in sorted(g["obs"].keys()):
            ds = g["obs"][k]
            if isinstance(ds, h5py.Dataset):
                shapes[k], dtypes[k] = tuple(int(s) for s in ds.shape[1:]), str(ds.dtype)
            else:
                shapes[k], dtypes[k] = (), "group"
        return shapes, dtypes, int(g["actions"].shape[1])


def low_dim_obs_dims(path, filter_key: str | None = None) -> tuple[dict[str, int], dict[str, str], int]:
    """What a low-dimensional policy can read from a dataset, from its first demo (nothing is loaded):
    ``(obs_dims, skipped, action_dim)``; ``obs_dims`` maps each numeric vector or scalar key (sorted) to its
    flattened dimension, ``skipped`` each other key (an image, text) to the reason it was left out."""
    with _reading(path) as f:
        g = _first_demo(f, path, filter_key)
        dims, skipped = {}, {}
        for k in sorted(g["obs"].keys()):
            ds = g["obs"][k]
            if not isinstance(ds, h5py.Dataset):
                skipped[k] = "a group, not an array"
            elif not _numeric(ds.dtype):
                skipped[k] = f"of dtype {ds.dtype}, not numbers"
            elif len(ds.shape) > 2:
                skipped[k] = f"per-step shape {ds.shape[1:]}, an image"
            else:
                dims[k] = int(np.prod(ds.shape[1:], dtype=np.int64))
        return dims, skipped, int(g["actions"].shape[1])


def _numeric(dtype) -> bool:
    return np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_)


def read_dataset(path, obs_keys: Sequence[str] | None = None, filter_key: str | None = None,
                 max_demos: int | None = None, load_next_obs: bool = False) -> list[Demo]:
    """Load and validate demos. ``obs_keys=None`` loads every key of the first demo. Images come back uint8
    (N, H, W, C), every other observation float32 (N, d); ``Demo.actions`` is float32 (N, Da)."""
    obs_keys = list(obs_keys) if obs_keys else None
    with _reading(path) as f:
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
            for k, v in [(f"obs/{k}", v) for k, v in demo.obs.items()] + [("actions", demo.actions)]:
                s = v.shape[1:]
                if shapes.setdefault(k, s) != s:
                    raise DatasetError(f"{path}: data/{name}/{k} has per-step shape {s} but earlier demos have {shapes[k]}.")
            demos.append(demo)
    return demos


def _read_demo(path, g: h5py.Group, name: str, obs_keys, load_next_obs: bool) -> Demo:
    """One demo, checked; ``obs_keys`` None: every key under obs, ``()``: none (obs may then be absent)."""
    where = f"{path}: data/{name}"
    if not isinstance(g, h5py.Group):
        raise DatasetError(f"{where} is not a group.")
    if "actions" not in g:
        raise DatasetError(f"{where}/actions is missing.")
    keys = sorted(g["obs"].keys()) if obs_keys is None and isinstance(g.get("obs"), h5py.Group) else list(obs_keys or ())
    if (obs_keys is None or keys) and not isinstance(g.get("obs"), h5py.Group):
        raise DatasetError(f"{where}/obs is missing.")
    actions = np.asarray(_read(g["actions"], f"{where}/actions"), dtype=np.float32)
    if actions.ndim != 2:
        raise DatasetError(f"{where}/actions has shape {actions.shape}; expected (N, action_dim).")
    n = len(actions)
    if n == 0:
        raise DatasetError(f"{where} is empty (0 steps).")
    if "num_samples" in g.attrs and int(g.attrs["num_samples"]) != n:
        raise DatasetError(f"{where} says num_samples={int(g.attrs['num_samples'])} but actions has {n} rows.")
    obs = {}
    for k in keys:
        if k not in g["obs"]:
            raise DatasetError(f"{where}/obs/{k} is missing (available keys: {sorted(g['obs'].keys())}).")
        obs[k] = _checked(g["obs"][k], f"{where}/obs/{k}", n)
    _checked_array(actions, f"{where}/actions", n)
    next_obs = None
    if load_next_obs:
        next_obs = {k: _checked(g["next_obs"][k], f"{where}/next_obs/{k}", n) if f"next_obs/{k}" in g else None for k in keys}
    opt = {k: np.asarray(_read(g[k], f"{where}/{k}")) if isinstance(g.get(k), h5py.Dataset) else None
           for k in ("rewards", "dones", "states")}
    for k, v in opt.items():
        if v is not None and len(v) != n:
            raise DatasetError(f"{where}/{k} has {len(v)} rows but actions has {n}.")
    return Demo(obs=obs, actions=actions, next_obs=next_obs, attrs=dict(g.attrs), **opt)


def _checked(ds, where: str, n: int) -> np.ndarray:
    if not isinstance(ds, h5py.Dataset):
        raise DatasetError(f"{where} is a group, not an array.")
    if not _numeric(ds.dtype):
        raise DatasetError(f"{where} has dtype {ds.dtype}, not numbers.")
    if ds.ndim == 0:
        raise DatasetError(f"{where} is a single value, not one row per step.")
    if ds.ndim > 4:
        raise DatasetError(f"{where} has per-step shape {ds.shape[1:]}; an observation is a vector or an "
                           "(H, W, C) image.")
    if ds.shape[0] != n:
        raise DatasetError(f"{where} has {ds.shape[0]} rows but actions has {n}.")
    if ds.ndim == 4:
        return _as_image(_read(ds, where), where)  # one read per demo, no float copy
    a = np.asarray(_read(ds, where))
    if a.ndim == 1:  # robomimic stores scalar observations as (N,); treat as (N, 1)
        a = a[:, None]
    return _checked_array(a.reshape(len(a), -1).astype(np.float32), where, n)


def _as_image(a: np.ndarray, where: str) -> np.ndarray:
    """(N, H, W, C) images as uint8: uint8 as they are; integers in [0, 255] and floats in [0, 1] (times 255)
    or [0, 255], rounded; anything else one DatasetError naming ``where``."""
    if a.shape[-1] > 4:
        raise DatasetError(f"{where} has per-step shape {a.shape[1:]}, not an (H, W, C) image with 1 to 4 "
                           "channels last.")
    if a.dtype == np.uint8:
        return a
    if not _numeric(a.dtype) or a.dtype == np.bool_:
        raise DatasetError(f"{where} is an image of dtype {a.dtype}; images are uint8.")
    if a.size == 0:
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise DatasetError(f"{where} is an image holding NaN or infinite values.")
    lo, hi = a.min(), a.max()
    if lo < 0 or hi > 255:
        raise DatasetError(f"{where} is an image of dtype {a.dtype} with values in [{lo}, {hi}]; images are uint8, "
                           "or floats in [0, 1] or [0, 255].")
    if np.issubdtype(a.dtype, np.floating):
        return np.rint(a * 255.0 if hi <= 1 else a).astype(np.uint8)
    return a.astype(np.uint8)


def _checked_array(a: np.ndarray, where: str, n: int) -> np.ndarray:
    if len(a) != n:
        raise DatasetError(f"{where} has {len(a)} rows but actions has {n}.")
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).any(axis=tuple(range(1, a.ndim))).argmax()) if a.ndim > 1 else int((~np.isfinite(a)).argmax())
        raise DatasetError(f"{where} holds NaN or infinite values (first at row {bad}).")
    return a
