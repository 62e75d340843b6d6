"""Build mole-tiny from scratch: pretrain the base, train the face and hand experts and the gates, package them.

    .venv/bin/python scripts/build_mole_tiny.py --data ../shared/data --tokenizer ../shared/assets/clip_tokenizer \
        --work runs/mole-tiny-build            # ~60-80 min on 2 CPU cores; --resume continues a killed run

Writes src/mole/assets/mole_tiny/{pipeline/, mole.safetensors, build.json} (pass --no-install to leave the package
alone). Every step is seeded; the base phase resumes from its checkpoints.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="data root laid out like ../shared/data")
    p.add_argument("--tokenizer", required=True, help="CLIP tokenizer folder (vocab.json, merges.txt)")
    p.add_argument("--work", default="runs/mole-tiny-build")
    p.add_argument("--vae-steps", type=int, default=2400)
    p.add_argument("--steps", type=int, default=3200)
    p.add_argument("--expert-steps", type=int, default=1200)
    p.add_argument("--gate-steps", type=int, default=500)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-install", action="store_true", help="do not copy the result into src/mole/assets")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from diffusers import DiffusionPipeline

    from mole.mole_tiny import ASSETS
    from mole.pretrain.stages import StageOptions, balanced_mix, experts_and_gates
    from mole.pretrain.train import PretrainOptions, pretrain

    t0 = time.perf_counter()
    work = Path(args.work)
    base_dir = work / "base"
    if (base_dir / "pretrain.json").is_file():
        base = json.loads((base_dir / "pretrain.json").read_text())
    else:
        base = pretrain(PretrainOptions(data=args.data, tokenizer=args.tokenizer, out=str(base_dir),
                                        vae_steps=args.vae_steps, steps=args.steps, resume=args.resume))  # fmt: skip
    # the shipped base is stored in fp16: stages 2 and 3 train on exactly those (rounded) weights
    target = ASSETS if not args.no_install else work / "package"
    target.mkdir(parents=True, exist_ok=True)
    if (target / "pipeline").exists():
        shutil.rmtree(target / "pipeline")
    pipe = DiffusionPipeline.from_pretrained(base["pipeline"], dtype=torch.float32)
    pipe.to(torch.float16).save_pretrained(target / "pipeline")
    base_name = "mole-tiny" if not args.no_install else str(target / "pipeline")
    # the gates see scenes, faces and hands in equal shares (the base's own mix is mostly hands)
    scenes = work / "scenes_train"
    if not scenes.is_dir():
        scenes.mkdir(parents=True)
        for img in Path(base["data"]["mix"]).glob("scene_*.png"):
            shutil.copyfile(img, scenes / img.name)
            shutil.copyfile(img.with_suffix(".txt"), scenes / (img.stem + ".txt"))
    mix = balanced_mix({"scene": scenes, "face": base["data"]["face"], "hand": base["data"]["hand"]},
                       work / "gate_mix", per_source=200)  # fmt: skip
    stages = experts_and_gates(StageOptions(
        base=base_name, face_dir=base["data"]["face"], hand_dir=base["data"]["hand"], mix_dir=str(mix),
        out_dir=str(work / "stages"), rank=args.rank, expert_steps=args.expert_steps, gate_steps=args.gate_steps,
        gatings=["both", "local", "global"],
    ))  # fmt: skip
    shutil.copyfile(stages["gates"]["both"]["file"], target / "mole.safetensors")
    build = {"base": base, "stages": stages, "seconds": round(time.perf_counter() - t0, 1)}
    (work / "build.json").write_text(json.dumps(build, indent=2))
    (target / "build.json").write_text(json.dumps(
        {"vocabulary": base["vocabulary"], "corpus": base["corpus"], "steps": base["steps"],
         "vae_steps": base["vae_steps"], "loss_first100": base["loss_first100"], "loss_last100": base["loss_last100"],
         "vae_l1_last100": base["vae_l1_last100"], "rank": args.rank, "expert_steps": args.expert_steps,
         "gate_steps": args.gate_steps,
         "experts": {k: {kk: vv for kk, vv in v.items() if kk != "file"} for k, v in stages["experts"].items()},
         "gates": {k: {kk: vv for kk, vv in v.items() if kk != "file"} for k, v in stages["gates"].items()}},
        indent=2))  # fmt: skip
    print(json.dumps({"package": str(target), "work": str(work), "seconds": build["seconds"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
