"""A fixed-size replay buffer held on the training device (no per-batch host copies)."""

from __future__ import annotations

import torch


class ReplayBuffer:
    """Ring buffer of named float tensors; ``add`` takes a batch of transitions, ``sample`` a batch."""

    def __init__(self, capacity: int, shapes: dict[str, tuple], device="cpu", seed: int = 0):
        if capacity < 1:
            raise ValueError(f"replay capacity {capacity} must be at least 1")
        self.capacity, self.device = int(capacity), torch.device(device)
        self.data = {k: torch.zeros((self.capacity, *s), device=self.device) for k, s in shapes.items()}
        self.pos, self.size = 0, 0
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def __len__(self) -> int:
        return self.size

    def add(self, **batch: torch.Tensor) -> None:
        missing = set(self.data) - set(batch)
        if missing:
            raise KeyError(f"replay add is missing field(s) {sorted(missing)}")
        n = next(iter(batch.values())).shape[0]
        idx = (self.pos + torch.arange(n, device=self.device)) % self.capacity
        for k, buf in self.data.items():
            buf[idx] = batch[k].to(self.device, torch.float32).reshape(n, *buf.shape[1:])
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        idx = torch.randint(0, self.size, (batch_size,), device=self.device, generator=self.generator)
        return {k: v[idx] for k, v in self.data.items()}
