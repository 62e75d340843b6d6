"""Full-size SD1.5 / SD2.1 / SDXL / PixArt-alpha from the model configs that ship with the package.

The configs under mole/configs_full/<kind>/ are the published diffusers configs (UNet / transformer, VAE, text
encoders, scheduler, tokenizer settings) of

    sd15    runwayml/stable-diffusion-v1-5
    sd21    stabilityai/stable-diffusion-2-1        (768 px, v-prediction)
    sdxl    stabilityai/stable-diffusion-xl-base-1.0
    pixart  PixArt-alpha/PixArt-XL-2-512x512

They are what single-file checkpoints load with (mole.formats.ldm), and what the builders here make full-size
random-weight models from (no download; device="meta" builds the architecture without allocating any weights):

    unet = build_denoiser("sdxl", device="meta")                # 2,567,463,684 parameters, no memory
    pipe = build_pipeline("sd15", tokenizer="path/to/clip_tokenizer")
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

PUBLISHED: dict[str, str] = {
    "sd15": "runwayml/stable-diffusion-v1-5",
    "sd21": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "pixart": "PixArt-alpha/PixArt-XL-2-512x512",
}
KINDS = tuple(PUBLISHED)
DENOISER = {"sd15": "unet", "sd21": "unet", "sdxl": "unet", "pixart": "transformer"}
TOKENIZERS = {"sd15": ("tokenizer",), "sd21": ("tokenizer",), "sdxl": ("tokenizer", "tokenizer_2"),
              "pixart": ("tokenizer",)}  # fmt: skip


def check_kind(kind: str) -> str:
    kind = getattr(kind, "value", kind)  # a mole.targets.Backbone works too
    if kind not in PUBLISHED:
        raise ValueError(f"kind={kind!r} has no shipped full-size config; use one of {', '.join(map(str, KINDS))}")
    return kind


def config_dir(kind: str) -> Path:
    """The folder of the shipped configs of `kind` (a diffusers pipeline folder without weights or vocabularies)."""
    return Path(str(resources.files("mole") / "configs_full" / check_kind(kind)))


def component_config(kind: str, component: str) -> dict[str, Any]:
    """The published config of one component (unet, transformer, vae, text_encoder, text_encoder_2, scheduler,
    tokenizer, tokenizer_2) as a dict."""
    folder = config_dir(kind) / component
    names = {"scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json",
             "tokenizer_2": "tokenizer_config.json"}  # fmt: skip
    path = folder / names.get(component, "config.json")
    if not path.is_file():
        present = sorted(p.name for p in config_dir(kind).iterdir() if p.is_dir())
        raise ValueError(f"kind={kind!r} has no component {component!r}; it has {present}")
    return json.loads(path.read_text())


def _pipeline_components(kind: str) -> dict[str, tuple[str | None, str | None]]:
    index = json.loads((config_dir(kind) / "model_index.json").read_text())
    return {k: tuple(v) for k, v in index.items() if isinstance(v, list)}


def _build_model(kind: str, component: str, dtype: torch.dtype, device: str | torch.device | None) -> nn.Module:
    import diffusers
    import transformers

    library, cls_name = _pipeline_components(kind)[component]
    config = component_config(kind, component)
    device = torch.device(device) if device is not None else torch.device("cpu")
    # created in `dtype` directly: building in fp32 and casting would hold both copies (PixArt's T5-XXL: 19 GB in
    # fp32 beside 9.5 GB in fp16 does not fit a 24 GB host)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:  # meta: the modules are created without storage
            if library == "diffusers":
                model = getattr(diffusers, cls_name).from_config(config)
            else:
                cls = getattr(transformers, cls_name)
                model = cls(cls.config_class.from_dict(config))
    finally:
        torch.set_default_dtype(default)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def build_denoiser(kind: str, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
                   seed: int = 0) -> nn.Module:  # fmt: skip
    """The full-size UNet (SD1.5 / SD2.1 / SDXL) or PixArt transformer with random weights.

    device="meta" makes the architecture alone (parameter counts, target tables, memory estimates) in no time and
    no memory; otherwise the weights are initialised as diffusers does (fp32 SDXL UNet: 10.3 GB)."""
    kind = check_kind(kind)
    torch.manual_seed(seed)
    return _build_model(kind, DENOISER[kind], dtype, device)


_TOKENIZER_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "model_max_length", "errors", "extra_ids",
                   "legacy", "additional_special_tokens")


def load_tokenizer(kind: str, source, component: str = "tokenizer", settings: dict | None = None):
    """The tokenizer `component` of `kind` from `source`: a tokenizer object (returned as it is) or a folder.

    CLIP kinds: a folder holding vocab.json and merges.txt (or a pipeline folder with tokenizer/ in it); the special
    tokens, padding and length come from the shipped config of that kind (SD2.1 and SDXL's tokenizer_2 pad with '!').
    PixArt: a folder with spiece.model or the .model file itself. settings: tokenizer_config values to use instead."""
    if not isinstance(source, (str, Path)):
        return source
    kind = check_kind(kind)
    folder = Path(source)
    settings = settings if settings is not None else component_config(kind, component)
    config = {k: v.get("content", v) if isinstance(v, dict) else v for k, v in settings.items() if k in _TOKENIZER_KEYS}
    if kind == "pixart":
        from transformers import T5Tokenizer

        model = folder if folder.is_file() else folder / "spiece.model"
        if not model.is_file() and (folder / "tokenizer" / "spiece.model").is_file():
            model = folder / "tokenizer" / "spiece.model"
        if not model.is_file():
            raise ValueError(f"tokenizer={str(source)!r}: no spiece.model there; pass the T5 tokenizer's folder")
        config.pop("additional_special_tokens", None)
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(model))
        vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
        try:  # transformers 5: the (fast) T5Tokenizer takes the unigram vocabulary itself
            return T5Tokenizer(vocab=vocab, **config)
        except TypeError:  # transformers 4: the sentencepiece tokenizer reads the file
            return T5Tokenizer(str(model), **config)
    from transformers import CLIPTokenizer

    found = clip_vocab_folder(folder, component)
    if found is None:
        raise ValueError(
            f"tokenizer={str(source)!r}: no vocab.json + merges.txt (or tokenizer.json) there, nor in its tokenizer/ "
            "subfolder; pass a CLIP tokenizer folder, e.g. the tokenizer/ folder of any Stable Diffusion download"
        )
    if (found / "vocab.json").is_file() and (found / "merges.txt").is_file():
        return CLIPTokenizer(str(found / "vocab.json"), str(found / "merges.txt"), **config)
    return CLIPTokenizer.from_pretrained(str(found), local_files_only=True, **config)


def clip_vocab_folder(folder: Path, component: str = "tokenizer") -> Path | None:
    """The folder holding a CLIP vocabulary (vocab.json + merges.txt, or a tokenizer.json): `folder`, its
    `component` or its tokenizer/ subfolder."""
    for c in (folder, folder / component, folder / "tokenizer"):
        if ((c / "vocab.json").is_file() and (c / "merges.txt").is_file()) or (c / "tokenizer.json").is_file():
            return c
    return None


def build_pipeline(kind: str, dtype: torch.dtype = torch.float32, tokenizer=None, device: str | None = None,
                   seed: int = 0):  # fmt: skip
    """A full-size diffusers pipeline of `kind` with random weights, built from the shipped configs (no download).

    tokenizer: a folder or tokenizer object (see load_tokenizer); None gives CLIP kinds mole's character-level
    tokenizer (its 514 ids fit the real vocabulary: enough for random weights); PixArt needs a T5 tokenizer.
    device="meta" builds every component without weights (sizes only; such a pipeline cannot run).
    """
    import diffusers

    kind = check_kind(kind)
    parts: dict[str, Any] = {}
    for i, (name, (library, cls_name)) in enumerate(sorted(_pipeline_components(kind).items())):
        if library is None:
            parts[name] = None
        elif name == "scheduler":
            parts[name] = getattr(diffusers, cls_name).from_config(component_config(kind, "scheduler"))
        elif name.startswith("tokenizer"):
            if tokenizer is None and kind == "pixart":
                raise ValueError("kind='pixart' needs tokenizer= (a T5 tokenizer or its spiece.model)")
            if tokenizer is None:
                from .tiny import tiny_clip_tokenizer

                logger.info("no tokenizer given: the character-level tokenizer stands in (random weights anyway)")
                parts[name] = tiny_clip_tokenizer()
            else:
                parts[name] = load_tokenizer(kind, tokenizer, name)
        else:
            torch.manual_seed(seed + i)
            parts[name] = _build_model(kind, name, dtype, device)
    pipe_cls = getattr(diffusers, json.loads((config_dir(kind) / "model_index.json").read_text())["_class_name"])
    extra = {"requires_safety_checker": False} if "safety_checker" in parts else {}
    return pipe_cls(**parts, **extra)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
