"""Tiny, randomly initialised backbones with the real diffusers architectures, and random experts for them.

They are the embedded default of the demo and the fixtures of the tests: built from configs, no download.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------------- pipelines
def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte-to-character table (the 256 symbols CLIP's BPE starts from)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_clip_tokenizer(folder: str | Path | None = None):
    """A character-level CLIPTokenizer (514 tokens, no merges) built in place: the embedded default needs no files.

    With `folder` holding vocab.json + merges.txt (e.g. ../shared/assets/clip_tokenizer), that tokenizer is loaded.
    """
    from transformers import CLIPTokenizer

    if folder is not None:
        folder = Path(folder)
        return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"), model_max_length=77)


def _tiny_clip_text(hidden: int, vocab: int, with_projection: bool = False, projection_dim: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )
    return CLIPTextModelWithProjection(cfg) if with_projection else CLIPTextModel(cfg)


def tiny_vae(seed: int = 0):
    """An AutoencoderKL with 4 latent channels and a downsampling factor of 2 (32 px images -> 16x16 latents)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=32,
    )


def tiny_pipeline(kind: Backbone | str = Backbone.SD15, tokenizer=None, seed: int = 0):
    """A complete tiny diffusers pipeline (SD1.5, SD2.1 with v-prediction, SDXL; PixArt needs a T5 tokenizer)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    kind = Backbone(kind)
    if kind is Backbone.PIXART:
        if tokenizer is None:
            raise ValueError("tiny PixArt needs a T5 tokenizer: pass tokenizer= (see ../shared/assets)")
        return tiny_pixart_pipeline(tokenizer, seed)
    tokenizer = tokenizer or tiny_clip_tokenizer()
    vocab = len(tokenizer)
    unet = tiny_unet(kind, seed=seed)
    vae = tiny_vae(seed)
    prediction = "v_prediction" if kind is Backbone.SD21 else "epsilon"
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction,
    )  # fmt: skip
    torch.manual_seed(seed)
    if kind is Backbone.SDXL:
        te1 = _tiny_clip_text(32, vocab)
        te2 = _tiny_clip_text(32, vocab, with_projection=True, projection_dim=32)
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer, tokenizer_2=tokenizer,
            unet=unet, scheduler=scheduler,
        )  # fmt: skip
    text = _tiny_clip_text(unet.config.cross_attention_dim, vocab)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def tiny_pixart_pipeline(tokenizer, seed: int = 0):
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline
    from transformers import T5Config, T5EncoderModel

    transformer = tiny_pixart(seed)
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2))
    return PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=t5, vae=tiny_vae(seed), transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------- Flux
def tiny_t5_tokenizer(max_length: int = 16):
    """A character-level T5TokenizerFast (sentencepiece-style Unigram, ~190 tokens) built in place, no files."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import T5TokenizerFast

    chars = list(string.ascii_letters + string.digits + string.punctuation)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    tk = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.post_processor = TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                           model_max_length=max_length)  # fmt: skip


def tiny_flux(seed: int = 0) -> nn.Module:
    """A FluxTransformer2DModel (FLUX.1 / Kontext architecture) with 1 double and 2 single blocks, 32-d text."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))  # fmt: skip


def tiny_flux_pipeline(kontext: bool = True, tokenizer=None, seed: int = 0):
    """A complete tiny FluxKontextPipeline (kontext=False: FluxPipeline): CLIP + T5 text encoders, a VAE with
    factor 2 (x2 packing: 32 px images -> 8x8 = 64 image tokens), tiny_flux. `tokenizer`: a T5 tokenizer (default:
    tiny_t5_tokenizer, built in place). The text encoders are in eval mode (T5's dropout off), as from_pretrained
    gives them. Save it with save_pretrained to use it as `mole generate --base`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline
    from transformers import T5Config, T5EncoderModel

    tok = tokenizer if tokenizer is not None else tiny_t5_tokenizer()
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2))
    clip_tok = tiny_clip_tokenizer()
    clip = _tiny_clip_text(32, len(clip_tok))
    vae = tiny_vae(seed)
    vae.register_to_config(shift_factor=0.1)
    cls = FluxKontextPipeline if kontext else FluxPipeline
    return cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip.eval(), tokenizer=clip_tok,
               text_encoder_2=t5.eval(), tokenizer_2=tok, transformer=tiny_flux(seed))  # fmt: skip
