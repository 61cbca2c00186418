"""Driving data: scene sets with their expert plans, and demos in the robomimic HDF5 layout.

Each scene is one demo of one step: obs/{ego,route,bounds,agents} (1, ...), actions (1, 16) (the
expert's 8 waypoints, flattened x, y), rewards = the expert's PDMS-like score, states = [seed,
best candidate progress]. Masks train / valid / test list the demos of each split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dpolicy.data.robomimic import Demo, read_dataset, write_dataset
from dpolicy.errors import DatasetError
from dpolicy_envs.driving import Scenes, expert_plan, generate_scenes, observe, observe_vector, split_seeds

OBSERVERS = {"flat": observe, "vector": observe_vector, "vector_mlp": observe_vector}  # what each encoder reads
ENV_ARGS = {"env_name": "driving", "env_type": "dpolicy-drive", "env_kwargs": {"horizon_s": 4.0, "waypoints": 8}}


@dataclass
class DriveSet:
    scenes: Scenes
    obs: dict
    expert: torch.Tensor         # (n, 8, 2)
    expert_scores: dict          # sub-scores of the expert's plan, each (n,)
    best_progress: torch.Tensor  # (n,) EP normaliser

    @property
    def n(self) -> int:
        return self.expert.shape[0]

    def index(self, idx) -> "DriveSet":
        return DriveSet(self.scenes.index(idx), {k: v[idx] for k, v in self.obs.items()}, self.expert[idx],
                        {k: v[idx] for k, v in self.expert_scores.items()}, self.best_progress[idx])

    def observed(self, encoder: str, chunk: int = 2048) -> "DriveSet":
        """The same scenes with the observation the ``encoder`` (flat | vector) reads."""
        if encoder not in OBSERVERS:
            raise DatasetError(f"no observation for encoder {encoder!r}; choose from {', '.join(OBSERVERS)}.")
        parts = [OBSERVERS[encoder](self.scenes.index(slice(i, i + chunk))) for i in range(0, self.n, chunk)]
        obs = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return DriveSet(self.scenes, obs, self.expert, self.expert_scores, self.best_progress)


def build_set(split: str, n: int, device="cpu", start: int = 0, encoder: str = "flat") -> DriveSet:
    scenes = generate_scenes(split_seeds(split, n, start), device)
    traj, info = expert_plan(scenes)
    ds = DriveSet(scenes, {}, traj, {k: v for k, v in info.items() if k != "best_progress"}, info["best_progress"])
    return ds.observed(encoder)


def write_demos(path, sets: dict[str, DriveSet]) -> Path:
    """Write the sets (split name -> DriveSet) as one robomimic-layout file with one mask per split."""
    demos, masks, i = [], {}, 0
    for split, ds in sets.items():
        names = []
        obs = {k: v.cpu().numpy() for k, v in ds.obs.items()}
        for j in range(ds.n):
            demos.append(Demo(obs={k: v[j:j + 1] for k, v in obs.items()},
                              actions=ds.expert[j].reshape(1, -1).cpu().numpy(),
                              rewards=ds.expert_scores["pdms"][j:j + 1].cpu().numpy(),
                              states=np.array([[float(ds.scenes.seeds[j]), float(ds.best_progress[j])]]),
                              attrs={"split": split, "seed": int(ds.scenes.seeds[j])}))
            names.append(f"demo_{i}")
            i += 1
        masks["valid" if split == "val" else split] = names
    return write_dataset(path, demos, ENV_ARGS, masks=masks)


def read_demos(path, split: str = "train", device="cpu") -> DriveSet:
    """Load a split written by ``write_demos``; scenes are regenerated from the stored seeds."""
    key = "valid" if split == "val" else split
    demos = read_dataset(path, filter_key=key)
    seeds = [int(d.states[0, 0]) for d in demos]
    scenes = generate_scenes(seeds, device)
    shapes = {"ego": (4,), "route": (16, 2), "bounds": (16, 4), "agents": (-1, 7)}
    missing = set(shapes) - set(demos[0].obs)
    if missing:
        raise DatasetError(f"{path}: driving demos need obs keys {sorted(shapes)}; missing {sorted(missing)}.")
    obs = {k: torch.as_tensor(np.concatenate([d.obs[k] for d in demos]), dtype=torch.float32, device=device).reshape(len(demos), *shp)
           for k, shp in shapes.items()}
    acts = np.concatenate([d.actions for d in demos])
    if acts.shape[1] != 16:
        raise DatasetError(f"{path}: actions have {acts.shape[1]} columns; driving demos hold 16 (8 waypoints x, y).")
    expert = torch.as_tensor(acts, dtype=torch.float32, device=device).reshape(-1, 8, 2)
    best = torch.as_tensor([d.states[0, 1] for d in demos], dtype=torch.float32, device=device)
    pdms = torch.as_tensor(np.concatenate([d.rewards for d in demos]), dtype=torch.float32, device=device)
    return DriveSet(scenes, obs, expert, {"pdms": pdms}, best)
