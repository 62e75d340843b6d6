"""Save and load MoLE weights: one safetensors file with the gates, optionally the experts, and a manifest.

File layout
    gates.<layer path>.<local_weight|local_bias|global_weight|global_bias>
    experts.<name>.<layer path>.<lora_A|lora_B|alpha>          (when the experts are embedded)
    metadata["mole_manifest"]: JSON naming the base model (with a structural hash and a weight signature),
        the experts (name, source, fingerprint, ranks), the MoLE config, the wrapped layers and the versions.

Loading checks everything before it changes the model: a different base model, a missing or different expert,
a missing, extra or wrongly shaped tensor is an error that names it, never a partial load.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .config import MoLEConfig
from .experts import ExpertWeights, KeyNaming, layers_fingerprint
from .formats import MoLEFileError
from .formats.common import read_safetensors
from .formats.official import is_official_gate_file, load_official
from .inject import has_mole, inject_mole, mole_layers, mole_state, remove_mole, resolve_layers
from .layers.lora import LoraPair
from .targets import Backbone

logger = logging.getLogger(__name__)

FORMAT = "mole-diffusion"
FORMAT_VERSION = 1
MANIFEST_KEY = "mole_manifest"
_MOLE_PARAM_MARKERS = (".lora_A", ".lora_B", ".gates.")


# ---------------------------------------------------------------------------------------------------- base identity
def _plain_param_shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of the model's own parameters, with MoLE wrappers looked through."""
    out = []
    for name, p in model.named_parameters():
        if any(m in name for m in _MOLE_PARAM_MARKERS):
            continue
        out.append((name.replace(".base.", "."), tuple(p.shape)))
    return sorted(out)


def structure_hash(model: nn.Module) -> str:
    """sha256 of the model class and every parameter's name and shape (identical before and after injection)."""
    h = hashlib.sha256(type(model).__name__.encode())
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


def _model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    name = config.get("_name_or_path") if isinstance(config, dict) else getattr(config, "_name_or_path", None)
    return str(name) if name else None  # from_pretrained may store a Path


# ---------------------------------------------------------------------------------------------------- save
def _versions() -> dict[str, str]:
    from . import __version__

    versions = {"mole": __version__, "torch": torch.__version__}
    try:
        import diffusers

        versions["diffusers"] = diffusers.__version__
    except ImportError:  # pragma: no cover - diffusers is a dependency, but the layer works without it
        pass
    return versions


def build_manifest(model: nn.Module, base_model: str | None = None, embedded: bool = True) -> dict:
    state = mole_state(model)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": _versions(),
        "base_model": {
            "name": str(base_model) if base_model else (_model_name(model) or type(model).__name__),
            "class": type(model).__name__,
            "backbone": state.backbone.value,
            "structure_sha256": structure_hash(model),
            "weight_signature": weight_signature(model, state.layer_paths),
            "weight_samples": {"per_tensor": SAMPLES_PER_TENSOR, "values": _encode_samples(weight_samples(model))},
        },
        "config": state.config.to_dict(),
        "experts": [
            {
                "name": e.name,
                "source": e.source,
                "fingerprint": e.fingerprint,
                "ranks": e.ranks,
                "num_layers": e.num_layers,
                "embedded": embedded,
            }
            for e in state.experts
        ],
        "layers": state.layer_paths,
    }


def gate_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """gates.<layer>.<param> -> tensor for every wrapped layer."""
    return {
        f"gates.{path}.{pname}": p.detach()
        for path, layer in mole_layers(model).items()
        for pname, p in layer.gates.named_parameters()
    }


def save_mole(
    model: nn.Module,
    path: str | Path,
    base_model: str | None = None,
    include_experts: bool = True,
    dtype: torch.dtype | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    extra_manifest: dict | None = None,
) -> Path:
    """Write the gates (and, by default, the experts) with a manifest to `path` atomically; return the path.

    base_model: the hub id or local path of the base model, recorded in the manifest (default: the model's
    config._name_or_path).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise MoLEFileError(f"path={str(path)!r} must end in .safetensors")
    from safetensors.torch import save_file

    tensors = gate_state_dict(model)
    for key, value in (extra_tensors or {}).items():  # e.g. an InstructMoLE router: "router.<name>"
        if key.startswith(("gates.", "experts.")):
            raise MoLEFileError(f"extra tensor {key!r} uses a reserved prefix (gates., experts.)")
        tensors[key] = value
    if include_experts:
        for lpath, layer in mole_layers(model).items():
            for name in layer.expert_names:
                pair = layer.expert(name)
                if pair is None:
                    continue
                tensors[f"experts.{name}.{lpath}.lora_A"] = pair.down
                tensors[f"experts.{name}.{lpath}.lora_B"] = pair.up
                tensors[f"experts.{name}.{lpath}.alpha"] = torch.tensor(pair.alpha, dtype=torch.float32)
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() and not k.endswith(".alpha") else v)
        .detach()
        .cpu()
        .contiguous()
        for k, v in tensors.items()
    }
    manifest = build_manifest(model, base_model, embedded=include_experts)
    if extra_manifest:
        manifest["extra"] = extra_manifest
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={MANIFEST_KEY: json.dumps(manifest), "format": "pt"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("saved MoLE weights (%d tensors, experts embedded: %s) to %s", len(tensors), include_experts, path)
    return path


# ---------------------------------------------------------------------------------------------------- load
def read_mole_manifest(path: str | Path) -> dict:
    """The manifest of a MoLE file, read from its header alone (no tensor is loaded)."""
    return read_mole_file(path, tensors=False)[0]


def read_mole_file(path: str | Path, tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """Return (manifest, tensors) of a MoLE file, checking that it is one (tensors=False: manifest only).
    `mole-tiny` names the MoLE file that ships with the package."""
    from .mole_tiny import resolve_mole

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


def embedded_experts(manifest: dict, tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, ExpertWeights]:
    """Rebuild the experts stored in a MoLE file."""
    out = {}
    for info in manifest["experts"]:
        name = info["name"]
        prefix = f"experts.{name}."
        layers = {}
        for layer in manifest["layers"]:
            a = tensors.get(f"{prefix}{layer}.lora_A")
            if a is None:
                continue
            b = tensors.get(f"{prefix}{layer}.lora_B")
            alpha = tensors.get(f"{prefix}{layer}.alpha")
            if b is None or alpha is None:
                raise MoLEFileError(f"{source}: key {prefix}{layer}.lora_B or .alpha is missing")
            for part, t in (("lora_A", a), ("lora_B", b), ("alpha", alpha)):
                if not torch.isfinite(t).all():
                    raise MoLEFileError(f"{source}: {prefix}{layer}.{part} holds NaN/Inf values; the file is damaged "
                                        "or came from a diverged run")  # fmt: skip
            layers[layer] = LoraPair(a, b, float(alpha))
        if layers:
            out[name] = ExpertWeights(name, layers, KeyNaming.DOTTED, source=info.get("source", source))
    return out


def check_base(model: nn.Module, manifest: dict, source: str, strict: bool = True) -> None:
    """Refuse a model that is not the base the file was trained on (architecture, then weights)."""
    base = manifest["base_model"]
    ours = _model_name(model) or type(model).__name__
    if structure_hash(model) != base["structure_sha256"]:
        raise MoLEFileError(
            f"{source} was made for base model {base['name']!r} ({base['class']}, {base['backbone']}), but this "
            f"model {ours!r} ({type(model).__name__}) has a different architecture (parameter names or shapes differ)"
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


def load_mole(
    model: nn.Module,
    path: str | Path,
    experts: Sequence[ExpertWeights] | Mapping[str, ExpertWeights] | None = None,
    strict_base: bool = True,
) -> nn.Module:
    """Load a MoLE file into `model` (a plain model: it is injected; an injected one: its gates are replaced).

    experts: experts to use instead of (or, when the file does not embed them, in place of) the embedded ones;
    each must be the expert the gates were trained with (same fingerprint).

    The paper's released gate files (JiePKU/MoLE, recognised by their ``moe_lora_unet_*.softmoe.*`` keys) load too:
    pass experts=[face, hand] (matched by name); the model gets the official layer (global_source=expert_output).
    They carry no base-model identity, so strict_base does not apply to them.
    """
    source = str(path)
    if Path(path).is_file() and is_official_gate_file(path):
        try:
            _, tensors = read_safetensors(Path(path))
        except ValueError as exc:
            raise MoLEFileError(str(exc)) from None
        load_official(model, tensors, experts, source)
        return model
    manifest, tensors = read_mole_file(path)
    config = MoLEConfig.from_dict(manifest["config"])
    names = [e["name"] for e in manifest["experts"]]

    injected_here = False
    if has_mole(model):
        state = mole_state(model)
        if sorted(state.expert_names) != sorted(names):
            raise MoLEFileError(
                f"{source} has gates for experts {names}, but the model was injected with {state.expert_names}"
            )
        if (state.config.gating, state.config.global_source) != (config.gating, config.global_source):
            raise MoLEFileError(
                f"{source} uses gating={config.gating.value}/{config.global_source.value}, the model has "
                f"{state.config.gating.value}/{state.config.global_source.value}"
            )
        check_base(model, manifest, source, strict_base)
        ours = {e.name: e.fingerprint for e in state.experts}
        for info in manifest["experts"]:
            if ours[info["name"]] != info["fingerprint"]:
                raise MoLEFileError(
                    f"expert {info['name']!r} in the model differs from the one {source} was trained with "
                    f"(fingerprint {ours[info['name']][:12]} vs {info['fingerprint'][:12]}); inject the original expert"
                )
    else:
        check_base(model, manifest, source, strict_base)
        chosen = _choose_experts(model, manifest, tensors, experts, source)
        inject_mole(model, [chosen[n] for n in names], config, backbone=Backbone(manifest["base_model"]["backbone"]))
        injected_here = True
    try:
        _load_gates(model, manifest, tensors, source)
    except Exception:
        if injected_here:
            remove_mole(model)
        raise
    return model


def _choose_experts(model, manifest, tensors, given, source) -> dict[str, ExpertWeights]:
    given_list = list(given.values()) if isinstance(given, Mapping) else list(given or [])
    given_by_name = {e.name: e for e in given_list}
    names = [e["name"] for e in manifest["experts"]]
    extra = sorted(set(given_by_name) - set(names))
    if extra:
        raise MoLEFileError(f"experts {extra} were passed but {source} has gates only for {names}")
    stored = embedded_experts(manifest, tensors, source)
    chosen = {}
    for info in manifest["experts"]:
        name = info["name"]
        if name in given_by_name:
            ex = given_by_name[name]
            if layers_fingerprint(resolve_layers(ex, model)) != info["fingerprint"]:
                raise MoLEFileError(
                    f"expert {name!r} passed from {ex.source} differs from the one {source} was trained with "
                    f"(fingerprint {info['fingerprint'][:12]}); pass the original expert"
                )
            chosen[name] = ex
        elif name in stored:
            chosen[name] = stored[name]
        else:
            raise MoLEFileError(
                f"expert {name!r} is missing: {source} does not embed it; pass experts=[load_expert(<file>, {name!r})]"
            )
    return chosen


def _load_gates(model: nn.Module, manifest: dict, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    file_names = [e["name"] for e in manifest["experts"]]
    layers = mole_layers(model)
    file_keys = {k for k in tensors if k.startswith("gates.")}
    expected = {}
    for path, layer in layers.items():
        order = [file_names.index(n) for n in layer.expert_names]  # file row of each of the layer's experts
        for pname, p in layer.gates.named_parameters():
            expected[f"gates.{path}.{pname}"] = (p, order)
    missing = sorted(set(expected) - file_keys)
    unexpected = sorted(file_keys - set(expected))
    if missing or unexpected:
        raise MoLEFileError(
            f"{source} does not match the model's MoLE layers: missing keys {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all), unexpected keys {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)} in all)"
        )
    for key, (p, _order) in expected.items():
        t = tensors[key]
        if t.shape != p.shape:
            raise MoLEFileError(f"{source}: {key} has shape {tuple(t.shape)}, the model expects {tuple(p.shape)}")
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise MoLEFileError(f"{source}: {key} holds {bad} NaN/Inf value(s); the file is damaged or came from a "
                                "diverged run: use an earlier checkpoint")  # fmt: skip
    with torch.no_grad():
        for key, (p, order) in expected.items():
            p.copy_(tensors[key][order].to(p.dtype))
