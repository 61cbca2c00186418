"""Deterministic regression (MSE behaviour cloning) expressed as a one-step "process".

Same network, same conditioning, same checkpoint format as the generative policies: the
network sees an all-zero chunk at time 0 and is trained to output the demonstrated chunk.
It ignores the noise entirely, so it is the unimodal baseline that averages modes.
"""

from __future__ import annotations

import torch

from dpolicy.process.base import FieldFn, Process


class Regression(Process):
    def loss(self, field_fn, x0, generator=None):
        zeros = torch.zeros_like(x0)
        t = torch.zeros(x0.shape[0], device=x0.device)
        return (field_fn(zeros, t).float() - x0).pow(2).mean(dim=(1, 2))

    def schedule(self, steps, t_start=1.0):
        return [(t_start, 0.0)]  # one step whatever is asked: there is nothing to integrate

    def step(self, field_fn: FieldFn, x, t, t_next, generator=None):
        return field_fn(torch.zeros_like(x), 0.0)

    def noise_to(self, x0, noise, t):
        return x0
