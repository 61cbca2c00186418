"""Action-chunk policies: the ``Policy`` interface, ``ChunkPolicy`` (normalizer + observation encoder +
denoiser + process + sampler settings), observation histories, and self-describing checkpoints.

``load_policy`` loads a checkpoint of any kind (a plain policy, a composition, a steered policy); it
lives in ``dpolicy.kinds``, above the layers that define the kinds, and is re-exported here on first use.
"""

from dpolicy.policy.base import Policy, PolicySpec
from dpolicy.policy.checkpoint import load_checkpoint, register_kind, resolve_checkpoint, save_policy
from dpolicy.policy.chunk_policy import ChunkPolicy

__all__ = ["ChunkPolicy", "Policy", "PolicySpec", "load_checkpoint", "load_policy", "register_kind", "resolve_checkpoint",
           "save_policy"]


def __getattr__(name):
    if name == "load_policy":
        from dpolicy.kinds import load_policy

        return load_policy
    raise AttributeError(f"module 'dpolicy.policy' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
