"""`mole data scenes|closeups`: training sets from raw image folders, at any scale.

Per source image (in parallel worker processes):
    read robustly (corrupt, tiny, huge -> counted and skipped; CMYK, 16-bit, palette -> RGB)
    scenes:   sliding square windows (paper: 1024, downscaled to 512; never upscaled past min_scale), each judged on
              its own pixels: keep windows with a person (a pose found in the window whose person mask is
              >= min_person and confirmed by the person segmenter, or a confident face; tiles of the window
              when it has no confirmed big pose), drop "little person" windows (person < little_person and no
              confident face of min_face of the window); every dropped window's evidence goes to drops.jsonl
    closeups: face or hand detections -> square crops with a margin, resized
    quality:  variance of the Laplacian >= min_sharpness, judged on the crop at its source resolution (before any
              resize: resizing changes the figure, so size passed for blur); optional blur CNN >= min_blur_score
In the main process: near-duplicate removal (64-bit pHash, Hamming <= 3), captions (cleaned, truncated), optional
CLIP-score filter, a streaming jsonl manifest with provenance and every score, optional webdataset tar shards,
and stats.json (kept / dropped per filter, resolution histogram).
A rerun skips sources already processed with the same options (resumable; a finished rerun is a no-op). The
options that decide what a source yields are part of the resume key: a rerun with a changed option re-processes
every source, says so in the log and in stats.json ("reprocessed_for_options"), and replaces that source's rows.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import tarfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .captions import build_captioners, caption_crop, clean_caption, truncate_caption
from .dataset import IMAGE_EXTS, load_rgb
from .detect import Box, Detector, sliding_windows, square_crop_box, window_evidence
from .quality import BlurFilter, DuplicateIndex, laplacian_variance, phash

logger = logging.getLogger(__name__)

Image.MAX_IMAGE_PIXELS = 200_000_000  # above this a file is treated as hostile / broken and skipped


@dataclass
class BuildOptions:
    source: str
    out_dir: str
    mode: str = "scenes"  # scenes | closeups
    part: str = "face"  # closeups: face | hand
    size: int = 512  # output side in pixels
    window: int = 1024  # scenes: window side (shorter image side when smaller)
    stride: int = 512
    margin: float = 0.4  # closeups: extra context around a detection, per side, as a fraction of its size
    min_source_side: int = 64  # smaller sources are skipped as "tiny"
    min_crop_side: int = 64  # crops smaller than this (before resizing) are dropped
    # never upscale past this: a window / crop whose source side is < min_scale x size is dropped ("upscale_floor");
    # larger ones are downscaled (a 1024 window -> 512). The floor is in whole pixels, round(min_scale x size).
    # None: 0.7 for scenes (358 px at 512: a scene window is a small part of a photo, upscaling it blurs people)
    # and 0.15 for close-ups (77 px at 512, 38 at 256, so min_crop_side, 64 px, decides): close-up sets are small,
    # sharp, single-subject images (ORL faces are 92 x 112, 11k Hands 180 px); a sharp small face upscaled to the
    # training size is fine, a blurred one is dropped by min_sharpness, judged at the source resolution
    min_scale: float | None = None
    # detector confidence floor; None: 0.8 for face close-ups (on COCO every face found at >= 0.8 was a human face,
    # at 0.5 only 12 of 30 were), 0.5 otherwise
    min_confidence: float | None = None
    # scenes, judged per window on the window's source pixels (seen by the detectors at detect_side, never at the
    # output size: --size changes only the saved image). A window has a person when
    #   pose+face: a pose is found in it (pose presence >= min_pose_presence) whose person mask covers >= min_person
    #     of it, the person segmenter (an independent model) marks >= min_person_agreement of that mask as person,
    #     and a face is found at the pose's head (>= min_head_face) or a hand at one of its wrists (>=
    #     min_wrist_hand): poses found on cats, pandas, chairs, vases or food have no human face where their head
    #     would be and no hand at their wrists (pose+face, pose+hand);
    #   face: a face of >= min_face_confidence whose box the segmenter marks as person on >= min_face_segmenter.
    # "Little person": the posed person covers < little_person of the window and no such face of >= min_face of the
    # window side is in it. pose_tiles: a window without a confirmed pose of >= little_person is searched again in
    # its four 3/4 tiles; a tile's pose counts when it is confirmed the same way, covers >= little_person of the
    # window and shows >= tile_landmarks visible landmarks (bench/data_quality.py --only scenes)
    detect_side: int = 512
    min_person: float = 0.03
    min_pose_presence: float = 0.8
    min_face_confidence: float = 0.8
    min_face_segmenter: float = 0.3
    min_head_face: float = 0.5
    min_wrist_hand: float = 0.8
    little_person: float = 0.05
    min_face: float = 0.06
    min_person_agreement: float = 0.2
    pose_tiles: bool = True
    tile_landmarks: int = 0
    # no two kept crops of one source image overlap by more than this IoU (the crop with the most person / the most
    # confident detection is kept, the other dropped as "overlap"); 1 disables
    max_overlap: float = 0.5
    min_sharpness: float = 30.0  # variance of the Laplacian (0 disables)
    blur_filter: str | None = None  # a trained BlurNet (safetensors)
    min_blur_score: float = 0.5
    # template:..., sidecar, hf:<model>; a list: the first that gives a caption wins. None: the mode's template
    # (default_template). Whatever is given, the mode's template ends the chain, so no crop is left without a caption
    # (the manifest's caption_source says which one wrote it)
    captioner: str | list | None = None
    captions_json: str | list | None = None  # one or several (COCO captions json or {file name: caption})
    caption_prompt: str | None = None  # for hf: captioners that take a prompt (captions.PAPER_CAPTION_PROMPT)
    # a CLIP tokenizer folder (vocab.json + merges.txt) for truncation; "auto": the real CLIP tokenizer when one is
    # on this machine (captions.find_clip_tokenizer), else words; "none": count words
    tokenizer: str | None = "auto"
    max_tokens: int = 77
    clip_filter: str | None = None  # CLIP weights (folder or hub id)
    min_clip: float = 20.0
    dedupe_distance: int = 3
    workers: int = 1
    shard_size: int = 0  # > 0: also write webdataset tar shards of this many samples
    # "i/n": build part i of n (the sources whose stable hash of their path under `source` is i mod n), to be
    # joined by merge_builds; a part keeps near-duplicates and low-CLIP crops for the merge to decide
    shard: str | None = None
    overwrite: bool = False  # replace an earlier build in out_dir made with other options (else refused)

    def __post_init__(self) -> None:
        if self.mode not in ("scenes", "closeups"):
            raise ValueError(f"mode={self.mode!r}: use scenes or closeups")
        if self.mode == "closeups" and self.part not in ("face", "hand"):
            raise ValueError(f"part={self.part!r}: close-ups are of a face or a hand")
        if self.size < 8 or self.window < 8 or self.stride < 1:
            raise ValueError(f"size={self.size}, window={self.window}, stride={self.stride}: too small")
        if self.min_scale is None:
            self.min_scale = 0.7 if self.mode == "scenes" else 0.15
        if self.captioner is None:
            self.captioner = self.default_template
        if not 0 <= self.min_scale <= 1:
            raise ValueError(f"min_scale={self.min_scale}: the smallest source side as a fraction of size (0.75: "
                             "upscale at most 1.33x), between 0 (any upscale) and 1 (never upscale)")  # fmt: skip
        if self.min_confidence is None:
            self.min_confidence = 0.8 if self.mode == "closeups" and self.part == "face" else 0.5
        if self.detect_side < 64:
            raise ValueError(f"detect_side={self.detect_side}: the detectors need at least 64 px (default 512)")
        for name in ("min_confidence", "min_face_confidence", "min_pose_presence", "min_person_agreement",
                     "min_head_face", "min_wrist_hand", "min_face_segmenter", "max_overlap"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)}: confidences and shares are between 0 and 1")
        if not 0 <= self.tile_landmarks <= 33:
            raise ValueError(f"tile_landmarks={self.tile_landmarks}: the pose model has 33 landmarks; use 0 to 33")
        if not Path(self.source).is_dir():
            raise FileNotFoundError(f"source {self.source} is not a folder of images")
        if self.shard is not None:
            self.part_of()

    def part_of(self) -> tuple[int, int] | None:
        """(i, n) of shard "i/n", None for a whole build; raises naming a bad value."""
        return None if self.shard is None else parse_part(self.shard)

    @property
    def default_template(self) -> str:
        """The caption every crop falls back to: what the crop shows."""
        if self.mode == "scenes":
            return "template:a photo of a person"
        return f"template:a close-up photo of a {self.part}"

    @property
    def upscale_floor_px(self) -> int:
        """The smallest window / crop side kept, in whole pixels: round(min_scale x size) (358 for 0.7 x 512)."""
        return round(self.min_scale * self.size)


def parse_part(value: str) -> tuple[int, int]:
    """ "i/n" -> (i, n) with 0 <= i < n; raises ValueError naming the value."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(value))
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"shard={value!r} is not a part i/n with 0 <= i < n; e.g. --shard 0/4 ... --shard 3/4 for "
                         "four machines")  # fmt: skip
    return int(m.group(1)), int(m.group(2))


# ---------------------------------------------------------------------------------------------------- workers
_DETECTOR: Detector | None = None
_BLUR: BlurFilter | None = None


def _init_worker(opts: BuildOptions) -> None:
    global _DETECTOR, _BLUR
    if opts.mode == "scenes":
        need = ("faces", "pose", "person", "hands")
    else:
        need = ("faces",) if opts.part == "face" else ("hands",)
    _DETECTOR = Detector(need, opts.min_confidence, pose_presence=opts.min_pose_presence)
    _BLUR = BlurFilter.load(opts.blur_filter) if opts.blur_filter else None


def _judge_window(scores: dict, opts: BuildOptions) -> tuple[str | None, str | None]:
    """(drop reason or None, the rule that found the person: "pose+face" or "face") for one window's evidence."""
    posed = scores["pose_confirmed"]
    person = scores["person_fraction"] if posed else 0.0
    faced = (scores["face_confidence"] >= opts.min_face_confidence
             and scores.get("face_segmenter", 1.0) >= opts.min_face_segmenter)  # fmt: skip
    if not ((posed and person >= opts.min_person) or faced):
        return "no_person", None
    if person < opts.little_person and (not faced or scores["face_fraction"] < opts.min_face):
        return "little_person", None
    return None, (f"pose+{scores['confirmed_by']}" if posed and person >= opts.min_person else "face")


def _iou(a: tuple, b: tuple) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union if union > 0 else 0.0


def _closeup_detections(image: Image.Image, part: str) -> tuple[list, bool]:
    """Face / hand boxes in source pixels, and whether they came from the padded retry: a close-up whose subject
    fills the frame (a hand photo, a tight face crop) is often missed by detectors trained on subjects with room
    around them; when nothing is found, the image is searched again inside a border of 1/4 of its longer side in
    its median edge colour, and the boxes are mapped back and clipped to the image."""
    det = _DETECTOR(image)
    found = det.faces if part == "face" else det.hands
    if found:
        return found, False
    w, h = image.size
    pad = max(w, h) // 4
    arr = np.asarray(image)
    edge = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    canvas = Image.new("RGB", (w + 2 * pad, h + 2 * pad), tuple(int(v) for v in np.median(edge, axis=0)))
    canvas.paste(image, (pad, pad))
    det = _DETECTOR(canvas)
    found = det.faces if part == "face" else det.hands
    out = []
    for b in found:
        box = Box(max(0.0, b.x0 - pad), max(0.0, b.y0 - pad), min(float(w), b.x1 - pad), min(float(h), b.y1 - pad),
                  b.score)  # fmt: skip
        if box.x1 - box.x0 > 0 and box.y1 - box.y0 > 0:
            out.append(box)
    return out, True


def _process(args: tuple[str, BuildOptions]) -> dict:
    """One source image -> {"source", "crops": [(file, record)], "crop_drops": Counter (per crop / window),
    "source_drop": a reason when the source yields no candidate at all (per source image), "rejected", "status"}."""
    src, opts = args
    path = Path(src)
    drops: Counter = Counter()
    rejected: list[dict] = []  # every dropped window / crop with its box, reason and evidence (drops.jsonl)

    def reject(reason: str, box=None, scores: dict | None = None) -> None:
        drops[reason] += 1
        if box is not None:
            rejected.append({"box": list(box), "reason": reason, "scores": scores or {}})

    def done(status: str, source_drop: str | None = None, crops: list | None = None) -> dict:
        return {"source": src, "crops": crops or [], "crop_drops": dict(drops), "source_drop": source_drop,
                "rejected": rejected, "status": status}  # fmt: skip

    try:
        image = load_rgb(path)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return done(f"unreadable: {exc}", "unreadable")
    w, h = image.size
    if min(w, h) < opts.min_source_side:
        return done("tiny", "tiny_source")
    candidates = []  # (box, scores, rank): rank orders overlapping crops (the larger is kept)
    if opts.mode == "scenes":
        for box in sliding_windows(w, h, opts.window, opts.stride):
            side = box[2] - box[0]
            if side < opts.upscale_floor_px:  # before detection: these are never kept
                reject("upscale_floor", box, {"window_side": side, "floor": opts.upscale_floor_px})
                continue
            # the window's source pixels: the detectors see it at detect_side, whatever --size is
            scores = window_evidence(_DETECTOR, image.crop(box), tiles=opts.pose_tiles, little=opts.little_person,
                                     tile_landmarks=opts.tile_landmarks, min_agreement=opts.min_person_agreement,
                                     min_head_face=opts.min_head_face, min_wrist_hand=opts.min_wrist_hand,
                                     detect_side=opts.detect_side)  # fmt: skip
            reason, rule = _judge_window(scores, opts)
            if reason:
                reject(reason, box, scores)
            else:
                scores["person_rule"] = rule
                candidates.append((box, scores, (scores["person_fraction"], scores["face_confidence"])))
    else:
        found, padded = _closeup_detections(image, opts.part)
        if not found:
            return done("ok", f"no_{opts.part}")
        for b in found:
            box = square_crop_box(b, opts.margin, w, h)
            scores = {"detection_confidence": round(float(b.score), 4), "detection_box": [round(v) for v in
                      (b.x0, b.y0, b.x1, b.y1)], "detected_padded": padded}  # fmt: skip
            candidates.append((box, scores, (float(b.score),)))
    passed = []
    for box, scores, rank in candidates:
        if box[2] - box[0] < opts.min_crop_side:
            reject("small_crop", box, scores)
            continue
        if box[2] - box[0] < opts.upscale_floor_px:
            reject("upscale_floor", box, scores)
            continue
        source_crop = image.crop(box)
        sharp = laplacian_variance(source_crop, size=None)  # at the source resolution, not after the resize
        scores["sharpness"] = round(sharp, 2)
        if opts.min_sharpness and sharp < opts.min_sharpness:
            reject("blurry_laplacian", box, scores)
            continue
        crop = source_crop.resize((opts.size, opts.size), Image.Resampling.LANCZOS)
        if _BLUR is not None:
            scores["blur_cnn"] = round(_BLUR.score([crop])[0], 4)
            if scores["blur_cnn"] < opts.min_blur_score:
                reject("blurry_cnn", box, scores)
                continue
        passed.append((box, scores, rank, crop))
    # distinct crops: the best-ranked first; any later one overlapping a kept one by IoU > max_overlap is dropped
    kept: list = []
    for box, scores, rank, crop in sorted(passed, key=lambda c: c[2], reverse=True):
        near = max((_iou(box, k[0]) for k in kept), default=0.0)
        if near > opts.max_overlap:
            reject("overlap", box, {**scores, "iou_with_kept": round(near, 4)})
            continue
        kept.append((box, scores, rank, crop))
    crops = []
    out = Path(opts.out_dir) / "images"
    for k, (box, scores, _, crop) in enumerate(sorted(kept, key=lambda c: (c[0][1], c[0][0]))):
        name = f"{path.stem}_{hashlib.md5(src.encode()).hexdigest()[:8]}_{k:02d}.png"
        out.mkdir(parents=True, exist_ok=True)
        crop.save(out / name)
        crops.append((name, {"box": list(box), "scores": scores, "source_size": [w, h],
                             "phash": f"{phash(crop):016x}"}))  # fmt: skip
    return done("ok", None, crops)


# ---------------------------------------------------------------------------------------------------- main
# options that never change what a source yields (how fast, where, how packed)
_NOT_IN_KEY = ("source", "out_dir", "workers", "shard_size", "overwrite", "shard")


def _key_options(opts: BuildOptions | dict) -> dict:
    d = asdict(opts) if isinstance(opts, BuildOptions) else dict(opts)
    return {k: v for k, v in sorted(d.items()) if k not in _NOT_IN_KEY}


def options_key(opts: BuildOptions) -> str:
    """The resume key: a hash of every option that decides what a source yields."""
    return hashlib.sha256(json.dumps(_key_options(opts), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _reset_for_options(out: Path, opts: BuildOptions, key: str) -> dict | None:
    """When the folder was built with other options: which options changed ({name: [old, new]}), after removing the
    old rows, crops and resume log so every source is processed again; None when nothing has to be redone."""
    sources_log = out / "sources.jsonl"
    if not sources_log.is_file():
        return None
    keys = {json.loads(x).get("options_key") for x in sources_log.read_text().splitlines() if x.strip()}
    if keys <= {key}:
        return None
    old_stats = out / "stats.json"
    old = _key_options(json.loads(old_stats.read_text()).get("options", {})) if old_stats.is_file() else {}
    new = _key_options(opts)
    changed = {k: [old.get(k), v] for k, v in new.items() if old.get(k) != v} or {"options_key": [sorted(
        k for k in keys if k), key]}  # fmt: skip
    manifest = out / "manifest.jsonl"
    if manifest.is_file():
        for line in manifest.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                (out / row["file"]).unlink(missing_ok=True)
                (out / row["file"]).with_suffix(".txt").unlink(missing_ok=True)
        manifest.unlink()
    sources_log.unlink()
    old_stats.unlink(missing_ok=True)
    (out / "drops.jsonl").unlink(missing_ok=True)
    logger.warning("options changed since the last build in %s (%s): re-processing every source", out,
                   ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))  # fmt: skip
    return changed


# options that do not change what a build keeps (a rerun with other values resumes the same build)
_RESUMABLE = {"workers", "shard_size", "overwrite", "out_dir"}
BUILD_OUTPUTS = ("images", "manifest.jsonl", "sources.jsonl", "drops.jsonl", "stats.json", "shards")


def _check_earlier_build(opts: BuildOptions, out: Path) -> None:
    """A rerun with the same options resumes; other options would mix two builds: refused, naming what changed and
    --overwrite (which removes the earlier build first, so every source is processed again)."""
    from ..outputs import OutputExistsError, check_output_dir

    stats = out / "stats.json"
    if opts.overwrite:
        if not stats.is_file():  # not a build of ours: check_output_dir decides what may go
            check_output_dir(out, BUILD_OUTPUTS, True, "mole data")
        return  # an earlier build: _reset_for_options re-processes every source and names what changed
    if not stats.is_file():
        if (out / "manifest.jsonl").is_file():  # an interrupted first build: resumed (no options to compare yet)
            return
        check_output_dir(out, BUILD_OUTPUTS, False, "mole data")
        return
    try:
        before = json.loads(stats.read_text()).get("options") or {}
    except ValueError:
        before = {}
    now = asdict(opts)
    changed = sorted(k for k in now if k not in _RESUMABLE and k in before and before[k] != now[k])
    if changed:
        diffs = ", ".join(f"{k}: {before[k]!r} -> {now[k]!r}" for k in changed[:4])
        raise OutputExistsError(
            f"mole data: {str(out)!r} holds a build made with other options ({diffs}); pass --overwrite "
            "to build again with the new options, or choose another output folder"
        )


def build_dataset(opts: BuildOptions) -> dict:
    out = Path(opts.out_dir)
    if Path(opts.source).resolve().is_relative_to(out.resolve()):
        raise ValueError(f"out_dir={opts.out_dir!r} is or contains the source folder {opts.source!r}; write the "
                         "dataset to another folder")  # fmt: skip
    _check_earlier_build(opts, out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.jsonl"
    sources_log = out / "sources.jsonl"  # one line per processed source (+ the options key): makes reruns resumable
    key = options_key(opts)
    changed = _reset_for_options(out, opts, key)
    done = set()
    dedupe = DuplicateIndex(opts.dedupe_distance)
    if sources_log.is_file():
        done = {json.loads(x)["source"] for x in sources_log.read_text().splitlines() if x.strip()}
    if manifest.is_file():
        for line in manifest.read_text().splitlines():
            if line.strip():
                dedupe.add_if_new(int(json.loads(line)["phash"], 16))
    out_abs = out.resolve()
    sources = sorted(str(p) for p in Path(opts.source).rglob("*")
                     if p.suffix.lower() in IMAGE_EXTS and not p.resolve().is_relative_to(out_abs))  # fmt: skip
    if out_abs.is_relative_to(Path(opts.source).resolve()):
        logger.info("the output folder %s is inside the source folder: its files are not read as sources", out)

    part = opts.part_of()
    if part is not None:
        sources = [s for s in sources if source_part(Path(s).relative_to(opts.source).as_posix(), part[1]) == part[0]]
        logger.info("part %d/%d: %d sources", part[0], part[1], len(sources))
    todo = [s for s in sources if s not in done]
    captioners = build_captioners(opts.captioner, opts.default_template,
                                  part=opts.part if opts.mode == "closeups" else "person",
                                  captions_json=opts.captions_json, prompt=opts.caption_prompt)  # fmt: skip
    tokenizer = None
    if opts.tokenizer == "auto":
        from .captions import find_clip_tokenizer

        tokenizer = find_clip_tokenizer()
        if tokenizer is None:
            logger.info("no CLIP tokenizer on this machine: captions are truncated at %d words", opts.max_tokens)
    elif opts.tokenizer and opts.tokenizer != "none":
        from ..tiny import tiny_clip_tokenizer

        tokenizer = tiny_clip_tokenizer(opts.tokenizer)
    clip = None
    if opts.clip_filter:
        from ..eval.metrics import CLIPScore

        clip = CLIPScore(opts.clip_filter)
    needs_pixels = clip is not None or any(getattr(c, "needs_image", True) for c in captioners)
    stats = _load_stats(out)
    if changed:
        stats["reprocessed_for_options"] = changed
    stats["caption_truncation"] = "words" if tokenizer is None else "clip tokenizer"
    no_caption: list[str] = []
    t0 = time.perf_counter()
    jobs = [(s, opts) for s in todo]
    if opts.workers > 1:
        # spawn, not fork: a forked copy of a process that already runs mediapipe / torch threads can deadlock
        ctx = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(opts.workers, mp_context=ctx, initializer=_init_worker, initargs=(opts,))
        results = pool.map(_process, jobs, chunksize=4)
    else:
        _init_worker(opts)
        pool, results = None, map(_process, jobs)
    with manifest.open("a") as mf, sources_log.open("a") as sf, (out / "drops.jsonl").open("a") as df:
        for res in results:
            stats["sources"] += 1
            for r in res.get("rejected", ()):
                df.write(json.dumps({"source": res["source"], **r}) + "\n")
            _count(stats["crops_dropped"], res["crop_drops"])
            stats["crops_considered"] += sum(res["crop_drops"].values()) + len(res["crops"])
            kept_here = 0
            for name, rec in res["crops"]:
                img_path = out / "images" / name
                if part is None and not dedupe.add_if_new(int(rec["phash"], 16)):  # a part: merge_builds decides
                    img_path.unlink(missing_ok=True)
                    _count(stats["crops_dropped"], {"duplicate": 1})
                    continue
                crop = Image.open(img_path).convert("RGB") if needs_pixels else None  # the worker wrote it
                raw, by, level = caption_crop(captioners, crop, Path(res["source"]),
                                              about_a_person=opts.mode == "scenes")  # fmt: skip
                caption, cut = truncate_caption(clean_caption(raw), tokenizer, opts.max_tokens)
                if not caption:
                    no_caption.append(name)
                if clip is not None:
                    rec["scores"]["clip"] = round(clip.score([crop], [caption])["clip_score"][0], 3)
                if clip is not None and part is None and rec["scores"]["clip"] < opts.min_clip:
                    img_path.unlink(missing_ok=True)
                    _count(stats["crops_dropped"], {"low_clip": 1})
                    continue
                row = {"file": f"images/{name}", "caption": caption, "raw_caption": raw, "caption_truncated": cut,
                       "caption_source": by, "caption_level": level, "source": res["source"], **rec,
                       "size": opts.size, "mode": opts.mode}  # fmt: skip
                mf.write(json.dumps(row) + "\n")
                img_path.with_suffix(".txt").write_text(caption)
                stats["kept"] += 1
                kept_here += 1
                _count(stats["captions"], {f"{by}_{level}" if by else "none": 1})
                side = rec["box"][2] - rec["box"][0]
                bucket = f"{2 ** (max(side, 1).bit_length() - 1)}-{2 ** max(side, 1).bit_length() - 1}"
                stats["crop_side_histogram"][bucket] = stats["crop_side_histogram"].get(bucket, 0) + 1
            if res["source_drop"]:
                _count(stats["sources_dropped"], {res["source_drop"]: 1})
            elif kept_here:
                stats["sources_with_crops"] += 1
            else:  # it had candidates, and every one was dropped (the reasons are in crops_dropped)
                _count(stats["sources_dropped"], {"every_crop_dropped": 1})
            sf.write(json.dumps({"source": res["source"], "status": res["status"], "crops": kept_here,
                                 "options_key": key}) + "\n")  # fmt: skip
            mf.flush()
            df.flush()
            sf.flush()
    if pool is not None:
        pool.shutdown()
    stats["seconds"] += round(time.perf_counter() - t0, 2)
    stats["without_caption"] = stats.get("without_caption", 0) + len(no_caption)
    if no_caption:
        logger.warning("%d of the crops kept in this run have no caption (e.g. %s): the captioners gave none, not "
                       "even the template", len(no_caption), ", ".join(no_caption[:3]))  # fmt: skip
    stats["options"] = asdict(opts)
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    if opts.shard_size > 0 and part is None:
        stats["shards"] = write_shards(out, opts.shard_size)
    elif opts.shard_size > 0:
        logger.info("part %s: no shards written; mole data merge --shard-size writes them", opts.shard)
    return stats


def source_part(source_id: str, parts: int) -> int:
    """The part (0..parts-1) a source belongs to: a stable hash of its path under the source folder, the same on
    every machine and in every process."""
    return int.from_bytes(hashlib.sha256(source_id.encode()).digest()[:8], "big") % parts


def merge_builds(parts: list[str | Path], out_dir: str | Path, shard_size: int | None = None,
                 overwrite: bool = False) -> dict:  # fmt: skip
    """Join the parts of a build (`mole data ... --shard i/n` for i = 0..n-1) into one build folder, equal to the
    one-process build: rows in the one-process order (sorted sources), near-duplicates across parts and low CLIP
    scores dropped here as that build drops them, stats summed and the kept-crop counts recounted."""
    from ..outputs import check_output_dir

    parts = [Path(p) for p in parts]
    infos = []
    for p in parts:
        try:
            stats = json.loads((p / "stats.json").read_text())
        except (OSError, ValueError):
            raise ValueError(f"mole data merge: {str(p)!r} is not a finished part (no readable stats.json); run "
                             "mole data ... --shard i/n into it to the end") from None  # fmt: skip
        shard = (stats.get("options") or {}).get("shard")
        if not shard:
            raise ValueError(f"mole data merge: {str(p)!r} is a whole build, not a part (built without --shard)")
        i, n = parse_part(shard)
        infos.append((i, n, p, stats))
    counts = {n for _, n, _, _ in infos}
    if len(counts) > 1:
        raise ValueError(f"mole data merge: the parts split the sources {sorted(counts)} ways; merge the parts of one "
                         "split (the same n in --shard i/n)")  # fmt: skip
    n = counts.pop()
    have = sorted(i for i, *_ in infos)
    if have != list(range(n)):
        missing = sorted(set(range(n)) - set(have))
        twice = sorted({i for i in have if have.count(i) > 1})
        raise ValueError(f"mole data merge: parts {', '.join(f'{i}/{n}' for i in missing) or 'none'} missing"
                         + (f", {', '.join(f'{i}/{n}' for i in twice)} given twice" if twice else "")
                         + f" (given {', '.join(f'{i}/{n}' for i in have)}); give every part once")  # fmt: skip
    first = infos[0][3]["options"]
    for _, _, p, st in infos[1:]:
        diff = sorted(k for k, v in _key_options(st["options"]).items() if _key_options(first).get(k) != v)
        if diff:
            raise ValueError(f"mole data merge: {str(p)!r} was built with other options ({', '.join(diff[:4])}) "
                             "than the first part; rebuild it with the same options")  # fmt: skip
    out = Path(out_dir)
    if any(out.resolve() == p.resolve() for p in parts):
        raise ValueError(f"mole data merge: --out {str(out)!r} is one of the parts; choose another folder")
    check_output_dir(out, BUILD_OUTPUTS, overwrite, "mole data merge")
    (out / "images").mkdir(parents=True, exist_ok=True)

    def lines(path: Path) -> list[dict]:
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []

    rows = sorted(((r, p) for _, _, p, _ in infos for r in lines(p / "manifest.jsonl")),
                  key=lambda rp: rp[0]["source"])  # fmt: skip  (stable: the crops of a source stay in order)
    opts = {**first, "shard": None, "out_dir": str(out)}
    if shard_size is not None:
        opts["shard_size"] = shard_size
    dedupe = DuplicateIndex(opts["dedupe_distance"])
    stats = _fresh_stats()
    for _, _, _, st in infos:
        for k in ("sources", "crops_considered"):
            stats[k] += st.get(k, 0)
        _count(stats["sources_dropped"], st.get("sources_dropped", {}))
        _count(stats["crops_dropped"], st.get("crops_dropped", {}))
        stats["seconds"] = round(stats["seconds"] + st.get("seconds", 0.0), 2)
        stats["caption_truncation"] = st.get("caption_truncation")
    kept_by_source: Counter = Counter()
    with_candidates = {r["source"] for r, _ in rows}
    no_caption = 0
    with (out / "manifest.jsonl").open("w") as mf:
        for row, p in rows:
            if not dedupe.add_if_new(int(row["phash"], 16)):
                _count(stats["crops_dropped"], {"duplicate": 1})
                continue
            no_caption += not row["caption"]
            if opts.get("clip_filter") and row["scores"].get("clip", 0.0) < opts["min_clip"]:
                _count(stats["crops_dropped"], {"low_clip": 1})
                continue
            shutil.copyfile(p / row["file"], out / row["file"])
            (out / row["file"]).with_suffix(".txt").write_text(row["caption"])
            mf.write(json.dumps(row) + "\n")
            kept_by_source[row["source"]] += 1
            by, level = row.get("caption_source"), row.get("caption_level")
            _count(stats["captions"], {f"{by}_{level}" if by else "none": 1})
            side = row["box"][2] - row["box"][0]
            bucket = f"{2 ** (max(side, 1).bit_length() - 1)}-{2 ** max(side, 1).bit_length() - 1}"
            stats["crop_side_histogram"][bucket] = stats["crop_side_histogram"].get(bucket, 0) + 1
    stats["kept"] = sum(kept_by_source.values())
    stats["sources_with_crops"] = len(kept_by_source)
    emptied = len(with_candidates) - len(kept_by_source)  # had crops, every one dropped here
    if emptied:
        _count(stats["sources_dropped"], {"every_crop_dropped": emptied})
    stats["without_caption"] = no_caption
    srcs = sorted((r for _, _, p, _ in infos for r in lines(p / "sources.jsonl")), key=lambda r: r["source"])
    drops = sorted((r for _, _, p, _ in infos for r in lines(p / "drops.jsonl")), key=lambda r: r["source"])
    with (out / "sources.jsonl").open("w") as sf:
        for r in srcs:
            sf.write(json.dumps({**r, "crops": kept_by_source.get(r["source"], 0)}) + "\n")
    (out / "drops.jsonl").write_text("".join(json.dumps(r) + "\n" for r in drops))
    stats["options"] = opts
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    if opts.get("shard_size", 0) > 0:
        stats["shards"] = write_shards(out, opts["shard_size"])
    logger.info("merged %d parts: %d crops kept of %d sources", n, stats["kept"], stats["sources"])
    return stats


STATS_DOC = {
    "sources": "source images read",
    "sources_with_crops": "source images with >= 1 kept crop",
    "sources_dropped": "source images with no kept crop, by reason (unreadable, tiny_source, no_face / no_hand: "
                       "nothing detected, every_crop_dropped: see crops_dropped); these and sources_with_crops add "
                       "up to sources",
    "crops_considered": "crops (scene windows, close-up detections) looked at",
    "kept": "crops kept",
    "crops_dropped": "crops dropped, by reason (no_person, little_person, upscale_floor, small_crop, "
                     "blurry_laplacian, blurry_cnn, overlap, duplicate, low_clip); these and kept add up to "
                     "crops_considered",
    "captions": "kept crops by captioner and level (template_crop, hf_crop, sidecar_photo)",
}


def _count(into: dict, counts: dict) -> None:
    for k, v in counts.items():
        into[k] = into.get(k, 0) + v


def _fresh_stats() -> dict:
    return {"units": STATS_DOC, "sources": 0, "sources_with_crops": 0, "sources_dropped": {}, "crops_considered": 0,
            "kept": 0, "crops_dropped": {}, "captions": {}, "crop_side_histogram": {}, "seconds": 0.0}  # fmt: skip


def _load_stats(out: Path) -> dict:
    path = out / "stats.json"
    fresh = _fresh_stats()
    if path.is_file():
        s = json.loads(path.read_text())
        s.pop("options", None)
        s.pop("shards", None)
        s.pop("dropped", None)  # an older build's mixed-unit counts: not carried into the new ones
        return {**fresh, **s, "units": STATS_DOC}
    return fresh


# the option that decides each drop reason (named in the "nothing kept" error)
DROP_FLAGS = {
    "upscale_floor": "--min-scale; 0: any upscale", "tiny_source": "--min-scale", "small_crop": "--margin",
    "no_face": "--min-confidence", "no_hand": "--min-confidence", "no_person": "--min-pose-presence / --min-person",
    "little_person": "--little-person", "blurry_laplacian": "--min-sharpness; 0: off",
    "blurry_cnn": "--min-blur-score", "overlap": "--max-overlap; 1: off",
    "duplicate": "--dedupe-distance; 0: identical pHash only", "low_clip": "--min-clip",
    "unreadable": "convert or remove the files listed in drops.jsonl",
}


def nothing_kept_message(stats: dict, out_dir: str | Path) -> str | None:
    """A one-line error when the build in `out_dir` holds no crop at all (the CLI exits 3 with it: nothing
    produced), naming the counts by reason and the option that decides each; None when its manifest has rows (a
    resumed build that added none this time is fine)."""
    manifest = Path(out_dir) / "manifest.jsonl"
    if (stats.get("options") or {}).get("shard"):  # a part may hold no source at all
        return None
    if stats.get("kept", 0) or (manifest.is_file() and manifest.read_text().strip()):
        return None
    drops = {**stats.get("sources_dropped", {}), **stats.get("crops_dropped", {})}
    drops.pop("every_crop_dropped", None)  # its crops are counted by reason in crops_dropped
    why = sorted(drops.items(), key=lambda kv: -kv[1])
    reasons = ", ".join(f"{k} {v}" + (f" ({DROP_FLAGS[k]})" if k in DROP_FLAGS else "") for k, v in why[:4])
    if not stats.get("sources", 0):
        reasons = "no source images found in SOURCE: give the folder that holds the .jpg / .png files"
    return (f"mole data: kept 0 crops from {stats.get('sources', 0)} source images: {reasons}; see drops.jsonl and "
            "docs/data.md")


def write_shards(out: Path, shard_size: int) -> list[str]:
    """webdataset tar shards (key.png, key.txt, key.json) from the manifest, and their index.json (webdataset's
    wids format: each shard's sample count, so training never scans them); rewritten whole each time. Keys have no
    dot (webdataset splits a member name at the first dot of its base name)."""
    from .shards import INDEX_NAME, write_index

    rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines() if x.strip()]
    shard_dir = out / "shards"
    shard_dir.mkdir(exist_ok=True)
    for old in shard_dir.glob("*.tar"):
        old.unlink()
    (shard_dir / INDEX_NAME).unlink(missing_ok=True)
    names, counts = [], []
    for i in range(0, len(rows), shard_size):
        name = shard_dir / f"shard-{i // shard_size:06d}.tar"
        tmp = name.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w") as tar:
            for row in rows[i : i + shard_size]:
                key = Path(row["file"]).stem.replace(".", "_")
                tar.add(out / row["file"], arcname=f"{key}.png")
                for ext, payload in (("txt", row["caption"]), ("json", json.dumps(row))):
                    data = payload.encode()
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, name)
        names.append(str(name))
        counts.append(len(rows[i : i + shard_size]))
    write_index(shard_dir, names, counts)
    return names
