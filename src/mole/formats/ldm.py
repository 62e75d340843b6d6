"""diffusers pipelines -> original-layout single-file checkpoints (the CompVis / Stability layout civitai files use).

The inverse of diffusers' single-file conversion, for any UNet2DConditionModel / AutoencoderKL / CLIP text encoder
layout (tiny test models included): SD1.x (CLIP-L under cond_stage_model.transformer), SD2.x (OpenCLIP under
cond_stage_model.model, fused in_proj) and SDXL (conditioner.embedders.0 / .1, label_emb for the added conditions).

    save_single_file(pipe, "model.safetensors")   # loads back with mole.single_file / from_single_file
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..targets import Backbone, detect_backbone

UNET = "model.diffusion_model."
VAE = "first_stage_model."
_RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
           ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."),
           ("conv_shortcut.", "skip_connection."))  # fmt: skip


def _rename(key: str, prefixes: list[tuple[str, str, tuple]]) -> str:
    for new, old, inner in prefixes:
        if key.startswith(new):
            rest = key[len(new) :]
            for a, b in inner:
                if rest.startswith(a):
                    rest = b + rest[len(a) :]
                    break
            return old + rest
    raise KeyError(key)


def unet_to_original(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A UNet2DConditionModel state dict in the original (openaimodel) layout, without the model. prefix."""
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ValueError(f"layers_per_block={lpb!r}: only one value for every block has an original layout")
    n = len(config["block_out_channels"])
    pairs: list[tuple[str, str, tuple]] = [
        ("time_embedding.linear_1.", "time_embed.0.", ()), ("time_embedding.linear_2.", "time_embed.2.", ()),
        ("add_embedding.linear_1.", "label_emb.0.0.", ()), ("add_embedding.linear_2.", "label_emb.0.2.", ()),
        ("conv_in.", "input_blocks.0.0.", ()), ("conv_norm_out.", "out.0.", ()), ("conv_out.", "out.2.", ()),
        ("mid_block.resnets.0.", "middle_block.0.", _RESNET), ("mid_block.attentions.0.", "middle_block.1.", ()),
        ("mid_block.resnets.1.", "middle_block.2.", _RESNET),
    ]  # fmt: skip
    for i in range(n):
        for j in range(lpb):
            idx = 1 + i * (lpb + 1) + j
            pairs += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{idx}.0.", _RESNET),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{idx}.1.", ())]  # fmt: skip
        pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{1 + i * (lpb + 1) + lpb}.0.op.", ()))
        has_attn = any(k.startswith(f"up_blocks.{i}.attentions.") for k in state)
        for j in range(lpb + 1):
            idx = i * (lpb + 1) + j
            pairs += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{idx}.0.", _RESNET),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{idx}.1.", ())]  # fmt: skip
        pairs.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{i * (lpb + 1) + lpb}."
                      f"{2 if has_attn else 1}.conv.", ()))  # fmt: skip
    pairs.sort(key=lambda p: -len(p[0]))  # down_blocks.1.resnets.1 before down_blocks.1.resnets.1x
    return {_rename(k, pairs): v for k, v in state.items()}


def vae_to_original(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    n = len(config["block_out_channels"])
    attn = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))
    res = (("conv_shortcut.", "nin_shortcut."),)
    pairs: list[tuple[str, str, tuple]] = []
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_norm_out.", f"{part}.norm_out.", ()),
                  (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", res),
                  (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", res),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", attn),
                  (f"{part}.conv_in.", f"{part}.conv_in.", ()),
                  (f"{part}.conv_out.", f"{part}.conv_out.", ())]  # fmt: skip
    for i in range(n):
        pairs += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.", ()),
                  (f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", ()),
                  (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block.", ()),
                  (f"decoder.up_blocks.{i}.upsamplers.0.conv.",
                   f"decoder.up.{n - 1 - i}.upsample.conv.", ())]  # fmt: skip
    pairs += [("quant_conv.", "quant_conv.", ()), ("post_quant_conv.", "post_quant_conv.", ())]
    pairs.sort(key=lambda p: -len(p[0]))
    out = {}
    for k, v in state.items():
        new = _rename(k, pairs).replace("conv_shortcut.", "nin_shortcut.")
        if ".mid.attn_1." in new and new.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # the original attention projections are 1x1 convs
        out[new] = v
    return out


def _flat_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP text state dict with the text_model. level (newer transformers flatten CLIPTextModel)."""
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in state.items()}


def clip_to_original(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """An OpenAI CLIP text tower (SD1.x, SDXL's first encoder): the transformers keys under `prefix`."""
    return {prefix + k: v for k, v in _flat_clip(state).items() if not k.endswith("position_ids")}


def open_clip_to_original(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower (SD2.x, SDXL's second encoder): resblocks with fused in_proj, text_projection (d, e)."""
    state = {k.removeprefix("text_model."): v for k, v in _flat_clip(state).items() if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {}
    simple = {"embeddings.token_embedding.weight": "token_embedding.weight",
              "embeddings.position_embedding.weight": "positional_embedding",
              "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}  # fmt: skip
    layer_names = (("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
                   ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))  # fmt: skip
    for k, v in state.items():
        if k in simple:
            out[prefix + simple[k]] = v
        elif k == "text_projection.weight":
            out[prefix + "text_projection"] = v.T.contiguous()
        elif k.startswith("encoder.layers."):
            _, _, i, rest = k.split(".", 3)
            base = f"{prefix}transformer.resblocks.{i}."
            if rest.startswith("self_attn.q_proj."):
                kind = rest.rsplit(".", 1)[1]
                parts = [state[f"encoder.layers.{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                out[base + f"attn.in_proj_{kind}"] = torch.cat(parts)
            elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                continue
            else:
                for a, b in layer_names:
                    if rest.startswith(a):
                        out[base + b + rest[len(a) :]] = v
                        break
                else:
                    raise KeyError(k)
        else:
            raise KeyError(k)
    return out


def pipeline_to_original(pipe) -> dict[str, torch.Tensor]:
    """SD1.x / SD2.x / SDXL pipeline -> one original-layout state dict (what a civitai .safetensors holds)."""
    unet, vae = pipe.unet, pipe.vae
    out = {UNET + k: v for k, v in unet_to_original(unet.state_dict(), unet.config).items()}
    out.update({VAE + k: v for k, v in vae_to_original(vae.state_dict(), vae.config).items()})
    te2 = getattr(pipe, "text_encoder_2", None)
    if te2 is not None:  # SDXL
        out.update(clip_to_original(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
        out.update(open_clip_to_original(te2.state_dict(), "conditioner.embedders.1.model."))
    elif detect_backbone(unet) is Backbone.SD21:  # OpenCLIP
        out.update(open_clip_to_original(pipe.text_encoder.state_dict(), "cond_stage_model.model."))
    else:  # OpenAI CLIP: SD1.x
        out.update(clip_to_original(pipe.text_encoder.state_dict(), "cond_stage_model.transformer."))
    return {k: v.detach().contiguous() for k, v in out.items()}


def save_single_file(pipe, path: str | Path) -> Path:
    """Write the pipeline's UNet, VAE and text encoders as one original-layout .safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(pipeline_to_original(pipe), str(path))
    return path
