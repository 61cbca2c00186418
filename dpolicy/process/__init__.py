"""Generative processes: how a network's field turns into a training loss and a sampling step.

The contract is ``base.Process`` (coefficients, field conversions, step plans, samplers, levels);
``sample_loop`` runs any process over any field function, which is what lets warm starts (RTI)
start mid-schedule and composition (GPC) mix several policies' fields. Every module of this package
registers its processes (``@register("name")``); ``build_process`` finds them by ``cfg.type``, so a new
process is one new module here plus its ``configs/process/<name>.yaml``.
"""

import importlib
import pkgutil

from dpolicy.errors import ConfigError
from dpolicy.process.base import REGISTRY, Process, StepPlan, register, sample_loop

_LOADED = False


def _load_all() -> None:
    """Import every module of this package once, so each registers its processes."""
    global _LOADED
    if not _LOADED:
        for m in pkgutil.iter_modules(__path__):
            if m.name != "base":
                importlib.import_module(f"{__name__}.{m.name}")
        _LOADED = True


def process_types() -> list[str]:
    _load_all()
    return sorted(REGISTRY)


def process_class(type_name: str) -> type[Process]:
    _load_all()
    if type_name not in REGISTRY:
        raise ConfigError(f"process.type={type_name!r} is unknown; choose one of {sorted(REGISTRY)}.")
    return REGISTRY[type_name]


def check_process_config(cfg) -> None:
    """Check a ProcessConfig against its process: the type, the sampler and the options."""
    cls = process_class(cfg.type)
    if cfg.sampler not in cls.samplers:
        raise ConfigError(f"process.sampler={cfg.sampler!r} does not fit process.type={cfg.type!r}; "
                          f"choose one of {cls.samplers}.")
    cls.from_config(cfg)  # the process's own checks (levels, prediction, eta, options, ...), before anything runs


def build_process(cfg) -> Process:
    """Build the process named by ``cfg.type`` from a ProcessConfig."""
    return process_class(cfg.type).from_config(cfg)


def __getattr__(name):
    # the process classes by their class names (Diffusion, Flow, EDM, ...), loaded on first use
    _load_all()
    for cls in REGISTRY.values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(name)


__all__ = ["Process", "StepPlan", "register", "sample_loop", "build_process", "check_process_config",
           "process_class", "process_types"]
