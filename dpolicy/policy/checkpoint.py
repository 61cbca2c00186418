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
import shutil
import uuid
from pathlib import Path

import torch

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
        "shapes": {"obs": {k: [cfg.To, cfg.obs_dims[k]] for k in cfg.obs_keys}, "action": [cfg.Tp, cfg.action_dim]},
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


def resolve_checkpoint(path) -> Path:
    """Find the policy directory behind ``path`` (a policy dir, a step dir or a checkpoint root)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {str(p)!r} does not exist.")
    if (p / "meta.json").exists():
        return p
    if (p / "model" / "meta.json").exists():
        if not _complete(p):
            raise CheckpointError(f"checkpoint {str(p)!r} has no {COMPLETE} marker; it was not fully written.")
        return p / "model"
    # a root with step directories: follow `latest`, else the newest complete step
    candidates = []
    latest = p / "latest"
    if latest.exists():
        name = latest.read_text().strip()
        if name and _complete(p / name):
            return p / name / "model"
    candidates = sorted(d for d in p.glob("step_*") if d.is_dir() and _complete(d))
    if candidates:
        return candidates[-1] / "model"
    if (p / "checkpoints").is_dir():
        return resolve_checkpoint(p / "checkpoints")
    raise CheckpointError(f"{str(p)!r} holds no complete dpolicy checkpoint (no meta.json, no complete step_* directory).")


def load_policy(path, device="cpu"):
    """Load a ``ChunkPolicy`` (or a ``ComposedPolicy``, kind "composed", or a ``SteeredPolicy``, kind "steered") from any checkpoint
    path, on any device, without hydra."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from dpolicy.config import PolicyConfig, from_dict
    from dpolicy.data.normalizer import DictNormalizer
    from dpolicy.policy.chunk_policy import ChunkPolicy

    d = resolve_checkpoint(path)
    meta = read_json(d / "meta.json", "the checkpoint")
    if isinstance(meta, dict) and meta.get("kind") == "composed":  # parents by reference + weights (GPC)
        from dpolicy.compose.checkpoint import load_composed

        return load_composed(d, meta, device)
    if isinstance(meta, dict) and meta.get("kind") == "steered":  # frozen base by reference + DSRL actor
        from dpolicy.rl.steered import SteeredPolicy

        return SteeredPolicy.from_checkpoint(d, device)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{d / 'meta.json'} does not describe a dpolicy policy (format={meta.get('format') if isinstance(meta, dict) else None!r}).")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{d} has format_version {meta.get('format_version')!r}; this dpolicy reads version {FORMAT_VERSION}.")
    try:
        cfg = from_dict(PolicyConfig, read_json(d / "config.json", "the checkpoint"), "policy")
    except ConfigError as e:
        raise CheckpointError(f"{d / 'config.json'} is invalid: {e}") from None
    normalizer = DictNormalizer.from_dict(read_json(d / "normalizer.json", "the checkpoint"))
    policy = ChunkPolicy(cfg, normalizer)
    policy.metadata = dict(meta.get("metadata") or {})
    wfile = d / "model.safetensors"
    if not wfile.exists():
        raise CheckpointError(f"{wfile} is missing; the checkpoint is incomplete.")
    try:
        state = load_file(str(wfile), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{wfile} cannot be read ({e}); the file is truncated or not safetensors.") from None
    missing, unexpected = _diff_keys(policy.state_dict(), state)
    if missing or unexpected:
        raise CheckpointError(f"{wfile} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    try:
        policy.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{wfile} has tensors of the wrong shape for its config ({str(e).splitlines()[-1].strip()}).") from None
    return policy.to(torch.device(device)).eval()


def _diff_keys(expected: dict, got: dict):
    return sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
