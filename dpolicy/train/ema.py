"""Exponential moving average of weights with Diffusion Policy's warm-up decay.

``decay(step) = min(max_value, 1 - (1 + step) ** -power)`` (inv_gamma = 1), 0 at the first
update so the average starts as a copy. The step counter is part of the saved state: an EMA
restored without it would restart its warm-up and forget the average's age.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, power: float = 0.75, max_value: float = 0.9999):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.power, self.max_value = power, max_value
        self.step = 0

    def decay(self) -> float:
        if self.step <= 0:
            return 0.0
        return min(self.max_value, 1.0 - (1.0 + self.step) ** -self.power)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.decay()
        src = dict(model.named_parameters())
        for name, p in self.model.named_parameters():
            p.lerp_(src[_plain(name, src)].detach().to(p.dtype), 1.0 - d)
        src_b = dict(model.named_buffers())
        for name, b in self.model.named_buffers():
            b.copy_(src_b[_plain(name, src_b)])
        self.step += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.step = int(state["step"])


def _plain(name: str, table: dict) -> str:
    if name in table:
        return name
    for cand in (f"module.{name}", name.replace("net.", "net._orig_mod.", 1)):
        if cand in table:
            return cand
    raise KeyError(name)
