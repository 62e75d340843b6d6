"""The paper's released gate files (JiePKU/MoLE, ``WrapperLoRANetwork.save_weights``).

An official MoLE is three kohya-style files: a face LoRA, a hand LoRA and the gate file. The gate file holds, per
wrapped layer, six tensors under ``moe_lora_unet_<kohya flat name>.softmoe.``:

    Phi_1.weight (2, d_in), Phi_1.bias (2,)         the local gate; rows in expert order [face, hand]
    face_scale.weight (1, d_out), face_scale.bias (1,)   face's global gate, on mean_tokens(scale * B A X)
    hand_scale.weight (1, d_out), hand_scale.bias (1,)   hand's global gate

and no useful metadata. Flat names are kohya's: diffusers-like for SD1.5 / SD2.1, the SGM layout for SDXL. The
layer this computes is MoLE with gating="both" and global_source="expert_output". The official loader ignores
missing keys (``strict=False``); here a missing, extra or misshapen key, or a missing expert, is an error naming it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..config import MoLEConfig
from ..experts import ExpertWeights
from ..layers import layer_dims
from ..targets import FILE_FIX, layer_not_found, submodule
from . import FileLayerNotFound, MoLEFileError
from .kohya import _layers_per_block, kohya_lookup, sgm_to_diffusers

EXPERTS = ("face", "hand")  # the official code's two experts, in the order of Phi_1's rows
PARAMS = ("Phi_1.weight", "Phi_1.bias", "face_scale.weight", "face_scale.bias", "hand_scale.weight",
          "hand_scale.bias")  # fmt: skip
PREFIX = "moe_lora_unet_"
_KEY = re.compile(rf"^{PREFIX}(?P<flat>.+)\.softmoe\.(?P<param>{'|'.join(re.escape(p) for p in PARAMS)})$")


def official_config() -> MoLEConfig:
    """What the official layer computes: both gates, the global one pooled from each expert's own output."""
    return MoLEConfig(gating="both", global_source="expert_output")


def gate_key(flat: str, param: str) -> str:
    return f"{PREFIX}{flat}.softmoe.{param}"


def is_official_gate_file(path: str | Path) -> bool:
    """True when `path` is a safetensors file whose keys are official MoLE gate keys (header only is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError):
        return False
    return is_official_gate(keys)


def is_official_gate(keys) -> bool:
    return any(k.startswith(PREFIX) and ".softmoe." in k for k in keys)


def parse_gates(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """{kohya flat name: {param: tensor}}; every key must be an official gate key, every layer complete."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise MoLEFileError(
                f"{source}: key {key!r} is not an official MoLE gate key "
                f"({PREFIX}<layer>.softmoe.<{' | '.join(PARAMS)}>)"
            )
        layers.setdefault(m["flat"], {})[m["param"]] = value
    if not layers:
        raise MoLEFileError(f"{source} holds no official MoLE gate keys")
    for flat, params in layers.items():
        for param in PARAMS:
            if param not in params:
                raise MoLEFileError(f"{source}: key {gate_key(flat, param)!r} is missing (the layer's other gate keys "
                                    "are there)")  # fmt: skip
    return layers


def experts_by_name(experts, source: str) -> dict[str, ExpertWeights]:
    """The face and hand experts, matched by name (never by position); anything else is an error naming it."""
    if experts is None:
        raise MoLEFileError(
            f"{source} is an official MoLE gate file: it holds the gates only. Pass the experts by name, "
            "experts=[load_expert(<face LoRA>, 'face'), load_expert(<hand LoRA>, 'hand')] "
            "(CLI: --expert face=FILE --expert hand=FILE)"
        )
    given = list(experts.values()) if isinstance(experts, Mapping) else list(experts)
    by_name = {}
    for ex in given:
        if not isinstance(ex, ExpertWeights):
            raise MoLEFileError(f"experts must be ExpertWeights (see mole.load_expert); got {type(ex).__name__}")
        by_name[ex.name] = ex
    extra = sorted(set(by_name) - set(EXPERTS))
    if extra:
        raise MoLEFileError(f"experts {extra} were passed, but the official gate file {source} has gates for "
                            f"{list(EXPERTS)} only")  # fmt: skip
    for name in EXPERTS:
        if name not in by_name:
            raise MoLEFileError(
                f"expert {name!r} is missing: the official gate file {source} gates {list(EXPERTS)}; pass "
                f"load_expert(<{name} LoRA>, {name!r}) (CLI: --expert {name}=FILE)"
            )
    return by_name


def resolve_gate_layers(gates: Mapping[str, Mapping], model: nn.Module, source: str) -> dict[str, str]:
    """{kohya flat name: module path} for every gated layer; an unknown name is an error naming its key."""
    lookup = kohya_lookup(model)
    lpb = _layers_per_block(model)
    out = {}
    for flat in gates:
        path = lookup.get(flat) or lookup.get(sgm_to_diffusers(flat, lpb))
        if path is None:
            what = f"{source}: key {gate_key(flat, 'Phi_1.weight')!r}: layer"
            names = [n for n in lookup if n]
            raise layer_not_found(flat, names, type(model).__name__, what, FILE_FIX, FileLayerNotFound)
        out[flat] = path
    return out


def check_gate_shapes(gates: Mapping[str, Mapping], paths: Mapping[str, str], model: nn.Module, source: str) -> None:
    """Every gate tensor has the shape its layer needs (Phi_1: (2, d_in); the scales: (1, d_out))."""
    for flat, path in paths.items():
        d_in, d_out = layer_dims(submodule(model, path, "gate layer"))  # a wrapped layer: its base
        want = {"Phi_1.weight": (2, d_in), "Phi_1.bias": (2,), "face_scale.weight": (1, d_out),
                "face_scale.bias": (1,), "hand_scale.weight": (1, d_out), "hand_scale.bias": (1,)}  # fmt: skip
        for param, shape in want.items():
            got = tuple(gates[flat][param].shape)
            if got != shape:
                raise MoLEFileError(f"{source}: key {gate_key(flat, param)!r} has shape {got}, the layer {path!r} "
                                    f"needs {shape}")  # fmt: skip


def mole_gate_tensors(gates: Mapping[str, Mapping[str, torch.Tensor]], paths: Mapping[str, str]) -> dict:
    """The official gates in our layout (``gates.<path>.<param>``, rows in the order EXPERTS): Phi_1 is the local
    gate; face_scale and hand_scale, stacked, the global one. The inverse of official_gate_tensors."""
    out = {}
    for flat, path in paths.items():
        g = gates[flat]
        out[f"gates.{path}.local_weight"] = g["Phi_1.weight"]
        out[f"gates.{path}.local_bias"] = g["Phi_1.bias"]
        out[f"gates.{path}.global_weight"] = torch.cat([g["face_scale.weight"], g["hand_scale.weight"]], 0)
        out[f"gates.{path}.global_bias"] = torch.cat([g["face_scale.bias"], g["hand_scale.bias"]], 0)
    return out


def official_gate_tensors(
    gates: Mapping[str, torch.Tensor], names: Sequence[str], flat_of: Mapping[str, str], source: str
) -> dict[str, torch.Tensor]:
    """Our gate tensors (``gates.<path>.<param>``, rows in the order `names`) in the official file's layout."""
    if sorted(names) != sorted(EXPERTS):
        raise MoLEFileError(f"{source} has experts {list(names)}; the official layout has exactly {list(EXPERTS)}")
    rows = [list(names).index(n) for n in EXPERTS]
    out = {}
    for path, flat in flat_of.items():
        try:
            lw, lb = gates[f"gates.{path}.local_weight"], gates[f"gates.{path}.local_bias"]
            gw, gb = gates[f"gates.{path}.global_weight"], gates[f"gates.{path}.global_bias"]
        except KeyError as exc:
            raise MoLEFileError(f"{source}: key {exc.args[0]!r} is missing") from None
        out[gate_key(flat, "Phi_1.weight")] = lw[rows]
        out[gate_key(flat, "Phi_1.bias")] = lb[rows]
        for i, name in enumerate(EXPERTS):
            out[gate_key(flat, f"{name}_scale.weight")] = gw[rows[i] : rows[i] + 1]
            out[gate_key(flat, f"{name}_scale.bias")] = gb[rows[i] : rows[i] + 1]
    return out
