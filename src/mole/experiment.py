"""A small end-to-end MoLE experiment: train a face and a hand expert, train gates, then measure which expert the
gates open for face close-up prompts and for hand close-up prompts (the paper's Fig. 7a/b finding).

    run_gate_experiment(ExperimentOptions(base="path/to/pipeline", face_dir=..., hand_dir=..., mix_dir=...))

The numbers: per expert, the global gate averaged over layers, denoising steps and the conditional half of the CFG
batch, for each prompt set; and the same per step (the curves of Fig. 7).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .io import load_mole
from .models import DiffusionModel
from .recording import record_gates
from .training import DataConfig, ExpertTrainConfig, MixtureTrainConfig, OptimConfig, Stage, TrainConfig, train

logger = logging.getLogger(__name__)

FACE_PROMPTS = [
    "a close-up photo of a face",
    "a close-up portrait of a man's face",
    "a close-up photo of a woman's face, looking at the camera",
    "a detailed face close-up, studio light",
]
HAND_PROMPTS = [
    "a close-up photo of a hand",
    "a close-up photo of a hand showing two fingers",
    "a close-up photo of an open palm",
    "a detailed hand close-up, studio light",
]


@dataclass
class ExperimentOptions:
    base: str  # diffusers pipeline folder or hub id
    face_dir: str  # captioned face close-ups
    hand_dir: str  # captioned hand close-ups
    mix_dir: str  # captioned images for the gates (stage 3)
    out_dir: str = "runs/experiment"
    resolution: int = 32
    rank: int = 8
    finetune_steps: int = 0  # > 0: stage 1 on mix_dir first, and the experts and gates build on that model
    finetune_lr: float = 1e-4
    expert_steps: int = 200
    gate_steps: int = 200
    batch_size: int = 4
    expert_lr: float = 1e-3
    gate_lr: float = 3e-3
    sample_steps: int = 20
    guidance_scale: float = 7.5
    seed: int = 0
    face_prompts: list[str] = field(default_factory=lambda: list(FACE_PROMPTS))
    hand_prompts: list[str] = field(default_factory=lambda: list(HAND_PROMPTS))
    overwrite: bool = False  # replace earlier training runs under out_dir (else they are refused)


def _train_cfg(o: ExperimentOptions, stage: Stage, data: str, out: str, **kw) -> TrainConfig:
    return TrainConfig(
        stage=stage, model=o.base, output_dir=out, seed=o.seed, batch_size=o.batch_size, tensorboard=False,
        data=DataConfig(path=data, resolution=o.resolution, caption_dropout=0.1), log_every=50,
        checkpoint_every=10**9, **kw,
    )  # fmt: skip


def gate_means_for_prompts(
    model: DiffusionModel, prompts: list[str], steps: int, guidance_scale: float, resolution: int, seed: int
) -> dict:
    """Generate `prompts` with MoLE active, recording gates; return per-expert means (overall and per step)."""
    pipe = model.pipe
    f = model.vae_scale_factor
    with record_gates(model.denoiser, keep_local=False, latent_hw=(resolution // f, resolution // f)) as rec:
        pipe(
            prompts, num_inference_steps=steps, guidance_scale=guidance_scale, height=resolution, width=resolution,
            generator=torch.Generator().manual_seed(seed), output_type="latent",
        )  # fmt: skip
    g = rec.global_gates()  # (steps, layers, b, e); b = [uncond x n, cond x n] under CFG
    n = len(prompts)
    cond = g[:, :, -n:, :]
    per_step = cond.mean(dim=(1, 2))  # (steps, e)
    band = cond.mean(dim=1).std(dim=1)  # (steps, e): spread over prompts
    return {
        "mean": {name: float(cond[..., i].mean()) for i, name in enumerate(rec.expert_names)},
        "per_step": {name: [round(float(v), 5) for v in per_step[:, i]] for i, name in enumerate(rec.expert_names)},
        "per_step_std_over_prompts": {
            name: [round(float(v), 5) for v in band[:, i]] for i, name in enumerate(rec.expert_names)
        },
    }


def run_gate_experiment(o: ExperimentOptions) -> dict:
    t0 = time.perf_counter()
    out = Path(o.out_dir)
    stage1 = None
    if o.finetune_steps > 0:
        stage1 = train(_train_cfg(o, Stage.FINETUNE, o.mix_dir, str(out / "stage1"), max_steps=o.finetune_steps,
                                  optim=OptimConfig(name="adamw", lr=o.finetune_lr)),
                       overwrite=o.overwrite)  # fmt: skip
        o = replace(o, base=str(stage1.final[0]))
    experts = {}
    for name, folder in (("face", o.face_dir), ("hand", o.hand_dir)):
        experts[name] = train(_train_cfg(o, Stage.EXPERT, folder, str(out / f"stage2-{name}"),
                                         max_steps=o.expert_steps, expert=ExpertTrainConfig(name=name, rank=o.rank),
                                         optim=OptimConfig(lr=o.expert_lr)), overwrite=o.overwrite)  # fmt: skip
    face, hand = experts["face"], experts["hand"]
    mix = train(_train_cfg(o, Stage.MIXTURE, o.mix_dir, str(out / "stage3"), max_steps=o.gate_steps,
                           mixture=MixtureTrainConfig(experts={"face": str(face.final[0]), "hand": str(hand.final[0])}),
                           optim=OptimConfig(lr=o.gate_lr)), overwrite=o.overwrite)  # fmt: skip
    model = DiffusionModel.from_pretrained(o.base)
    load_mole(model.denoiser, mix.final[0])
    on_face = gate_means_for_prompts(model, o.face_prompts, o.sample_steps, o.guidance_scale, o.resolution, o.seed)
    on_hand = gate_means_for_prompts(model, o.hand_prompts, o.sample_steps, o.guidance_scale, o.resolution, o.seed)
    summary = {
        "base": o.base,
        "training": {
            "stage1": None
            if stage1 is None
            else {"probe_loss_first": stage1.probe_loss_first, "probe_loss_last": stage1.probe_loss_last},
            "face_expert": {"probe_loss_first": face.probe_loss_first, "probe_loss_last": face.probe_loss_last},
            "hand_expert": {"probe_loss_first": hand.probe_loss_first, "probe_loss_last": hand.probe_loss_last},
            "gates": {
                "probe_loss_first": mix.probe_loss_first,
                "probe_loss_last": mix.probe_loss_last,
                "gate_log_last": mix.gate_log[-1] if mix.gate_log else None,
            },
        },  # fmt: skip
        "files": {"face": str(face.final[0]), "hand": str(hand.final[0]), "mole": str(mix.final[0])},
        "face_prompts": on_face,
        "hand_prompts": on_hand,
        "face_gate_face_minus_hand_prompts": on_face["mean"]["face"] - on_hand["mean"]["face"],
        "hand_gate_hand_minus_face_prompts": on_hand["mean"]["hand"] - on_face["mean"]["hand"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "gate_experiment.json").write_text(json.dumps(summary, indent=2))
    return summary
