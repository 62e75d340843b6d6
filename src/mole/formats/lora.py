"""LoRA expert files of any supported layout: the layout is detected from the keys, the format module reads it.

    face = load_expert("face_lora.safetensors", "face")          # kohya, diffusers or peft; a file or a folder
    save_expert(face, "face_kohya.safetensors", fmt="kohya")     # or fmt="diffusers" (pipe.load_lora_weights)

The layouts: kohya / A1111 (mole.formats.kohya, the official MoLE experts' format, SDXL's SGM names included) and
diffusers / peft (mole.formats.diffusers). Experts are identified by the name given here, never by a file name.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from ..experts import ExpertLoadError, ExpertWeights, KeyNaming, validate_expert_name
from .common import read_safetensors
from .diffusers import diffusers_state_dict, find_weights, is_dotted, metadata_config, parse_dotted
from .kohya import is_kohya, kohya_state_dict, parse_kohya

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- reading
def load_expert(path: str | Path, name: str, component: str = "unet", adapter: str | None = None) -> ExpertWeights:
    """Load one expert from a LoRA safetensors file, or a folder holding one (peft / diffusers layout).

    component: which model the expert is for ("unet" or "transformer") in prefixed peft / diffusers files; keys of
    other components (text encoders) are skipped and listed in ``ExpertWeights.skipped``.
    adapter: the adapter name when a state dict holds several peft adapters.
    """
    validate_expert_name(name)
    path = Path(path)
    config: dict = {}
    if path.is_dir():
        path, config = find_weights(path, name)
    if not path.is_file():
        raise ExpertLoadError(f"expert {name!r}: file {path} does not exist")
    if path.suffix != ".safetensors":
        raise ExpertLoadError(
            f"expert {name!r}: {path} is not a .safetensors file; convert pickled checkpoints to safetensors "
            "(pickles can run code on load)"
        )
    try:
        metadata, state = read_safetensors(path)
    except ValueError as exc:
        raise ExpertLoadError(f"expert {name!r}: {exc}") from None
    if not config:
        config = metadata_config(metadata, component, name, path)
    return expert_from_state_dict(state, name, component=component, adapter=adapter, config=config, source=str(path))


def detect_naming(state: Mapping[str, torch.Tensor]) -> KeyNaming:
    keys = list(state)
    if is_kohya(keys):
        return KeyNaming.KOHYA
    if is_dotted(keys):
        return KeyNaming.DOTTED
    sample = keys[:3]
    raise ExpertLoadError(
        f"not a LoRA state dict: no lora_A/lora_B (peft, diffusers) or lora_down/lora_up (kohya) keys; "
        f"first keys are {sample}"
    )


def expert_from_state_dict(
    state: Mapping[str, torch.Tensor],
    name: str,
    component: str = "unet",
    adapter: str | None = None,
    config: Mapping | None = None,
    source: str = "memory",
) -> ExpertWeights:
    """Build an expert from a LoRA state dict in any supported layout (detected from its keys)."""
    naming = detect_naming(state)
    if naming is KeyNaming.KOHYA:
        layers, skipped = parse_kohya(state, source)
    else:
        layers, skipped = parse_dotted(state, component, adapter, dict(config or {}), source)
    if skipped:
        logger.warning(
            "expert %r from %s: skipped %d keys of other components (e.g. %s)", name, source, len(skipped), skipped[0]
        )
    return ExpertWeights(name=name, layers=layers, naming=naming, source=source, skipped=skipped)


# ---------------------------------------------------------------------------------------------------- writing
class ExpertFormat(str, enum.Enum):
    DIFFUSERS = "diffusers"  # <component>.<path>.lora_A.weight + lora_adapter_metadata: diffusers load_lora_weights
    KOHYA = "kohya"  # lora_unet_<flat>.lora_down.weight / lora_up.weight / alpha: kohya, A1111, ComfyUI


def save_expert(
    expert: ExpertWeights,
    path: str | Path,
    fmt: ExpertFormat | str = ExpertFormat.DIFFUSERS,
    component: str = "unet",
) -> Path:
    """Write an expert (keyed by module paths) as a LoRA safetensors file that other tools read too.

    DIFFUSERS files carry r / lora_alpha in ``lora_adapter_metadata`` (alpha_pattern where layers differ), so
    ``pipe.load_lora_weights`` and ``load_expert`` both read them. KOHYA files carry a per-layer alpha.
    """
    from safetensors.torch import save_file

    fmt = ExpertFormat(fmt)
    if expert.naming is not KeyNaming.DOTTED:
        raise ExpertLoadError(f"expert {expert.name!r} is keyed by kohya names; inject it and use expert_pairs()")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ExpertLoadError(f"path={str(path)!r} must end in .safetensors")
    metadata = {"format": "pt", "mole_expert": expert.name}
    if fmt is ExpertFormat.KOHYA:
        sd = kohya_state_dict(expert)
    else:
        sd, metadata["lora_adapter_metadata"] = diffusers_state_dict(expert, component)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path
