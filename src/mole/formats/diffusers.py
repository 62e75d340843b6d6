"""diffusers / peft LoRA files and folders, and peft adapters in memory.

Keys ``<layer>.lora_A.weight`` / ``lora_B.weight`` (peft), ``lora.down`` / ``lora.up`` or
``lora_linear_layer.down`` / ``.up`` (diffusers), optionally under a component prefix (``unet.``, ``transformer.``,
``text_encoder.`` ...) and an adapter name. alpha comes from ``<layer>.alpha`` keys, the folder's
adapter_config.json, or diffusers' ``lora_adapter_metadata``; without any, alpha = rank (scale 1). Written files carry
r / lora_alpha in ``lora_adapter_metadata`` (alpha_pattern where layers differ), so diffusers'
``pipe.load_lora_weights`` reads them too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..experts import ExpertLoadError, ExpertWeights, KeyNaming
from ..layers.lora import LoraPair
from .common import check_pairs, lora_pair, unsupported_kind

_PEFT_WEIGHT_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")
_COMPONENT_PREFIXES = ("unet.", "transformer.", "text_encoder.", "text_encoder_2.", "text_encoder_3.")


# ---------------------------------------------------------------------------------------------------- reading
def find_weights(path: Path, name: str) -> tuple[Path, dict]:
    """(the weights file, the adapter config) of a peft / diffusers LoRA folder."""
    found = [path / f for f in _PEFT_WEIGHT_FILES if (path / f).is_file()]
    if not found:
        raise ExpertLoadError(
            f"expert {name!r}: folder {path} holds none of {', '.join(map(str, _PEFT_WEIGHT_FILES))}; "
            "pass the .safetensors file"
        )
    config: dict = {}
    cfg_file = path / "adapter_config.json"
    if cfg_file.is_file():
        try:
            config = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ExpertLoadError(f"expert {name!r}: {cfg_file} is not valid JSON ({exc})") from None
    return found[0], config


def metadata_config(metadata: Mapping[str, str], component: str, name: str, path: Path) -> dict:
    """The adapter config diffusers stores in a file's ``lora_adapter_metadata`` ({} when there is none)."""
    if not metadata.get("lora_adapter_metadata"):
        return {}
    try:
        meta = json.loads(metadata["lora_adapter_metadata"])
    except json.JSONDecodeError as exc:
        raise ExpertLoadError(
            f"expert {name!r}: {path}: metadata 'lora_adapter_metadata' is not JSON ({exc})"
        ) from None
    return _diffusers_metadata_config(meta, component)


def _diffusers_metadata_config(meta: dict, component: str) -> dict:
    """diffusers stores {'unet.r': .., 'unet.lora_alpha': .., ...}; keep the component's entries."""
    prefix = component + "."
    return {k[len(prefix) :]: v for k, v in meta.items() if k.startswith(prefix)}


def is_dotted(keys) -> bool:
    """True when LoRA state-dict keys are peft's / diffusers' (module paths with lora_A / lora_B, lora.down, ...)."""
    return any(re.search(r"\.(lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down)\b", k) for k in keys)


_DOTTED = re.compile(
    r"^(?P<path>.+?)\.(?P<kind>lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up)"
    r"(?:\.(?P<adapter>[^.]+))?\.weight$"
)


def parse_dotted(state, component, adapter, config, source):
    if config.get("use_dora"):
        raise ExpertLoadError(f"{source}: DoRA adapters (use_dora = true in the adapter config) are not low-rank "
                              "experts MoLE can mix")
    downs: dict[str, dict[str, torch.Tensor]] = {}
    ups: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    skipped = []
    for key, value in state.items():
        path, is_own = _strip_component(key, component)
        if not is_own:
            skipped.append(key)
            continue
        if path.endswith(".alpha"):
            alphas[path[: -len(".alpha")]] = float(value)
            continue
        m = _DOTTED.match(path)
        if m is None:
            kind = unsupported_kind(path)
            what = f"a {kind} tensor, which MoLE cannot mix" if kind else "not a LoRA factor"
            raise ExpertLoadError(
                f"{source}: key {key!r} is {what} (expected <layer>.lora_A.weight / lora_B.weight / alpha)"
            )
        kind = m["kind"]
        bucket = downs if kind in ("lora_A", "lora.down", "lora_linear_layer.down") else ups
        layer = m["path"]
        if layer.endswith(".processor"):  # very old attention-processor layout: ...attn1.processor.to_q_lora
            raise ExpertLoadError(
                f"{source}: key {key!r} uses diffusers' pre-0.20 attention-processor layout; "
                "re-save it with a current diffusers"
            )
        bucket.setdefault(m["adapter"] or "", {})[layer] = value
    names = sorted(set(downs) | set(ups))
    if len(names) > 1 or (adapter is not None and names != [adapter]):
        if adapter is None:
            raise ExpertLoadError(f"{source}: the state dict holds adapters {names}; pass adapter= to pick one")
        if adapter not in names:
            raise ExpertLoadError(f"{source}: adapter {adapter!r} not found; the state dict holds {names}")
    key = adapter if adapter is not None else (names[0] if names else "")
    downs, ups = downs.get(key, {}), ups.get(key, {})
    check_pairs(downs, ups, source)
    layers = {}
    for layer in downs:
        rank = int(downs[layer].shape[0])
        alpha = alphas.get(layer)
        if alpha is None:
            alpha = _peft_alpha(layer, rank, config)
        layers[layer] = lora_pair(downs[layer], ups[layer], alpha, source, layer)
    return layers, skipped


def _strip_component(key: str, component: str) -> tuple[str, bool]:
    if key.startswith("base_model.model."):
        key = key[len("base_model.model.") :]
    for prefix in _COMPONENT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :], prefix == component + "."
    return key, True


def _peft_alpha(layer: str, rank: int, config: Mapping) -> float:
    """alpha for `layer` from a peft LoraConfig dict (alpha_pattern, lora_alpha, use_rslora); else alpha = rank."""
    alpha = None
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", layer):
            alpha = float(value)
            break
    if alpha is None and config.get("lora_alpha") is not None:
        alpha = float(config["lora_alpha"])
    if alpha is None:
        return float(rank)  # diffusers' default when no alpha is stored: scale 1
    if config.get("use_rslora"):  # peft scales by alpha / sqrt(r); express it as alpha' / r
        return alpha * rank**0.5
    return alpha


# ---------------------------------------------------------------------------------------------------- writing
def diffusers_state_dict(expert: ExpertWeights, component: str = "unet") -> tuple[dict[str, torch.Tensor], str]:
    """(tensors, lora_adapter_metadata JSON) of an expert keyed by module paths, in diffusers' layout."""
    ranks = {p.rank for p in expert.layers.values()}
    alphas = {k: p.alpha for k, p in expert.layers.items()}
    common_alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    rank = max(ranks, key=[p.rank for p in expert.layers.values()].count)
    config = {
        "r": rank,
        "lora_alpha": common_alpha,
        "target_modules": sorted(expert.layers),
        "rank_pattern": {k: p.rank for k, p in expert.layers.items() if p.rank != rank},
        "alpha_pattern": {k: a for k, a in alphas.items() if a != common_alpha},
    }
    sd: dict[str, torch.Tensor] = {}
    for key, pair in expert.layers.items():
        down, up = pair.factors_for_file()
        sd[f"{component}.{key}.lora_A.weight"], sd[f"{component}.{key}.lora_B.weight"] = down, up
    return sd, json.dumps({f"{component}.{k}": v for k, v in config.items()})


# ---------------------------------------------------------------------------------------------------- peft in memory
def expert_from_peft(model: nn.Module, adapter_name: str, name: str | None = None) -> ExpertWeights:
    """Copy an adapter out of a model that carries peft LoRA layers (PeftModel or diffusers ``add_adapter``).

    Paths are those of the base layers without peft's wrappers, so the expert can be injected into the plain model
    (e.g. after ``model.delete_adapters(...)`` or ``unload()``).
    """
    name = name or adapter_name
    layers: dict[str, LoraPair] = {}
    for path, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or adapter_name not in lora_a:
            continue
        if getattr(module, "use_dora", {}).get(adapter_name, False):
            raise ExpertLoadError(f"adapter {adapter_name!r} at {path!r} uses DoRA; MoLE mixes plain LoRA experts")
        down = lora_a[adapter_name].weight.detach().clone()
        up = module.lora_B[adapter_name].weight.detach().clone()
        scale = float(module.scaling[adapter_name])
        clean = path[len("base_model.model.") :] if path.startswith("base_model.model.") else path
        layers[clean] = LoraPair(down, up, alpha=scale * down.shape[0])
    if not layers:
        raise ExpertLoadError(f"model has no peft LoRA layers for adapter {adapter_name!r}")
    return ExpertWeights(name=name, layers=layers, naming=KeyNaming.DOTTED, source=f"peft:{adapter_name}")
