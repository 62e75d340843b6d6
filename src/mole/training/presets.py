"""The paper's training settings per stage, each value with where it comes from.

A preset is a table of dotted option names -> (value, source). `PRESETS` holds the values as nested tables (what
`load_config(preset=...)` merges under a TOML file and `--set` overrides); `PRESET_SOURCES` holds the sources, which
`mole train --preset NAME --print-config` writes as a comment after each option.

Sources: "paper" is Zhu et al., MoLE (NeurIPS 2024), appendix "Training details" of each stage; "official script"
is the training command of that stage in github.com/JiePKU/MoLE (command/*.sh, kohya sd-scripts flags). Options the
paper leaves open say so ("not in the paper") and keep this library's default.
"""

from __future__ import annotations

from typing import Any

PAPER = "paper appendix"
SD15 = "runwayml/stable-diffusion-v1-5"
PER_DEVICE = ("not in the paper: the per-device micro-batch; lower it until a step fits in memory, grad_accum "
              "follows")  # fmt: skip

_STAGE1: dict[str, tuple[Any, str]] = {
    "stage": (1, f"{PAPER}, Stage 1: fine-tuning on the human-centric dataset"),
    "model": (SD15, f"{PAPER}, Stage 1: SD v1.5"),
    "output_dir": ("runs/stage1", "stage 2 and 3 presets read runs/stage1/final"),
    "data.path": ("data/human_in_the_scene", f"{PAPER}, Stage 1: the human-in-the-scene set (`mole data scenes`)"),
    "train_text_encoder": (True, f"{PAPER}, Stage 1: fine-tune text encoder + UNet"),
    "total_batch_size": (64, f"{PAPER}, Stage 1: batch size 64 (reached by gradient accumulation)"),
    "batch_size": (8, PER_DEVICE),
    "max_steps": (300_000, f"{PAPER}, Stage 1: 300k steps (official script: --max_train_steps=300000)"),
    "min_snr_gamma": (5.0, f"{PAPER}, Stage 1: Min-SNR weighting (official script: --min_snr_gamma=5)"),
    "clip_skip": (1, f"{PAPER}, Stage 1: clip skip 1 (the last CLIP layer; official script: --clip_skip=1)"),
    "optim.name": ("lion", f"{PAPER}, Stage 1: Lion (official script: --use_lion_optimizer)"),
    "optim.lr": (2e-6, f"{PAPER}, Stage 1: lr 2e-6"),
    "optim.schedule": ("constant", f"{PAPER}, Stage 1: constant learning rate"),
    "optim.warmup_steps": (0, f"{PAPER}, Stage 1: constant learning rate (no warm-up)"),
    "optim.betas": ([0.9, 0.99], "not in the paper: Lion's default betas (kohya / lion-pytorch)"),
    "optim.weight_decay": (1e-2, "not in the paper: Lion's default weight decay in kohya sd-scripts"),
}

_CLIP_SKIP_LATER = ("not stated for this stage: the last CLIP layer, as in stage 1 (the official script passes no "
                    "--clip_skip: kohya's default, the same)")  # fmt: skip
_NO_MIN_SNR = ("not in the paper for this stage (it names Min-SNR for stage 1 only); the official script passes no "
               "--min_snr_gamma: plain MSE")  # fmt: skip


def _stage2(part: str, steps: int, lr: float, alpha: float, script: str) -> dict[str, tuple[Any, str]]:
    s = f"{PAPER}, Stage 2 ({part} expert)"
    return {
        "stage": (2, f"{PAPER}, Stage 2: low-rank expert generation"),
        "model": ("runs/stage1/final", f"{PAPER}, Stage 2: trained on the stage-1 model"),
        "output_dir": (f"runs/stage2-{part}", f"stage 3 preset reads runs/stage2-{part}/final/{part}.safetensors"),
        "data.path": (f"data/{part}_closeups", f"{s}: the close-up {part} set (`mole data closeups --part {part}`)"),
        "expert.name": (part, s),
        "expert.rank": (256, f"{s}: rank 256 (official script: --network_dim=256)"),
        "expert.alpha": (alpha, f"official script {script}: --network_alpha={alpha:g} (scale alpha/rank "
                                f"= {alpha / 256:g})"),  # fmt: skip
        "total_batch_size": (64, f"{s}: batch size 64 (reached by gradient accumulation)"),
        "batch_size": (8, PER_DEVICE),
        "max_steps": (steps, f"{s}: {steps // 1000}k steps (official script: --max_train_steps={steps})"),
        "clip_skip": (1, _CLIP_SKIP_LATER),
        "min_snr_gamma": (None, _NO_MIN_SNR),
        "optim.name": ("adamw", f"{s}: AdamW (official script: --optimizer_type=AdamW)"),
        "optim.lr": (lr, f"{s}: lr {lr:g}"),
        "optim.schedule": ("constant", f"{s}: constant learning rate"),
        "optim.warmup_steps": (0, f"{s}: constant learning rate (no warm-up)"),
        "train_text_encoder": (False, f"{s}: UNet only (official script: --network_train_unet_only)"),
    }


_STAGE3: dict[str, tuple[Any, str]] = {
    "stage": (3, f"{PAPER}, Stage 3: soft mixture assignment (gates only)"),
    "model": ("runs/stage1/final", f"{PAPER}, Stage 3: on the stage-1 model"),
    "output_dir": ("runs/stage3", "where `mole eval` configs look for runs/stage3/final/mole.safetensors"),
    "data.path": ("data/human_in_the_scene", f"{PAPER}, Stage 3: the human-in-the-scene set"),
    "mixture.experts": ({"face": "runs/stage2-face/final/face.safetensors",
                         "hand": "runs/stage2-hand/final/hand.safetensors"},
                        f"{PAPER}, Stage 3: the face and hand experts of stage 2"),  # fmt: skip
    "mixture.gating": ("both", f"{PAPER}, Stage 3: local and global assignment together (Table 3: best)"),
    "total_batch_size": (64, f"{PAPER}, Stage 3: batch size 64 (reached by gradient accumulation)"),
    "batch_size": (8, PER_DEVICE),
    "max_steps": (50_000, f"{PAPER}, Stage 3: 50k steps (official script: --max_train_steps=50000)"),
    "clip_skip": (1, _CLIP_SKIP_LATER),
    "min_snr_gamma": (None, _NO_MIN_SNR),
    "optim.name": ("adamw", f"{PAPER}, Stage 3: AdamW (official script: --optimizer_type=AdamW)"),
    "optim.lr": (1e-5, f"{PAPER}, Stage 3: lr 1e-5"),
    "optim.schedule": ("constant", f"{PAPER}, Stage 3: constant learning rate"),
    "optim.warmup_steps": (0, f"{PAPER}, Stage 3: constant learning rate (no warm-up)"),
}

_IM = "not from the MoLE paper: InstructMoLE official code (yanq095/InstructMoLE: train_config.json, src/lora_moe.py)"
_INSTRUCT: dict[str, tuple[Any, str]] = {
    "stage": (4, "InstructMoLE on a DiT: experts from scratch + instruction router, jointly"),
    "optim.name": ("adamw", _IM),
    "optim.lr": (1e-4, _IM),
    "optim.weight_decay": (1e-4, f"{_IM}: AdamW weight decay 1e-4 (the library's default 1e-2 is kohya's Lion's)"),
    "instruct.variant": ("official", f"{_IM}: resampler routing, TopKGate top-4 of 8 rank-32 experts, count-based "
                                     "balance 0.1, batch-wide orthogonality 0.01, cosine decay (see README)"),
}

_TABLES: dict[str, dict[str, tuple[Any, str]]] = {
    "stage1": _STAGE1,
    "stage2-face": _stage2("face", 30_000, 2e-5, 64.0, "command/lora_unet_adamw_face-bsd15.sh"),
    "stage2-hand": _stage2("hand", 60_000, 1e-5, 128.0, "command/lora_unet_adamw_hand_test_alpha128_bsd15.sh"),
    "stage3": _STAGE3,
    "instruct": _INSTRUCT,
}


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


PRESETS: dict[str, dict[str, Any]] = {name: _nest({k: v for k, (v, _) in t.items()}) for name, t in _TABLES.items()}
PRESET_SOURCES: dict[str, dict[str, str]] = {name: {k: s for k, (_, s) in t.items()} for name, t in _TABLES.items()}
