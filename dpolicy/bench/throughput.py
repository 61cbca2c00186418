"""Training throughput: our loop vs a loop in the style of Chi et al.'s Diffusion Policy code.

The reference keeps the windows on the host, builds each sample in a ``Dataset.__getitem__``,
collates with a PyTorch ``DataLoader`` (shuffle, ``num_workers=1`` as in their low-dim configs),
copies every batch to the device, and trains in fp32 without compile. Ours gathers batches on
the device from resident tensors (and uses bf16 autocast / compile on CUDA). Both use the same
network, batch size, optimizer and EMA; the timings alternate in one process and report medians.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from dpolicy.config import TrainConfig
from dpolicy.data.windows import WindowDataset
from dpolicy.train.ema import EMA
from dpolicy.train.trainer import Trainer


class HostWindows(torch.utils.data.Dataset):
    """Per-sample window construction on the host, as a replay-buffer sequence sampler does."""

    def __init__(self, data: WindowDataset):
        self.obs = {k: v.cpu().numpy() for k, v in data.obs.items()}
        self.actions = data.actions.cpu().numpy()
        self.start, self.end = data.ep_start.cpu().numpy(), data.ep_end.cpu().numpy()
        self.To, self.Tp = data.To, data.Tp

    def __len__(self):
        return len(self.actions)

    def __getitem__(self, i):
        oi = np.maximum(np.arange(i - self.To + 1, i + 1), self.start[i])
        ai = np.minimum(np.arange(i, i + self.Tp), self.end[i])
        return {"obs": {k: torch.from_numpy(v[oi]) for k, v in self.obs.items()}, "action": torch.from_numpy(self.actions[ai])}


def reference_loop(policy, data: WindowDataset, batch_size: int, steps: int, device) -> float:
    """Samples/s of the reference loop (after one warm-up batch)."""
    loader = torch.utils.data.DataLoader(HostWindows(data), batch_size=batch_size, shuffle=True, num_workers=1,
                                         pin_memory=device.type == "cuda", persistent_workers=False, drop_last=True)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6)
    ema = EMA(policy)
    n, t0 = 0, None
    while n < steps + 1:
        for batch in loader:
            obs = {k: v.to(device, non_blocking=True) for k, v in batch["obs"].items()}
            act = batch["action"].to(device, non_blocking=True)
            loss = policy.loss(obs, act)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ema.update(policy)
            n += 1
            if n == 1:
                _sync(device)
                t0 = time.perf_counter()
            if n >= steps + 1:
                break
    _sync(device)
    return steps * batch_size / (time.perf_counter() - t0)


def our_loop(policy, data: WindowDataset, batch_size: int, steps: int, device, compile: bool = False) -> float:
    cfg = TrainConfig(steps=10**9, batch_size=batch_size, lr=1e-4, progress=False, compile=compile, log_every=10**9,
                      ckpt_every=10**9)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(policy, data, cfg, d)
        tr._train_step()  # warm-up (and compile)
        for _ in range(3 if compile else 0):
            tr._train_step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            tr._train_step()
        _sync(device)
        return steps * batch_size / (time.perf_counter() - t0)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def compare(make_policy, data: WindowDataset, batch_size: int, steps: int, repeats: int = 3, compile: bool = False) -> dict:
    """Alternate the two loops ``repeats`` times on fresh copies of the same policy; medians and ratio."""
    ours, ref = [], []
    for _ in range(repeats):
        ref.append(reference_loop(make_policy().to(data.device), data, batch_size, steps, data.device))
        ours.append(our_loop(make_policy().to(data.device), data, batch_size, steps, data.device, compile))
    mo, mr = statistics.median(ours), statistics.median(ref)
    return {"ours_samples_per_s": mo, "reference_samples_per_s": mr, "ratio": mo / mr, "ours_all": ours, "reference_all": ref}
