"""The dataset pipeline's steps measured on data with ground truth (issue 15); figures for bench/RESULTS.md.

    PYTHONPATH=src .venv/bin/python bench/data_quality.py [--only prompts,captions,sharpness] [--data ../shared/data]

- prompts:   precision / recall of the human-prompt rule on the hand-labelled samples in tests/data/
- captions:  COCO captions that lose a content word in the VLM clean-up (must be none; a few COCO captions open with
             a frame, "This is a picture of", which may go) and framed copies ("The image shows ...") restored exactly
- sharpness: share of ORL faces / real hand photos kept by the default Laplacian floor, and of their Gaussian-blurred
             copies (sigma 2 and 3 px) dropped
Prints one table per part and writes runs/data_quality.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prompts(data: Path) -> dict:
    from mole.eval.human_text import is_human_text

    out = {}
    for name in ("coco", "diffusiondb"):
        rows = [json.loads(x) for x in (ROOT / "tests" / "data" / f"human_prompts_{name}_labelled.jsonl")
                .read_text().splitlines() if x.strip()]  # fmt: skip
        pred = [is_human_text(r["prompt"]) for r in rows]
        tp = sum(p and r["human"] for p, r in zip(pred, rows))
        out[name] = {"labelled": len(rows), "human": sum(r["human"] for r in rows), "kept": sum(pred),
                     "precision": round(tp / max(1, sum(pred)), 4),
                     "recall": round(tp / max(1, sum(r["human"] for r in rows)), 4)}  # fmt: skip
    return out


def captions(data: Path) -> dict:
    from mole.data.captions import clean_caption

    anns = json.loads((data / "prompts" / "coco_captions_val2017.json").read_text())["annotations"]
    texts = [" ".join(a["caption"].split()) for a in anns]
    changed = [(t, clean_caption(t)) for t in texts if _words(clean_caption(t)) != _words(t)]
    # a caption loses content when what is left is not the original's tail (only a leading frame may go)
    lost = [(t, c) for t, c in changed if _words(c) != _words(t)[len(_words(t)) - len(_words(c)) :] or not c]
    frames = ["The image shows {}", "In this picture, {}", "This image depicts {}", "The photo features {}",
              "In the image, we can see {}", "This is an image of {}"]  # fmt: skip
    rng = random.Random(0)
    sample = rng.sample(texts, 500)
    restored = 0
    for t in sample:
        framed = rng.choice(frames).format(t[:1].lower() + t[1:])
        restored += _words(clean_caption(framed)) == _words(t)
    return {
        "coco_captions": len(texts),
        "leading_frame_removed": len(changed) - len(lost),
        "captions_losing_content_words": len(lost),
        "examples_frame_removed": changed[:3],
        "examples_lost": lost[:5],
        "framed_sample": len(sample),
        "framed_restored_exactly": restored,
    }


def _words(t: str) -> list[str]:
    return [w.strip(".,;:!\"'").lower() for w in t.split() if w.strip(".,;:!\"'")]


def sharpness(data: Path, limit: int = 200) -> dict:
    from PIL import ImageFilter

    from mole.data.build import BuildOptions
    from mole.data.dataset import load_rgb
    from mole.data.quality import laplacian_variance

    floor = BuildOptions.__dataclass_fields__["min_sharpness"].default
    sets = {"orl_faces": sorted((data / "faces" / "orl").rglob("*.pgm")),
            "hands_11k": sorted((data / "hands" / "11k_hands_sample").glob("*.jpg")),
            "hands_sign_language": sorted((data / "hands" / "sign_language_digits").rglob("*.JPG"))}  # fmt: skip
    out = {"min_sharpness": floor}
    for name, files in sets.items():
        files = random.Random(0).sample(files, min(limit, len(files)))
        ims = [load_rgb(p) for p in files]
        row = {"images": len(ims), "kept_sharp": round(sum(laplacian_variance(i) >= floor for i in ims) / len(ims), 4)}
        for sigma in (2, 3):
            blurred = [i.filter(ImageFilter.GaussianBlur(sigma)) for i in ims]
            row[f"dropped_blur_sigma{sigma}"] = round(sum(laplacian_variance(b) < floor for b in blurred) / len(ims), 4)
        out[name] = row
    return out


PARTS = {"prompts": prompts, "captions": captions, "sharpness": sharpness}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--only", default=",".join(PARTS), help="comma-separated parts: " + ", ".join(PARTS))
    p.add_argument("--out", default="runs/data_quality.json")
    args = p.parse_args(argv)
    results = {}
    for part in args.only.split(","):
        results[part] = PARTS[part](Path(args.data))
        print(f"## {part}\n{json.dumps(results[part], indent=2)}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
