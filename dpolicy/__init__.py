"""dpolicy: diffusion and flow action-chunk policies.

The whole package is organised around one map,
``(observation history, latent noise, sampling schedule) -> action chunk``,
with the noise an explicit input (see docs/ARCHITECTURE.md).
"""

__version__ = "0.1.0"

from dpolicy.errors import (  # noqa: F401
    CheckpointError,
    ConfigError,
    DatasetError,
    DPolicyError,
    ShapeError,
    TrainingError,
)


# public names that are imported on first use, so that `import dpolicy` stays cheap for the env-only and
# data-only users: name -> the module that defines it
_LAZY = {
    "ChunkPolicy": "dpolicy.policy",
    "load_policy": "dpolicy.policy",
    "save_policy": "dpolicy.policy",
    "PolicyConfig": "dpolicy.config",
    "NetConfig": "dpolicy.config",
    "ProcessConfig": "dpolicy.config",
    "RunConfig": "dpolicy.config",
    "TrainConfig": "dpolicy.config",
}

__all__ = ["CheckpointError", "ConfigError", "DatasetError", "DPolicyError", "ShapeError", "TrainingError", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dpolicy' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
