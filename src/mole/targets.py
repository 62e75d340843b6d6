"""Which layers of each backbone MoLE may wrap, and how to tell the backbones apart.

Module paths are diffusers' (e.g. ``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k``).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence

from torch import nn


class Backbone(str, enum.Enum):
    SD15 = "sd15"  # UNet2DConditionModel, conv proj_in/proj_out
    SD21 = "sd21"  # UNet2DConditionModel, linear projections (use_linear_projection=True)
    SDXL = "sdxl"  # UNet2DConditionModel with text_time added conditioning
    PIXART = "pixart"  # PixArtTransformer2DModel (PixArt-alpha / sigma), a DiT
    FLUX = "flux"  # FluxTransformer2DModel (FLUX.1 dev / schnell / Kontext): 19 double + 38 single blocks
    GENERIC = "generic"  # any other model: every attention / feed-forward Linear inside a transformer block


# Spatial transformers of the SD UNets: attention q/k/v/out, both feed-forward Linears, proj_in/proj_out.
_UNET_TRANSFORMER = (
    r"^(?:down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\."
    r"(?:proj_in|proj_out|transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.(?:0\.proj|2)))$"
)
# DiT blocks (PixArt-alpha, DiT): self/cross attention and the feed-forward.
_DIT_BLOCKS = r"^transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.(?:0\.proj|2))$"
# Flux: InstructMoLE's official targets, the double blocks' feed-forward output and the single blocks' proj_out.
_FLUX = (r"^transformer_blocks\.\d+\.ff\.net\.2$", r"^single_transformer_blocks\.\d+\.proj_out$")
# Anything attention- or MLP-like inside a block list (fits SD3 / Flux joint and single blocks).
_GENERIC = (
    r"(?:^|\.)(?:transformer_blocks|single_transformer_blocks|blocks)\.\d+\..*"
    r"(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|proj_mlp|proj_out|ff\.net\.(?:0\.proj|2)"
    r"|ff_context\.net\.(?:0\.proj|2))$"
)

TARGETS: dict[Backbone, tuple[str, ...]] = {
    Backbone.SD15: (_UNET_TRANSFORMER,),
    Backbone.SD21: (_UNET_TRANSFORMER,),
    Backbone.SDXL: (_UNET_TRANSFORMER,),
    Backbone.PIXART: (_DIT_BLOCKS,),
    Backbone.FLUX: _FLUX,
    Backbone.GENERIC: (_GENERIC,),
}


# The resnet and down/upsampler layers of the SD UNets: what kohya LoCon files (conv_dim set) add to the transformer
# layers (kohya wraps every Linear / Conv2d inside ResnetBlock2D, Downsample2D and Upsample2D).
_UNET_CONV = (
    r"^(?:(?:down_blocks\.\d+|up_blocks\.\d+|mid_block)\.resnets\.\d+\.(?:conv1|conv2|conv_shortcut|time_emb_proj)"
    r"|down_blocks\.\d+\.downsamplers\.0\.conv|up_blocks\.\d+\.upsamplers\.0\.conv)$"
)

# What inject_mole accepts expert weights for by default: the backbone's table, plus the LoCon layers of UNets.
# (Fresh experts, new_expert(), cover TARGETS only.)
INJECT_TARGETS: dict[Backbone, tuple[str, ...]] = {
    b: (*t, _UNET_CONV) if b in (Backbone.SD15, Backbone.SD21, Backbone.SDXL) else t for b, t in TARGETS.items()
}


def detect_backbone(model: nn.Module) -> Backbone:
    """Name the backbone from the model class and its config (works for tiny test configs too)."""
    cls = type(model).__name__
    get = lambda key: _config_value(model, key)  # noqa: E731
    if cls == "UNet2DConditionModel":
        if get("addition_embed_type") == "text_time":
            return Backbone.SDXL
        return Backbone.SD21 if get("use_linear_projection") else Backbone.SD15
    if cls in ("PixArtTransformer2DModel", "DiTTransformer2DModel"):
        return Backbone.PIXART
    if cls == "FluxTransformer2DModel":
        return Backbone.FLUX
    return Backbone.GENERIC


def _config_value(model: nn.Module, key: str) -> object:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if isinstance(config, dict):  # diffusers' FrozenDict
        return config.get(key)
    return getattr(config, key, None)


def compile_targets(patterns: tuple[str, ...]) -> list[re.Pattern[str]]:
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as exc:
            raise ValueError(f"targets pattern {p!r} is not a valid regular expression: {exc}") from None
    return compiled


def is_target(path: str, patterns: list[re.Pattern[str]]) -> bool:
    return any(p.search(path) for p in patterns)


def target_modules(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Paths of the Linear / Conv2d modules of `model` the patterns select (the layers an expert may cover)."""
    compiled = compile_targets(patterns)
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and is_target(n, compiled)]


class LayerNotFound(LookupError):
    """A module path from a file or a setting that the model does not have (a user error, not a bug)."""


FILE_FIX = "the file was made for another base model (pass the --base it was trained on) or is damaged"


def nearest_paths(path: str, names: Sequence[str], n: int = 3) -> list[str]:
    """The module paths among `names` closest to `path` (difflib), best first."""
    import difflib

    return difflib.get_close_matches(path, list(names), n=n, cutoff=0.6)


def layer_not_found(
    path: str, names: Sequence[str], where: str, what: str = "layer", fix: str | None = None, cls=LayerNotFound
) -> LayerNotFound:
    """The one wording of a module path that is not among `names` (the paths `where` has), with the nearest ones."""
    near = nearest_paths(path, names)
    hint = f"nearest: {', '.join(near)}" if near else f"it has e.g. {', '.join(list(names)[:3])}"
    fix = fix or "the file or setting was made for another base model, or the name is misspelt"
    return cls(f"{what} {path!r} is not a module of {where} ({hint}); {fix}")


def submodule(
    model: nn.Module, path: str, what: str = "layer", fix: str | None = None, cls=LayerNotFound
) -> nn.Module:
    """model.get_submodule(path), but a path the model lacks (from a MoLE / LoRA file, a manifest, a setting) raises
    LayerNotFound naming the path and the nearest module paths the model has, instead of torch's
    "<Model> has no attribute `x`"."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise layer_not_found(path, names, type(model).__name__, what, fix, cls) from None
