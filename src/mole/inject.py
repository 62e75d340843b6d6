"""Turn a diffusers UNet / DiT into a Mixture of Low-rank Experts, and back.

model = inject_mole(unet, [face, hand], MoLEConfig(gating="both"))
print(model)            # wrapped layers show as MoLELayer(base=Linear(...), experts=[face(r=256), hand(r=256)])
opt = AdamW(gate_parameters(model), lr=1e-5)
remove_mole(model)      # the original modules and requires_grad flags, bit for bit
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import MoLEConfig
from .experts import ExpertLoadError, ExpertWeights, KeyNaming, layers_fingerprint, validate_expert_name
from .formats import FileLayerNotFound, MoLEFileError
from .formats.kohya import sgm_to_diffusers
from .layers import MoLELayer, check_wrappable, layer_dims, mole_layer_for
from .layers.lora import LoraPair
from .targets import (
    FILE_FIX,
    INJECT_TARGETS,
    TARGETS,
    Backbone,
    LayerNotFound,
    compile_targets,
    detect_backbone,
    is_target,
    layer_not_found,
    submodule,
)

logger = logging.getLogger(__name__)


class ExpertLayerNotFound(ExpertLoadError, LayerNotFound):
    """An expert's weights name a layer the model does not have (another base model, or a damaged file)."""


class MoLEInjectError(ValueError):
    """The experts cannot be put into this model as asked; the message names the expert, layer and fix."""


@dataclass
class ExpertInfo:
    name: str
    source: str
    fingerprint: str
    ranks: list[int]
    num_layers: int


@dataclass
class MoLEState:
    """What inject_mole did to a model; kept on the model as ``model.mole_state``."""

    config: MoLEConfig
    backbone: Backbone
    experts: list[ExpertInfo]
    layer_paths: list[str]
    original_requires_grad: dict[str, bool] = field(default_factory=dict, repr=False)

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]


def resolve_layers(expert: ExpertWeights, model: nn.Module) -> dict[str, LoraPair]:
    """Map the expert's layer keys to module paths of `model`; an unknown key raises naming it."""
    modules = dict(model.named_modules())
    if expert.naming is KeyNaming.DOTTED:
        lookup = {k: k for k in modules}
    else:
        lookup = {}
        for path in modules:
            lookup.setdefault(path.replace(".", "_"), path)
        lpb = getattr(getattr(model, "config", None), "layers_per_block", 2)
        lpb = lpb if isinstance(lpb, int) else 2
    out = {}
    for key, pair in expert.layers.items():
        probe = key if expert.naming is KeyNaming.DOTTED else sgm_to_diffusers(key, lpb)
        path = lookup.get(probe)
        if path is None:
            names = list(modules) if expert.naming is KeyNaming.DOTTED else list(lookup)
            what = f"expert {expert.name!r} ({expert.source}): layer"
            raise layer_not_found(key, [n for n in names if n], type(model).__name__, what, FILE_FIX,
                                  ExpertLayerNotFound)  # fmt: skip
        out[path] = pair
    return out


def _as_named(experts: Sequence[ExpertWeights] | Mapping[str, ExpertWeights]) -> list[ExpertWeights]:
    if isinstance(experts, ExpertWeights):
        experts = [experts]
    if isinstance(experts, Mapping):
        out = []
        for key, ex in experts.items():
            if key != ex.name:
                raise MoLEInjectError(f"experts[{key!r}] holds an expert named {ex.name!r}; use the same name")
            out.append(ex)
        experts = out
    experts = list(experts)
    if not experts:
        raise MoLEInjectError("experts is empty; MoLE needs at least one expert (e.g. load_expert(path, 'face'))")
    seen = set()
    for ex in experts:
        if not isinstance(ex, ExpertWeights):
            raise MoLEInjectError(f"experts must be ExpertWeights (see mole.load_expert); got {type(ex).__name__}")
        validate_expert_name(ex.name)
        if ex.name in seen:
            raise MoLEInjectError(f"two experts are named {ex.name!r}; every expert needs its own name")
        seen.add(ex.name)
    return experts


def inject_mole(
    model: nn.Module,
    experts: Sequence[ExpertWeights] | Mapping[str, ExpertWeights] | ExpertWeights,
    config: MoLEConfig | None = None,
    backbone: Backbone | str | None = None,
    seed: int = 0,
) -> nn.Module:
    """Wrap every target layer that any expert covers in a MoLELayer, in place; return the model.

    The gates start from a seeded init, a function of `seed` (the training run's seed) and the layer path only.

    Afterwards only gate parameters require grad. Every expert key must name a target module of the model,
    else nothing is changed and the error names the key.
    """
    config = config or MoLEConfig()
    if has_mole(model):
        raise MoLEInjectError("model already has MoLE layers; call remove_mole(model) before injecting again")
    experts = _as_named(experts)
    # Resolve and validate everything before touching the model (no partial injection).
    resolved = {ex.name: resolve_layers(ex, model) for ex in experts}
    fingerprints = {n: layers_fingerprint(r) for n, r in resolved.items()}  # by module path: kohya, peft copies agree
    backbone = Backbone(backbone) if backbone is not None else detect_backbone(model)
    patterns = config.targets if config.targets is not None else INJECT_TARGETS[backbone]
    compiled = compile_targets(patterns)
    per_layer: dict[str, dict[str, LoraPair]] = {}
    for ex in experts:
        for path, pair in resolved[ex.name].items():
            if not is_target(path, compiled):
                raise MoLEInjectError(
                    f"expert {ex.name!r} has weights for {path!r}, which is not a MoLE target of backbone "
                    f"{backbone.value!r}; pass MoLEConfig(targets=[...]) with a pattern that includes it"
                )
            per_layer.setdefault(path, {})[ex.name] = pair
    modules = dict(model.named_modules())
    for path, pairs in per_layer.items():
        module = modules[path]
        try:
            check_wrappable(module, path)
        except ValueError as exc:
            raise MoLEInjectError(str(exc)) from None
        d_in, d_out = layer_dims(module)
        for name, pair in pairs.items():
            if (pair.in_features, pair.out_features) != (d_in, d_out):
                raise MoLEInjectError(
                    f"expert {name!r} has shape (in {pair.in_features}, out {pair.out_features}) at {path!r}, "
                    f"but the model's layer is (in {d_in}, out {d_out}); the expert was trained for another base model"
                )

    state = MoLEState(
        config=config,
        backbone=backbone,
        experts=[
            ExpertInfo(ex.name, ex.source, fingerprints[ex.name], sorted(ex.ranks), len(ex.layers)) for ex in experts
        ],
        layer_paths=sorted(per_layer),
        original_requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
    )
    names = [ex.name for ex in experts]
    model.requires_grad_(False)
    for path in state.layer_paths:
        parent, attr = _parent(model, path)
        layer = mole_layer_for(modules[path], names, per_layer[path], config, path=path, seed=seed)
        setattr(parent, attr, layer)
    model.mole_state = state
    uncovered = [
        n
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
        and is_target(n, compiled)
        and n.rsplit(".", 1)[-1] != "base"
        and n not in per_layer
    ]
    logger.info(
        "MoLE: wrapped %d layers with experts %s (gating=%s); %d target layers have no expert weights",
        len(state.layer_paths),
        names,
        config.gating.value,
        len(uncovered),
    )
    return model


def remove_mole(model: nn.Module) -> nn.Module:
    """Put every wrapped layer's original module back and restore requires_grad flags; return the model."""
    state = mole_state(model)
    for path, layer in list(mole_layers(model).items()):
        parent, attr = _parent(model, path)
        setattr(parent, attr, layer.base)
    for name, p in model.named_parameters():
        if name in state.original_requires_grad:
            p.requires_grad_(state.original_requires_grad[name])
    del model.mole_state
    return model


def has_mole(model: nn.Module) -> bool:
    return hasattr(model, "mole_state") or any(isinstance(m, MoLELayer) for m in model.modules())


def mole_state(model: nn.Module) -> MoLEState:
    state = getattr(model, "mole_state", None)
    if state is None:
        raise MoLEInjectError(f"{type(model).__name__} has no MoLE layers; call inject_mole(model, experts) first")
    return state


def mole_layers(model: nn.Module) -> dict[str, MoLELayer]:
    """The wrapped layers by module path, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoLELayer)}


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of mixture mode (stage 3): every layer's gates."""
    return [p for layer in mole_layers(model).values() for p in layer.gates.parameters()]


def gate_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """gates.<layer>.<param> -> tensor for every wrapped layer."""
    return {
        f"gates.{path}.{pname}": p.detach()
        for path, layer in mole_layers(model).items()
        for pname, p in layer.gates.named_parameters()
    }


def load_gate_state_dict(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], names: Sequence[str], source: str
) -> None:
    """Copy ``gates.<layer>.<param>`` tensors (rows in the order `names`) into the model's gates, after checking
    that every key is there and no other, every shape fits and every value is finite (else nothing is copied)."""
    file_names = list(names)
    layers = mole_layers(model)
    file_keys = {k for k in tensors if k.startswith("gates.")}
    expected = {}
    for path, layer in layers.items():
        order = [file_names.index(n) for n in layer.expert_names]  # file row of each of the layer's experts
        for pname, p in layer.gates.named_parameters():
            expected[f"gates.{path}.{pname}"] = (p, order)
    missing = sorted(set(expected) - file_keys)
    unexpected = sorted(file_keys - set(expected))
    for key in unexpected:  # a gate at a layer the model lacks: name it and the nearest paths
        layer = key[len("gates.") :].rpartition(".")[0]
        submodule(model, layer, f"{source}: gate key {key!r}: layer", FILE_FIX, FileLayerNotFound)
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


def set_fused(model: nn.Module, fused: bool) -> None:
    """Choose the fused GEMM path (default) or the naive per-expert reference in every layer."""
    for layer in mole_layers(model).values():
        layer.fused = fused


def set_expert_weights(model: nn.Module, weights: Mapping[str, float]) -> None:
    """Multiply each named expert's contribution (on top of its gates); experts not named keep their weight.

    With gating="none" this is fixed-weight LoRA mixing (the paper's stage-2 baseline); weight 0 turns one off.
    """
    state = mole_state(model)
    unknown = sorted(set(weights) - set(state.expert_names))
    if unknown:
        raise MoLEInjectError(f"no expert named {', '.join(unknown)} in this MoLE file; its experts are "
                              f"{', '.join(state.expert_names)} (e.g. --experts {state.expert_names[0]}=1)")
    for layer in mole_layers(model).values():
        for name, w in weights.items():
            layer.expert_weight[layer.expert_names.index(name)] = float(w)


def expert_pairs(model: nn.Module, name: str) -> dict[str, LoraPair]:
    """The named expert's factors in every wrapped layer that has them (module path -> LoraPair)."""
    state = mole_state(model)
    if name not in state.expert_names:
        raise ExpertLoadError(f"model has no expert {name!r}; its experts are {state.expert_names}")
    out = {}
    for path, layer in mole_layers(model).items():
        pair = layer.expert(name)
        if pair is not None:
            out[path] = pair
    return out


def new_expert(
    model: nn.Module,
    name: str,
    rank: int,
    alpha: float | None = None,
    targets: Sequence[str] | None = None,
    seed: int = 0,
) -> ExpertWeights:
    """A fresh expert to train (stage 2): on every target layer, A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (peft's
    default) and B = 0, so the model starts exactly at its base output."""
    from .targets import target_modules

    patterns = tuple(targets) if targets is not None else TARGETS[detect_backbone(model)]
    paths = target_modules(model, patterns)
    if not paths:
        raise MoLEInjectError(f"no target layers found in {type(model).__name__} for patterns {list(patterns)}")
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for path in paths:
        m = model.get_submodule(path)
        conv = isinstance(m, nn.Conv2d)
        d_in, d_out = (m.in_channels, m.out_channels) if conv else (m.in_features, m.out_features)
        bound = 1.0 / d_in**0.5
        down = (torch.rand(rank, d_in, generator=g) * 2 - 1) * bound
        layers[path] = LoraPair(down, torch.zeros(d_out, rank), float(alpha if alpha is not None else rank), conv=conv)
    return ExpertWeights(name, layers, KeyNaming.DOTTED, source="new")


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every wrapped layer's stacked expert factors (lora_A, lora_B), e.g. to train experts (stage 2)."""
    return [p for layer in mole_layers(model).values() for p in (layer.lora_A, layer.lora_B)]


def extract_expert(model: nn.Module, name: str) -> ExpertWeights:
    """The named expert as it is now in the model (e.g. after training), keyed by module path."""
    pairs = {k: LoraPair(p.down.detach().clone(), p.up.detach().clone(), p.alpha, conv=p.conv)
             for k, p in expert_pairs(model, name).items()}  # fmt: skip
    return ExpertWeights(name, pairs, KeyNaming.DOTTED, source="trained")


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (submodule(model, parent_path) if parent_path else model), attr
