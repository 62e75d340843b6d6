"""Tiny, randomly initialised backbones with the real diffusers architectures, and random experts for them.

They are the embedded default of the demo and the fixtures of the tests: built from configs, no download.
"""

from __future__ import annotations

import torch
from torch import nn

from .experts import ExpertWeights, KeyNaming
from .layers.lora import LoraPair
from .targets import TARGETS, Backbone, detect_backbone, target_modules


def tiny_unet(kind: Backbone | str = Backbone.SD15, seed: int = 0) -> nn.Module:
    """A UNet2DConditionModel shaped like SD1.5 (conv proj_in/out), SD2.1 (linear projections) or SDXL."""
    from diffusers import UNet2DConditionModel

    kind = Backbone(kind)
    common = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    )
    torch.manual_seed(seed)
    if kind is Backbone.SD15:
        return UNet2DConditionModel(**common, cross_attention_dim=32)
    if kind is Backbone.SD21:
        return UNet2DConditionModel(**common, cross_attention_dim=48, use_linear_projection=True)
    if kind is Backbone.SDXL:
        return UNet2DConditionModel(
            **{
                **common,
                "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            },
            cross_attention_dim=64,
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
        )
    raise ValueError(f"kind={kind.value!r}: tiny_unet builds sd15, sd21 or sdxl; use tiny_pixart for a DiT")


def tiny_pixart(seed: int = 0) -> nn.Module:
    """A PixArtTransformer2DModel (PixArt-alpha architecture) with 2 blocks."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=16,
        caption_channels=32,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )


def unet_inputs(model: nn.Module, batch: int = 2, hw: tuple[int, int] = (16, 16), seed: int = 0) -> dict:
    """Random (sample, timestep, encoder_hidden_states, ...) for a tiny backbone; non-square hw is fine."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    dtype = next(model.parameters()).dtype
    if type(model).__name__ == "PixArtTransformer2DModel":
        return {
            "hidden_states": torch.randn(batch, cfg.in_channels, *hw, generator=g).to(dtype),
            "encoder_hidden_states": torch.randn(batch, 6, cfg.caption_channels, generator=g).to(dtype),
            "timestep": torch.tensor([500] * batch),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }
    inputs = {
        "sample": torch.randn(batch, cfg.in_channels, *hw, generator=g).to(dtype),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, 7, cfg.cross_attention_dim, generator=g).to(dtype),
    }
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_dim, generator=g).to(dtype),
            "time_ids": torch.tensor([[hw[0] * 8, hw[1] * 8, 0, 0, hw[0] * 8, hw[1] * 8]] * batch, dtype=dtype),
        }
    return inputs


def random_expert(
    model: nn.Module,
    name: str,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    std: float = 0.02,
    kohya: bool = False,
    paths: list[str] | None = None,
) -> ExpertWeights:
    """An expert with random A and B (std `std`) on every target layer of `model` (or on `paths`).

    kohya=True keys it by kohya's flattened names, as a kohya file would.
    """
    g = torch.Generator().manual_seed(seed)
    paths = paths if paths is not None else target_modules(model, TARGETS[detect_backbone(model)])
    layers = {}
    for path in paths:
        m = model.get_submodule(path)
        d_in = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
        d_out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        key = path.replace(".", "_") if kohya else path
        layers[key] = LoraPair(
            torch.randn(rank, d_in, generator=g) * std,
            torch.randn(d_out, rank, generator=g) * std,
            alpha if alpha is not None else float(rank),
            conv=isinstance(m, nn.Conv2d),
        )
    return ExpertWeights(name, layers, KeyNaming.KOHYA if kohya else KeyNaming.DOTTED, source=f"random:{seed}")
