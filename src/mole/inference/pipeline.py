"""Putting MoLE into a diffusers pipeline, the way diffusers users expect:

pipe = DiffusionPipeline.from_pretrained("runwayml/stable-diffusion-v1-5")
load_mole_weights(pipe, "mole.safetensors")             # gates + embedded experts
load_mole_weights(pipe, "mole.safetensors", mode=MixMode.FIXED, expert_weights={"face": 1.0})
image = pipe("a close-up photo of a woman's face").images[0]
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import MoLEConfig
from ..formats.lora import load_expert
from ..formats.mole_file import read_mole_manifest
from ..formats.official import is_official_gate_file
from ..inject import has_mole, inject_mole, mole_state, remove_mole, set_expert_weights
from ..io import load_mole
from ..targets import Backbone

logger = logging.getLogger(__name__)

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(kw_only=True)
class SamplingOptions:
    """What every sampling command shares (generate, inspect, eval)."""

    steps: int = 50  # the paper: 50 DDIM steps
    guidance_scale: float = 7.5
    scheduler: str = "ddim"
    height: int | None = None  # None: the pipeline's native size
    width: int | None = None
    dtype: str = "auto"  # auto: fp16 on a GPU, fp32 on the CPU
    device: str | None = None  # None: cuda if present, else cpu

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps={self.steps}: use at least 1")
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype={self.dtype!r}: use auto, fp32, fp16 or bf16")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler={self.scheduler!r} is unknown; use one of {', '.join(sorted(SCHEDULERS))}")
        for h in (self.height, self.width):
            if h is not None and (h < 8 or h % 8):
                raise ValueError(f"height/width={h}: use a positive multiple of 8")
        check_device(self.device)


def check_device(device: str | None) -> None:
    """A device string torch knows and this machine has (None: automatic)."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device={device!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: no CUDA GPU is visible here; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r}: MPS is not available here; use cpu")
    elif dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"device={device!r}: use cpu, cuda, cuda:N or mps")


class MixMode(str, enum.Enum):
    MOLE = "mole"  # the learned gates
    FIXED = "fixed"  # no gates: each expert at a fixed weight (LoRA mixing, the paper's stage-2 baseline)
    NONE = "none"  # the base model alone


def denoiser_of(pipe) -> nn.Module:
    module = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if module is None:
        raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer to put MoLE into")
    return module


def load_mole_weights(
    pipe,
    path: str | Path,
    mode: MixMode | str = MixMode.MOLE,
    expert_weights: Mapping[str, float] | None = None,
    strict_base: bool = True,
    expert_files: Mapping[str, str | Path] | None = None,
):
    """Inject the MoLE file's experts into the pipeline's denoiser (gated, or at fixed weights); return the pipe.

    expert_weights: per-expert multipliers. In FIXED mode, experts not named get weight 0 (e.g. {"face": 1.0}
    runs the face LoRA alone); in MOLE mode they multiply the gated contributions.
    expert_files: {name: LoRA file} experts to use by name: required with the paper's gate files (face and hand),
    else in place of the experts a MoLE file embeds (they must be the ones it was trained with).
    """
    mode = MixMode(mode)
    denoiser = denoiser_of(pipe)
    component = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    given = [load_expert(f, name, component=component) for name, f in (expert_files or {}).items()]
    previous = getattr(pipe, "mole_instruct", None)
    if previous is not None:  # detach an InstructMoLE router (and condition hooks) loaded before
        if previous.router is not None:
            previous.router.detach()
        if previous.conditions is not None:
            previous.conditions.remove()
        pipe.mole_instruct = None
    instruct = mode is MixMode.MOLE and not is_official_gate_file(path) and "instruct" in read_mole_manifest(path).get(
        "extra", {}
    )  # InstructMoLE: the experts plus their instruction router
    if mode is not MixMode.NONE and not instruct:  # a MoLE file or the paper's files: gated, or at fixed weights
        load_mole(denoiser, path, experts=given or None, strict_base=strict_base, gates=mode is MixMode.MOLE,
                  replace=True)  # fmt: skip
        if mode is MixMode.FIXED:  # experts not named get weight 0
            names = mole_state(denoiser).expert_names
            expert_weights = {name: 0.0 for name in names} | dict(expert_weights or {name: 1.0 for name in names})
        if expert_weights:
            set_expert_weights(denoiser, expert_weights)
        return pipe
    if has_mole(denoiser):
        remove_mole(denoiser)
    if instruct:
        from ..instruct import InstructMoLE

        pipe.mole_instruct = InstructMoLE.load(denoiser, path, strict_base=strict_base)
        if expert_weights:
            set_expert_weights(denoiser, expert_weights)
    return pipe


def load_loras(pipe, loras: Mapping[str, str | Path], weights: Mapping[str, float] | None = None):
    """Plain LoRA files (diffusers, peft or kohya) into any pipeline's denoiser at fixed weights, UNet or DiT alike
    (diffusers has no LoRA loader for PixArt). Replaces MoLE / LoRAs loaded before; returns the pipe."""
    denoiser = denoiser_of(pipe)
    component = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    experts = [load_expert(path, name, component=component) for name, path in loras.items()]
    if has_mole(denoiser):
        remove_mole(denoiser)
    inject_mole(denoiser, experts, MoLEConfig(gating="none"))
    set_expert_weights(denoiser, {name: 1.0 for name in loras} | dict(weights or {}))
    return pipe


def load_pipeline(base: str | Path, dtype: torch.dtype = torch.float32, device: str | None = None, tokenizer=None):
    """A diffusers pipeline from a hub id, a local folder or a single-file checkpoint (model.safetensors; its
    tokenizer: `tokenizer` or see mole.formats.ldm), on `device` (default: cuda if present, else cpu)."""
    from ..models import DiffusionModel

    model = DiffusionModel.from_pretrained(base, dtype=dtype, tokenizer=tokenizer)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.pipe.to(device)
    if hasattr(model.pipe, "safety_checker") and model.pipe.safety_checker is None:
        model.pipe.requires_safety_checker = False
    return model


def set_scheduler(pipe, name: str) -> None:
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler={name!r} is unknown; use one of {', '.join(sorted(SCHEDULERS))}")
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[name])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def open_sampler(base: str | Path, scheduler: str = "ddim", dtype: str = "auto", device: str | None = None,
                 progress: bool = False):  # fmt: skip
    """A DiffusionModel ready to sample: on `device` (default: cuda if present), in `dtype` (auto: fp16 on a GPU,
    fp32 on the CPU), with the named scheduler; returns (model, device)."""
    if dtype not in ("auto", *DTYPES):
        raise ValueError(f"dtype={dtype!r}: use auto, fp32, fp16 or bf16")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = DTYPES[dtype] if dtype != "auto" else (torch.float16 if device == "cuda" else torch.float32)
    model = load_pipeline(base, dtype=torch_dtype, device=device)
    if is_flow_matching(model):
        logger.info("%s samples with its own %s; scheduler=%r does not apply", type(model.pipe).__name__,
                    type(model.pipe.scheduler).__name__, scheduler)  # fmt: skip
    else:
        set_scheduler(model.pipe, scheduler)
    model.pipe.set_progress_bar_config(disable=not progress)
    return model, device


def default_size(model) -> tuple[int, int]:
    """The pipeline's native (height, width) in pixels: its own default_sample_size (Flux, SD, SDXL) times its
    vae_scale_factor, else the denoiser config's sample_size (PixArt) times the VAE's factor."""
    pipe = model.pipe
    f = getattr(pipe, "vae_scale_factor", None) or model.vae_scale_factor
    sample = getattr(pipe, "default_sample_size", None)
    if sample is None:
        sample = dict(model.denoiser.config).get("sample_size")
    if sample is None:
        raise ValueError(f"{type(pipe).__name__} has no default size (no default_sample_size, no sample_size in "
                         "its denoiser config); pass --height and --width")  # fmt: skip
    h, w = (sample, sample) if isinstance(sample, int) else sample
    return h * f, w * f


def is_flow_matching(model) -> bool:
    """Flux pipelines sample with their own flow-matching scheduler (DDIM and the others do not apply)."""
    return model.backbone is Backbone.FLUX


def pipeline_kwargs(model, height: int | None = None, width: int | None = None) -> dict:
    """Extra keyword arguments some pipelines need for arbitrary sizes (PixArt: no resolution binning;
    Flux-Kontext: max_area = height x width, else it rescales every size to 1024 x 1024)."""
    if model.backbone is Backbone.PIXART:
        return {"use_resolution_binning": False}
    if type(model.pipe).__name__ == "FluxKontextPipeline" and height and width:
        return {"max_area": height * width}
    return {}


def condition_latents(model, paths: list[str | Path]) -> list[torch.Tensor]:
    """Condition images (any sizes) -> one VAE latent (1, c, h, w) each: the image resized to its size cut to a
    multiple of 2 x the VAE factor, in [-1, 1], posterior mean, shifted and scaled (as FluxKontextPipeline does)."""
    from PIL import Image, UnidentifiedImageError

    multiple = 2 * model.vae_scale_factor
    out = []
    for path in paths:
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"--image {path} does not exist; check the path") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"--image {path} is not a readable image ({exc}); give a PNG or JPEG") from None
        w, h = image.width // multiple * multiple, image.height // multiple * multiple
        if not w or not h:
            raise ValueError(f"--image {path} is {image.width}x{image.height} px; give at least {multiple}x{multiple}")
        pixels = model.pipe.image_processor.preprocess(image, h, w)  # resized, as the pipeline does
        vae = model.vae
        out.append(model.encode_images(pixels.to(vae.device, vae.dtype), mode=True))
    return out
