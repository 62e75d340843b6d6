"""Small-scale real experiment: do the gates open the face expert for face close-ups and the hand expert for hands?

Trains a face expert on ../shared/data faces (ORL), a hand expert on hand close-ups (Sign-Language-Digits), gates on
a mix of both plus COCO scenes with their captions, then records the global gates while sampling face and hand
close-up prompts. Writes <out>/gate_experiment.json.

    python examples/gate_experiment.py --out runs/gate-exp                 # tiny random SD1.5, CPU, minutes
    python examples/gate_experiment.py --base path/to/sd15 --resolution 512 --rank 256 ...   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def captioned(folder: Path, items: list[tuple[Path, str]]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (src, caption) in enumerate(items):
        link = folder / f"{i:05d}{src.suffix.lower()}"
        if not link.exists():
            link.symlink_to(src.resolve())
        link.with_suffix(".txt").write_text(caption)
    return str(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="diffusers pipeline folder (default: a tiny random SD1.5 built here)")
    ap.add_argument("--out", default="runs/gate-exp")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--finetune-steps", type=int, default=0, help="stage 1 on the mix first")
    ap.add_argument("--expert-steps", type=int, default=200)
    ap.add_argument("--gate-steps", type=int, default=200)
    ap.add_argument("--per-set", type=int, default=200, help="images per close-up set")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from mole.experiment import ExperimentOptions, run_gate_experiment

    out = Path(args.out)
    rng = random.Random(args.seed)
    faces = sorted((SHARED / "faces" / "orl").glob("s*/*.pgm"))
    hands = sorted((SHARED / "hands" / "sign_language_digits").glob("*/*.JPG"))
    rng.shuffle(faces)
    rng.shuffle(hands)
    faces, hands = faces[: args.per_set], hands[: args.per_set]
    coco = SHARED / "scenes" / "coco_mini"
    caps = json.loads((coco / "annotations" / "captions_train2017.json").read_text())
    first_caption = {}
    for a in caps["annotations"]:
        first_caption.setdefault(a["image_id"], a["caption"].strip())
    scenes = [(coco / "train2017" / im["file_name"], first_caption[im["id"]]) for im in caps["images"]
              if im["id"] in first_caption and (coco / "train2017" / im["file_name"]).is_file()]  # fmt: skip

    face_dir = captioned(out / "data" / "faces", [(p, "a close-up photo of a face") for p in faces])
    hand_dir = captioned(out / "data" / "hands", [(p, "a close-up photo of a hand") for p in hands])
    mix = [(p, "a close-up photo of a face") for p in faces[:60]] + [(p, "a close-up photo of a hand")
                                                                      for p in hands[:60]] + scenes  # fmt: skip
    mix_dir = captioned(out / "data" / "mix", mix)

    base = args.base
    if base is None:
        from mole.tiny import tiny_pipeline

        base = str(out / "tiny-sd15")
        if not Path(base, "model_index.json").is_file():
            from mole.tiny import tiny_clip_tokenizer

            clip = SHARED.parent / "assets" / "clip_tokenizer"  # word-level tokens: "face" and "hand" differ
            tokenizer = tiny_clip_tokenizer(clip) if clip.is_dir() else None
            tiny_pipeline("sd15", tokenizer=tokenizer, seed=args.seed).save_pretrained(base)
    summary = run_gate_experiment(ExperimentOptions(
        base=base, face_dir=face_dir, hand_dir=hand_dir, mix_dir=mix_dir, out_dir=str(out),
        resolution=args.resolution, rank=args.rank, finetune_steps=args.finetune_steps,
        expert_steps=args.expert_steps, gate_steps=args.gate_steps,
        seed=args.seed,
    ))  # fmt: skip
    print(json.dumps({k: v for k, v in summary.items() if k not in ("face_prompts", "hand_prompts")}, indent=2))
    print("face prompts:", summary["face_prompts"]["mean"], " hand prompts:", summary["hand_prompts"]["mean"])


if __name__ == "__main__":
    main()
