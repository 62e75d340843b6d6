"""The base model's identity: what a MoLE file records of the model it was trained on, and the check against it.

    structure_hash(model)      sha256 of the class and every parameter's name and shape (MoLE wrappers looked through)
    weight_samples(model)      4 evenly spaced values of every base tensor: tells two bases of one architecture apart
    tensor_stats(model)        statistics over every value of every base tensor (mean, std, abs-max, 2 projections)
    check_base(model, manifest, source)   the strict check on load: architecture, then weights

MoLE's own parameters (lora_A / lora_B / gates) are looked through, so a model gives the same identity before and
after injection.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Sequence

import torch
from torch import nn

from .formats import MoLEFileError
from .targets import submodule

_MOLE_PARAM_MARKERS = (".lora_A", ".lora_B", ".gates.")

logger = logging.getLogger(__name__)


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
        module = submodule(model, path, "manifest layer")
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


STAT_FIELDS = ("mean", "std", "absmax", "proj0", "proj1")
_PROJ_LEN = 4096
_PROJ_SEED = 20261203
STATS_TOLERANCE = 1e-2


def _projection() -> torch.Tensor:
    """(2, 4096) float32 of +-1: numpy's legacy RandomState stream, frozen by numpy's policy, so files written
    by any version give the same projections."""
    import numpy as np

    signs = np.random.RandomState(_PROJ_SEED).randint(0, 2, size=(2, _PROJ_LEN)).astype("float32") * 2 - 1
    return torch.from_numpy(signs)


def _base_params(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) of the base, MoLE wrappers looked through, sorted by name (the order of every record)."""
    named = [(n.replace(".base.", "."), p) for n, p in model.named_parameters()
             if not any(m in n for m in _MOLE_PARAM_MARKERS)]  # fmt: skip
    return sorted(named, key=lambda x: x[0])


@torch.no_grad()
def tensor_stats(model: nn.Module) -> torch.Tensor:
    """Statistics over EVERY value of every base parameter, in sorted-name order: (num_tensors, 5) float32 of
    mean, std, abs-max and two projections onto fixed +-1 vectors (tiled, divided by sqrt(numel)). The
    projections move by about (relative L2 change) x rms for any change, so a re-initialised block (same
    distribution, other values) shows up although its mean / std barely move. One pass over the weights:
    about 1.5 s for SD1.5's 860M parameters on a loaded 2-core CPU."""
    weights = None  # rows: ones (the sum), then the two +-1 projections
    rows = []
    for _, p in _base_params(model):
        w = p.detach().reshape(-1)
        if w.dtype != torch.float32:
            w = w.float()
        n = w.numel()
        if weights is None or weights.device != w.device:
            weights = torch.cat([torch.ones(1, _PROJ_LEN), _projection()]).to(w.device)
        if n == 0:
            rows.append(torch.zeros(len(STAT_FIELDS), device=w.device))
            continue
        full = n // _PROJ_LEN  # fold the tensor onto 4096 columns (one pass), then weigh the columns
        folded = w[: full * _PROJ_LEN].view(full, _PROJ_LEN).sum(0) if full else w.new_zeros(_PROJ_LEN)
        folded[: n - full * _PROJ_LEN] += w[full * _PROJ_LEN :]
        sums = (weights * folded).sum(1)
        mean = sums[0] / n
        std = (torch.linalg.vector_norm(w) ** 2 / n - mean**2).clamp_min(0).sqrt()
        lo, hi = torch.aminmax(w)
        rows.append(torch.stack([mean, std, torch.maximum(-lo, hi), sums[1] / n**0.5, sums[2] / n**0.5]))
    return torch.stack(rows).float().cpu() if rows else torch.zeros(0, len(STAT_FIELDS))


def stats_differ(ours: torch.Tensor, theirs: torch.Tensor, tol: float = STATS_TOLERANCE) -> list[int]:
    """Indices of the tensors whose statistics differ: mean, std or a projection by more than tol x the tensor's
    rms, or abs-max by more than tol x its abs-max (fp16 / bf16 rounding of the same weights stays far below)."""
    a, b = ours.double(), theirs.double()
    rms = (b[:, 0] ** 2 + b[:, 1] ** 2).sqrt()
    scale = torch.stack([rms, rms, b[:, 2], rms, rms], dim=1).clamp_min(1e-7)
    bad = ((a - b).abs() > tol * scale).any(dim=1)
    return [int(i) for i in bad.nonzero().flatten()]


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
        "tensor_stats": {"fields": list(STAT_FIELDS), "values": _encode_samples(tensor_stats(model))},
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
    fix = ("Load the right base model, or pass --no-strict-base if you mean to move "
           "the gates to a fine-tuned copy")  # fmt: skip
    names = [n for n, _ in _plain_param_shapes(model)]
    differing: set[int] = set()
    checked = []
    stats = base.get("tensor_stats")
    if stats:  # every value of every tensor (files written since the per-tensor statistics were added)
        theirs = _decode_samples(stats["values"], len(stats.get("fields", STAT_FIELDS)))
        ours_stats = tensor_stats(model)
        if ours_stats.shape != theirs.shape:
            differing.update(range(len(names)))
        else:
            differing.update(stats_differ(ours_stats, theirs))
        checked.append("statistics of every value")
    stored = base.get("weight_samples")
    if stored:  # 4 values of every tensor (files written since format 1.x with weight_samples)
        k = int(stored["per_tensor"])
        ours_s, theirs_s = weight_samples(model, k), _decode_samples(stored["values"], k)
        if ours_s.shape != theirs_s.shape:
            differing.update(range(len(names)))
        else:
            per = (ours_s.double() - theirs_s.double()).norm(dim=1) / (theirs_s.double().norm(dim=1) + 1e-6)
            differing.update(int(i) for i in (per > 1e-2).nonzero().flatten())
        checked.append("samples of every tensor")
    if checked:
        if differing:
            listed = [names[i] for i in sorted(differing) if i < len(names)]
            more = f" and {len(listed) - 3} more" if len(listed) > 3 else ""
            raise MoLEFileError(
                f"{source} was made for base model {base['name']!r}, but the weights of {ours!r} differ in "
                f"{len(differing)} of {len(names)} tensors: {', '.join(listed[:3])}{more} (compared: "
                f"{' and '.join(checked)}). {fix}"
            )
        if not stats:
            logger.info("%s records no per-tensor statistics of its base (written by an older mole-diffusion): the "
                        "base check compared 4 samples of each tensor; save the file again to record them", source)
        return
    logger.info("%s records only sampled weights of its first layers (written by an older mole-diffusion): the base "
                "check cannot see a change elsewhere (e.g. re-initialised up_blocks); save the file again to record "
                "statistics of every tensor", source)
    dist = _signature_distance(weight_signature(model, manifest["layers"]), base["weight_signature"])
    if dist > 1e-2:
        raise MoLEFileError(
            f"{source} was made for base model {base['name']!r}, but the weights of {ours!r} differ "
            f"(relative distance {dist:.3g} on sampled weights). {fix}"
        )
