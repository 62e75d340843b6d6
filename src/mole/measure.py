"""Measure what MoLE does on a real (small) model: the paper's claims, in small.

    specialisation   held-out denoising loss (fixed noise and timesteps) per model variant and image set
    gates            each expert's global gate per denoising step while generating face / hand prompts (Fig. 7a/b)
    detection        face / hand detection rate and confidence on generated images (Tables 1-3 in small), beside
                     the detectors' rates on real held-out images (ceiling) and on the other kind (false positives)

A model variant is (mode, MoLE file, expert weights): `Variant("base", "none")`, `Variant("face", "fixed", file,
{"face": 1.0})`, `Variant("mole", "mole", file)`. Every number comes with its standard error over samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .eval.metrics import detector_view
from .inference.pipeline import MixMode, load_mole_weights
from .models import DiffusionModel
from .recording import record_gates

# held-out prompts: none of them is a training caption of mole-tiny
FACE_TEST_PROMPTS = [
    "a portrait of an old man's face", "a close-up photo of a young woman's face",
    "a close-up of a smiling man's face", "a black and white headshot of a person",
    "a close-up photo of a bearded man's face", "a photo of a face with glasses",
    "a portrait of a serious man looking at the camera", "a close-up of a person's face, front view",
]  # fmt: skip
HAND_TEST_PROMPTS = [
    "a close-up photo of an open hand", "a photo of a hand making a peace sign",
    "a close-up of a woman's left hand", "a hand with fingers spread, close-up",
    "a close-up photo of a child's hand", "the back of a hand, close-up photo",
    "a close-up photo of a hand pointing up", "a hand showing three fingers on a white background",
]  # fmt: skip


@dataclass(frozen=True)
class Variant:
    name: str
    mode: str  # none | fixed | mole
    mole: str | None = None
    weights: dict[str, float] | None = field(default=None, hash=False)


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_se of no values")
    m = sum(values) / n
    if n == 1:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def apply_variant(model: DiffusionModel, v: Variant) -> None:
    load_mole_weights(model.pipe, v.mole or "", MixMode(v.mode), expert_weights=v.weights)


def read_folder(folder: str | Path, limit: int | None = None) -> tuple[list[Image.Image], list[str]]:
    """Images and their .txt captions from a captioned folder (sorted, first `limit`)."""
    from .data.dataset import load_rgb

    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:limit]
    if not paths:
        raise FileNotFoundError(f"{folder}: no images")
    caps = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() if p.with_suffix(".txt").is_file() else ""
            for p in paths]  # fmt: skip
    return [load_rgb(p) for p in paths], caps


@torch.no_grad()
def heldout_losses(
    model: DiffusionModel,
    images: Sequence[Image.Image],
    captions: Sequence[str],
    seeds: Sequence[int],
    timesteps: Sequence[int] = (100, 300, 500, 700, 900),
) -> list[float]:
    """One epsilon-MSE per (image, seed), averaged over `timesteps`; noise is a function of (seed, image index), so
    every variant sees the same noise."""
    import numpy as np

    size = model.vae_scale_factor * model.denoiser.config.sample_size
    pix = torch.stack([torch.from_numpy(np.asarray(im.resize((size, size)), dtype=np.float32)).permute(2, 0, 1)
                       for im in images]) / 127.5 - 1  # fmt: skip
    latents = model.encode_images(pix, mode=True)
    cond = model.encode_text(list(captions))
    sched = model.noise_scheduler
    out = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        per_image = torch.zeros(len(images))
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=g)
            tt = torch.full((len(images),), t, dtype=torch.long)
            pred = model.predict(sched.add_noise(latents, noise, tt), tt, cond)
            per_image += (pred - noise).pow(2).flatten(1).mean(1) / len(timesteps)
        out.extend(per_image.tolist())
    return out


@torch.no_grad()
def generate_images(
    model: DiffusionModel,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 25,
    guidance_scale: float = 4.0,
    batch: int = 24,
    record: bool = False,
) -> tuple[list[Image.Image], dict[str, torch.Tensor] | None]:
    """Images for every (seed, prompt), seed-major; with record=True also each expert's conditional global gate
    averaged over layers, {expert name: (steps, len(seeds) * len(prompts))}."""
    size = model.vae_scale_factor * model.denoiser.config.sample_size
    jobs = [(s, k, p) for s in seeds for k, p in enumerate(prompts)]
    images, gates, names = [], [], []
    for i in range(0, len(jobs), batch):
        chunk = jobs[i : i + batch]
        gens = [torch.Generator().manual_seed(s * 10_007 + k) for s, k, _ in chunk]
        kwargs = dict(num_inference_steps=steps, guidance_scale=guidance_scale, height=size, width=size,
                      generator=gens)  # fmt: skip
        if record:
            f = model.vae_scale_factor
            with record_gates(model.denoiser, keep_local=False, latent_hw=(size // f, size // f)) as rec:
                res = model.pipe([p for _, _, p in chunk], **kwargs)
            g = rec.mean_global()  # (steps, 2b, e): [uncond x b, cond x b] under CFG
            gates.append(g[:, -len(chunk) :, :])
            names = rec.expert_names
        else:
            res = model.pipe([p for _, _, p in chunk], **kwargs)
        images += res.images
    if not record:
        return images, None
    stacked = torch.cat(gates, dim=1)  # (steps, n, e)
    return images, {name: stacked[..., i] for i, name in enumerate(names)}


def detection_rates(detector, images: Sequence[Image.Image]) -> dict[str, tuple[float, float]]:
    """Face / hand detection rate and confidence, mean +- s.e. over images (each seen through detector_view)."""
    rows = [detector.detect(detector_view(im)) for im in images]
    return {k: mean_se([r[k] for r in rows]) for k in ("face_rate", "face_conf", "hand_rate", "hand_conf")}


def fmt(ms: tuple[float, float], digits: int = 3) -> str:
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def separated(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """a's error bar lies entirely above b's."""
    return a[0] - a[1] > b[0] + b[1]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
