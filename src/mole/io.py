"""Save and load MoLE weights: the one orchestrating load, reading top-down.

    save_mole(model, "mole.safetensors")     # gates (+ experts) and a manifest naming the base
    load_mole(model, "mole.safetensors")     # file -> base check -> experts -> inject -> gates
    load_fixed(model, "mole.safetensors")    # the experts alone at fixed weights (no gates)

Each step calls down and never back up: the file formats (mole.formats: the mole file, the paper's gate file,
LoRA files) read tensors and manifests; mole.identity checks the base; mole.inject resolves and injects the
experts; the gates are copied in last. Loading checks everything before it changes the model: a different base
model, a missing or different expert, a missing, extra or wrongly shaped tensor is an error that names it, never a
partial load.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .config import MoLEConfig
from .experts import ExpertWeights
from .formats import MoLEFileError
from .formats.common import read_safetensors
from .formats.kohya import kohya_flat_name
from .formats.mole_file import FORMAT, FORMAT_VERSION, embedded_experts, read_mole_file, write_mole_file
from .formats.official import (
    EXPERTS,
    check_gate_shapes,
    experts_by_name,
    gate_key,
    is_official_gate_file,
    mole_gate_tensors,
    official_config,
    parse_gates,
    resolve_gate_layers,
)
from .identity import base_identity, check_base
from .inject import (
    gate_state_dict,
    has_mole,
    inject_mole,
    load_gate_state_dict,
    mole_layers,
    mole_state,
    remove_mole,
    resolve_layers,
)
from .targets import Backbone
from .version import __version__

logger = logging.getLogger(__name__)

__all__ = ["build_manifest", "check_base", "embedded_experts", "gate_state_dict", "load_mole", "load_official",
           "read_mole_file", "save_mole"]  # fmt: skip


# ---------------------------------------------------------------------------------------------------- save
def _versions() -> dict[str, str]:
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
        "base_model": base_identity(model, state.layer_paths, state.backbone.value, base_model),
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
    write_mole_file(path, tensors, manifest)
    logger.info("saved MoLE weights (%d tensors, experts embedded: %s) to %s", len(tensors), include_experts, path)
    return path


# ---------------------------------------------------------------------------------------------------- load
def load_mole(
    model: nn.Module,
    path: str | Path,
    experts: Sequence[ExpertWeights] | Mapping[str, ExpertWeights] | None = None,
    strict_base: bool = True,
    *,
    gates: bool = True,
    replace: bool = False,
) -> nn.Module:
    """Load a MoLE file into `model` (a plain model: it is injected; an injected one: its gates are replaced).

    experts: experts to use instead of (or, when the file does not embed them, in place of) the embedded ones;
    each must be the expert the gates were trained with (same fingerprint).
    gates=False: the experts alone, without the file's gates (gating="none", every expert at weight 1: fixed-weight
    LoRA mixing, the paper's stage-2 baseline); any passed expert replaces the embedded one of its name.
    replace=True: MoLE layers the model already has are removed (once the file passed every check) and the file's
    experts injected, instead of keeping the model's experts and replacing their gates.

    The paper's released gate files (JiePKU/MoLE, recognised by their ``moe_lora_unet_*.softmoe.*`` keys) load too:
    pass experts=[face, hand] (matched by name); the model gets the official layer (global_source=expert_output).
    They carry no base-model identity, so strict_base does not apply to them.
    """
    source = str(path)
    if Path(path).is_file() and is_official_gate_file(path):
        if gates:
            load_official(model, _read(Path(path)), experts, source, replace=replace)
            return model
        chosen = experts_by_name(experts, source)  # the paper's release: the experts come as files, by name
        if replace and has_mole(model):
            remove_mole(model)
        inject_mole(model, [chosen[n] for n in EXPERTS], MoLEConfig(gating="none"))
        return model
    manifest, tensors = read_mole_file(path)
    names = [e["name"] for e in manifest["experts"]]
    backbone = Backbone(manifest["base_model"]["backbone"])
    if not gates:
        check_base(model, manifest, source, strict_base)
        chosen = _fixed_experts(manifest, tensors, experts, source, model)
        if replace and has_mole(model):
            remove_mole(model)
        inject_mole(model, list(chosen.values()), MoLEConfig(gating="none"), backbone=backbone)
        return model
    config = MoLEConfig.from_dict(manifest["config"])
    if has_mole(model) and not replace:  # keep the model's experts (they must be the file's) and load the gates
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
        load_gate_state_dict(model, tensors, names, source)
        return model
    check_base(model, manifest, source, strict_base)
    chosen, passed = _choose_experts(manifest, tensors, experts, source, model)
    if replace and has_mole(model):
        remove_mole(model)
    inject_mole(model, [chosen[n] for n in names], config, backbone=backbone)
    try:  # the passed experts must be those the gates were trained with: their fingerprints as injected (by path)
        injected = {e.name: e.fingerprint for e in mole_state(model).experts}
        for info in manifest["experts"]:
            ex = chosen[info["name"]]
            if ex.name in passed and injected[ex.name] != info["fingerprint"]:
                raise MoLEFileError(
                    f"expert {ex.name!r} passed from {ex.source} differs from the one {source} was trained with "
                    f"(fingerprint {info['fingerprint'][:12]}); pass the original expert"
                )
        load_gate_state_dict(model, tensors, names, source)
    except Exception:
        remove_mole(model)
        raise
    return model


def _choose_experts(manifest: dict, tensors: Mapping[str, torch.Tensor], given, source: str,
                    model: nn.Module) -> tuple[dict, set]:  # fmt: skip
    """The expert of each name the file gates: the one passed, else the one the file embeds; and the passed names."""
    given_list = list(given.values()) if isinstance(given, Mapping) else list(given or [])
    given_by_name = {e.name: e for e in given_list}
    names = [e["name"] for e in manifest["experts"]]
    extra = sorted(set(given_by_name) - set(names))
    if extra:
        raise MoLEFileError(f"experts {extra} were passed but {source} has gates only for {names}")
    stored = embedded_experts(manifest, tensors, source, model)
    chosen = {}
    for name in names:
        if name in given_by_name:
            chosen[name] = given_by_name[name]
        elif name in stored:
            chosen[name] = stored[name]
        else:
            raise MoLEFileError(
                f"expert {name!r} is missing: {source} does not embed it; pass experts=[load_expert(<file>, {name!r})]"
            )
    return chosen, set(given_by_name)


def _fixed_experts(manifest: dict, tensors: Mapping[str, torch.Tensor], given, source: str, model: nn.Module) -> dict:
    """The experts for fixed-weight mixing: the embedded ones, each replaced by a passed expert of its name."""
    given = list(given.values()) if isinstance(given, Mapping) else list(given or [])
    chosen = embedded_experts(manifest, tensors, source, model)
    names = [e["name"] for e in manifest["experts"]]
    unknown = sorted({e.name for e in given} - set(names))
    if unknown:
        raise MoLEFileError(f"experts {unknown} were passed but {source} has experts {names}")
    chosen.update({e.name: e for e in given})
    missing = [n for n in names if n not in chosen]
    if missing:
        raise MoLEFileError(
            f"{source} does not embed experts {missing}; pass them as expert_files={{name: file}} (--expert)"
        )
    return chosen


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        return read_safetensors(path)[1]
    except ValueError as exc:
        raise MoLEFileError(str(exc)) from None


# ---------------------------------------------------------------------------------------------------- the paper's files
def load_official(
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    experts: Sequence[ExpertWeights] | Mapping[str, ExpertWeights] | None,
    source: str,
    replace: bool = False,
) -> dict[str, str]:
    """Inject the face and hand experts into `model` with the official file's gates; return {module path: kohya
    flat name} of the gated layers. Everything is checked before the model changes (replace=True: MoLE layers the
    model has are then removed; else they are an error)."""
    if has_mole(model) and not replace:
        raise MoLEFileError(f"{source}: the model already has MoLE layers; call remove_mole(model) first")
    gates = parse_gates(tensors, source)
    chosen = experts_by_name(experts, source)
    covered = {name: resolve_layers(chosen[name], model) for name in EXPERTS}
    paths = resolve_gate_layers(gates, model, source)
    check_gate_shapes(gates, paths, model, source)
    flat_of = {p: f for f, p in paths.items()}
    for name in EXPERTS:
        extra = sorted(set(covered[name]) - set(flat_of))
        if extra:
            raise MoLEFileError(
                f"expert {name!r} ({chosen[name].source}) has weights for {extra[0]!r}"
                f"{f' and {len(extra) - 1} more layers' if len(extra) > 1 else ''}, but {source} has no gates there "
                f"(key {gate_key(kohya_flat_name(extra[0], model), 'Phi_1.weight')!r} is missing); pass the expert "
                "the gates were trained with"
            )
        missing = sorted(set(flat_of) - set(covered[name]))
        if missing:
            raise MoLEFileError(
                f"{source} has gates for {missing[0]!r} (key {gate_key(flat_of[missing[0]], 'Phi_1.weight')!r})"
                f"{f' and {len(missing) - 1} more layers' if len(missing) > 1 else ''}, but expert {name!r} "
                f"({chosen[name].source}) has no weights there; pass the expert the gates were trained with"
            )
    ours = mole_gate_tensors(gates, paths)
    if replace and has_mole(model):
        remove_mole(model)
    inject_mole(model, [chosen[n] for n in EXPERTS], official_config())
    load_gate_state_dict(model, ours, EXPERTS, source)
    logger.info("loaded the official MoLE gate file %s: %d gated layers", source, len(paths))
    return flat_of
