"""Data-parallel helpers: ``torchrun`` sets WORLD_SIZE/RANK/LOCAL_RANK, we read them here.

NCCL on CUDA, gloo on CPU (which is how the tests exercise DDP with two processes).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from dpolicy.utils.distributed import world  # noqa: F401  (defined below the data layer, which shards by it)


def init_from_env(device_type: str = "cpu") -> tuple[int, int, int]:
    """Initialise the process group if torchrun launched us. Returns (rank, world_size, local_rank)."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws <= 1:
        return 0, 1, 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), local


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
