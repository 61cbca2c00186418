"""The settings of ``dpolicy-drive`` (configs/drive.yaml holds the same defaults): one dataclass per
section, built and checked by ``dpolicy.config.from_dict`` like every other command's settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from dpolicy.config import _check, check_choice, check_device, check_min, register
from dpolicy.drive.encoder import ENCODERS
from dpolicy.drive.frenet import FRAMES
from dpolicy.drive.masked import ORDERS
from dpolicy.drive.rl import RLConfig


@dataclass
class DriveDataConfig:
    path: str = "runs/drive/drive.hdf5"  # train / rl / eval: demos written by collect
    n_train: int = 300  # collect: scenes per split
    n_val: int = 50  # 0: no validation split
    n_test: int = 100  # train, rl and eval report on the test split
    cache: str | None = None  # a directory: train / rl / eval draw the first n_<split> scenes of each split from a
                              # scene cache there (built on first use, dpolicy/drive/cache.py) instead of data.path

    def __post_init__(self):
        check_min(self, "data", 1, "n_train", "n_test")
        check_min(self, "data", 0, "n_val")


@dataclass
class DriveModelConfig:
    planner: str = "masked"  # masked (token diffusion, confidence-order decoding) | anchor (truncated anchor diffusion)
                             # | scorer (train: a learned trajectory scorer for the proposals of the init planner)
    encoder: str = "vector_mlp"  # vector_mlp (an MLP per polyline) | vector (PointNet per polyline), then a transformer
                                 # over the tokens | flat (one MLP token from flattened polylines); chosen on val
    d: int = 64
    layers: int = 2  # the planner's transformer (masked) or decoder (anchor) layers
    heads: int = 4
    encoder_layers: int = 2  # vector encoder: transformer layers over the scene tokens
    ego_dropout: float = 0.0  # vector encoder: share of training samples whose ego history is hidden
    frame: str = "ego"  # the frame plans are written in: ego (x ahead, y left) | route (station along the route
                        # lane and offset from it, relative to the ego's; vector encoders)
    anchors: int = 20  # anchor planner: K-means anchors of the training plans
    experts: int = 0  # masked planner: routed experts in every feed-forward beside the dense one (WAM-Diff's MoE);
                      # 0: none
    expert_hidden: int = 32  # masked planner: each routed expert's hidden width
    top_k: int = 2  # masked planner: experts each token is routed to

    def __post_init__(self):
        check_choice(self, "model", "planner", ("masked", "anchor", "scorer"))
        check_choice(self, "model", "encoder", ENCODERS)
        check_choice(self, "model", "frame", FRAMES)
        check_min(self, "model", 1, "d", "layers", "heads", "encoder_layers", "anchors", "expert_hidden", "top_k")
        check_min(self, "model", 0, "experts")
        _check(self.experts == 0 or self.top_k <= self.experts,
               f"model.top_k={self.top_k} must not exceed model.experts={self.experts}.")
        _check(self.d % self.heads == 0, f"model.d={self.d} must be a multiple of model.heads={self.heads}.")
        _check(0 <= self.ego_dropout < 1, f"model.ego_dropout={self.ego_dropout!r} must lie in [0, 1).")


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
    steps: int = 2000  # 400 left the masked planner's plans uncomfortable (comfort 0.52 vs 0.92 at 1,600, val)
    batch: int = 64
    lr: float = 1e-3
    seed: int = 0
    proposals: int = 8  # scorer: samples of the init planner per training scene, beside the rule candidates
    teacher: str | None = None  # masked / anchor: imitate the plan a learned scorer (a train model.planner=scorer run)
                                # chooses among the rule candidates, which the observation determines, instead of
                                # the logged expert's plan, which depends on the log
    teacher_temperature: float = 0.0  # 0: the teacher's best candidate is the target; T > 0: every step draws each
                                      # scene's target among the candidates with weights exp(rating / T), so near-tied
                                      # candidates (train logs the median gap of the best two) stop being an arbitrary
                                      # choice

    def __post_init__(self):
        check_min(self, "train", 1, "steps", "batch")
        check_min(self, "train", 0, "proposals")
        _check(self.lr > 0, f"train.lr={self.lr!r} must be positive.")
        _check(self.teacher_temperature >= 0, f"train.teacher_temperature={self.teacher_temperature!r} must be >= 0.")
        _check(self.teacher_temperature == 0 or self.teacher is not None,
               "train.teacher_temperature weights a teacher's ratings; set train.teacher too.")


@dataclass
class DriveEvalConfig:
    order: str | None = None  # decoding order: confidence | random | causal | reverse; null: the planner's own (the
                              # order its RL trained, else confidence)
    steps: int | None = None  # decoding (masked) or denoising (anchor) steps; null: the planner's own (8 / 2)
    samples: int = 1  # the planner's proposals per scene: 1 = its own plan; K > 1 adds K - 1 samples; 0 (with rule) none
    rule: bool = False  # also propose the map-only rule candidates (lanes x speed profiles)
    scorer: str | None = None  # a learned scorer (train model.planner=scorer) rates the proposals; null: the rule-based
                               # scorer against a constant-speed forecast of the agents (neither reads the log)
    split: str = "test"  # test | val (choices are made on val) | train (the first data.n_train: how well a clone fits)
    closed_loop: bool = False  # also drive planner and expert in closed loop (re-plan every 0.5 s for the 4 s log)
    scenes_in_picture: int = 4

    def __post_init__(self):
        if self.order is not None:
            check_choice(self, "eval", "order", ORDERS)
        check_choice(self, "eval", "split", ("test", "val", "train"))
        check_min(self, "eval", 1, "scenes_in_picture")
        check_min(self, "eval", 0, "samples")
        _check(self.samples > 0 or self.rule, "eval.samples=0 leaves no proposals; set eval.rule=true or eval.samples >= 1.")
        check_min(self, "eval", 1, "steps", null="the planner's own")


@dataclass
class DriveConfig:
    out: str = "runs/drive/drive.hdf5"  # collect: where the robomimic-layout demos go
    run_dir: str = "runs/drive/run"  # train / rl / eval: output directory
    init: str | None = None  # rl / eval / train: a planner checkpoint directory (or a train / rl run directory holding planner/); train continues from it
    device: str = "auto"
    data: DriveDataConfig = field(default_factory=DriveDataConfig)
    model: DriveModelConfig = field(default_factory=DriveModelConfig)
    tokenizer: DriveTokenizerConfig = field(default_factory=DriveTokenizerConfig)
    train: DriveTrainConfig = field(default_factory=DriveTrainConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: DriveEvalConfig = field(default_factory=DriveEvalConfig)

    def __post_init__(self):
        check_device(self.device)
        _check(self.model.frame == "ego" or self.model.encoder != "flat",
               "model.frame=route reads the route lane from the vectorized observation; model.encoder=flat has none.")


register(DriveDataConfig, DriveModelConfig, DriveTokenizerConfig, DriveTrainConfig, DriveEvalConfig, DriveConfig, RLConfig)
