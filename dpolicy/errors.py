"""Error classes: every user-facing failure is one of these, with one sentence naming the culprit.

The CLIs catch ``DPolicyError`` and print its message without a traceback, then exit non-zero.
"""


class DPolicyError(Exception):
    """Base class for errors caused by the user's input (data, config, checkpoint, observation)."""


class ConfigError(DPolicyError, ValueError):
    """A configuration value or key is invalid."""


class DatasetError(DPolicyError, ValueError):
    """A dataset file is missing, malformed or holds non-finite values."""


class CheckpointError(DPolicyError, ValueError):
    """A checkpoint directory is missing, truncated, foreign or from an unknown format version."""


class ShapeError(DPolicyError, ValueError):
    """An observation or action has the wrong keys or shape."""


class TrainingError(DPolicyError, RuntimeError):
    """Training cannot continue (e.g. too many non-finite losses in a row)."""
