"""Composed checkpoints: a directory holding only ``meta.json`` (kind ``composed``) and a COMPLETE marker.

The parents are stored by reference: a path relative to the composed directory (the default, so a
folder holding the parents and the composition can be moved as a whole) or an absolute path, with
the SHA-256 of each parent's weights. ``ComposedPolicy`` is registered for the kind, so
``dpolicy.load_policy`` loads the directory (through ``read_composed`` here); a missing parent, or a
parent whose weights changed since the weights were chosen, is a CheckpointError naming it. Written
atomically like every checkpoint.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from dpolicy.errors import CheckpointError, ConfigError
from dpolicy.policy.checkpoint import atomic_dir, load_checkpoint, resolve_checkpoint, write_json

FORMAT = "dpolicy-composed"
FORMAT_VERSION = 1
KIND = "composed"


def weights_digest(policy_dir: Path) -> str:
    h = hashlib.sha256()
    with open(Path(policy_dir) / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_composed(policy, path, relative: bool = True) -> Path:
    """Atomically write ``policy`` (a ComposedPolicy built with parent paths) at ``path``."""
    from dpolicy import __version__

    if policy.parent_paths is None:
        raise ConfigError("this composed policy does not know where its parents are stored; build it with "
                          "ComposedPolicy.from_checkpoints(paths) (or pass parent_paths=) before saving.")
    path = Path(path)
    target = path.resolve()
    parents = []
    for i, p in enumerate(policy.parent_paths):
        d = resolve_checkpoint(p).resolve()
        if target == d or target in d.parents:
            raise ConfigError(f"cannot save the composition at {str(path)!r}: parent {i} lives inside it.")
        ref = os.path.relpath(d, target) if relative else str(d)
        parents.append({"path": ref, "sha256": weights_digest(d), "process": policy.parents[i].process.name})
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": KIND, "dpolicy_version": __version__,
            "operator": policy.operator, "weights": policy.weights, "steps": policy.default_steps, "Ta": policy.Ta,
            "action_norm_tol": policy.action_norm_tol, "parents": parents, "metadata": policy.metadata,
            "shapes": {"obs": {k: [policy.To, d] for k, d in policy.obs_dims.items()},
                       "action": [policy.Tp, policy.action_dim]}}
    with atomic_dir(path) as tmp:
        write_json(tmp / "meta.json", meta)
    return path


def read_composed(d: Path, meta: dict, device="cpu") -> tuple[list, list[str], dict]:
    """What the ``meta.json`` of composed directory ``d`` describes: ``(parents, their resolved paths, the
    ComposedPolicy settings)``, each parent loaded from its own checkpoint and checked against its digest."""
    where = d / "meta.json"
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{where} has format {meta.get('format')!r} version {meta.get('format_version')!r}; "
                              f"this dpolicy reads {FORMAT!r} version {FORMAT_VERSION}.")
    entries = meta.get("parents")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) and "path" in e for e in entries):
        raise CheckpointError(f"{where} lists no parents (expected 'parents': [{{'path': ...}}, ...]).")
    parents, paths = [], []
    for i, e in enumerate(entries):
        p = Path(e["path"])
        full = p if p.is_absolute() else (d / p)
        if not full.exists():
            raise CheckpointError(f"parent {i} of composed checkpoint {str(d)!r} is missing: {str(e['path'])!r} "
                                  f"(resolved to {str(full.resolve())!r}) does not exist.")
        try:
            parent = load_checkpoint(full, device)
        except CheckpointError as err:
            raise CheckpointError(f"parent {i} of composed checkpoint {str(d)!r} cannot be loaded: {err}") from None
        if getattr(parent, "parents", None) is not None:
            raise CheckpointError(f"parent {i} of composed checkpoint {str(d)!r} is itself a composition; "
                                  f"nested compositions are not supported.")
        if e.get("sha256") and weights_digest(resolve_checkpoint(full)) != e["sha256"]:
            raise CheckpointError(f"parent {i} of composed checkpoint {str(d)!r} at {str(full)!r} has different "
                                  f"weights than when it was composed; re-run the weight search for the new parent.")
        parents.append(parent)
        paths.append(str(full.resolve()))
    settings = {"weights": meta.get("weights"), "operator": meta.get("operator", "convex"), "steps": meta.get("steps"),
                "Ta": meta.get("Ta"), "action_norm_tol": float(meta.get("action_norm_tol", 0.1))}
    return parents, paths, settings


def is_composed(meta) -> bool:
    return isinstance(meta, dict) and meta.get("kind") == KIND


__all__ = ["save_composed", "read_composed", "is_composed", "weights_digest", "FORMAT", "FORMAT_VERSION"]
