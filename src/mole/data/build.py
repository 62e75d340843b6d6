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
import tarfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from .captions import build_captioner, clean_caption, truncate_caption
from .dataset import IMAGE_EXTS, load_rgb
from .detect import Detector, sliding_windows, square_crop_box, window_evidence
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
    # larger ones are downscaled (a 1024 window -> 512). The floor is in whole pixels, round(min_scale x size):
    # 358 px for 0.7 x 512 (upscale_floor_px)
    min_scale: float = 0.7
    # detector confidence floor; None: 0.8 for face close-ups (on COCO every face found at >= 0.8 was a human face,
    # at 0.5 only 12 of 30 were), 0.5 otherwise
    min_confidence: float | None = None
    # scenes, judged per window on the window itself: a window has a person when a pose is found in it (pose
    # presence >= min_pose_presence) whose person mask covers >= min_person of it, or it holds a face detected with
    # >= min_face_confidence. "Little person": the posed person covers < little_person of the window and no
    # confident face of >= min_face of the window side is in it (bench/data_quality.py --only scenes).
    # A pose counts only when the person segmenter (an independent model) also marks >= min_person_agreement of
    # its pixels as person (poses found where no person is sit on background). pose_tiles: a window without a
    # confirmed big pose is searched again in its four 3/4 tiles; a tile's pose counts when it is a confirmed
    # person of >= little_person of the window with >= tile_landmarks visible landmarks
    min_person: float = 0.03
    min_pose_presence: float = 0.8
    min_face_confidence: float = 0.8
    little_person: float = 0.05
    min_face: float = 0.06
    min_person_agreement: float = 0.2
    pose_tiles: bool = True
    tile_landmarks: int = 22
    min_sharpness: float = 30.0  # variance of the Laplacian (0 disables)
    blur_filter: str | None = None  # a trained BlurNet (safetensors)
    min_blur_score: float = 0.5
    captioner: str | list = "template:a photo of a {part}"  # template:..., sidecar, hf:<model>; a list: first wins
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
    overwrite: bool = False  # replace an earlier build in out_dir made with other options (else refused)

    def __post_init__(self) -> None:
        if self.mode not in ("scenes", "closeups"):
            raise ValueError(f"mode={self.mode!r}: use scenes or closeups")
        if self.mode == "closeups" and self.part not in ("face", "hand"):
            raise ValueError(f"part={self.part!r}: close-ups are of a face or a hand")
        if self.size < 8 or self.window < 8 or self.stride < 1:
            raise ValueError(f"size={self.size}, window={self.window}, stride={self.stride}: too small")
        if not 0 <= self.min_scale <= 1:
            raise ValueError(f"min_scale={self.min_scale}: the smallest source side as a fraction of size (0.75: "
                             "upscale at most 1.33x), between 0 (any upscale) and 1 (never upscale)")  # fmt: skip
        if self.min_confidence is None:
            self.min_confidence = 0.8 if self.mode == "closeups" and self.part == "face" else 0.5
        for name in ("min_confidence", "min_face_confidence", "min_pose_presence", "min_person_agreement"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)}: confidences and shares are between 0 and 1")
        if not 0 <= self.tile_landmarks <= 33:
            raise ValueError(f"tile_landmarks={self.tile_landmarks}: the pose model has 33 landmarks; use 0 to 33")
        if not Path(self.source).is_dir():
            raise FileNotFoundError(f"source {self.source} is not a folder of images")

    @property
    def upscale_floor_px(self) -> int:
        """The smallest window / crop side kept, in whole pixels: round(min_scale x size) (358 for 0.7 x 512)."""
        return round(self.min_scale * self.size)


# ---------------------------------------------------------------------------------------------------- workers
_DETECTOR: Detector | None = None
_BLUR: BlurFilter | None = None


def _init_worker(opts: BuildOptions) -> None:
    global _DETECTOR, _BLUR
    need = ("faces", "pose", "person") if opts.mode == "scenes" else (("faces",) if opts.part == "face" else ("hands",))
    _DETECTOR = Detector(need, opts.min_confidence, pose_presence=opts.min_pose_presence)
    _BLUR = BlurFilter.load(opts.blur_filter) if opts.blur_filter else None


def _process(args: tuple[str, BuildOptions]) -> dict:
    """One source image -> {"source", "crops": [(file, record)], "drops": Counter, "status"}."""
    src, opts = args
    path = Path(src)
    drops: Counter = Counter()
    rejected: list[dict] = []  # every dropped window / crop with its box, reason and evidence (drops.jsonl)

    def reject(reason: str, box=None, scores: dict | None = None) -> None:
        drops[reason] += 1
        if box is not None:
            rejected.append({"box": list(box), "reason": reason, "scores": scores or {}})

    try:
        image = load_rgb(path)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return {"source": src, "crops": [], "drops": {"unreadable": 1}, "status": f"unreadable: {exc}"}
    w, h = image.size
    if min(w, h) < opts.min_source_side:
        return {"source": src, "crops": [], "drops": {"tiny_source": 1}, "status": "tiny"}
    candidates = []
    if opts.mode == "scenes":
        for box in sliding_windows(w, h, opts.window, opts.stride):
            side = box[2] - box[0]
            if side < opts.upscale_floor_px:  # before detection: these are never kept
                reject("upscale_floor", box, {"window_side": side, "floor": opts.upscale_floor_px})
                continue
            window = image.crop(box)
            if side > opts.size:  # detect on what will be kept: the window downscaled to the output size
                window = window.resize((opts.size, opts.size), Image.Resampling.LANCZOS)
            scores = window_evidence(_DETECTOR, window, tiles=opts.pose_tiles, little=opts.little_person,
                                     tile_landmarks=opts.tile_landmarks, min_agreement=opts.min_person_agreement)
            # an unconfirmed pose (the segmenter sees background where it stands) is no evidence of a person
            posed = scores["pose"] and scores["person_agreement"] >= opts.min_person_agreement
            person, face = (scores["person_fraction"] if posed else 0.0), scores["face_fraction"]
            faced = scores["face_confidence"] >= opts.min_face_confidence
            if not ((posed and person >= opts.min_person) or faced):
                reject("no_person", box, scores)
            elif person < opts.little_person and (not faced or face < opts.min_face):
                reject("little_person", box, scores)
            else:
                candidates.append((box, scores))
    else:
        det = _DETECTOR(image)
        found = det.faces if opts.part == "face" else det.hands
        if not found:
            drops[f"no_{opts.part}"] += 1
        for b in found:
            box = square_crop_box(b, opts.margin, w, h)
            scores = {"detection_confidence": round(float(b.score), 4), "detection_box": [round(v) for v in
                      (b.x0, b.y0, b.x1, b.y1)]}  # fmt: skip
            candidates.append((box, scores))
    crops = []
    out = Path(opts.out_dir) / "images"
    for k, (box, scores) in enumerate(candidates):
        if box[2] - box[0] < opts.min_crop_side:
            reject("small_crop", box, scores)
            continue
        if box[2] - box[0] < opts.upscale_floor_px:
            reject("upscale_floor", box, scores)
            continue
        source_crop = image.crop(box)
        crop = source_crop.resize((opts.size, opts.size), Image.Resampling.LANCZOS)
        sharp = laplacian_variance(source_crop, size=None)  # at the source resolution, not after the resize
        scores["sharpness"] = round(sharp, 2)
        if opts.min_sharpness and sharp < opts.min_sharpness:
            reject("blurry_laplacian", box, scores)
            continue
        if _BLUR is not None:
            scores["blur_cnn"] = round(_BLUR.score([crop])[0], 4)
            if scores["blur_cnn"] < opts.min_blur_score:
                reject("blurry_cnn", box, scores)
                continue
        name = f"{path.stem}_{hashlib.md5(src.encode()).hexdigest()[:8]}_{k:02d}.png"
        out.mkdir(parents=True, exist_ok=True)
        crop.save(out / name)
        crops.append(
            (name, {"box": list(box), "scores": scores, "source_size": [w, h], "phash": f"{phash(crop):016x}"})
        )
    return {"source": src, "crops": crops, "drops": dict(drops), "rejected": rejected, "status": "ok"}


# ---------------------------------------------------------------------------------------------------- main
# options that never change what a source yields (how fast, where, how packed)
_NOT_IN_KEY = ("source", "out_dir", "workers", "shard_size", "overwrite")


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
            "(overwrite=True) to build again with the new options, or choose another output folder"
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

    todo = [s for s in sources if s not in done]
    captioner = build_captioner(opts.captioner, part=opts.part if opts.mode == "closeups" else "person",
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
    needs_pixels = clip is not None or getattr(captioner, "needs_image", True)
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
            for k, v in res["drops"].items():
                stats["dropped"][k] = stats["dropped"].get(k, 0) + v
            for name, rec in res["crops"]:
                img_path = out / "images" / name
                if not dedupe.add_if_new(int(rec["phash"], 16)):
                    img_path.unlink(missing_ok=True)
                    stats["dropped"]["duplicate"] = stats["dropped"].get("duplicate", 0) + 1
                    continue
                crop = Image.open(img_path).convert("RGB") if needs_pixels else None  # the worker wrote it
                raw = captioner(crop, Path(res["source"]))
                caption, cut = truncate_caption(clean_caption(raw), tokenizer, opts.max_tokens)
                if not caption:
                    no_caption.append(name)
                if clip is not None:
                    rec["scores"]["clip"] = round(clip.score([crop], [caption])["clip_score"][0], 3)
                if clip is not None and rec["scores"]["clip"] < opts.min_clip:
                    img_path.unlink(missing_ok=True)
                    stats["dropped"]["low_clip"] = stats["dropped"].get("low_clip", 0) + 1
                    continue
                row = {"file": f"images/{name}", "caption": caption, "raw_caption": raw, "caption_truncated": cut,
                       "source": res["source"], **rec, "size": opts.size, "mode": opts.mode}  # fmt: skip
                mf.write(json.dumps(row) + "\n")
                img_path.with_suffix(".txt").write_text(caption)
                stats["kept"] += 1
                side = rec["box"][2] - rec["box"][0]
                bucket = f"{2 ** (max(side, 1).bit_length() - 1)}-{2 ** max(side, 1).bit_length() - 1}"
                stats["crop_side_histogram"][bucket] = stats["crop_side_histogram"].get(bucket, 0) + 1
            sf.write(json.dumps({"source": res["source"], "status": res["status"], "crops": len(res["crops"]),
                                 "options_key": key}) + "\n")  # fmt: skip
            mf.flush()
            df.flush()
            sf.flush()
    if pool is not None:
        pool.shutdown()
    stats["seconds"] += round(time.perf_counter() - t0, 2)
    stats["without_caption"] = stats.get("without_caption", 0) + len(no_caption)
    if no_caption:
        logger.warning("%d of the crops kept in this run have no caption (e.g. %s): give another caption source "
                       "(--captions-json, several allowed, or --captioner hf:...)", len(no_caption),
                       ", ".join(no_caption[:3]))  # fmt: skip
    stats["options"] = asdict(opts)
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    if opts.shard_size > 0:
        stats["shards"] = write_shards(out, opts.shard_size)
    return stats


def _load_stats(out: Path) -> dict:
    path = out / "stats.json"
    if path.is_file():
        s = json.loads(path.read_text())
        s.pop("options", None)
        s.pop("shards", None)
        return s
    return {"sources": 0, "kept": 0, "dropped": {}, "crop_side_histogram": {}, "seconds": 0.0}


def write_shards(out: Path, shard_size: int) -> list[str]:
    """webdataset tar shards (key.png, key.txt, key.json) from the manifest; rewritten whole each time."""
    rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines() if x.strip()]
    shard_dir = out / "shards"
    shard_dir.mkdir(exist_ok=True)
    for old in shard_dir.glob("*.tar"):
        old.unlink()
    names = []
    for i in range(0, len(rows), shard_size):
        name = shard_dir / f"shard-{i // shard_size:06d}.tar"
        tmp = name.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w") as tar:
            for row in rows[i : i + shard_size]:
                key = Path(row["file"]).stem
                tar.add(out / row["file"], arcname=f"{key}.png")
                for ext, payload in (("txt", row["caption"]), ("json", json.dumps(row))):
                    data = payload.encode()
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, name)
        names.append(str(name))
    return names
