"""Device-resident (obs history, action chunk) windows over a set of demos.

All demos are concatenated once into tensors on the training device; a batch is gathered with
one index computation, so training never copies batches from the host. A window at step t holds
observations ``t-To+1 .. t`` (clamped to the episode start, i.e. the first observation repeated)
and actions ``t .. t+Tp-1`` (clamped to the episode end: the last action repeated), the padding
Diffusion Policy uses. Epoch order comes from a CPU ``torch.Generator`` whose state, the current
permutation and the position within it are all part of the resumable training state.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from dpolicy.data.robomimic import Demo
from dpolicy.errors import DatasetError


class WindowDataset:
    def __init__(self, demos: Sequence[Demo], obs_keys: Sequence[str], To: int, Tp: int,
                 device: str | torch.device = "cpu", seed: int = 0, rank: int | None = None, world_size: int | None = None):
        if not demos:
            raise DatasetError("no demonstrations to train on.")
        self.obs_keys, self.To, self.Tp = list(obs_keys), To, Tp
        self.device = torch.device(device)
        # camera images ((H, W, C) per step) stay uint8 on the device, a quarter of float32's memory, and are
        # turned into floats by the policy's encoder per batch; vectors are float32
        self.image_shapes = {k: tuple(int(n) for n in demos[0].obs[k].shape[1:]) for k in self.obs_keys
                             if np.asarray(demos[0].obs[k]).ndim == 4}
        self.obs = {}
        for k in self.obs_keys:
            if k in self.image_shapes:
                bad = next((i for i, d in enumerate(demos) if d.obs[k].dtype != np.uint8 or d.obs[k].shape[1:] != self.image_shapes[k]), None)
                if bad is not None:
                    raise DatasetError(f"observation {k!r} of demo {bad} is {demos[bad].obs[k].dtype} {demos[bad].obs[k].shape[1:]}; "
                                       f"images must be uint8 {self.image_shapes[k]} like the first demo's.")
                self.obs[k] = torch.from_numpy(np.concatenate([d.obs[k] for d in demos])).to(self.device)
            else:
                self.obs[k] = torch.from_numpy(np.concatenate([d.obs[k] for d in demos])).float().to(self.device)
        self.actions = torch.from_numpy(np.concatenate([d.actions for d in demos])).float().to(self.device)
        lengths = torch.tensor([len(d) for d in demos])
        ends = lengths.cumsum(0)
        starts = ends - lengths
        ep = torch.repeat_interleave(torch.arange(len(demos)), lengths)
        self.ep_start = starts[ep].to(self.device)
        self.ep_end = (ends[ep] - 1).to(self.device)
        self.n = int(lengths.sum())
        self._obs_off = torch.arange(-To + 1, 1, device=self.device)
        self._act_off = torch.arange(0, Tp, device=self.device)
        if rank is None or world_size is None:  # under torchrun every rank reads a disjoint shard of one permutation
            from dpolicy.utils.distributed import world

            rank, world_size = world()
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.empty(0, dtype=torch.long)
        self.pos = 0
        self.epoch = 0

    @property
    def obs_dims(self) -> dict:
        """Per key the flat dimension of one step (``H * W * C`` for an image)."""
        return {k: int(np.prod(v.shape[1:])) for k, v in self.obs.items()}

    @property
    def image_bytes_per_frame(self) -> int:
        """Bytes one step's images take on the device (uint8), all cameras."""
        return int(sum(np.prod(s) for s in self.image_shapes.values()))

    @property
    def action_dim(self) -> int:
        return int(self.actions.shape[1])

    def __len__(self) -> int:
        return self.n

    def gather(self, idx: torch.Tensor):
        """Windows at global step indices ``idx`` (B,) -> (obs {k: (B,To,d)}, actions (B,Tp,Da)); an image key's
        window is ``(B, To, H, W, C)`` uint8."""
        oi = torch.maximum(idx[:, None] + self._obs_off, self.ep_start[idx][:, None])
        ai = torch.minimum(idx[:, None] + self._act_off, self.ep_end[idx][:, None])
        return {k: v[oi] for k, v in self.obs.items()}, self.actions[ai]

    def next_indices(self, batch_size: int) -> torch.Tensor:
        """Indices of the next batch in epoch order; each rank reads its own slice under DDP."""
        per_rank = self.n // self.world_size
        out = []
        need = batch_size
        while need > 0:
            if self.pos >= per_rank:
                self.perm = torch.empty(0, dtype=torch.long)
            if self.perm.numel() == 0:
                full = torch.randperm(self.n, generator=self.generator)
                full = full[self.rank * per_rank:(self.rank + 1) * per_rank] if self.world_size > 1 else full
                self.perm = full.to(self.device)  # one transfer per epoch, none per batch
                self.pos = 0
                self.epoch += 1
            take = self.perm[self.pos:self.pos + need]
            self.pos += take.numel()
            need -= take.numel()
            out.append(take)
        return out[0] if len(out) == 1 else torch.cat(out)

    def sample(self, batch_size: int):
        return self.gather(self.next_indices(batch_size))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "perm": self.perm.cpu().clone(), "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.perm = state["perm"].to(self.device)
        self.pos, self.epoch = int(state["pos"]), int(state["epoch"])

    def fit_normalizer(self, obs_mode: str = "limits", action_mode: str = "limits"):
        from dpolicy.data.normalizer import DictNormalizer

        # images need no statistics: the encoder maps 0..255 to [0, 1] itself
        return DictNormalizer.fit({k: v.cpu() for k, v in self.obs.items() if k not in self.image_shapes}, self.actions.cpu(),
                                  obs_mode, action_mode)
