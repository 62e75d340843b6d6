"""mole-diffusion: Mixture of Low-rank Experts for human-centric text-to-image diffusion."""

from __future__ import annotations

import logging

from .config import GateInit, Gating, GlobalSource, MoLEConfig, MoLEConfigError  # noqa: E402
from .experts import ExpertLoadError, ExpertWeights, KeyNaming  # noqa: E402
from .formats import MoLEFileError  # noqa: E402
from .formats.diffusers import expert_from_peft  # noqa: E402
from .formats.lora import ExpertFormat, expert_from_state_dict, load_expert, save_expert  # noqa: E402
from .formats.mole_file import read_mole_file  # noqa: E402
from .inject import (  # noqa: E402
    MoLEInjectError,
    expert_pairs,
    gate_parameters,
    has_mole,
    inject_mole,
    mole_layers,
    mole_state,
    remove_mole,
    set_expert_weights,
    set_fused,
)
from .io import load_mole, save_mole  # noqa: E402
from .layers import LoraPair, MoLELayer  # noqa: E402
from .recording import GateRecorder, record_gates  # noqa: E402
from .targets import Backbone, detect_backbone  # noqa: E402
from .version import __version__  # noqa: E402

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "Backbone",
    "ExpertFormat",
    "ExpertLoadError",
    "ExpertWeights",
    "GateInit",
    "GateRecorder",
    "Gating",
    "GlobalSource",
    "KeyNaming",
    "LoraPair",
    "MoLEConfig",
    "MoLEConfigError",
    "MoLEFileError",
    "MoLEInjectError",
    "MoLELayer",
    "__version__",
    "detect_backbone",
    "expert_from_peft",
    "expert_from_state_dict",
    "expert_pairs",
    "gate_parameters",
    "has_mole",
    "inject_mole",
    "load_expert",
    "load_mole",
    "mole_layers",
    "mole_state",
    "read_mole_file",
    "record_gates",
    "remove_mole",
    "save_expert",
    "save_mole",
    "set_expert_weights",
    "set_fused",
]
