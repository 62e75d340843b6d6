"""Named low-rank experts and their loaders.

An expert is a name (face, hand, feet, ...) plus per-layer LoRA factors. It can come from
- a peft / diffusers LoRA safetensors file or folder (``lora_A`` / ``lora_B`` keys, alpha from the adapter config,
  from diffusers' ``lora_adapter_metadata``, or from ``<layer>.alpha`` keys),
- a kohya / A1111 LoRA safetensors file (``lora_unet_*.lora_down.weight`` / ``lora_up.weight`` / ``alpha``),
  the format of the official MoLE experts, including SDXL files with SGM block names (input_blocks, ...),
- an in-memory peft adapter (``expert_from_peft``).
Experts are identified by the name given here, never by a file name.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .formats.kohya_names import sgm_to_diffusers as _sgm_to_diffusers
from .layers.lora import LoraPair

logger = logging.getLogger(__name__)

EXPERT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$")


class ExpertLoadError(ValueError):
    """An expert file or adapter cannot be read as asked; the message names the file, key and fix."""


class KeyNaming(str, enum.Enum):
    DOTTED = "dotted"  # module paths, e.g. down_blocks.0.attentions.0.proj_in
    KOHYA = "kohya"  # flattened names, e.g. down_blocks_0_attentions_0_proj_in (resolved against a model)


@dataclass
class ExpertWeights:
    """One named expert: LoRA factors keyed by layer (dotted module path or kohya flat name)."""

    name: str
    layers: dict[str, LoraPair]
    naming: KeyNaming = KeyNaming.DOTTED
    source: str = "memory"
    skipped: list[str] = field(default_factory=list)  # keys for other components (e.g. text encoder)

    def __post_init__(self) -> None:
        validate_expert_name(self.name)
        if not self.layers:
            raise ExpertLoadError(f"expert {self.name!r} from {self.source} has no LoRA layers for this component")

    @property
    def ranks(self) -> set[int]:
        return {p.rank for p in self.layers.values()}

    def fingerprint(self) -> str:
        return layers_fingerprint(self.layers)


def layers_fingerprint(layers: Mapping[str, LoraPair]) -> str:
    """sha256 over layer keys, shapes, alphas and fp32 values: recognises the same expert later."""
    h = hashlib.sha256()
    for key in sorted(layers):
        p = layers[key]
        h.update(f"{key}|{tuple(p.down.shape)}|{tuple(p.up.shape)}|{p.alpha:.6g}".encode())
        h.update(p.down.detach().float().cpu().contiguous().numpy().tobytes())
        h.update(p.up.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def read_safetensors(path: Path, tensors: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file (tensors=False: the header only, tensors {}); a ValueError says
    why it is unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, ({k: f.get_tensor(k) for k in f.keys()} if tensors else {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from None


def validate_expert_name(name: str) -> None:
    if not isinstance(name, str) or not EXPERT_NAME.match(name):
        raise ExpertLoadError(
            f"expert name {name!r} is not valid; use a short identifier such as 'face' or 'hand' "
            "(letters, digits, '_' or '-', starting with a letter)"
        )


# ---------------------------------------------------------------------------------------------------- files
_PEFT_WEIGHT_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")
_COMPONENT_PREFIXES = ("unet.", "transformer.", "text_encoder.", "text_encoder_2.", "text_encoder_3.")


def load_expert(path: str | Path, name: str, component: str = "unet", adapter: str | None = None) -> ExpertWeights:
    """Load one expert from a LoRA safetensors file, or a folder holding one (peft / diffusers layout).

    component: which model the expert is for ("unet" or "transformer") in prefixed peft / diffusers files; keys of
    other components (text encoders) are skipped and listed in ``ExpertWeights.skipped``.
    adapter: the adapter name when a state dict holds several peft adapters.
    """
    validate_expert_name(name)
    path = Path(path)
    config: dict = {}
    if path.is_dir():
        found = [path / f for f in _PEFT_WEIGHT_FILES if (path / f).is_file()]
        if not found:
            raise ExpertLoadError(
                f"expert {name!r}: folder {path} holds none of {list(_PEFT_WEIGHT_FILES)}; pass the .safetensors file"
            )
        cfg_file = path / "adapter_config.json"
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ExpertLoadError(f"expert {name!r}: {cfg_file} is not valid JSON ({exc})") from None
        path = found[0]
    if not path.is_file():
        raise ExpertLoadError(f"expert {name!r}: file {path} does not exist")
    if path.suffix != ".safetensors":
        raise ExpertLoadError(
            f"expert {name!r}: {path} is not a .safetensors file; convert pickled checkpoints to safetensors "
            "(pickles can run code on load)"
        )
    try:
        metadata, state = read_safetensors(path)
    except ValueError as exc:
        raise ExpertLoadError(f"expert {name!r}: {exc}") from None
    if not config and metadata.get("lora_adapter_metadata"):
        try:
            meta = json.loads(metadata["lora_adapter_metadata"])
        except json.JSONDecodeError as exc:
            raise ExpertLoadError(
                f"expert {name!r}: {path}: metadata 'lora_adapter_metadata' is not JSON ({exc})"
            ) from None
        config = _diffusers_metadata_config(meta, component)
    return expert_from_state_dict(state, name, component=component, adapter=adapter, config=config, source=str(path))


def _diffusers_metadata_config(meta: dict, component: str) -> dict:
    """diffusers stores {'unet.r': .., 'unet.lora_alpha': .., ...}; keep the component's entries."""
    prefix = component + "."
    return {k[len(prefix) :]: v for k, v in meta.items() if k.startswith(prefix)}


def detect_naming(state: Mapping[str, torch.Tensor]) -> KeyNaming:
    keys = list(state)
    if any(".lora_down." in k or k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for k in keys):
        return KeyNaming.KOHYA
    if any(re.search(r"\.(lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down)\b", k) for k in keys):
        return KeyNaming.DOTTED
    sample = keys[:3]
    raise ExpertLoadError(
        f"not a LoRA state dict: no lora_A/lora_B (peft, diffusers) or lora_down/lora_up (kohya) keys; "
        f"first keys are {sample}"
    )


def expert_from_state_dict(
    state: Mapping[str, torch.Tensor],
    name: str,
    component: str = "unet",
    adapter: str | None = None,
    config: Mapping | None = None,
    source: str = "memory",
) -> ExpertWeights:
    """Build an expert from a LoRA state dict in any supported layout (detected from its keys)."""
    naming = detect_naming(state)
    if naming is KeyNaming.KOHYA:
        layers, skipped = _parse_kohya(state, source)
    else:
        layers, skipped = _parse_dotted(state, component, adapter, dict(config or {}), source)
    if skipped:
        logger.warning(
            "expert %r from %s: skipped %d keys of other components (e.g. %s)", name, source, len(skipped), skipped[0]
        )
    return ExpertWeights(name=name, layers=layers, naming=naming, source=source, skipped=skipped)


_DOTTED = re.compile(
    r"^(?P<path>.+?)\.(?P<kind>lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up)"
    r"(?:\.(?P<adapter>[^.]+))?\.weight$"
)


def _parse_dotted(state, component, adapter, config, source):
    if config.get("use_dora"):
        raise ExpertLoadError(f"{source}: DoRA adapters (use_dora=True) are not low-rank experts MoLE can mix")
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
    _check_pairs(downs, ups, source)
    layers = {}
    for layer in downs:
        rank = int(downs[layer].shape[0])
        alpha = alphas.get(layer)
        if alpha is None:
            alpha = _peft_alpha(layer, rank, config)
        layers[layer] = _pair(downs[layer], ups[layer], alpha, source, layer)
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


_KOHYA = re.compile(
    r"^(?P<name>lora_(?P<comp>unet|te\d*|transformer)_[^.]+)\.(?P<kind>lora_down\.weight|lora_up\.weight|alpha)$"
)


def _parse_kohya(state, source):
    downs, ups, alphas, skipped = {}, {}, {}, []
    for key, value in state.items():
        m = _KOHYA.match(key)
        if m is None:
            kind = unsupported_kind(key)
            if kind:
                raise ExpertLoadError(
                    f"{source}: key {key!r} is a {kind} tensor; MoLE mixes plain LoRA / LoCon experts "
                    "(lora_down / lora_up / alpha) only. Convert or merge it first, or use another expert"
                )
            raise ExpertLoadError(
                f"{source}: key {key!r} is not a kohya LoRA key (lora_unet_*.lora_down.weight / lora_up.weight / "
                "alpha)"
            )
        comp = m["comp"]
        if comp not in ("unet", "transformer"):  # kohya names the denoiser lora_unet_ even for DiTs
            skipped.append(key)
            continue
        flat = m["name"][len(f"lora_{comp}_") :]
        {"lora_down.weight": downs, "lora_up.weight": ups, "alpha": alphas}[m["kind"]][flat] = value
    _check_pairs(downs, ups, source)
    layers = {}
    for flat in downs:
        alpha = float(alphas[flat]) if flat in alphas else float(downs[flat].shape[0])
        layers[flat] = _pair(downs[flat], ups[flat], alpha, source, f"lora_unet_{flat}")
    return layers, skipped


# Tensor names of LyCORIS / peft variants that are not a plain low-rank pair, and what they are.
_UNSUPPORTED = (
    (re.compile(r"(^|[._])hada_"), "LoHa (hada_*)"),
    (re.compile(r"(^|[._])lokr_"), "LoKr (lokr_*)"),
    (re.compile(r"(^|[._])dora_scale$"), "DoRA (dora_scale)"),
    (re.compile(r"(^|\.)lora_magnitude_vector\b"), "DoRA (lora_magnitude_vector)"),
    (re.compile(r"\.lora_mid\.weight$"), "LoCon with CP / Tucker decomposition (lora_mid)"),
    (re.compile(r"\.(diff|diff_b)$"), "full weight difference (LyCORIS diff)"),
    (re.compile(r"\.on_input$|\.(ia3_l|ia3)\b"), "IA3"),
    (re.compile(r"\.(a1|a2|b1|b2)\.weight$"), "GLoRA"),
    (re.compile(r"\.oft_|\.oft_blocks$|\.oft_diag$"), "OFT"),
    (re.compile(r"\.boft_"), "BOFT"),
    (re.compile(r"\.(w_norm|b_norm)$"), "norm fine-tune (LyCORIS w_norm / b_norm)"),
)


def unsupported_kind(key: str) -> str | None:
    """The adapter kind a tensor name belongs to when it is a known kind MoLE cannot mix (LoHa, LoKr, DoRA, ...)."""
    for pattern, kind in _UNSUPPORTED:
        if pattern.search(key):
            return kind
    return None


def _pair(down: torch.Tensor, up: torch.Tensor, alpha: float, source: str, key: str) -> LoraPair:
    try:
        return LoraPair(down, up, alpha)
    except ValueError as exc:
        raise ExpertLoadError(f"{source}: layer {key!r}: {exc}") from None


def _check_pairs(downs: Mapping, ups: Mapping, source: str) -> None:
    missing_up = sorted(set(downs) - set(ups))
    missing_down = sorted(set(ups) - set(downs))
    if missing_up or missing_down:
        raise ExpertLoadError(
            f"{source}: incomplete LoRA pairs: layers with A/down but no B/up: {missing_up[:5]}, "
            f"with B/up but no A/down: {missing_down[:5]}"
        )


# ---------------------------------------------------------------------------------------------------- writing
class ExpertFormat(str, enum.Enum):
    DIFFUSERS = "diffusers"  # <component>.<path>.lora_A.weight + lora_adapter_metadata: diffusers load_lora_weights
    KOHYA = "kohya"  # lora_unet_<flat>.lora_down.weight / lora_up.weight / alpha: kohya, A1111, ComfyUI


def save_expert(
    expert: ExpertWeights,
    path: str | Path,
    fmt: ExpertFormat | str = ExpertFormat.DIFFUSERS,
    component: str = "unet",
) -> Path:
    """Write an expert (keyed by module paths) as a LoRA safetensors file that other tools read too.

    DIFFUSERS files carry r / lora_alpha in ``lora_adapter_metadata`` (alpha_pattern where layers differ), so
    ``pipe.load_lora_weights`` and ``load_expert`` both read them. KOHYA files carry a per-layer alpha.
    """
    from safetensors.torch import save_file

    fmt = ExpertFormat(fmt)
    if expert.naming is not KeyNaming.DOTTED:
        raise ExpertLoadError(f"expert {expert.name!r} is keyed by kohya names; inject it and use expert_pairs()")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ExpertLoadError(f"path={str(path)!r} must end in .safetensors")
    sd: dict[str, torch.Tensor] = {}
    metadata = {"format": "pt", "mole_expert": expert.name}
    if fmt is ExpertFormat.KOHYA:
        for key, pair in expert.layers.items():
            down, up = pair.factors_for_file()
            flat = "lora_unet_" + key.replace(".", "_")  # kohya names the denoiser lora_unet_, DiTs included
            sd[f"{flat}.lora_down.weight"], sd[f"{flat}.lora_up.weight"] = down, up
            sd[f"{flat}.alpha"] = torch.tensor(pair.alpha, dtype=torch.float32)
    else:
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
        for key, pair in expert.layers.items():
            down, up = pair.factors_for_file()
            sd[f"{component}.{key}.lora_A.weight"], sd[f"{component}.{key}.lora_B.weight"] = down, up
        metadata["lora_adapter_metadata"] = json.dumps({f"{component}.{k}": v for k, v in config.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


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


# ---------------------------------------------------------------------------------------------------- resolution
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
        probe = key if expert.naming is KeyNaming.DOTTED else _sgm_to_diffusers(key, lpb)
        path = lookup.get(probe)
        if path is None:
            import difflib

            close = difflib.get_close_matches(probe, list(lookup), n=1)
            hint = f"; closest module is {lookup[close[0]]!r}" if close else ""
            raise ExpertLoadError(
                f"expert {expert.name!r} ({expert.source}): layer {key!r} is not a module of this "
                f"{type(model).__name__}{hint}. Was the expert trained for another base model?"
            )
        out[path] = pair
    return out
