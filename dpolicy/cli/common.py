"""Shared CLI plumbing: where the hydra configs live, and turning user errors into one clean line."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from dpolicy.errors import DPolicyError

CONFIG_DIR = os.environ.get("DPOLICY_CONFIGS") or str(Path(__file__).resolve().parents[2] / "configs")


def user_errors(fn):
    """Run ``fn``; a DPolicyError (or a missing file) prints one sentence to stderr and exits 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (DPolicyError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    return wrapper


def container(cfg) -> dict:
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(cfg, resolve=True)
    d.pop("hydra", None)
    return d


def run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)
