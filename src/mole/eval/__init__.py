"""Evaluation: human-centric prompt benchmarks, metric backends, repeated runs with standard errors, ablations."""

from .metrics import CLIPScore, FaceHandDetector, HPSv2, ImageRewardScorer, MetricUnavailable, Scorer, build_scorer
from .prompts import HUMAN_WORDS, build_benchmark, coco_human_prompts, diffusiondb_human_prompts, read_benchmark
from .runner import EvalOptions, MetricSpec, ModelSpec, ablation_models, load_eval_config, run_eval, summarise

__all__ = [
    "HUMAN_WORDS", "CLIPScore", "EvalOptions", "FaceHandDetector", "HPSv2", "ImageRewardScorer", "MetricSpec",
    "MetricUnavailable", "ModelSpec", "Scorer", "ablation_models", "build_benchmark", "build_scorer",
    "coco_human_prompts", "diffusiondb_human_prompts", "load_eval_config", "read_benchmark", "run_eval", "summarise",
]  # fmt: skip
