"""kohya / A1111 / ComfyUI LoRA files, and kohya's flattened module names against diffusers' module paths.

A kohya LoRA file holds ``lora_unet_<flat>.lora_down.weight`` / ``lora_up.weight`` / ``alpha`` per layer (the format
of the official MoLE experts); ``lora_te*_`` keys (text encoders) are skipped. kohya names every wrapped module by its
path with '.' replaced by '_'. For SD1.5 / SD2.1 the path is diffusers' own (``down_blocks_0_attentions_0_proj_in``);
for SDXL, kohya's UNet uses the original SGM layout (``input_blocks_4_1_transformer_blocks_0_attn1_to_q``,
``input_blocks_1_0_in_layers_2``, ``middle_block_0_...``, ``output_blocks_2_2_conv``). Both directions are here, for
attention blocks, resnets and down/upsamplers.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..experts import ExpertLoadError, ExpertWeights
from ..targets import Backbone, detect_backbone
from .common import check_pairs, lora_pair, unsupported_kind

# ---------------------------------------------------------------------------------------------------- module names
_SGM_BLOCK = re.compile(r"^(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)$")
_SGM_MID = re.compile(r"^middle_block_(\d+)_(.+)$")
# SGM ResBlock submodules -> diffusers ResnetBlock2D attributes
_SGM_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
               "skip_connection": "conv_shortcut"}  # fmt: skip
_RESNET_SGM = {v: k for k, v in _SGM_RESNET.items()}


def sgm_to_diffusers(flat: str, layers_per_block: int) -> str:
    """Map a kohya SDXL name in SGM layout to diffusers' flattened name (names in no SGM block pass through)."""
    per = layers_per_block + 1  # down blocks: layers plus the downsampler; up blocks: layers_per_block + 1 layers
    if m := _SGM_BLOCK.match(flat):
        kind, n, sub, rest = m[1], int(m[2]), int(m[3]), m[4]
        if kind == "input_blocks":
            if n == 0:
                return flat  # conv_in
            block, j = divmod(n - 1, per)
            side = "down_blocks"
            if j == layers_per_block:  # the downsampler's slot
                return f"down_blocks_{block}_downsamplers_0_conv" if (sub, rest) == (0, "op") else flat
        else:
            block, j = divmod(n, per)
            side = "up_blocks"
            if sub > 0 and rest == "conv":  # the upsampler follows the resnet (and the attention, if any)
                return f"up_blocks_{block}_upsamplers_0_conv"
        if sub == 0:
            r = _SGM_RESNET.get(rest)
            return f"{side}_{block}_resnets_{j}_{r}" if r else flat
        if sub == 1:
            return f"{side}_{block}_attentions_{j}_{rest}"
        return flat
    if m := _SGM_MID.match(flat):
        sub, rest = int(m[1]), m[2]
        if sub == 1:
            return "mid_block_attentions_0_" + rest
        r = _SGM_RESNET.get(rest)
        return f"mid_block_resnets_{sub // 2}_{r}" if r and sub in (0, 2) else flat
    return flat


_DIFF_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$")
_DIFF_SAMPLER = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(downsamplers|upsamplers)\.0\.conv$")
_DIFF_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def diffusers_to_sgm(path: str, model: nn.Module) -> str:
    """kohya's SGM flat name of a diffusers module path of an SDXL-like UNet (the inverse of sgm_to_diffusers)."""
    lpb = _layers_per_block(model)
    per = lpb + 1

    def resnet(rest: str) -> str:
        name = _RESNET_SGM.get(rest)
        if name is None:
            raise ValueError(f"module {path!r}: resnet submodule {rest!r} has no SGM name")
        return name

    if m := _DIFF_BLOCK.match(path):
        side, block, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        n = 1 + block * per + j if side == "down_blocks" else block * per + j
        stem = "input_blocks" if side == "down_blocks" else "output_blocks"
        if kind == "resnets":
            return f"{stem}_{n}_0_{resnet(rest)}"
        return f"{stem}_{n}_1_" + rest.replace(".", "_")
    if m := _DIFF_SAMPLER.match(path):
        block = int(m[2])
        if m[1] == "down_blocks":
            return f"input_blocks_{1 + block * per + lpb}_0_op"
        has_attention = getattr(model.up_blocks[block], "attentions", None) is not None
        return f"output_blocks_{block * per + lpb}_{2 if has_attention else 1}_conv"
    if m := _DIFF_MID.match(path):
        kind, k, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return "middle_block_1_" + rest.replace(".", "_")
        return f"middle_block_{2 * k}_{resnet(rest)}"
    return path.replace(".", "_")


def _layers_per_block(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    lpb = config.get("layers_per_block") if isinstance(config, dict) else getattr(config, "layers_per_block", None)
    return lpb if isinstance(lpb, int) else 2


def uses_sgm_names(model: nn.Module) -> bool:
    """kohya names SDXL UNets (text_time conditioning) in the SGM layout, every other model by diffusers' paths."""
    return detect_backbone(model) is Backbone.SDXL


def kohya_lookup(model: nn.Module) -> dict[str, str]:
    """kohya flat name -> module path for every module of `model`, SGM names included. Reading accepts both layouts
    for every model, as expert files are read (resolve_layers): SDXL files use SGM names, other UNets diffusers'."""
    lookup: dict[str, str] = {}
    for path, _ in model.named_modules():
        lookup.setdefault(path.replace(".", "_"), path)
    for path, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            try:
                lookup.setdefault(diffusers_to_sgm(path, model), path)
            except ValueError:
                continue
    return lookup


def kohya_flat_name(path: str, model: nn.Module) -> str:
    """The flat name kohya gives the module at `path` (SGM layout for SDXL)."""
    return diffusers_to_sgm(path, model) if uses_sgm_names(model) else path.replace(".", "_")


# ---------------------------------------------------------------------------------------------------- reading
_KOHYA = re.compile(
    r"^(?P<name>lora_(?P<comp>unet|te\d*|transformer)_[^.]+)\.(?P<kind>lora_down\.weight|lora_up\.weight|alpha)$"
)


def is_kohya(keys) -> bool:
    """True when LoRA state-dict keys are kohya's (lora_unet_* / lora_te* / lora_transformer_*, lora_down)."""
    return any(".lora_down." in k or k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for k in keys)


def parse_kohya(state, source):
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
    check_pairs(downs, ups, source)
    layers = {}
    for flat in downs:
        alpha = float(alphas[flat]) if flat in alphas else float(downs[flat].shape[0])
        layers[flat] = lora_pair(downs[flat], ups[flat], alpha, source, f"lora_unet_{flat}")
    return layers, skipped


# ---------------------------------------------------------------------------------------------------- writing
def kohya_state_dict(expert: ExpertWeights) -> dict[str, torch.Tensor]:
    """An expert keyed by module paths as kohya's tensors (a per-layer alpha); the denoiser is lora_unet_, DiTs too."""
    sd: dict[str, torch.Tensor] = {}
    for key, pair in expert.layers.items():
        down, up = pair.factors_for_file()
        flat = "lora_unet_" + key.replace(".", "_")  # kohya names the denoiser lora_unet_, DiTs included
        sd[f"{flat}.lora_down.weight"], sd[f"{flat}.lora_up.weight"] = down, up
        sd[f"{flat}.alpha"] = torch.tensor(pair.alpha, dtype=torch.float32)
    return sd
