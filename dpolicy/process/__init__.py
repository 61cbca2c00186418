"""Generative processes: how a network's field turns into a training loss and a sampling step.

A process has four methods (see ``base.Process``): ``loss``, ``schedule``, ``step`` and
``noise_to``. ``sample_loop`` runs any process over any field function, which is what lets
warm starts (RTI) start mid-schedule and composition (GPC) mix several policies' fields.
"""

from dpolicy.process.base import Process, sample_loop
from dpolicy.process.diffusion import Diffusion
from dpolicy.process.flow import Flow
from dpolicy.process.regression import Regression


def build_process(cfg) -> Process:
    """Build the process named by ``cfg.type`` ("diffusion" or "flow") from a ProcessConfig."""
    from dpolicy.errors import ConfigError

    if cfg.type == "diffusion":
        return Diffusion(train_steps=cfg.train_steps, prediction=cfg.prediction, sampler=cfg.sampler, eta=cfg.eta,
                         clip_sample=cfg.clip_sample)
    if cfg.type == "flow":
        return Flow(sampler=cfg.sampler, time_sampling=cfg.time_sampling)
    if cfg.type == "regression":
        return Regression()
    raise ConfigError(f"process.type={cfg.type!r} is unknown; choose 'diffusion', 'flow' or 'regression'.")


__all__ = ["Process", "Diffusion", "Flow", "Regression", "sample_loop", "build_process"]
