"""Self-describing, atomically written checkpoint directories.

A policy directory holds ``config.json`` (the PolicyConfig), ``normalizer.json``,
``model.safetensors`` (weights) and ``meta.json`` (format name and version, shapes). A training
run's checkpoint root holds ``step_XXXXXXX/`` directories, each with ``model/`` (a policy
directory, EMA weights) and ``training_state/``, plus a ``latest`` pointer file.

Atomicity: a directory is written under a temporary name, its files fsynced, a ``COMPLETE``
marker added, then renamed into place; ``latest`` is replaced with ``os.replace`` only after.
A crash at any moment leaves either the old or the new checkpoint loadable, never a broken one,
and loaders skip directories without the marker.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

from dpolicy.errors import CheckpointError, ConfigError

FORMAT = "dpolicy-policy"
FORMAT_VERSION = 1
COMPLETE = "COMPLETE"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def read_json(path: Path, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; {what} is incomplete or not a dpolicy checkpoint.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}); the checkpoint is corrupt.") from None


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yield a temporary directory that becomes ``final`` only if the block completes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        (tmp / COMPLETE).write_text("ok\n")
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_policy_files(policy, out: Path) -> None:
    """Write the four policy files into an existing directory ``out`` (no atomicity here)."""
    from safetensors.torch import save_file

    from dpolicy import __version__
    from dpolicy.config import to_dict

    cfg = policy.cfg
    # Unwrap DDP / torch.compile so saved names never carry "module." or "_orig_mod." prefixes.
    state = {k: v.detach().to("cpu").contiguous() for k, v in _plain_state_dict(policy).items()}
    save_file(state, str(out / "model.safetensors"))
    write_json(out / "config.json", to_dict(cfg))
    write_json(out / "normalizer.json", policy.normalizer.to_dict())
    write_json(out / "meta.json", {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dpolicy_version": __version__,
        "shapes": {"obs": {k: [cfg.To, *cfg.image_shapes.get(k, [cfg.obs_dims[k]])] for k in cfg.obs_keys},
                   "action": [cfg.Tp, cfg.action_dim]},
        "process": cfg.process.type, "net": cfg.net.type, "metadata": getattr(policy, "metadata", {}),
    })


def _plain_state_dict(module) -> dict:
    sd = module.state_dict()
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            k = k.replace(prefix, "")
        out[k] = v
    return out


def save_policy(policy, path) -> Path:
    """Atomically write a standalone policy directory at ``path``."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_policy_files(policy, tmp)
    return path


def _complete(p: Path) -> bool:
    return (p / COMPLETE).exists()


_STEP_NAME = re.compile(r"step_(\d+)")


def complete_steps(root) -> list[Path]:
    """The complete ``step_<n>`` directories directly under ``root``, oldest first (by step number)."""
    root = Path(root)
    steps = []
    with contextlib.suppress(OSError):
        for d in root.iterdir():
            m = _STEP_NAME.fullmatch(d.name)
            if m and d.is_dir() and not d.is_symlink() and _complete(d):
                steps.append((int(m.group(1)), d))
    return [d for _, d in sorted(steps)]


def read_latest(root) -> Path | None:
    """The step directory ``root/latest`` names, if it names a complete one directly under ``root``; else None.

    The pointer is only a hint: whatever it holds (random bytes, text that is not UTF-8, a missing or
    incomplete step, a path leading elsewhere), a caller falls back to the newest complete step."""
    root = Path(root)
    try:
        with open(root / "latest", "rb") as f:
            raw = f.read(256)  # a step name is short; a huge garbage file is not read whole
    except OSError:  # missing, a directory, unreadable
        return None
    name = raw.decode("utf-8", errors="replace").strip()
    if not _STEP_NAME.fullmatch(name):
        return None
    d = root / name
    return d if d.is_dir() and not d.is_symlink() and _complete(d) else None


def newest_step(root) -> Path | None:
    """The step a run's checkpoint root stands for: the one ``latest`` names when that is a complete step,
    else the newest complete step; None when there is none."""
    latest = read_latest(root)
    if latest is not None:
        return latest
    steps = complete_steps(root)
    return steps[-1] if steps else None


def resolve_checkpoint(path) -> Path:
    """Find the policy directory behind ``path`` (a policy dir, a step dir, a checkpoint root or its ``latest``)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {str(p)!r} does not exist.")
    if p.is_file() and p.name == "latest":  # the pointer file itself stands for its checkpoint root
        p = p.parent
    if (p / "meta.json").exists():
        return p
    if (p / "model" / "meta.json").exists():
        if not _complete(p):
            raise CheckpointError(f"checkpoint {str(p)!r} has no {COMPLETE} marker; it was not fully written.")
        return p / "model"
    # a root with step directories: follow `latest`, else the newest complete step
    step = newest_step(p)
    if step is not None:
        return step / "model"
    if (p / "checkpoints").is_dir():
        return resolve_checkpoint(p / "checkpoints")
    raise CheckpointError(f"{str(p)!r} holds no complete dpolicy checkpoint (no meta.json, no complete step_* directory).")


# the PolicyConfig fields that fix a policy's weights and what it reads and writes; a resumed run must match them
SHAPE_FIELDS = ("net", "process", "To", "Tp", "Ta", "obs_keys", "obs_dims", "action_dim", "image_shapes", "vision")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in ("net", "process", "vision"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def policy_config_differences(saved: dict, current) -> list[tuple[str, object, object]]:
    """``(key, saved value, current value)`` for each of ``SHAPE_FIELDS`` (nested keys spelled out, e.g.
    ``process.type``) in which a checkpoint's ``config.json`` dict differs from the PolicyConfig ``current``."""
    from dpolicy.config import PolicyConfig, from_dict, to_dict

    saved_cfg = from_dict(PolicyConfig, saved, "policy")  # fills fields newer than the checkpoint with defaults
    a = _flat({k: v for k, v in to_dict(saved_cfg).items() if k in SHAPE_FIELDS})
    b = _flat({k: v for k, v in to_dict(current).items() if k in SHAPE_FIELDS})
    keys = sorted(set(a) | set(b), key=lambda k: (not k.endswith(".type"), k))  # net.type / process.type first
    return [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)]


def check_resume_compatible(step_dir, current) -> None:
    """Raise CheckpointError, naming every differing key, unless the policy saved in ``step_dir`` has the same
    network, process and shapes as the PolicyConfig ``current`` (the run that wants to resume from it)."""
    step_dir = Path(step_dir)
    path = step_dir / "model" / "config.json"
    try:
        diffs = policy_config_differences(read_json(path, "the checkpoint"), current)
    except ConfigError as e:
        raise CheckpointError(f"{path} is invalid: {e}") from None
    if diffs:
        was = ", ".join(f"{k}={old!r}" for k, old, _ in diffs)
        now = ", ".join(f"{k}={new!r}" for k, _, new in diffs) if len(diffs) > 1 else repr(diffs[0][2])
        raise CheckpointError(f"{step_dir} was trained with {was}; this run asks for {now} — use a new hydra.run.dir "
                              f"or the same settings.")


# -- kinds ----------------------------------------------------------------------------------------------
# A checkpoint's meta.json names its kind ("kind"; none: a ChunkPolicy directory, kind "chunk"). Each kind is
# a class with a ``load(dir, meta, device)`` classmethod, registered by the module that defines it. The
# loader below only consults this table, so the policy layer never imports the layers built on it;
# ``dpolicy.kinds`` imports every kind dpolicy defines and is what ``load_policy`` users call.
KINDS: dict[str, type] = {}
DEFAULT_KIND = "chunk"


def register_kind(name: str):
    """Class decorator: checkpoints whose ``meta.json`` says ``"kind": name`` load with ``cls.load(dir, meta, device)``."""
    def deco(cls):
        if not callable(getattr(cls, "load", None)):
            raise ConfigError(f"checkpoint kind {name!r}: {cls.__name__} has no load(dir, meta, device) classmethod.")
        prev = KINDS.get(name)
        if prev is not None and (prev.__module__, prev.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ConfigError(f"checkpoint kind {name!r} is registered twice ({prev.__qualname__}, {cls.__qualname__}).")
        KINDS[name] = cls
        cls.kind = name
        return cls
    return deco


def load_checkpoint(path, device="cpu"):
    """Load the policy behind any checkpoint path (see ``resolve_checkpoint``), on any device, without hydra,
    with the class registered for its kind. Only kinds whose modules were imported are known here;
    ``dpolicy.kinds.load_policy`` (also ``dpolicy.load_policy`` and ``dpolicy.policy.load_policy``) knows them all."""
    d = resolve_checkpoint(path)
    meta = read_json(d / "meta.json", "the checkpoint")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{d / 'meta.json'} does not describe a dpolicy policy (format=None).")
    kind = meta.get("kind", DEFAULT_KIND)
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise CheckpointError(f"{d} is a checkpoint of kind {kind!r}, which no loaded module registers (known: "
                              f"{sorted(KINDS)}); load it with dpolicy.load_policy or import the module defining it.")
    return cls.load(d, meta, device)


def check_format(d: Path, meta: dict) -> None:
    """A CheckpointError unless ``meta`` (``d``'s meta.json) names this format and version."""
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{d / 'meta.json'} does not describe a dpolicy policy (format={meta.get('format')!r}).")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{d} has format_version {meta.get('format_version')!r}; this dpolicy reads version {FORMAT_VERSION}.")


def read_weights(d: Path) -> dict:
    """The tensors of ``d/model.safetensors`` on the CPU; a missing or unreadable file is a CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    wfile = d / "model.safetensors"
    if not wfile.exists():
        raise CheckpointError(f"{wfile} is missing; the checkpoint is incomplete.")
    try:
        return load_file(str(wfile), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{wfile} cannot be read ({e}); the file is truncated or not safetensors.") from None


def read_policy_dir(d: Path, meta: dict):
    """``(PolicyConfig, DictNormalizer, weights)`` of the ChunkPolicy directory ``d``, each checked."""
    from dpolicy.config import PolicyConfig, from_dict
    from dpolicy.data.normalizer import DictNormalizer

    check_format(d, meta)
    try:
        cfg = from_dict(PolicyConfig, read_json(d / "config.json", "the checkpoint"), "policy")
    except ConfigError as e:
        raise CheckpointError(f"{d / 'config.json'} is invalid: {e}") from None
    normalizer = DictNormalizer.from_dict(read_json(d / "normalizer.json", "the checkpoint"))
    return cfg, normalizer, read_weights(d)


def load_weights(module, state: dict, wfile) -> None:
    """``module.load_state_dict(state)``, strictly; a mismatch is a CheckpointError naming ``wfile``."""
    missing, unexpected = _diff_keys(module.state_dict(), state)
    if missing or unexpected:
        raise CheckpointError(f"{wfile} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{wfile} has tensors of the wrong shape for its config ({str(e).splitlines()[-1].strip()}).") from None


def _diff_keys(expected: dict, got: dict):
    return sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
