"""`mole convert`: the paper's three files (face LoRA, hand LoRA, gate file) <-> one mole file.

official_to_mole: load the official files into a base model and save one mole.safetensors (manifest, experts
embedded). The manifest records what the official layout needs to be rebuilt exactly (kohya names, dtypes, factor
shapes, file names and metadata), so mole_to_official gives back the same tensors under the same keys. A model
trained here converts too (gating both, global_source expert_output, experts named face and hand).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .config import Gating, GlobalSource, MoLEConfig
from .formats import MoLEFileError
from .formats.common import read_safetensors
from .formats.kohya import kohya_flat_name, uses_sgm_names
from .formats.lora import load_expert
from .formats.mole_file import embedded_experts, read_mole_file
from .formats.official import EXPERTS, official_gate_tensors
from .inject import remove_mole
from .io import load_official, save_mole
from .targets import Backbone, submodule

logger = logging.getLogger(__name__)

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


def official_to_mole(
    model: nn.Module,
    gate: str | Path,
    experts: Mapping[str, str | Path],
    out: str | Path,
    base_model: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the official face / hand LoRAs and gate file as one mole file for `model`; the model is left as given."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise MoLEFileError(f"{out} exists; pass --overwrite to replace it")
    gate = Path(gate)
    gate_meta, gate_tensors = _read(gate)
    loaded, record = [], {}
    for name, file in experts.items():
        loaded.append(load_expert(file, name))
        meta, tensors = _read(Path(file))
        record[name] = {
            "file": Path(file).name,
            "metadata": meta,
            "dtype": {k: str(t.dtype) for k, t in tensors.items()},
            "shapes": {k: list(t.shape) for k, t in tensors.items() if not k.endswith(".alpha")},
        }
    flat_of = load_official(model, gate_tensors, loaded, str(gate))
    try:
        official = {
            "gate_file": gate.name,
            "gate_metadata": gate_meta,
            "gate_dtype": {k: str(t.dtype) for k, t in gate_tensors.items()},
            "names": flat_of,
            "experts": record,
        }
        return save_mole(model, out, base_model=base_model, extra_manifest={"official": official})
    finally:
        remove_mole(model)


def mole_to_official(
    path: str | Path, out_dir: str | Path, model: nn.Module | None = None, overwrite: bool = False
) -> dict[str, Path]:
    """Write a mole file as the official layout: <face>.safetensors, <hand>.safetensors (kohya LoRAs) and the gate
    file, in out_dir; return {"face": ..., "hand": ..., "gate": ...}. `model` (the base denoiser) is needed only for
    files not converted from the official layout (to name SDXL layers and shape 1x1 conv factors)."""
    source = str(path)
    manifest, tensors = read_mole_file(path)
    config = MoLEConfig.from_dict(manifest["config"])
    if config.gating is not Gating.BOTH or config.global_source is not GlobalSource.EXPERT_OUTPUT:
        raise MoLEFileError(
            f"{source} uses gating={config.gating.value}, global_source={config.global_source.value}; the official "
            "layer has gating=both with global_source=expert_output (train with those to convert)"
        )
    names = [e["name"] for e in manifest["experts"]]
    record = (manifest.get("extra") or {}).get("official")
    if record is None and model is None and Backbone(manifest["base_model"]["backbone"]) is Backbone.SDXL:
        raise MoLEFileError(f"{source}: naming SDXL layers the kohya way needs the base model; pass model=")
    if record is not None:
        flat_of = record["names"]
    else:
        flat_of = {p: kohya_flat_name(p, model) if model is not None else p.replace(".", "_")
                   for p in manifest["layers"]}  # fmt: skip
    gate_tensors = official_gate_tensors(tensors, names, flat_of, source)
    experts = embedded_experts(manifest, tensors, source, model)
    missing = [n for n in EXPERTS if n not in experts]
    if missing:
        raise MoLEFileError(f"{source} does not embed experts {missing}; the official layout needs both LoRA files")
    out_dir = Path(out_dir)
    files = {
        "gate": out_dir / (record["gate_file"] if record else "mole_gates.safetensors"),
        **{n: out_dir / (record["experts"][n]["file"] if record else f"{n}.safetensors") for n in EXPERTS},
    }
    clash = [str(f) for f in files.values() if f.exists()]
    if clash and not overwrite:
        raise MoLEFileError(f"{clash} exist; pass --overwrite to replace them")
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in EXPERTS:
        rec = record["experts"][name] if record else None
        sd = {}
        for layer, pair in experts[name].layers.items():
            flat = f"lora_unet_{flat_of[layer]}"
            down, up = pair.down, pair.up
            if rec is not None:
                down = down.reshape(rec["shapes"][f"{flat}.lora_down.weight"])
                up = up.reshape(rec["shapes"][f"{flat}.lora_up.weight"])
            elif model is not None and isinstance(submodule(model, layer), nn.Conv2d) and down.ndim == 2:
                down, up = down[:, :, None, None], up[:, :, None, None]
            sd[f"{flat}.lora_down.weight"], sd[f"{flat}.lora_up.weight"] = down, up
            sd[f"{flat}.alpha"] = torch.tensor(pair.alpha)
        if rec is not None:
            sd = {k: v.to(_DTYPES[rec["dtype"][k]]) for k, v in sd.items() if k in rec["dtype"]}
        metadata = (rec["metadata"] or None) if rec else None
        save_file({k: v.contiguous() for k, v in sd.items()}, str(files[name]), metadata=metadata)
    if record is not None:
        gate_tensors = {k: v.to(_DTYPES[record["gate_dtype"][k]]) for k, v in gate_tensors.items()}
    save_file({k: v.contiguous() for k, v in gate_tensors.items()}, str(files["gate"]),
              metadata=(record["gate_metadata"] or None) if record else None)  # fmt: skip
    if record is None and model is not None and uses_sgm_names(model):
        logger.info("named the layers in kohya's SGM layout (SDXL)")
    return files


def _read(path: Path) -> tuple[dict, dict]:
    try:
        return read_safetensors(path)
    except ValueError as exc:
        raise MoLEFileError(str(exc)) from None
