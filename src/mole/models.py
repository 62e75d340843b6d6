"""One interface over the diffusers pipelines MoLE trains and samples: SD1.5, SD2.1 (v-prediction), SDXL, PixArt-alpha.

model = DiffusionModel.from_pretrained("path/or/hub-id")   # a diffusers pipeline folder
latents = model.encode_images(pixels)                      # (b, 4, h/f, w/f), scaled
cond = model.encode_text(captions)                         # whatever the denoiser needs
pred = model.predict(noisy, t, cond)                       # epsilon or v, as the scheduler says
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .formats import ModelLoadError
from .formats.ldm import SUFFIXES, load_single_file
from .targets import Backbone, detect_backbone

logger = logging.getLogger(__name__)

__all__ = ["DiffusionModel", "ModelLoadError", "TextConditioning", "check_base_name", "check_mole_name"]


def check_base_name(base: str, field: str = "--base") -> str:
    """The one rule every command and config uses for a base model (`--base`, `model = ...`, `[[models]] base`):
    `mole-tiny` (the shipped model), a single-file checkpoint (.safetensors / .ckpt ...), a diffusers pipeline
    folder, or a hub id (org/name). Checked in milliseconds; raises naming `field`, the value and the fix. Returns
    what loads: the folder / file / hub id (mole-tiny -> its pipeline folder)."""
    from .mole_tiny import is_mole_tiny, resolve_base

    if not isinstance(base, str) or not base.strip():
        raise ModelLoadError(f"{field}={base!r}: give a base model (mole-tiny, a hub id, a pipeline folder or a "
                             "model.safetensors)")  # fmt: skip
    if is_mole_tiny(base):
        return str(resolve_base(base))
    p = Path(base).expanduser()
    if p.is_file() and p.suffix.lower() in SUFFIXES:  # a single-file checkpoint: read when the model loads
        return str(p)
    if p.exists():
        if not p.is_dir() or not (p / "model_index.json").is_file():
            raise ModelLoadError(f"{field} {base} is not a diffusers pipeline folder (no model_index.json); give "
                                 "the folder written by save_pretrained, a model.safetensors, or a hub id such as "
                                 "runwayml/stable-diffusion-v1-5")  # fmt: skip
        return str(p)
    if base.startswith((".", "/", "~")) or base.count("/") > 1 or "\\" in base or p.suffix.lower() in SUFFIXES:
        raise FileNotFoundError(f"{field} {base}: no such file or folder; check the path (or give a hub id)")
    if hub_offline() and not hub_cached(base):  # known now, not minutes later when the model loads
        raise ModelLoadError(hub_unreachable(base, field))
    return base  # a hub id: resolved by diffusers when the model loads


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set: the hub will not be asked (huggingface_hub reads it once, at import)."""
    import os

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a dependency of diffusers
        return False
    return bool(constants.HF_HUB_OFFLINE)


def hub_cached(repo_id: str) -> bool:
    """A snapshot of the pipeline `repo_id` (its model_index.json) is in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str)
    except (ImportError, ValueError):  # an id huggingface_hub refuses is not cached either
        return False


def _not_downloadable(exc: BaseException) -> bool:
    """diffusers' / huggingface_hub's error for a hub id it neither found cached nor could fetch."""
    text = str(exc)
    return any(k in text for k in ("not fully cached", "local_files_only", "outgoing traffic has been disabled",
                                   "couldn't connect", "Cannot reach", "offline mode"))  # fmt: skip


def one_line_cause(exc: BaseException, limit: int = 200) -> str:
    """A dependency's error in one short line (its first sentence)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def hub_unreachable(base: str, field: str) -> str:
    """The one line for a hub id that is neither cached nor downloadable (offline or the hub unreachable)."""
    return (f"{field} {base}: not in the local Hugging Face cache and the hub cannot be reached; download it once "
            f"with network access (huggingface-cli download {base}) or give a local folder / model.safetensors")


def check_mole_name(mole: str, field: str = "--mole") -> str:
    """The one rule for a MoLE file (`--mole`, `[[models]] mole`, `mixture` files): `mole-tiny` or an existing
    file. Returns the file's path (mole-tiny -> its shipped file)."""
    from .mole_tiny import is_mole_tiny, resolve_mole

    if is_mole_tiny(mole):
        return str(resolve_mole(mole))
    p = Path(str(mole)).expanduser()
    if p.is_dir():
        raise ModelLoadError(f"{field} {mole} is a folder; give the MoLE .safetensors file inside it (or mole-tiny)")
    if not p.is_file():
        raise FileNotFoundError(f"{field} {mole} does not exist; check the path (or give mole-tiny)")
    return str(p)


@dataclass
class TextConditioning:
    """Denoiser keyword arguments for one batch of captions."""

    kwargs: dict[str, Any]

    def to(self, device: torch.device, dtype: torch.dtype) -> TextConditioning:
        def move(v):
            if isinstance(v, torch.Tensor):
                return v.to(device, dtype) if v.is_floating_point() else v.to(device)
            if isinstance(v, dict):
                return {k: move(x) for k, x in v.items()}
            return v

        return TextConditioning({k: move(v) for k, v in self.kwargs.items()})


class DiffusionModel:
    """A diffusers pipeline plus what training needs: the denoiser, the VAE, text encoding and a DDPM scheduler."""

    def __init__(self, pipe, name: str) -> None:
        from diffusers import DDPMScheduler

        self.pipe = pipe
        self.name = name
        self.denoiser: nn.Module = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if self.denoiser is None:
            raise ModelLoadError(f"{name}: the pipeline {type(pipe).__name__} has neither a unet nor a transformer")
        self.backbone = detect_backbone(self.denoiser)
        if self.backbone is Backbone.GENERIC:
            raise ModelLoadError(
                f"{name}: {type(self.denoiser).__name__} is not a supported backbone (SD1.5, SD2.1, SDXL, PixArt, Flux)"
            )
        self.vae = pipe.vae
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type: str = self.noise_scheduler.config.prediction_type
        if self.backbone is Backbone.FLUX:  # rectified flow: x_s = (1 - s) x + s n, the model predicts n - x
            self.prediction_type = "flow"
        self.text_encoders = [
            m for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if m
        ]

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | dict = torch.float32, tokenizer=None, config=None,
                        **kwargs) -> DiffusionModel:  # fmt: skip
        """Load a diffusers pipeline from a hub id, a local save_pretrained folder, or a single-file checkpoint
        (model.safetensors / .ckpt in the original SD1.x / SD2.x / SDXL layout, loaded offline with the shipped
        configs; `tokenizer` and `config` are for those files, see mole.formats.ldm.load_single_file). dtype: one
        dtype, or per component for pipeline folders ({"default": torch.bfloat16, "unet": torch.float32})."""
        from diffusers import DiffusionPipeline

        from .mole_tiny import is_mole_tiny

        name = "mole-tiny" if is_mole_tiny(path) else str(path)
        path = check_base_name(name, "base model")  # the rule every command shares, before anything loads
        if Path(path).suffix.lower() in SUFFIXES and Path(path).is_file():
            if isinstance(dtype, dict):  # per-component dtypes are for pipeline folders; a file loads in one
                dtype = torch.float32
            return cls(load_single_file(path, dtype=dtype, tokenizer=tokenizer, config=config), str(path))
        try:
            pipe = DiffusionPipeline.from_pretrained(str(path), dtype=dtype, **kwargs)
        except (OSError, ValueError) as exc:
            if not Path(path).exists() and _not_downloadable(exc):  # a hub id: uncached, and the hub unreachable
                raise ModelLoadError(hub_unreachable(name, "base model")) from None
            raise ModelLoadError(
                f"base model {name} could not be loaded as a diffusers pipeline ({one_line_cause(exc)}); give a "
                "hub id, a folder written by pipeline.save_pretrained() or a model.safetensors"
            ) from None
        return cls(pipe, name)

    @property
    def is_unet(self) -> bool:
        return self.backbone in (Backbone.SD15, Backbone.SD21, Backbone.SDXL)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device: torch.device | str) -> DiffusionModel:
        self.pipe.to(device)
        return self

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def encode_images(
        self, pixels: torch.Tensor, generator: torch.Generator | None = None, mode: bool = False
    ) -> torch.Tensor:
        """pixels (b, 3, H, W) in [-1, 1] -> scaled latents (b, c, H/f, W/f); mode=True: the posterior mean."""
        vae = self.vae
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        latents = dist.mode() if mode else dist.sample(generator=generator)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    # ------------------------------------------------------------------ text
    def encode_text(
        self, captions: list[str], text_encoder: nn.Module | None = None, clip_skip: int = 1
    ) -> TextConditioning:
        """Captions -> the denoiser's text conditioning. `text_encoder` replaces pipe.text_encoder (e.g. a
        DDP-wrapped copy being trained in stage 1); gradients flow only if it requires grad. `clip_skip` counts as
        kohya and A1111 do: 1 is the last CLIP layer (the paper's setting), k > 1 the k-th from the end passed
        through the final layer norm (SD1.5 / SD2.1 only; diffusers' `clip_skip` is this minus 1)."""
        pipe = self.pipe
        device = self.denoiser.device
        sd = self.backbone in (Backbone.SD15, Backbone.SD21)
        if clip_skip != 1 and not sd:
            raise ValueError(
                f"clip_skip={clip_skip} applies to the CLIP text encoder of SD1.5 / SD2.1, not to "
                f"{self.backbone.value}; use clip_skip=1"
            )
        if sd:
            tok = pipe.tokenizer(
                captions, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                return_tensors="pt",
            )  # fmt: skip
            encoder = text_encoder or pipe.text_encoder
            if clip_skip == 1:
                hidden = encoder(tok.input_ids.to(device))[0]  # (b, 77, d): final_layer_norm(last layer)
                return TextConditioning({"encoder_hidden_states": hidden})
            states = encoder(tok.input_ids.to(device), output_hidden_states=True).hidden_states  # embeddings + layers
            if clip_skip >= len(states):
                raise ValueError(
                    f"clip_skip={clip_skip}: the text encoder has {len(states) - 1} layers; use 1 to {len(states) - 1}"
                )
            inner = getattr(encoder, "module", encoder)  # DDP keeps the model in .module
            final_norm = getattr(inner, "text_model", inner).final_layer_norm  # transformers < 5 nests text_model
            return TextConditioning({"encoder_hidden_states": final_norm(states[-clip_skip])})
        with torch.no_grad():
            if self.backbone is Backbone.FLUX:  # T5 states + CLIP pooled vector (txt_ids are zeros, made in predict)
                length = min(512, pipe.tokenizer_2.model_max_length)
                embeds, pooled, _ = pipe.encode_prompt(captions, prompt_2=None, device=device,
                                                       max_sequence_length=length)  # fmt: skip
                return TextConditioning({"encoder_hidden_states": embeds, "pooled_projections": pooled})
            if self.backbone is Backbone.SDXL:
                embeds, _, pooled, _ = pipe.encode_prompt(
                    captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
                )
                return TextConditioning({"encoder_hidden_states": embeds, "pooled": pooled})
            embeds, mask, _, _ = pipe.encode_prompt(
                captions, do_classifier_free_guidance=False, device=device, clean_caption=False
            )
            return TextConditioning({"encoder_hidden_states": embeds, "encoder_attention_mask": mask})

    # ------------------------------------------------------------------ denoiser
    def predict(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: TextConditioning,
        denoiser: nn.Module | None = None,
    ) -> torch.Tensor:
        """The denoiser's epsilon / v prediction (PixArt's learned variance channels are dropped)."""
        denoiser = denoiser or self.denoiser
        kw = dict(cond.kwargs)
        if self.backbone is Backbone.SDXL:
            pooled = kw.pop("pooled")
            b, _, h, w = noisy.shape
            f = self.vae_scale_factor
            time_ids = torch.tensor([[h * f, w * f, 0, 0, h * f, w * f]], device=noisy.device, dtype=pooled.dtype)
            kw["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids.repeat(b, 1)}
            return denoiser(noisy, timesteps, **kw).sample
        if self.is_unet:
            return denoiser(noisy, timesteps, **kw).sample
        if self.backbone is Backbone.FLUX:
            return self._predict_flux(denoiser, noisy, timesteps, kw)
        out = denoiser(
            noisy, timestep=timesteps, added_cond_kwargs={"resolution": None, "aspect_ratio": None}, **kw
        ).sample
        if out.shape[1] == 2 * noisy.shape[1]:  # learned sigma: keep the mean prediction
            out = out.chunk(2, dim=1)[0]
        return out

    def _predict_flux(self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, kw: dict):
        """Flux: pack (b, c, h, w) latents into 2x2 patches with their RoPE ids, timestep = t / 1000, guidance 1
        (as InstructMoLE's training), unpack the velocity prediction."""
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        if h % 2 or w % 2:
            raise ValueError(f"Flux latents need even height and width, got {h}x{w}; use a resolution divisible by "
                             f"{2 * self.vae_scale_factor}")  # fmt: skip
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        text = kw["encoder_hidden_states"]
        txt_ids = torch.zeros(text.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        config = self.denoiser.config  # `denoiser` may be a DDP wrapper of it
        guidance = torch.ones(b, device=noisy.device, dtype=noisy.dtype) if config.guidance_embeds else None
        out = denoiser(hidden_states=packed, timestep=timesteps.to(noisy.dtype) / 1000, guidance=guidance,
                       pooled_projections=kw["pooled_projections"], encoder_hidden_states=text, txt_ids=txt_ids,
                       img_ids=img_ids).sample  # fmt: skip
        f = self.vae_scale_factor
        return FluxPipeline._unpack_latents(out[:, : packed.shape[1]], h * f, w * f, f)
