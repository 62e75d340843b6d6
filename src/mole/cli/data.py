"""`mole data scenes | closeups | train-filter`: build the training sets and train the blur filter."""

from __future__ import annotations

import argparse
import json
import os

from ._common import NothingProduced, finite_float, table


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="build training sets: scene crops, face / hand close-ups, blur filter")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    scenes = data_sub.add_parser("scenes", help="human-in-the-scene: sliding-window crops with a person")
    _data_args(scenes)
    scenes.add_argument("--window", type=int, default=1024)
    scenes.add_argument("--stride", type=int, default=512)
    scenes.add_argument("--min-pose-presence", type=finite_float, default=0.8,
                        help="pose-presence score a pose found in a window needs (default 0.8; 0.5 lets through poses "
                        "on animals, food and beds)")
    scenes.add_argument("--min-person", type=finite_float, default=0.03,
                        help="the posed person's pixels a window needs, as a fraction of it (default 0.03)")
    scenes.add_argument("--little-person", type=finite_float, default=0.05,
                        help="drop windows whose person covers less than this and hold no confident face of >= 6 %% "
                        "of the window side (default 0.05)")
    scenes.add_argument("--min-person-agreement", type=finite_float, default=0.2,
                        help="share of the posed person's pixels the person segmenter must also mark as person for "
                        "the pose to count (default 0.2; poses found on objects sit on background: 0.0)")
    scenes.add_argument("--pose-tiles", action=argparse.BooleanOptionalAction, default=True,
                        help="search the four 3/4 tiles of a window without a confirmed big pose (default on; "
                        "--no-pose-tiles: the window alone)")
    scenes.add_argument("--tile-landmarks", type=int, default=0,
                        help="visible landmarks (of 33) a pose found in a tile needs (default 0: the head-face and "
                        "segmenter checks decide)")
    scenes.add_argument("--min-head-face", type=finite_float, default=0.5,
                        help="face confidence a pose needs at its head to count as a person (default 0.5; poses found "
                        "on animals, vases and food have none; 0: the segmenter check alone)")
    scenes.add_argument("--min-wrist-hand", type=finite_float, default=0.8,
                        help="hand confidence at a pose's wrist that confirms it when no face is at its head (default "
                        "0.8; a back turned, a face hidden)")
    close = data_sub.add_parser("closeups", help="face or hand close-ups from detections")
    _data_args(close)
    close.add_argument("--part", choices=["face", "hand"], default="face")
    close.add_argument("--margin", type=finite_float, default=0.4)
    merge = data_sub.add_parser("merge", help="join the parts of a build made with --shard i/n into one build")
    merge.add_argument("parts", nargs="+", metavar="PART", help="the part folders (every i of i/n once)")
    merge.add_argument("--out", required=True, help="the merged build folder")
    merge.add_argument("--shard-size", type=int, help="also write webdataset tar shards of N samples (default: "
                       "the parts' --shard-size)")
    merge.add_argument("--overwrite", action="store_true", help="replace an earlier build in --out")
    merge.add_argument("--json", action="store_true", help="print the build's stats as JSON (default: a table)")
    merge.set_defaults(func=_cmd_data_merge)
    flt = data_sub.add_parser("train-filter", help="train the blur / low-quality CNN from labelled folders")
    flt.add_argument("--good", required=True, help="sharp, good images")
    flt.add_argument("--bad", help="blurry / low-quality images (optional with synthetic blur)")
    flt.add_argument("--out", required=True, help="output .safetensors")
    flt.add_argument("--epochs", type=int, default=10)
    flt.add_argument("--no-synthetic", action="store_true", help="do not add blurred copies of the good images")
    flt.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    flt.add_argument("--json", action="store_true", help="print the result as JSON (default: a table)")
    flt.set_defaults(func=_cmd_data_filter)


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="folder of raw images (searched recursively)")
    p.add_argument("out", help="output folder: images/, manifest.jsonl, stats.json")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--min-sharpness", type=finite_float, default=30.0, help="variance-of-Laplacian floor (0: off)")
    p.add_argument("--blur-filter", help="a BlurNet from `mole data train-filter`")
    p.add_argument("--min-blur-score", type=finite_float, default=0.5)
    p.add_argument("--captioner", action="append",
                   help="template:<text with {part}> | sidecar | hf:<model> (a vision-language model per crop, the "
                   "paper's path); repeat for several (first caption wins); the mode's template ('a photo of a "
                   "person', 'a close-up photo of a face') is the default and always the last resort")
    p.add_argument("--captions-json", action="append",
                   help="for sidecar: COCO captions json or {file name: caption}; repeat for several")
    p.add_argument("--caption-prompt", help="prompt for hf: captioners that take one ('paper': the paper's "
                   "'Describe this image in one sentence with details.')")
    p.add_argument("--tokenizer", default="auto", help="CLIP tokenizer folder (vocab.json, merges.txt) to truncate "
                   "captions; auto (default): the real CLIP tokenizer when one is on this machine; none: words")
    p.add_argument("--min-confidence", type=finite_float,
                   help="detector confidence floor: the face / hand detection a close-up needs (default: 0.8 for "
                   "face close-ups, else 0.5)")
    p.add_argument("--min-face-confidence", type=finite_float, default=0.8,
                   help="scenes: a face this confident marks a window as holding a person (default 0.8)")
    p.add_argument("--min-scale", type=finite_float,
                   help="upscale floor: windows / crops whose source side is below MIN_SCALE x --size are dropped "
                   "('upscale_floor'), never upscaled more than 1/MIN_SCALE; larger ones are downscaled (a 1024 "
                   "window -> 512); 0: any upscale. Default 0.7 for scenes (at most 1.43x), 0.15 for close-ups "
                   "(small sharp close-ups such as 92-px ORL faces are kept; blur is judged at the source size)")
    p.add_argument("--dedupe-distance", type=int, default=3, choices=range(4), metavar="0-3",
                   help="near-duplicate crops across photos: pHash Hamming distance (default 3; resized / re-encoded "
                   "copies are at 0-2, and so are burst shots of one hand)")
    p.add_argument("--max-overlap", type=finite_float, default=0.5,
                   help="no two kept crops of one photo overlap by more than this IoU (default 0.5; 1: off)")
    p.add_argument("--clip-filter", help="CLIP weights (folder or hub id) for the CLIP-score filter")
    p.add_argument("--min-clip", type=finite_float, default=20.0)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--shard-size", type=int, default=0, help="also write webdataset tar shards of N samples")
    p.add_argument("--shard", metavar="I/N", help="build part I of N (0 <= I < N; the sources split by a stable "
                   "hash of their path), e.g. one per machine; join the parts with mole data merge")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier build in OUT made with other options")
    p.add_argument("--json", action="store_true", help="print the build's stats as JSON (default: a table)")
    p.set_defaults(func=_cmd_data_build)


def _cmd_data_build(args: argparse.Namespace) -> int:
    from ..data.build import BuildOptions, build_dataset

    # options only one of the two subcommands has (scenes: window, pose thresholds; closeups: part, margin): the
    # other takes BuildOptions' defaults
    mode_only = {k: getattr(args, k) for k in ("part", "margin", "window", "stride", "min_pose_presence",
                                               "min_person", "little_person", "pose_tiles", "min_person_agreement",
                                               "tile_landmarks", "min_head_face", "min_wrist_hand")
                 if hasattr(args, k)}  # fmt: skip
    stats = build_dataset(BuildOptions(
        source=args.source, out_dir=args.out, mode=args.data_command, size=args.size,
        min_sharpness=args.min_sharpness, blur_filter=args.blur_filter, min_blur_score=args.min_blur_score,
        captioner=args.captioner, captions_json=args.captions_json, tokenizer=args.tokenizer,
        clip_filter=args.clip_filter, min_clip=args.min_clip, workers=args.workers, shard_size=args.shard_size,
        caption_prompt=_caption_prompt(args.caption_prompt), min_confidence=args.min_confidence,
        min_face_confidence=args.min_face_confidence, min_scale=args.min_scale, overwrite=args.overwrite,
        max_overlap=args.max_overlap, dedupe_distance=args.dedupe_distance, shard=args.shard, **mode_only,
    ))  # fmt: skip
    _print_stats(args, stats, args.out)
    from ..data.build import nothing_kept_message

    message = nothing_kept_message(stats, args.out)
    if message:
        raise NothingProduced(message)
    return 0


def _cmd_data_merge(args: argparse.Namespace) -> int:
    from ..data.build import merge_builds, nothing_kept_message

    stats = merge_builds(args.parts, args.out, args.shard_size, args.overwrite)
    _print_stats(args, stats, args.out)
    message = nothing_kept_message(stats, args.out)
    if message:
        raise NothingProduced(message)
    return 0


def _print_stats(args: argparse.Namespace, stats: dict, out: str) -> None:
    """A short table (kept, sources, the main drop reasons), or with --json the stats as JSON (stats.json has all)."""
    if args.json:
        print(json.dumps({k: v for k, v in stats.items() if k not in ("options", "units")}, indent=2))
        return
    drops = {**stats.get("sources_dropped", {}), **stats.get("crops_dropped", {})}
    drops.pop("every_crop_dropped", None)
    rows = [["kept crops", stats.get("kept", 0)], ["source images", stats.get("sources", 0)],
            ["sources with crops", stats.get("sources_with_crops", 0)]]  # fmt: skip
    rows += [[f"dropped: {k}", v] for k, v in sorted(drops.items(), key=lambda kv: -kv[1])[:5]]
    print(table(["build", "count"], rows))
    print(f"{out}: manifest.jsonl, drops.jsonl, stats.json (all counts; --json prints them)")


def _caption_prompt(value: str | None) -> str | None:
    from ..data.captions import PAPER_CAPTION_PROMPT

    return PAPER_CAPTION_PROMPT if value == "paper" else value


def _cmd_data_filter(args: argparse.Namespace) -> int:
    from ..data.quality import train_blur_filter
    from ..outputs import check_output_file

    check_output_file(args.out, args.overwrite, "mole data train-filter --out")
    result = train_blur_filter(args.good, args.bad, args.out, epochs=args.epochs, synthetic_blur=not args.no_synthetic)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(table(["blur filter", "value"], [
        ["holdout accuracy", f"{result['holdout_accuracy']:.3f}"], ["train / holdout images",
         f"{result['train']} / {result['holdout']}"], ["good / bad", f"{result['good']} / {result['bad']}"]]))
    print(f"saved {args.out}")
    return 0
