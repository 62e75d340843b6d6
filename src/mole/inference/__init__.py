"""Generation with MoLE and pictures of its gates."""

from .generate import GenerateOptions, check_prompt_lengths, generate, read_prompt_file, write_png
from .inspect import InspectOptions, inspect, mean_local_map
from .pipeline import SCHEDULERS, MixMode, denoiser_of, load_loras, load_mole_weights, load_pipeline, set_scheduler

__all__ = [
    "SCHEDULERS", "GenerateOptions", "InspectOptions", "MixMode", "check_prompt_lengths", "denoiser_of", "generate",
    "inspect", "load_loras", "load_mole_weights", "load_pipeline", "mean_local_map", "read_prompt_file",
    "set_scheduler", "write_png",
]  # fmt: skip
