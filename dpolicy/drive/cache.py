"""Scene sets cached on disk, so that 20,000+ procedural training scenes are built once.

Building a scene costs ~10 ms (numpy agents) and its expert plan ~35 ms (31 candidates through the
scorer) on one CPU core, so 20,000 scenes take ~15 minutes; reading them back takes seconds. A split
is cached in chunks of ``CHUNK`` consecutive seeds (``<split>_<first seed index>_<CHUNK>.safetensors``: the
scene tensors, the expert's plan, its sub-scores and the EP normaliser), each written atomically, so a
set of n scenes reuses every chunk a smaller set built and an interrupted build resumes where it
stopped. Chunks live under a directory named by a fingerprint of what the scene generator, expert and
scorer produce for three probe scenes, and of the expert's candidate set on them (a candidate the probes'
expert never picks still changes other scenes' plans and EP normalisers): change their output and the old
chunks are simply not found. Observations are not
cached; ``DriveSet.observed`` computes them from the scenes (batched, fast) for the chosen encoder.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import fields
from pathlib import Path

import torch

from dpolicy.drive.data import DriveSet, build_set
from dpolicy.errors import DatasetError
from dpolicy_envs.driving import Scenes

CHUNK = 1000


@functools.lru_cache(maxsize=1)
def fingerprint() -> str:
    """A short hash of what the generator, the expert and the scorer make of three probe scenes (one per
    split), with the expert's candidates and their scores there: a change that alters any cached tensor or
    the candidate set changes it, a refactor that does not leaves it alone."""
    from dpolicy_envs.driving.expert import candidates
    from dpolicy_envs.driving.scorer import score

    probe = build_set("train", 1, "cpu", 0)
    h = hashlib.sha256()
    for ds in (probe, build_set("val", 1, "cpu", 0), build_set("test", 1, "cpu", 0)):
        cand = candidates(ds.scenes)
        rows = [getattr(ds.scenes, f.name) for f in fields(Scenes)] + [ds.expert, ds.best_progress, cand]
        for t in rows + list(ds.expert_scores.values()) + [score(ds.scenes, cand)["pdms"]]:
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def _save_chunk(ds: DriveSet, path: Path) -> None:
    from safetensors.torch import save_file

    t = {f"scene.{f.name}": getattr(ds.scenes, f.name).cpu().contiguous() for f in fields(Scenes)}
    t.update({f"score.{k}": v.cpu().contiguous() for k, v in ds.expert_scores.items()})
    t["expert"], t["best_progress"] = ds.expert.cpu().contiguous(), ds.best_progress.cpu().contiguous()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(t, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_chunk(path: Path) -> DriveSet:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        t = load_file(str(path))
        scenes = Scenes(**{f.name: t[f"scene.{f.name}"] for f in fields(Scenes)})
        scores = {k[6:]: v for k, v in t.items() if k.startswith("score.")}
        return DriveSet(scenes, {}, t["expert"], scores, t["best_progress"])
    except (SafetensorError, OSError, KeyError) as e:
        raise DatasetError(f"cached scene chunk {path} is unreadable ({type(e).__name__}: {e}); delete it to rebuild.") from None


def _cat(parts: list[DriveSet]) -> DriveSet:
    scenes = Scenes(**{f.name: torch.cat([getattr(p.scenes, f.name) for p in parts]) for f in fields(Scenes)})
    return DriveSet(scenes, {}, torch.cat([p.expert for p in parts]),
                    {k: torch.cat([p.expert_scores[k] for p in parts]) for k in parts[0].expert_scores},
                    torch.cat([p.best_progress for p in parts]))


def cached_set(split: str, n: int, root, device="cpu", encoder: str = "flat", log=None, chunk: int = CHUNK) -> DriveSet:
    """The first ``n`` scenes of ``split`` with expert plans, built once into ``root`` and read back after,
    observed for ``encoder`` and moved to ``device``; the same scenes, plans and scores as ``build_set``."""
    if n < 1:
        raise DatasetError(f"a cached scene set needs n >= 1, got {n}.")
    d = Path(root) / fingerprint()
    d.mkdir(parents=True, exist_ok=True)
    chunk = min(chunk, n)  # a small set (a test, a quick run) does not build a whole chunk
    parts = []
    for start in range(0, n, chunk):
        path = d / f"{split}_{start:07d}_{chunk}.safetensors"
        if not path.exists():
            if log:
                log(f"  building {split} scenes {start}..{start + chunk - 1} into {path}")
            _save_chunk(build_set(split, chunk, "cpu", start), path)
        parts.append(_load_chunk(path))
    ds = _cat(parts)
    ds = ds.index(torch.arange(n)) if ds.n != n else ds
    ds = DriveSet(ds.scenes.to(device), {}, ds.expert.to(device), {k: v.to(device) for k, v in ds.expert_scores.items()},
                  ds.best_progress.to(device))
    return ds.observed(encoder)
