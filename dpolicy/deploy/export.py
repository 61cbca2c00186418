"""Export a decision step so a deployment process can run it without dpolicy.

**Why torch.export, not TorchScript.** TorchScript is deprecated in current PyTorch (no new
operator or frontend work; ``torch.jit`` warns), and ``torch.jit.trace`` silently freezes Python
control flow while ``torch.jit.script`` rejects ordinary Python such as einops calls. ``torch.export``
captures the whole ``DecisionStep`` — observation normalization, the warm-start shift and gripper
binarization, the unrolled short schedule with its constants, unnormalization — as one ATen graph
with the weights, checks soundness while doing so (it fails loudly instead of baking in a wrong
branch), serializes to a single ``.pt2`` file that ``torch.export.load`` reads in any process that
has torch (no dpolicy, no hydra, no pickled classes), and is the input format of AOTInductor for a
Python-free C++ runtime. The cost: the loader needs a compatible torch, and shapes are fixed at
export (batch size included unless ``dynamic_batch=True``).

Reading it back, in a process without dpolicy::

    import json, torch
    extra = {"dpolicy_deploy.json": ""}
    step = torch.export.load("rti_step.pt2", extra_files=extra).module()
    meta = json.loads(extra["dpolicy_deploy.json"])      # input order, shapes, obs keys, schedule
    chunk, actions = step(prev_chunk, obs_history, noise, step_noise)
    prev_chunk = chunk; execute(actions[:, 0])
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dpolicy.deploy.kernel import DecisionStep
from dpolicy.errors import ConfigError

META_FILE = "dpolicy_deploy.json"


def example_inputs(step: DecisionStep, batch_size: int = 1, generator: torch.Generator | None = None) -> tuple:
    """Random inputs of the right shapes and device: ``(prev, obs, noise, step_noise)``."""
    dev = step.act_offset.device
    g = generator or torch.Generator().manual_seed(0)
    b, tp, da = batch_size, step.Tp, step.Da
    return (torch.randn(b, tp, da, generator=g).clamp(-1, 1).to(dev),
            torch.randn(b, step.To, step.obs_offset.numel(), generator=g).to(dev),
            torch.randn(b, tp, da, generator=g).to(dev),
            torch.randn(step.n_step_noise, b, tp, da, generator=g).to(dev))


def describe_step(step: DecisionStep, batch_size: int, dynamic_batch: bool) -> dict:
    b = "B" if dynamic_batch else batch_size
    return {
        "format": "dpolicy-decision-step", "version": 1,
        "inputs": {"prev_chunk": [b, step.Tp, step.Da], "obs_history": [b, step.To, step.obs_offset.numel()],
                   "noise": [b, step.Tp, step.Da], "step_noise": [step.n_step_noise, b, step.Tp, step.Da]},
        "outputs": {"chunk": [b, step.Tp, step.Da], "actions": [b, step.Tp, step.Da]},
        "notes": ("prev_chunk and chunk are normalized; obs_history holds the last To observations (oldest first, "
                  "keys concatenated in obs_keys order; a camera image (image_shapes) flattened row-major from (H, W, C), "
                  "its 0..255 values as floats) and actions are in env units; execute actions[:, 0] and "
                  "feed chunk back as prev_chunk. noise and step_noise are standard normal draws."),
        "warm": step.warm, "renoise": step.renoise, "shift": step.shift, "schedule": step.schedule,
        "network_evaluations": step.n_evals, "stochastic": step.stochastic, "device": str(step.act_offset.device),
        "torch": torch.__version__,
    }


def export_step(step: DecisionStep, path, batch_size: int = 1, meta: dict | None = None,
                dynamic_batch: bool = False) -> Path:
    """``torch.export`` the eager ``step`` to ``path`` (a ``.pt2`` file) with a JSON description inside."""
    if not isinstance(step, DecisionStep):
        raise ConfigError(f"export_step needs a DecisionStep, got {type(step).__name__}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = example_inputs(step, max(batch_size, 2) if dynamic_batch else batch_size)
    dynamic = None
    if dynamic_batch:
        bdim = torch.export.Dim("batch", min=1, max=1024)
        dynamic = ({0: bdim}, {0: bdim}, {0: bdim}, {1: bdim})
    was_training = step.training
    step.eval()
    try:
        program = torch.export.export(step, args, dynamic_shapes=dynamic)
    finally:
        step.train(was_training)
    info = {**describe_step(step, batch_size, dynamic_batch), **(meta or {})}
    torch.export.save(program, str(path), extra_files={META_FILE: json.dumps(info, default=str)})
    return path


def load_step(path) -> tuple[torch.nn.Module, dict]:
    """Load an exported step: a callable module and its description (what a deployment process does)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"exported step {str(path)!r} does not exist.")
    extra = {META_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra)
    return program.module(), json.loads(extra[META_FILE] or "{}")
