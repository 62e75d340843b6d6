"""`mole-tiny`: the small real text-to-image model that ships with the package (see assets/mole_tiny/MODEL_CARD.md).

The name is accepted wherever a base model or a MoLE file is expected, offline:

    DiffusionModel.from_pretrained("mole-tiny")        # the base: a StableDiffusionPipeline folder, 64 px
    mole.load_mole(unet, "mole-tiny")                  # its gates + face / hand experts
    mole generate --base mole-tiny --mole mole-tiny --prompt "a close-up photo of a face"
"""

from __future__ import annotations

from pathlib import Path

NAME = "mole-tiny"
ASSETS = Path(__file__).resolve().parent / "assets" / "mole_tiny"


class MoleTinyMissing(FileNotFoundError):
    """The package was installed without mole-tiny's weights."""


def is_mole_tiny(name: object) -> bool:
    return isinstance(name, str) and name.strip().lower() == NAME


def _need(path: Path) -> Path:
    if not path.exists():
        raise MoleTinyMissing(
            f"{NAME}: {path} is missing from this installation; reinstall mole-diffusion (the weights are package "
            "data) or build them with scripts/build_mole_tiny.sh"
        )
    return path


def base_path() -> Path:
    """The base pipeline folder."""
    return _need(ASSETS / "pipeline")


def mole_path() -> Path:
    """The MoLE file: gates (local + global) with the face and hand experts embedded."""
    return _need(ASSETS / "mole.safetensors")


def resolve_base(base: str | Path) -> str | Path:
    """`mole-tiny` -> its pipeline folder; anything else unchanged."""
    return str(base_path()) if is_mole_tiny(base) else base


def resolve_mole(path: str | Path) -> str | Path:
    """`mole-tiny` -> its MoLE file; anything else unchanged."""
    return str(mole_path()) if is_mole_tiny(path) else path
