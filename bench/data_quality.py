"""The dataset pipeline's steps measured on data with ground truth (issue 15); figures for bench/RESULTS.md.

    PYTHONPATH=src .venv/bin/python bench/data_quality.py [--only prompts,captions,sharpness,scenes,closeups]

- prompts:   precision / recall of the human-prompt rule on the hand-labelled samples in tests/data/
- captions:  COCO captions that lose a content word in the VLM clean-up (must be none; a few COCO captions open with
             a frame, "This is a picture of", which may go) and framed copies ("The image shows ...") restored exactly
- sharpness: share of ORL faces / real hand photos kept by the default Laplacian floor, and of their Gaussian-blurred
             copies (sigma 2 and 3 px) dropped
- scenes:    `mole data scenes` (defaults) on the 159 annotated coco_mini photos against the COCO person masks: kept
             windows with < 1 % person, photos with people >= 5 % / 20 % that yield a crop, little-person drops right
- closeups:  face / hand close-ups against COCO keypoints (nose / eyes inside a face crop, a wrist near a hand crop)
Prints one table per part and writes runs/data_quality.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # coco_truth


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


def _coco_build(data: Path, work: Path, **options) -> tuple[dict, list[dict], list[dict], dict]:
    """`mole data` on the annotated coco_mini photos (symlinked into `work`): stats, manifest rows, dropped windows,
    ground truth by file name."""
    import shutil

    from coco_truth import load
    from mole.data.build import BuildOptions, build_dataset

    truth = load(data / "scenes" / "coco_mini")
    src = work / "src"
    shutil.rmtree(work, ignore_errors=True)
    src.mkdir(parents=True)
    for name, t in truth.items():
        (src / name).symlink_to(t.path)
    stats = build_dataset(BuildOptions(source=str(src), out_dir=str(work / "out"), workers=1, **options))
    rows = [json.loads(x) for x in (work / "out" / "manifest.jsonl").read_text().splitlines() if x.strip()]
    drops = [json.loads(x) for x in (work / "out" / "drops.jsonl").read_text().splitlines() if x.strip()]
    return stats, rows, drops, truth


# a window dropped as "little person" is right when no single person in it covers >= this much of it (GT masks)
LITTLE_PERSON_TRUTH = 0.10


def scenes(data: Path, work: Path = ROOT / "runs" / "data_quality_scenes") -> dict:
    """Kept scene windows against the COCO person masks of coco_mini."""
    stats, rows, drops, truth = _coco_build(data, work, mode="scenes", captioner="template:a photo of a person")
    frac = [truth[Path(r["source"]).name].person_fraction(tuple(r["box"])) for r in rows]
    empty = [r for r, f in zip(rows, frac) if f < 0.01]
    out = {"images": len(truth), "kept_windows": len(rows), "dropped": stats["dropped"],
           "kept_with_lt_1pct_person": len(empty),
           "share_kept_lt_1pct_person": round(len(empty) / max(1, len(rows)), 4),
           "examples_kept_lt_1pct_person": [Path(r["source"]).name for r in empty[:8]]}  # fmt: skip
    kept_images = {Path(r["source"]).name for r in rows}
    for floor in (0.05, 0.2):
        big = [n for n, t in truth.items() if t.person_fraction() >= floor]
        got = [n for n in big if n in kept_images]
        out[f"images_person_ge_{int(floor * 100)}pct"] = len(big)
        out[f"of_which_yield_a_crop_{int(floor * 100)}pct"] = len(got)
        out[f"share_yield_{int(floor * 100)}pct"] = round(len(got) / max(1, len(big)), 4)
        if floor == 0.2:
            out["missed_big_person_images"] = sorted(set(big) - set(got))
    little = [d for d in drops if d["reason"] == "little_person"]
    right = [d for d in little if truth[Path(d["source"]).name].largest_person_fraction(tuple(d["box"]))
             < LITTLE_PERSON_TRUTH]  # fmt: skip
    out["little_person_drops"] = len(little)
    out["little_person_right"] = len(right)
    out["little_person_right_share"] = round(len(right) / len(little), 4) if little else None
    out["little_person_truth"] = f"largest single person < {LITTLE_PERSON_TRUTH:.0%} of the window (COCO masks)"
    sides = [r["box"][2] - r["box"][0] for r in rows]
    out["window_sides"] = {"min": min(sides, default=0), "max": max(sides, default=0)}
    out["evidence_keys"] = sorted(rows[0]["scores"]) if rows else []
    out["seconds"] = stats["seconds"]
    return out


def _near(points: list[tuple[float, float]], box: list[int], slack: float) -> bool:
    pad = slack * (box[2] - box[0])
    return any(box[0] - pad <= x <= box[2] + pad and box[1] - pad <= y <= box[3] + pad for x, y in points)


def closeups(data: Path, work: Path = ROOT / "runs" / "data_quality_closeups") -> dict:
    """Face / hand close-up crops against COCO keypoints: a face crop holds a human face when a nose or eye keypoint
    of an annotated person lies inside it; a hand crop holds a hand when a wrist keypoint lies inside it or within
    25 % of its side (the wrist is the hand's edge). Persons without keypoints (tiny or crowd) cannot vouch."""
    out = {}
    settings = (("face", (0, 1, 2), 0.0, (None, 0.5, 0.65)), ("hand", (9, 10), 0.25, (None, 0.8)))
    for part, which, slack, confs in settings:
        for conf in confs:
            opts = {"mode": "closeups", "part": part, "size": 128, "min_sharpness": 0, "min_scale": 0.0}
            if conf is not None:
                opts["min_confidence"] = conf
            stats, rows, _, truth = _coco_build(data, work, **opts)
            ok = [r for r in rows if _near(truth[Path(r["source"]).name].points(which), r["box"], slack)]
            bad = [r for r in rows if r not in ok]
            out[f"{part}_conf_{stats['options']['min_confidence']}"] = {
                "crops": len(rows), "with_keypoint": len(ok), "share": round(len(ok) / max(1, len(rows)), 4),
                "without": [(Path(r["source"]).name, r["box"], r["scores"].get("detection_confidence")) for r in bad]}
    return out


PARTS = {"prompts": prompts, "captions": captions, "sharpness": sharpness, "scenes": scenes, "closeups": closeups}


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
