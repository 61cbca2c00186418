"""The settings of ``dpolicy-drive`` (configs/drive.yaml holds the same defaults): one dataclass per
section, built and checked by ``dpolicy.config.from_dict`` like every other command's settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from dpolicy.config import _check, check_choice, check_device, check_min, register
from dpolicy.drive.masked import ORDERS
from dpolicy.drive.rl import RLConfig


@dataclass
class DriveDataConfig:
    path: str = "runs/drive/drive.hdf5"  # train / rl / eval: demos written by collect
    n_train: int = 300  # collect: scenes per split
    n_val: int = 50  # 0: no validation split
    n_test: int = 100  # train, rl and eval report on the test split

    def __post_init__(self):
        check_min(self, "data", 1, "n_train", "n_test")
        check_min(self, "data", 0, "n_val")


@dataclass
class DriveModelConfig:
    d: int = 64
    layers: int = 2
    heads: int = 4

    def __post_init__(self):
        check_min(self, "model", 1, "d", "layers", "heads")
        _check(self.d % self.heads == 0, f"model.d={self.d} must be a multiple of model.heads={self.heads}.")


@dataclass
class DriveTokenizerConfig:
    mode: str = "deltas"  # deltas | waypoints
    resolution: float = 0.2  # metres per bin
    x_range: list[float] = field(default_factory=lambda: [-1.0, 13.0])  # per-step (deltas) or absolute (waypoints)
    y_range: list[float] = field(default_factory=lambda: [-3.0, 3.0])

    def __post_init__(self):
        check_choice(self, "tokenizer", "mode", ("deltas", "waypoints"))
        _check(self.resolution > 0, f"tokenizer.resolution={self.resolution!r} must be positive.")
        for name in ("x_range", "y_range"):
            r = getattr(self, name)
            _check(len(r) == 2 and r[0] < r[1], f"tokenizer.{name}={r} must be [low, high] with low < high.")


@dataclass
class DriveTrainConfig:
    steps: int = 400
    batch: int = 64
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        check_min(self, "train", 1, "steps", "batch")
        _check(self.lr > 0, f"train.lr={self.lr!r} must be positive.")


@dataclass
class DriveEvalConfig:
    order: str = "confidence"  # decoding order: confidence | random | causal | reverse
    steps: int = 8  # decoding steps
    scenes_in_picture: int = 4

    def __post_init__(self):
        check_choice(self, "eval", "order", ORDERS)
        check_min(self, "eval", 1, "steps", "scenes_in_picture")


@dataclass
class DriveConfig:
    out: str = "runs/drive/drive.hdf5"  # collect: where the robomimic-layout demos go
    run_dir: str = "runs/drive/run"  # train / rl / eval: output directory
    init: str | None = None  # rl / eval: a run directory holding planner.pt
    device: str = "auto"
    data: DriveDataConfig = field(default_factory=DriveDataConfig)
    model: DriveModelConfig = field(default_factory=DriveModelConfig)
    tokenizer: DriveTokenizerConfig = field(default_factory=DriveTokenizerConfig)
    train: DriveTrainConfig = field(default_factory=DriveTrainConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: DriveEvalConfig = field(default_factory=DriveEvalConfig)

    def __post_init__(self):
        check_device(self.device)


register(DriveDataConfig, DriveModelConfig, DriveTokenizerConfig, DriveTrainConfig, DriveEvalConfig, DriveConfig, RLConfig)
