"""The base model's identity: what a MoLE file records of the model it was trained on, and the check against it.

    structure_hash(model)      sha256 of the class and every parameter's name and shape (MoLE wrappers looked through)
    weight_samples(model)      4 evenly spaced values of every base tensor: tells two bases of one architecture apart
    check_base(model, manifest, source)   the strict check on load: architecture, then weights

MoLE's own parameters (lora_A / lora_B / gates) are looked through, so a model gives the same identity before and
after injection.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence

import torch
from torch import nn

from .formats import MoLEFileError

_MOLE_PARAM_MARKERS = (".lora_A", ".lora_B", ".gates.")


def _plain_param_shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of the model's own parameters, with MoLE wrappers looked through."""
    out = []
    for name, p in model.named_parameters():
        if any(m in name for m in _MOLE_PARAM_MARKERS):
            continue
        out.append((name.replace(".base.", "."), tuple(p.shape)))
    return sorted(out)


def class_name(model: nn.Module) -> str:
    """The model's own class name; under FSDP2's generated wrapper class (FSDP<Class>, a subclass of FSDPModule
    and of the model's class, made by fully_shard) the model's class."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return type(model).__name__
    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule)).__name__


def structure_hash(model: nn.Module) -> str:
    """sha256 of the model class and every parameter's name and shape (identical before and after injection)."""
    h = hashlib.sha256(class_name(model).encode())
    for name, shape in _plain_param_shapes(model):
        h.update(f"{name}:{shape};".encode())
    return h.hexdigest()


def spaced_indices(numel: int, count: int, device=None) -> torch.Tensor:
    """`count` evenly spaced positions in 0 .. numel - 1: a float32 linspace, truncated, clamped to the last element.

    Past 2^24 elements the float32 linspace rounds numel - 1 up beyond the end (SD1.5's 29,491,200-element
    up-block convolution gave index 29491200 and saving a real SD1.5 MoLE file failed); the clamp keeps every other
    position as before, so files written earlier keep their fingerprints."""
    idx = torch.linspace(0, numel - 1, count).long().clamp_(0, numel - 1)
    return idx.to(device) if device is not None else idx


def weight_signature(model: nn.Module, layer_paths: Sequence[str], layers: int = 4, per_layer: int = 16) -> list[float]:
    """A few evenly spaced base weights of the first wrapped layers: tells two models of one architecture apart."""
    values: list[float] = []
    for path in sorted(layer_paths)[:layers]:
        module = model.get_submodule(path)
        w = getattr(module, "base", module).weight.detach().flatten()
        values.extend(float(v) for v in w[spaced_indices(w.numel(), per_layer, w.device)].float().cpu())
    return values


SAMPLES_PER_TENSOR = 4


def weight_samples(model: nn.Module, per_tensor: int = SAMPLES_PER_TENSOR) -> torch.Tensor:
    """`per_tensor` evenly spaced values of every base parameter (MoLE wrappers looked through), in the order of
    the sorted parameter names: (num_tensors, per_tensor) float32. Milliseconds even for SDXL; a base that differs
    anywhere (mid block, up blocks, one norm layer) shows up in its tensor's row."""
    named = []
    for name, p in model.named_parameters():
        if any(m in name for m in _MOLE_PARAM_MARKERS):
            continue
        named.append((name.replace(".base.", "."), p))
    rows = []
    for _, p in sorted(named, key=lambda x: x[0]):
        w = p.detach().reshape(-1)
        rows.append(w[spaced_indices(w.numel(), per_tensor, w.device)].float().cpu())
    return torch.stack(rows) if rows else torch.zeros(0, per_tensor)


def _encode_samples(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().astype("<f4").tobytes()).decode()


def _decode_samples(text: str, per_tensor: int) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype="<f4").copy()).reshape(-1, per_tensor)


def samples_distance(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, int, int]:
    """(overall relative distance, tensors that differ by more than 1 %, index of the most different tensor)."""
    if ours.shape != theirs.shape:
        return float("inf"), max(len(ours), len(theirs)), 0
    a, b = ours.double(), theirs.double()
    overall = float((a - b).norm() / b.norm().clamp_min(1e-12))
    per = (a - b).norm(dim=1) / (b.norm(dim=1) + 1e-6)
    return overall, int((per > 1e-2).sum()), int(per.argmax()) if len(per) else 0


def _signature_distance(a: Sequence[float], b: Sequence[float]) -> float:
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    if ta.shape != tb.shape:
        return float("inf")
    return float((ta - tb).norm() / tb.norm().clamp_min(1e-12))


def model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    name = config.get("_name_or_path") if isinstance(config, dict) else getattr(config, "_name_or_path", None)
    return str(name) if name else None  # from_pretrained may store a Path


def base_identity(model: nn.Module, layer_paths: Sequence[str], backbone: str, base_model: str | None = None) -> dict:
    """The manifest's base_model entry: name, class, backbone, structure hash, weight signature and samples."""
    return {
        "name": str(base_model) if base_model else (model_name(model) or class_name(model)),
        "class": class_name(model),
        "backbone": backbone,
        "structure_sha256": structure_hash(model),
        "weight_signature": weight_signature(model, layer_paths),
        "weight_samples": {"per_tensor": SAMPLES_PER_TENSOR, "values": _encode_samples(weight_samples(model))},
    }


def check_base(model: nn.Module, manifest: dict, source: str, strict: bool = True) -> None:
    """Refuse a model that is not the base the file was trained on (architecture, then weights)."""
    base = manifest["base_model"]
    ours = model_name(model) or class_name(model)
    if structure_hash(model) != base["structure_sha256"]:
        raise MoLEFileError(
            f"{source} was made for base model {base['name']!r} ({base['class']}, {base['backbone']}), but this "
            f"model {ours!r} ({class_name(model)}) has a different architecture (parameter names or shapes differ)"
        )
    if not strict:
        return
    fix = ("Load the right base model, or pass --no-strict-base (strict_base=False in Python) if you mean to move "
           "the gates to a fine-tuned copy")  # fmt: skip
    stored = base.get("weight_samples")
    if stored:  # every tensor of the base (files written since format 1.x with weight_samples)
        k = int(stored["per_tensor"])
        overall, differing, worst = samples_distance(weight_samples(model, k), _decode_samples(stored["values"], k))
        if differing:
            names = [n for n, _ in _plain_param_shapes(model)]
            raise MoLEFileError(
                f"{source} was made for base model {base['name']!r}, but the weights of {ours!r} differ: "
                f"{differing} of {len(names)} tensors (most: {names[worst] if worst < len(names) else '?'}; relative "
                f"distance {overall:.3g} over samples of every tensor). {fix}"
            )
        return
    dist = _signature_distance(weight_signature(model, manifest["layers"]), base["weight_signature"])
    if dist > 1e-2:
        raise MoLEFileError(
            f"{source} was made for base model {base['name']!r}, but the weights of {ours!r} differ "
            f"(relative distance {dist:.3g} on sampled weights). {fix}"
        )
