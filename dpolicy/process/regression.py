"""Deterministic regression (MSE behaviour cloning) expressed as a one-step "process".

Same network, same conditioning, same checkpoint format as the generative policies: the
network sees an all-zero chunk at time 0 and is trained to output the demonstrated chunk.
It ignores the noise entirely, so it is the unimodal baseline that averages modes. It has no
noise schedule: warm starts and composition refuse it.
"""

from __future__ import annotations

import torch

from dpolicy.process.base import Process, StepPlan, register


@register("regression")
class Regression(Process):
    samplers = ("direct",)
    denoising = False

    @classmethod
    def from_config(cls, cfg):
        cls.parse_options(getattr(cfg, "options", None))
        return cls()

    def loss(self, field_fn, x0, generator=None):
        zeros = torch.zeros_like(x0)
        t = torch.zeros(x0.shape[0], device=x0.device)
        return (field_fn(zeros, t).float() - x0).pow(2).mean(dim=(1, 2))

    def schedule(self, steps, t_start=1.0):
        return [(t_start, 0.0)]  # one step whatever is asked: there is nothing to integrate

    def step_plan(self, t, t_next):
        return StepPlan(t, t_next, (0.0,), ())

    def apply_step(self, plan, field, x, draw=None):
        return field(0, torch.zeros_like(x))
