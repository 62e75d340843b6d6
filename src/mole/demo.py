"""The embedded-default job: the whole MoLE foundation on a tiny built-in model, offline, in seconds.

1. build a tiny SD-shaped UNet from a config (no download) and write two experts to disk, one in kohya's format
   (as the official MoLE experts are) and one in diffusers/peft's format;
2. load them by name (face, hand), inject them, check the fused path against the naive reference;
3. run a short DDIM-style denoising loop while recording the gates;
4. save gates + experts + manifest, load them into a fresh copy of the base model, check the outputs match.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import MoLEConfig
from .experts import ExpertFormat, load_expert, save_expert
from .inject import inject_mole, mole_layers, set_fused
from .io import load_mole, save_mole
from .recording import record_gates
from .targets import Backbone
from .tiny import random_expert, tiny_unet, unet_inputs

logger = logging.getLogger(__name__)


@dataclass
class DemoOptions:
    out_dir: Path = Path("runs/demo")
    backbone: Backbone = Backbone.SD15
    steps: int = 10
    rank: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.backbone = Backbone(self.backbone)
        if self.backbone is Backbone.PIXART or self.backbone is Backbone.GENERIC:
            raise ValueError(f"backbone={self.backbone.value!r}: the demo runs sd15, sd21 or sdxl")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps}: use at least 1 denoising step")
        if self.rank < 1:
            raise ValueError(f"rank={self.rank}: use a rank of at least 1")


def run_demo(opts: DemoOptions) -> dict:
    """Run the demo; return a JSON-ready summary (also written to out_dir/summary.json)."""
    t0 = time.perf_counter()
    out = opts.out_dir
    (out / "experts").mkdir(parents=True, exist_ok=True)
    unet = tiny_unet(opts.backbone, seed=opts.seed).eval()
    base_dir = out / "base_unet"
    unet.save_pretrained(base_dir)  # the "hub id or local path" a user would pass

    face = random_expert(unet, "face", rank=opts.rank, alpha=opts.rank / 2, seed=opts.seed + 1, std=0.1)
    hand = random_expert(unet, "hand", rank=opts.rank, seed=opts.seed + 2, std=0.1)
    save_expert(face, out / "experts" / "face_kohya.safetensors", ExpertFormat.KOHYA)
    save_expert(hand, out / "experts" / "hand_diffusers.safetensors", ExpertFormat.DIFFUSERS)
    experts = [
        load_expert(out / "experts" / "face_kohya.safetensors", "face"),
        load_expert(out / "experts" / "hand_diffusers.safetensors", "hand"),
    ]

    from diffusers import DDIMScheduler, UNet2DConditionModel

    model = UNet2DConditionModel.from_pretrained(base_dir).eval()
    inputs = unet_inputs(model, batch=2, hw=(16, 12), seed=opts.seed)
    with torch.no_grad():
        base_out = model(**inputs).sample
    inject_mole(model, experts, MoLEConfig())
    layers = mole_layers(model)
    with torch.no_grad():
        fused = model(**inputs).sample
        set_fused(model, False)
        naive = model(**inputs).sample
        set_fused(model, True)
    fused_vs_naive = float((fused - naive).abs().max())

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(opts.steps)
    latents = inputs["sample"].clone()
    cond = {k: v for k, v in inputs.items() if k not in ("sample", "timestep")}
    with torch.no_grad(), record_gates(model, latent_hw=(16, 12)) as rec:
        for t in scheduler.timesteps:
            eps = model(sample=latents, timestep=t, **cond).sample
            latents = scheduler.step(eps, t, latents).prev_sample
    curve = rec.mean_global()  # (steps, b, e)

    mole_path = save_mole(model, out / "mole.safetensors", base_model=str(base_dir))
    fresh = UNet2DConditionModel.from_pretrained(base_dir).eval()
    load_mole(fresh, mole_path)
    with torch.no_grad():
        reloaded = fresh(**inputs).sample
    summary = {
        "backbone": opts.backbone.value,
        "wrapped_layers": len(layers),
        "experts": {e.name: {"source": e.source, "layers": len(e.layers), "ranks": sorted(e.ranks)} for e in experts},
        "gate_parameters": sum(p.numel() for layer in layers.values() for p in layer.gates.parameters()),
        "max_abs_change_vs_base": float((fused - base_out).abs().max()),
        "max_abs_fused_vs_naive": fused_vs_naive,
        "max_abs_reloaded_vs_saved": float((reloaded - fused).abs().max()),
        "denoising_steps": rec.num_steps,
        "mean_global_gate_per_step": {
            name: [round(float(v), 5) for v in curve[:, :, i].mean(1)] for i, name in enumerate(rec.expert_names)
        },
        "files": {
            "mole": str(mole_path),
            "experts": sorted(str(p) for p in (out / "experts").iterdir()),
            "base": str(base_dir),
        },
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / "gates.json").write_text(json.dumps(rec.to_dict()))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("demo finished in %.1f s; summary in %s", summary["seconds"], out / "summary.json")
    return summary
