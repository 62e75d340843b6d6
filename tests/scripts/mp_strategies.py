"""Run under torchrun (2 processes, gloo): the same short trainings under DDP and FSDP2, one sharded stop + resume,
and a comparison of the files they leave; rank 0 writes report.json (read by tests/test_distributed.py).

    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 tests/scripts/mp_strategies.py OUT MODEL DATA [WHICH]
WHICH: comma-separated parts (s2, s1, s3; default all; z: stage 2 under DeepSpeed ZeRO-2 / ZeRO-3, needs deepspeed).
"""

import json
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import load_file

from mole.training import load_config, train

out, model, data = (Path(a) for a in sys.argv[1:4])
which = set((sys.argv[4] if len(sys.argv) > 4 else "s2,s1,s3").split(","))
rank = int(os.environ.get("RANK", "0"))
COMMON = [f"model='{model}'", f"data.path='{data}'", "data.resolution=32", "tensorboard=false", "batch_size=1",
          "total_batch_size=2", "data.caption_dropout=0.0", "log_every=1"]  # fmt: skip
report: dict = {"world": os.environ.get("WORLD_SIZE")}


def run(name, preset, *extra):
    t0 = time.perf_counter()
    cfg = load_config(preset=preset, overrides=[*COMMON, f"output_dir='{out / name}'", *extra])
    result = train(cfg)
    report[name] = {"seconds": round(time.perf_counter() - t0, 2), "checksum": result.trainable_checksum,
                    "losses": result.losses, "start_step": result.start_step,
                    "checkpoints": [p.name for p in result.checkpoints]}  # fmt: skip
    return result


def diffs(a: dict, b: dict) -> dict[str, float]:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return {k: float((a[k].double() - b[k].double()).abs().max()) for k in a}


def files(path: Path) -> dict:
    out = {}
    for f in sorted(path.rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.relative_to(path)}:{k}"] = v
    return out


if "s2" in which:  # stage 2, clipping that bites (max_grad_norm far below the gradients' norm)
    s2 = ["expert.rank=4", "expert.alpha=4", "optim.lr=1e-3", "max_steps=4", "checkpoint_every=2"]
    run("s2_ddp", "stage2-face", *s2, "optim.max_grad_norm=1e-4")
    run("s2_fsdp", "stage2-face", *s2, "optim.max_grad_norm=1e-4", "distributed=fsdp2")
    run("s2_fsdp_noclip", "stage2-face", *s2, "optim.max_grad_norm='none'", "distributed=fsdp2")
    # sharded stop after 2 steps, then resume=latest to 4 (as a kill -9 after checkpoint 2 leaves it)
    run("s2_res", "stage2-face", *s2[:3], "max_steps=2", "checkpoint_every=2", "optim.max_grad_norm=1e-4",
        "distributed=fsdp2")  # fmt: skip
    run("s2_res", "stage2-face", *s2, "optim.max_grad_norm=1e-4", "distributed=fsdp2", "resume=latest")
KILL = ["expert.rank=4", "expert.alpha=4", "optim.lr=1e-3", "max_steps=16", "checkpoint_every=2",
        "optim.max_grad_norm=1e-4", "distributed=fsdp2"]  # fmt: skip
if "k1" in which:  # killed with SIGKILL by the test once a checkpoint is written
    run("k_res", "stage2-face", *KILL)
if "k2" in which:  # resume the killed run; and the same run uninterrupted
    run("k_res", "stage2-face", *KILL, "resume=latest")
    run("k_full", "stage2-face", *KILL)
if "z" in which:  # DeepSpeed through accelerate: ZeRO-2, ZeRO-3, a ZeRO-2 stop + resume
    s2 = ["expert.rank=4", "expert.alpha=4", "optim.lr=1e-3", "max_steps=4", "checkpoint_every=2",
          "optim.max_grad_norm=1e-4"]  # fmt: skip
    if "s2_ddp" not in report:
        run("s2_ddp", "stage2-face", *s2)
    run("s2_zero2", "stage2-face", *s2, "distributed=zero2")
    run("s2_zero3", "stage2-face", *s2, "distributed=zero3")
    run("s2_zres", "stage2-face", *s2, "max_steps=2", "distributed=zero2")
    run("s2_zres", "stage2-face", *s2, "distributed=zero2", "resume=latest")
if "z1" in which:  # stage 1 (UNet + text encoder as one DeepSpeed model), not run by the tests (slow)
    s1 = ["optim.lr=1e-4", "max_steps=2", "checkpoint_every=100", "train_text_encoder=true"]
    if "s1_ddp" not in report:
        run("s1_ddp", "stage1", *s1)
    run("s1_zero2", "stage1", *s1, "distributed=zero2")
    try:
        run("s1_zero3", "stage1", *s1, "distributed=zero3")
    except ValueError as exc:  # refused before loading: CLIP under ZeRO-3 cannot train
        report["s1_zero3_refused"] = str(exc)
if "s1" in which:  # stage 1: UNet and text encoder, each its own FSDP unit
    s1 = ["optim.lr=1e-4", "max_steps=2", "checkpoint_every=100", "train_text_encoder=true"]
    run("s1_ddp", "stage1", *s1)
    run("s1_fsdp", "stage1", *s1, "distributed=fsdp2")
if "s3" in which:
    from mole import save_expert
    from mole.models import DiffusionModel
    from mole.tiny import random_expert

    if rank == 0:
        base = DiffusionModel.from_pretrained(model).denoiser
        for i, n in enumerate(("face", "hand")):
            save_expert(random_expert(base, n, rank=4, seed=i + 1, std=0.05), out / f"{n}.safetensors")
    dist.barrier()
    s3 = ["optim.lr=1e-3", "max_steps=2", "checkpoint_every=100", "mixture.gate_init='zero'",
          f"mixture.experts={{face = '{out / 'face.safetensors'}', hand = '{out / 'hand.safetensors'}'}}"]  # fmt: skip
    run("s3_ddp", "stage3", *s3)
    run("s3_fsdp", "stage3", *s3, "distributed=fsdp2")

if rank == 0:
    pairs = {"s2_fsdp": "s2_ddp", "s2_fsdp_noclip": "s2_ddp", "s2_res": "s2_fsdp", "s1_fsdp": "s1_ddp",
             "s3_fsdp": "s3_ddp", "s2_zero2": "s2_ddp", "s2_zero3": "s2_ddp", "s2_zres": "s2_zero2",
             "s1_zero2": "s1_ddp", "k_res": "k_full"}  # fmt: skip
    for a, b in pairs.items():
        if a in report:
            fa, fb = files(out / a / "final"), files(out / b / "final")
            report[a]["files"] = sorted(fa)
            d = diffs(fa, fb)
            report[a]["vs"] = b
            report[a]["max_diff"] = max(d.values())
            report[a]["above_1e-6"] = {k: v for k, v in d.items() if v > 1e-6}
    if "s1" in which:  # the whole pipeline loads as a plain diffusers pipeline
        from mole.models import DiffusionModel

        m = DiffusionModel.from_pretrained(out / "s1_fsdp" / "final")
        unet_config = json.loads((out / "s1_fsdp/final/unet/config.json").read_text())
        report["s1_fsdp"]["unet_class"] = unet_config["_class_name"]
        report["s1_fsdp"]["loaded"] = type(m.denoiser).__name__
    if "s3" in which:  # the MoLE file names the plain UNet and loads into one
        from mole import load_mole, mole_layers
        from mole.formats.mole_file import read_mole_manifest

        path = out / "s3_fsdp" / "final" / "mole.safetensors"
        report["s3_fsdp"]["class"] = read_mole_manifest(path)["base_model"]["class"]
        unet = DiffusionModel.from_pretrained(model).denoiser
        load_mole(unet, path)
        report["s3_fsdp"]["loaded_layers"] = len(mole_layers(unet))
    if "s1" in which and "s3" in which:  # `mole generate` on the fine-tuned pipeline with the MoLE file
        from mole.cli import main

        gen = ["generate", "--base", str(out / "s1_fsdp" / "final"), "--mole", str(path), "--prompt", "a face",
               "--steps", "2", "--height", "32", "--width", "32", "--device", "cpu", "--out", str(out / "gen"),
               "--no-strict-base", "-q"]  # fmt: skip
        report["generate_rc"] = main(gen)
        report["generated"] = sorted(p.name for p in (out / "gen").rglob("*.png"))
    (out / "report.json").write_text(json.dumps(report, indent=1))
dist.barrier()
