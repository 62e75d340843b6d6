"""The three MoLE training stages on accelerate: one loop, stage set-ups, TOML configs with presets."""

from .config import (
    PRESETS,
    DataConfig,
    ExpertTrainConfig,
    LRSchedule,
    MixedPrecision,
    MixtureTrainConfig,
    OptimConfig,
    OptimizerName,
    Stage,
    TrainConfig,
    TrainConfigError,
    load_config,
)
from .loop import TrainResult, train

__all__ = [
    "PRESETS", "DataConfig", "ExpertTrainConfig", "LRSchedule", "MixedPrecision", "MixtureTrainConfig",
    "OptimConfig", "OptimizerName", "Stage", "TrainConfig", "TrainConfigError", "TrainResult", "load_config", "train",
]  # fmt: skip
