"""The main job on the embedded default: all of MoLE on a tiny built-in model and drawn data, offline, in a minute.

1. build a tiny pipeline from configs (no download), save it (the "local path" a user would pass), and draw three
   small training sets: face close-ups, hand close-ups, figures in scenes;
2. stage 2: train a face expert and a hand expert (LoRA, diffusers format) on the close-ups;
3. stage 3: train the gates of every layer on a mix of the three sets, base and experts frozen;
4. check the foundation on the result: the hand expert re-saved in kohya's format and loaded by name gives the same
   model, the fused path equals the naive per-expert formula, a saved-and-reloaded MoLE file reproduces the outputs;
5. record the gates while sampling face and hand close-up prompts (gate charts, local maps) and draw base,
   fixed-weight mixing and MoLE side by side.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .data.synthetic import write_synthetic_set
from .experiment import FACE_PROMPTS, HAND_PROMPTS, ExperimentOptions, run_gate_experiment
from .experts import ExpertFormat, load_expert, save_expert
from .inject import remove_mole, set_fused
from .io import load_mole, read_mole_file
from .models import DiffusionModel
from .targets import Backbone
from .tiny import tiny_pipeline

logger = logging.getLogger(__name__)


@dataclass
class DemoOptions:
    out_dir: Path = Path("runs/demo")
    backbone: Backbone = Backbone.SD15
    train_steps: int = 40
    images_per_set: int = 24
    rank: int = 8
    sample_steps: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.backbone = Backbone(self.backbone)
        if self.backbone not in (Backbone.SD15, Backbone.SD21, Backbone.SDXL):
            raise ValueError(f"backbone={self.backbone.value!r}: the demo runs sd15, sd21 or sdxl")
        for name in ("train_steps", "images_per_set", "rank", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: use at least 1")


def run_demo(opts: DemoOptions) -> dict:
    """Run the demo; return a JSON-ready summary (also written to out_dir/summary.json)."""
    t0 = time.perf_counter()
    out = opts.out_dir
    tiny_pipeline(opts.backbone, seed=opts.seed).save_pretrained(out / "base")
    sets = {k: write_synthetic_set(out / "data" / k, k, opts.images_per_set, seed=opts.seed)
            for k in ("face", "hand", "scene")}  # fmt: skip
    mix = out / "data" / "mix"
    for k in sets:
        write_synthetic_set(mix, k, opts.images_per_set // 2, seed=opts.seed + 1)

    # ---- stages 2 and 3, and the gates measured while sampling face / hand prompts
    exp = run_gate_experiment(ExperimentOptions(
        base=str(out / "base"), face_dir=str(sets["face"]), hand_dir=str(sets["hand"]), mix_dir=str(mix),
        out_dir=str(out), rank=opts.rank, expert_steps=opts.train_steps, gate_steps=opts.train_steps,
        sample_steps=opts.sample_steps, seed=opts.seed, face_prompts=FACE_PROMPTS[:2], hand_prompts=HAND_PROMPTS[:2],
    ))  # fmt: skip
    experts = {name: {"file": exp["files"][name], **exp["training"][f"{name}_expert"]} for name in ("face", "hand")}
    mole_file = Path(exp["files"]["mole"])

    # ---- foundation checks on the trained result
    model = DiffusionModel.from_pretrained(out / "base")
    unet = model.denoiser
    kohya_hand = save_expert(load_expert(experts["hand"]["file"], "hand"), out / "hand_kohya.safetensors",
                             ExpertFormat.KOHYA)  # fmt: skip
    g = torch.Generator().manual_seed(opts.seed)
    sample = torch.randn(2, 4, 16, 12, generator=g)  # a non-square latent
    cond = model.encode_text(["a close-up photo of a face", "a close-up photo of a hand"])
    t = torch.tensor(500)
    with torch.no_grad():
        base_out = model.predict(sample, t, cond)
        load_mole(unet, mole_file)
        mole_out = model.predict(sample, t, cond)
        set_fused(unet, False)
        naive_out = model.predict(sample, t, cond)
        set_fused(unet, True)
        remove_mole(unet)
        restored = torch.equal(model.predict(sample, t, cond), base_out)
        # the same mixture, with the hand expert taken from its kohya copy (loaded by name, not file name)
        load_mole(unet, mole_file, experts=[load_expert(kohya_hand, "hand"), load_expert(experts["face"]["file"],
                                                                                          "face")])  # fmt: skip
        kohya_out = model.predict(sample, t, cond)
        remove_mole(unet)
    manifest, _ = read_mole_file(mole_file)

    # ---- pictures
    from .inference import GenerateOptions, InspectOptions, generate, inspect

    prompts = [FACE_PROMPTS[0], HAND_PROMPTS[0]]
    inspect(InspectOptions(base=str(out / "base"), mole=str(mole_file), prompts=prompts, out_dir=str(out / "inspect"),
                           steps=opts.sample_steps, map_steps=4, seed=opts.seed))  # fmt: skip
    generate(GenerateOptions(base=str(out / "base"), mole=str(mole_file), prompts=prompts,
                             out_dir=str(out / "generate"), steps=opts.sample_steps, seeds=[opts.seed],
                             modes=["none", "fixed", "mole"]))  # fmt: skip
    summary = {
        "backbone": opts.backbone.value,
        "wrapped_layers": len(manifest["layers"]),
        "experts": experts,
        "gates": exp["training"]["gates"],
        "max_abs_change_vs_base": float((mole_out - base_out).abs().max()),
        "max_abs_fused_vs_naive": float((mole_out - naive_out).abs().max()),
        "max_abs_kohya_hand_vs_diffusers_hand": float((kohya_out - mole_out).abs().max()),
        "remove_restores_base_exactly": restored,
        "mean_global_gate": {"face_prompts": exp["face_prompts"]["mean"], "hand_prompts": exp["hand_prompts"]["mean"]},
        "files": {"mole": str(mole_file), "inspect": str(out / "inspect"), "compare": str(out / "generate" /
                                                                                           "compare.png")},
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("demo finished in %.1f s; summary in %s", summary["seconds"], out / "summary.json")
    return summary
