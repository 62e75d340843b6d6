"""The three MoLE training stages on accelerate: one loop, stage set-ups, TOML configs with presets."""

from .config import (
    PRESET_SOURCES,
    PRESETS,
    BatchPlan,
    DataConfig,
    Distributed,
    ExpertTrainConfig,
    LRSchedule,
    MixedPrecision,
    MixtureTrainConfig,
    OptimConfig,
    OptimizerName,
    Stage,
    TrainConfig,
    TrainConfigError,
    annotated_toml,
    load_config,
)
from .loop import TrainResult, train

__all__ = [
    "PRESETS", "PRESET_SOURCES", "BatchPlan", "DataConfig", "Distributed", "ExpertTrainConfig", "LRSchedule",
    "MixedPrecision", "MixtureTrainConfig",
    "OptimConfig", "OptimizerName", "Stage", "TrainConfig", "TrainConfigError", "TrainResult", "annotated_toml",
    "load_config", "train",
]  # fmt: skip
