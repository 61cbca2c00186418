"""The one behaviour-cloning trainer loop (EMA, schedules, NaN guard, checkpoints, exact resume, DDP)."""

from dpolicy.train.ema import EMA
from dpolicy.train.trainer import Trainer

__all__ = ["EMA", "Trainer"]
