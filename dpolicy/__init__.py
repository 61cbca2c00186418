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


def __getattr__(name):
    # Lazy so that `import dpolicy` stays cheap for the env-only and data-only users.
    if name in ("ChunkPolicy", "PolicyConfig"):
        from dpolicy import policy

        return getattr(policy, name)
    raise AttributeError(name)
