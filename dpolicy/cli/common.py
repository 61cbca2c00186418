"""Shared CLI plumbing: where the hydra configs live, and turning user errors into one clean line."""

from __future__ import annotations

import argparse
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


def settings(cls, cfg, drop=(), check=None):
    """The one validation path of the commands: the composed hydra config (or a plain dict) -> the
    dataclass ``cls``, with its keys, value types and ranges checked (``from_dict`` and the class's own
    checks), then ``check(settings)`` for any checks the class does not hold itself, then the device
    it names checked on this machine. Keys in ``drop`` (a task file's training recipe, say) are ignored.
    Nothing runs before this returns."""
    from dpolicy.config import from_dict

    if isinstance(cfg, cls):
        obj = cfg
    else:
        d = dict(cfg) if isinstance(cfg, dict) else container(cfg)
        for key in drop:
            d.pop(key, None)
        obj = from_dict(cls, d)
    if check is not None:
        check(obj)
    if isinstance(getattr(obj, "device", None), str):
        device(obj.device)
    return obj


def device(name: str, key: str = "device"):
    """The torch device for ``name`` (auto, cpu, cuda, cuda:N, mps), or one ConfigError sentence when the
    name is unknown or this machine does not have it."""
    import torch

    from dpolicy.config import check_device
    from dpolicy.errors import ConfigError

    name = check_device(name, key)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"{key}={name!r} was requested but CUDA is not available on this machine.")
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"{key}={name!r} was requested but this machine has {n} CUDA device(s) (cuda:0 to cuda:{n - 1}).")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"{key}={name!r} was requested but MPS is not available on this machine.")
    return dev


def compose(config_name: str, overrides) -> dict:
    """configs/<config_name>.yaml composed with ``overrides`` (hydra's syntax), as a plain dict; a bad
    override is one ConfigError sentence."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from dpolicy.errors import ConfigError

    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
        return container(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        why = " (no such key)" if "not in struct" in str(e) else ""
        raise ConfigError(f"bad override: {lines[0]}{why}") from None


def checked(config_name: str):
    """Put above ``@hydra.main``: the command line's overrides are composed once before hydra runs, so a
    bad one (an unknown key, a missing option, a syntax error) is one ``error:`` line with exit status 2
    rather than hydra's report. Command lines with flags (--multirun, --cfg, ...) go to hydra untouched."""
    def deco(main):
        @functools.wraps(main)
        def wrapper(*args, **kwargs):
            argv = sys.argv[1:]
            if not args and not kwargs and not any(a.startswith("-") for a in argv):
                try:
                    compose(config_name, [a for a in argv if not a.lstrip("+~").startswith("hydra")])
                except DPolicyError as e:
                    print(f"error: {e}", file=sys.stderr)
                    sys.exit(2)
            return main(*args, **kwargs)
        return wrapper
    return deco


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``error:`` line on stderr and exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def container(cfg) -> dict:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from dpolicy.errors import ConfigError

    try:
        d = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"the config does not resolve: {' '.join(str(e).split())}") from None
    d.pop("hydra", None)
    return d


def run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)
