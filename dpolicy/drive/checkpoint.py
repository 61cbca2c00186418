"""Driving planners as checkpoint directories in the project's format.

A planner directory holds ``config.json`` (the planner's constructor settings), ``model.safetensors``
(its weights) and ``meta.json`` (format, version, ``kind``: ``drive_masked`` or ``drive_anchor``, and
free-form ``metadata`` such as the scores it was measured at), written atomically with the same
``atomic_dir`` as every other policy. The planner classes register their kinds, so
``dpolicy.load_policy(dir)`` loads them like any other checkpoint; nothing is pickled.
"""

from __future__ import annotations

from pathlib import Path

from dpolicy.errors import CheckpointError, ConfigError
from dpolicy.policy.checkpoint import (FORMAT, FORMAT_VERSION, atomic_dir, check_format, load_weights, read_json, read_weights,
                                       write_json)


def save_planner(planner, path, metadata: dict | None = None) -> Path:
    """Atomically write ``planner`` (it has ``cfg`` and a registered ``kind``) as a directory at ``path``."""
    from safetensors.torch import save_file

    from dpolicy import __version__

    path = Path(path)
    with atomic_dir(path) as tmp:
        state = {k: v.detach().to("cpu").contiguous() for k, v in planner.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        write_json(tmp / "config.json", planner.cfg)
        write_json(tmp / "meta.json", {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": planner.kind,
                                       "dpolicy_version": __version__, "metadata": metadata or {}})
    return path


def read_planner_dir(d: Path, meta: dict) -> tuple[dict, dict]:
    """``(config dict, weights)`` of the planner directory ``d``, each checked."""
    check_format(d, meta)
    cfg = read_json(d / "config.json", "the checkpoint")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{d / 'config.json'} does not hold a planner's settings.")
    return cfg, read_weights(d)


def build_planner(cls, d: Path, cfg: dict, state: dict, make, device):
    """``make(cfg)`` -> a planner of ``cls``, its weights loaded strictly from ``state``; a config that does not
    fit the class is a CheckpointError naming ``d``."""
    try:
        planner = make(cfg)
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise CheckpointError(f"{d / 'config.json'} does not describe a {cls.__name__} ({type(e).__name__}: {e}).") from None
    load_weights(planner, state, d / "model.safetensors")
    return planner.to(device).eval()
