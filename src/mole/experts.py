"""Named low-rank experts: a name (face, hand, feet, ...) plus per-layer LoRA factors.

Reading and writing expert files is mole.formats' (load_expert, save_expert: kohya, diffusers and peft layouts);
mapping an expert's keys onto a model and putting it in is mole.inject's. Experts are identified by their name,
never by a file name.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .layers.lora import LoraPair

EXPERT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$")


class ExpertLoadError(ValueError):
    """An expert file or adapter cannot be read as asked; the message names the file, key and fix."""


class KeyNaming(str, enum.Enum):
    DOTTED = "dotted"  # module paths, e.g. down_blocks.0.attentions.0.proj_in
    KOHYA = "kohya"  # flattened names, e.g. down_blocks_0_attentions_0_proj_in (resolved against a model)


@dataclass
class ExpertWeights:
    """One named expert: LoRA factors keyed by layer (dotted module path or kohya flat name)."""

    name: str
    layers: dict[str, LoraPair]
    naming: KeyNaming = KeyNaming.DOTTED
    source: str = "memory"
    skipped: list[str] = field(default_factory=list)  # keys for other components (e.g. text encoder)

    def __post_init__(self) -> None:
        validate_expert_name(self.name)
        if not self.layers:
            raise ExpertLoadError(f"expert {self.name!r} from {self.source} has no LoRA layers for this component")

    @property
    def ranks(self) -> set[int]:
        return {p.rank for p in self.layers.values()}

    def fingerprint(self) -> str:
        return layers_fingerprint(self.layers)


def layers_fingerprint(layers: Mapping[str, LoraPair]) -> str:
    """sha256 over layer keys, shapes, alphas and fp32 values: recognises the same expert later."""
    h = hashlib.sha256()
    for key in sorted(layers):
        p = layers[key]
        h.update(f"{key}|{tuple(p.down.shape)}|{tuple(p.up.shape)}|{p.alpha:.6g}".encode())
        h.update(p.down.detach().float().cpu().contiguous().numpy().tobytes())
        h.update(p.up.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def validate_expert_name(name: str) -> None:
    if not isinstance(name, str) or not EXPERT_NAME.match(name):
        raise ExpertLoadError(
            f"expert name {name!r} is not valid; use a short identifier such as 'face' or 'hand' "
            "(letters, digits, '_' or '-', starting with a letter)"
        )
