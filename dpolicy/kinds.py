"""Every kind of policy checkpoint dpolicy defines, and ``load_policy`` over all of them.

A checkpoint's ``meta.json`` names its kind (none: ``"chunk"``, a ``ChunkPolicy`` directory), and the
class registered for that kind loads it (``dpolicy.policy.checkpoint.register_kind``). The core loader
consults only that table and never imports the modules that fill it: they are built on the policy
layer (a composition of policies, a policy steered by an RL actor), so importing them from it would
make the layers import each other. This module sits above all of them and imports each module that
defines a kind; ``load_policy`` here (re-exported as ``dpolicy.load_policy`` and
``dpolicy.policy.load_policy``) therefore knows every kind. A new kind is a module that registers its
class; a kind of dpolicy's own is also imported here.
"""

from __future__ import annotations

from dpolicy.compose.composed import ComposedPolicy
from dpolicy.drive.anchor import AnchorDiffusionPlanner
from dpolicy.drive.masked import MaskedTokenPlanner
from dpolicy.drive.selector import TrajectoryScorer
from dpolicy.policy.checkpoint import KINDS, load_checkpoint
from dpolicy.policy.chunk_policy import ChunkPolicy
from dpolicy.rl.steered import SteeredPolicy

BUILTIN = {"chunk": ChunkPolicy, "composed": ComposedPolicy, "steered": SteeredPolicy,
           "drive_masked": MaskedTokenPlanner, "drive_anchor": AnchorDiffusionPlanner,
           "drive_scorer": TrajectoryScorer}


def load_policy(path, device="cpu"):
    """Load a policy of any registered kind (a ``ChunkPolicy``, a ``ComposedPolicy``, a ``SteeredPolicy``, a driving
    planner, or a kind another imported module registers) from any checkpoint path, on any device, without hydra."""
    return load_checkpoint(path, device)


def kinds() -> dict[str, type]:
    """The registered kinds: name -> class."""
    return dict(KINDS)


__all__ = ["BUILTIN", "kinds", "load_policy"]
