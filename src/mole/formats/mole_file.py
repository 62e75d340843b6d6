"""The mole file: one safetensors file with the gates, optionally the experts, and a manifest.

File layout
    gates.<layer path>.<local_weight|local_bias|global_weight|global_bias>
    experts.<name>.<layer path>.<lora_A|lora_B|alpha>          (when the experts are embedded)
    metadata["mole_manifest"]: JSON naming the base model (with a structural hash and a weight signature),
        the experts (name, source, fingerprint, ranks), the MoLE config, the wrapped layers and the versions.

This module reads and writes that layout; mole.io builds the manifest from a model and loads a file into one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..experts import ExpertWeights, KeyNaming
from ..layers.lora import LoraPair
from ..targets import FILE_FIX, layer_not_found, submodule
from . import FileLayerNotFound, MoLEFileError
from .common import read_safetensors

FORMAT = "mole-diffusion"
FORMAT_VERSION = 1
MANIFEST_KEY = "mole_manifest"


def write_mole_file(path: Path, tensors: Mapping[str, torch.Tensor], manifest: dict) -> Path:
    """Write tensors and manifest to `path` atomically (a temporary file beside it, then a rename)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(dict(tensors), tmp, metadata={MANIFEST_KEY: json.dumps(manifest), "format": "pt"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_mole_manifest(path: str | Path) -> dict:
    """The manifest of a MoLE file, read from its header alone (no tensor is loaded)."""
    return read_mole_file(path, tensors=False)[0]


def read_mole_file(path: str | Path, tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """Return (manifest, tensors) of a MoLE file, checking that it is one (tensors=False: manifest only).
    `mole-tiny` names the MoLE file that ships with the package."""
    from ..mole_tiny import resolve_mole

    path = Path(resolve_mole(path))
    if not path.is_file():
        raise MoLEFileError(f"MoLE file {path} does not exist")
    try:
        meta, tensors = read_safetensors(path, tensors)
    except ValueError as exc:
        raise MoLEFileError(str(exc)) from None
    if MANIFEST_KEY not in meta:
        raise MoLEFileError(
            f"{path} has no {MANIFEST_KEY!r} metadata: it is not a MoLE file (a LoRA expert is loaded with load_expert)"
        )
    try:
        manifest = json.loads(meta[MANIFEST_KEY])
    except json.JSONDecodeError as exc:
        raise MoLEFileError(f"{path}: the {MANIFEST_KEY!r} metadata is not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise MoLEFileError(f"{path}: manifest format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise MoLEFileError(
            f"{path}: format_version {manifest['format_version']} is newer than this mole-diffusion reads "
            f"({FORMAT_VERSION}); upgrade mole-diffusion"
        )
    return manifest, tensors


_PARTS = ("lora_A", "lora_B", "alpha")


def embedded_experts(
    manifest: dict, tensors: Mapping[str, torch.Tensor], source: str, model: nn.Module | None = None
) -> dict[str, ExpertWeights]:
    """Rebuild the experts stored in a MoLE file: every ``experts.<name>.<layer>.<part>`` tensor, none dropped.

    A layer `model` lacks (or, without a model, one the manifest does not list) is LayerNotFound naming it and the
    nearest paths; an expert the manifest does not name, a part other than lora_A / lora_B / alpha, or fewer layers
    than the manifest records is a MoLEFileError (a damaged file)."""
    names = [info["name"] for info in manifest["experts"]]
    found: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        if not key.startswith("experts."):
            continue
        rest, _, part = key[len("experts.") :].rpartition(".")
        name, _, layer = rest.partition(".")
        if name not in names or part not in _PARTS or not layer:
            raise MoLEFileError(f"{source}: tensor {key!r} is not experts.<one of {names}>.<layer>."
                                f"<{' | '.join(_PARTS)}>; the file is damaged")  # fmt: skip
        found.setdefault(name, {}).setdefault(layer, {})[part] = t
    listed = list(manifest.get("layers") or [])
    listed_set = set(listed)  # membership per layer; `listed` keeps the order for the nearest-path hint
    out = {}
    for info in manifest["experts"]:
        name = info["name"]
        prefix = f"experts.{name}."
        layers = {}
        for layer, parts in sorted(found.get(name, {}).items()):
            where = f"expert {name!r} in {source}: layer"
            if model is not None:
                submodule(model, layer, where, FILE_FIX, FileLayerNotFound)
            elif layer not in listed_set:
                raise layer_not_found(layer, listed, f"the layers {source} lists", where, FILE_FIX, FileLayerNotFound)
            missing = [p for p in _PARTS if p not in parts]
            if missing:
                raise MoLEFileError(f"{source}: key {prefix}{layer}.{missing[0]} is missing")
            for part in _PARTS:
                if not torch.isfinite(parts[part]).all():
                    raise MoLEFileError(f"{source}: {prefix}{layer}.{part} holds NaN/Inf values; the file is damaged "
                                        "or came from a diverged run")  # fmt: skip
            layers[layer] = LoraPair(parts["lora_A"], parts["lora_B"], float(parts["alpha"]))
        recorded = info.get("num_layers")
        if layers and isinstance(recorded, int) and len(layers) != recorded:
            raise MoLEFileError(f"{source}: expert {name!r} has weights for {len(layers)} layers, its manifest "
                                f"records {recorded}; the file is damaged or truncated")  # fmt: skip
        if layers:
            out[name] = ExpertWeights(name, layers, KeyNaming.DOTTED, source=info.get("source", source))
    return out
