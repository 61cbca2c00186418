"""Action-chunk policies: normalizer + observation encoder + denoiser + process + sampler settings."""

from dpolicy.policy.chunk_policy import ChunkPolicy
from dpolicy.policy.checkpoint import load_policy, resolve_checkpoint, save_policy

__all__ = ["ChunkPolicy", "load_policy", "save_policy", "resolve_checkpoint"]
