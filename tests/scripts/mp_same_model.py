"""Run under torchrun: train stages 2, 3 and 1 for 4 steps of 4 images (batch_size per process, total 4) with
every random draw on (flips, random crops, caption dropout, noise offset, VAE sampling); write this process's
per-step losses and batch plan to <out>/<stage>/rank<r>.json. tests/test_reproducible.py compares the final files
with a one-process run of the same settings (overrides() below)."""

import json
import os
import sys

STAGES = ("stage2", "stage3", "stage1")
# the runs of one launch: each stage under DDP (the default) and FSDP2 ("<stage>-fsdp2")
RUNS = (*STAGES, *(f"{s}-fsdp2" for s in STAGES))


def overrides(stage: str, model: str, data: str, out: str, experts: str, batch_size: int) -> tuple[str, list[str]]:
    """(preset, overrides) of one stage's run; `experts` is the TOML table of stage 3's expert files."""
    common = [f"model='{model}'", f"data.path='{data}'", f"output_dir='{out}'", "max_steps=4", "log_every=1",
              "checkpoint_every=100", f"batch_size={batch_size}", "total_batch_size=4", "data.resolution=32",
              "data.center_crop=false", "data.random_flip=true", "data.caption_dropout=0.25", "noise_offset=0.05",
              "tensorboard=false", "seed=7"]  # fmt: skip
    extra = {
        "stage2": ("stage2-face", ["expert.rank=4", "expert.alpha=4", "optim.lr=1e-3"]),
        "stage3": ("stage3", [f"mixture.experts={experts}", "optim.lr=1e-3"]),
        "stage1": ("stage1", ["optim.lr=1e-4"]),
    }[stage]
    return extra[0], common + extra[1]


if __name__ == "__main__":
    from mole.training import load_config, train

    out, model, data, experts = sys.argv[1:5]
    rank = os.environ.get("RANK", "0")
    for run in RUNS:
        stage, _, strategy = run.partition("-")
        preset, over = overrides(stage, model, data, os.path.join(out, run), experts, batch_size=2)
        over += [f"distributed={strategy or 'ddp'}"]
        result = train(load_config(preset=preset, overrides=over))
        with open(os.path.join(out, run, f"rank{rank}.json"), "w") as f:
            json.dump({"losses": result.losses, "world": os.environ.get("WORLD_SIZE"), "batch": result.batch,
                       "gate_log": result.gate_log}, f)  # fmt: skip
