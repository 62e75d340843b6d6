"""Captioned image folders: captions from .txt files, a jsonl/json manifest, or kohya's metadata json.

Every random choice (crop, flip, caption dropout, batch order) is a function of (seed, epoch, index), so a resumed
run sees exactly the batches the uninterrupted run would have seen, on any number of processes.
"""

from __future__ import annotations

import functools
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

logger = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".gif")


class DataError(ValueError):
    """The training data cannot be read as configured; the message names the file and the fix."""


@dataclass(frozen=True)
class Sample:
    path: Path
    caption: str
    # condition images (InstructMoLE multi-conditional), any sizes, and one type each; () for none
    conditions: tuple[Path, ...] = ()
    condition_types: tuple[str, ...] = ()

    @property
    def condition(self) -> Path | None:
        """The first condition image (None without)."""
        return self.conditions[0] if self.conditions else None

    @property
    def condition_type(self) -> str | None:
        """The record's condition kind: its distinct types joined by '+' (e.g. 'edge+blur'); None without."""
        return "+".join(dict.fromkeys(self.condition_types)) if self.condition_types else None


def scan_samples(root: str | Path, manifest: str | Path | None = None) -> list[Sample]:
    """List (image, caption) pairs.

    manifest None: every image under `root` with a same-named .txt caption (images without one are counted and
    skipped). manifest .jsonl: one {"file"|"image"|"path": ..., "caption"|"text": ...} per line. manifest .json: a
    list of such records, or kohya's metadata {image_key: {"caption": ...}} (key: a path, or a file stem under root).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.path={str(root)!r} is not a folder")
    if manifest is None:
        samples, missing = [], 0
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
            txt = path.with_suffix(".txt")
            if txt.is_file():
                samples.append(Sample(path, txt.read_text(encoding="utf-8").strip()))
            else:
                missing += 1
        if missing:
            logger.warning("%d images under %s have no .txt caption and are skipped", missing, root)
    else:
        samples = _from_manifest(root, Path(manifest))
    if not samples:
        raise DataError(
            f"no captioned images found under {str(root)!r}"
            + (f" with manifest {str(manifest)!r}" if manifest else " (each image needs a same-named .txt file)")
        )
    return samples


def _from_manifest(root: Path, manifest: Path) -> list[Sample]:
    if not manifest.is_file():
        raise DataError(f"data.manifest={str(manifest)!r} does not exist")
    text = manifest.read_text(encoding="utf-8")
    if manifest.suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{manifest}:{n} is not valid JSON ({exc})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{manifest} is not valid JSON ({exc})") from None
        if isinstance(data, dict):  # kohya metadata: {image_key: {"caption": ...}}
            records = [{"file": k, **(v if isinstance(v, dict) else {"caption": v})} for k, v in data.items()]
        else:
            records = data
    stems = None
    samples = []
    for n, rec in enumerate(records, 1):
        key = rec.get("file") or rec.get("image") or rec.get("path")
        caption = rec.get("caption", rec.get("text"))
        if key is None or caption is None:
            raise DataError(f"{manifest}: record {n} needs a file and a caption, got keys {sorted(rec)}")
        path = Path(key) if Path(key).is_absolute() else root / key
        if not path.is_file():
            candidates = [path.with_suffix(e) for e in IMAGE_EXTS if path.with_suffix(e).is_file()]
            if not candidates:
                stems = (
                    stems
                    if stems is not None
                    else {p.stem: p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS}
                )
                candidates = [stems[Path(key).name]] if Path(key).name in stems else []
            if not candidates:
                raise DataError(f"{manifest}: record {n} names {key!r}, which is not an image under {root}")
            path = candidates[0]
        cond, ctype = rec.get("condition"), rec.get("condition_type")
        if (cond is None) != (ctype is None):
            raise DataError(f"{manifest}: record {n} needs both condition and condition_type, or neither")
        conds = [] if cond is None else [cond] if isinstance(cond, str) else list(cond)
        types = [] if ctype is None else [ctype] if isinstance(ctype, str) else list(ctype)
        if len(types) == 1 and len(conds) > 1:  # one type for all of the record's conditions
            types = types * len(conds)
        if len(types) != len(conds) or not all(isinstance(x, str) for x in conds + types):
            raise DataError(f"{manifest}: record {n} has {len(conds)} condition image(s) and {len(types)} "
                            "condition_type(s); give a path and a type each (lists of the same length), or one type")
        if cond is not None and not conds:
            raise DataError(f"{manifest}: record {n} has an empty condition list; drop condition and condition_type")
        paths = []
        for c in conds:
            c = Path(c) if Path(c).is_absolute() else root / c
            if not c.is_file():
                raise DataError(f"{manifest}: record {n} names condition {str(c)!r}, which does not exist")
            paths.append(c)
        samples.append(Sample(path, str(caption).strip(), tuple(paths), tuple(types)))
    with_cond = sum(bool(s.conditions) for s in samples)
    if 0 < with_cond < len(samples):
        raise DataError(f"{manifest}: {with_cond} of {len(samples)} records have a condition; give all or none one")
    return samples


def load_rgb(path: Path) -> Image.Image:
    """Open any common image (grey, palette, CMYK, 16-bit, alpha) as 8-bit RGB; raises OSError/ValueError if bad."""
    img = Image.open(path)
    img.load()
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 257.0 if arr.max() > 255 else 1.0
        img = Image.fromarray(np.clip(arr / scale, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB")


class CaptionedImages(Dataset):
    """Items are dicts: pixels (3, R, R) in [-1, 1], caption, index; or {"bad": True, "reason": "PATH (why)"} for
    unreadable files (the caller warns, once per image: collate gathers them in bad_reasons)."""

    def __init__(
        self,
        samples: list[Sample],
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        caption_dropout: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.samples = samples
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.caption_dropout = caption_dropout
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        rng = random.Random(hash((self.seed, epoch, index)))  # int tuples hash the same in every process
        sample = self.samples[index]
        try:
            img = load_rgb(sample.path)
            conds = [load_rgb(c) for c in sample.conditions]
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            # no warning here: a DataLoader worker's copy cannot know what the others named; the training loop
            # warns once per image from the batch's bad_reasons
            logger.debug("unreadable image %s (%s)", sample.path, exc)
            return {"index": index, "bad": True, "reason": f"{sample.path} ({exc})"}
        r = self.resolution
        w, h = img.size
        if min(w, h) < 1:
            return {"index": index, "bad": True, "reason": f"{sample.path} (an empty image: {w}x{h} px)"}
        s = r / min(w, h)
        nw, nh = max(r, round(w * s)), max(r, round(h * s))
        if self.center_crop:
            left, top = (nw - r) // 2, (nh - r) // 2
        else:
            left, top = rng.randint(0, nw - r), rng.randint(0, nh - r)
        flip = self.random_flip and rng.random() < 0.5

        def view(im: Image.Image) -> torch.Tensor:  # the same resize, crop and flip for image and condition
            im = im.resize((nw, nh), Image.Resampling.BICUBIC).crop((left, top, left + r, top + r))
            if flip:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            return torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0

        def own_view(im: Image.Image) -> torch.Tensor:  # a condition of another size: its own centre crop, no flip
            k = r / min(im.size)
            cw, ch = max(r, round(im.width * k)), max(r, round(im.height * k))
            x, y = (cw - r) // 2, (ch - r) // 2
            im = im.resize((cw, ch), Image.Resampling.BICUBIC).crop((x, y, x + r, y + r))
            return torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0

        caption = "" if rng.random() < self.caption_dropout else sample.caption
        item = {"pixels": view(img), "caption": caption, "index": index, "epoch": epoch, "bad": False}
        if conds:  # aligned conditions (the image's size) share its crop and flip; others get their own crop
            item["conditions"] = [view(c) if c.size == img.size else own_view(c) for c in conds]
            item["condition_types"] = list(sample.condition_types)
        return item


def collate(items: list[dict]) -> dict:
    good = [it for it in items if not it["bad"]]
    conditioned = bool(good) and "conditions" in good[0]
    counts = sorted({len(it["conditions"]) for it in good}) if conditioned else []
    if len(counts) > 1:
        raise DataError(f"a batch mixes records with {counts} condition images; give every record the same number "
                        "of conditions, or use batch_size=1")  # fmt: skip
    slots = range(counts[0]) if conditioned else range(0)
    return {  # conditions: one (b, 3, R, R) tensor per condition slot; condition_types: per slot, one per sample
        "conditions": [torch.stack([it["conditions"][k] for it in good]) for k in slots] if conditioned else None,
        "condition_types": [[it["condition_types"][k] for it in good] for k in slots] if conditioned else None,
        "pixels": torch.stack([it["pixels"] for it in good]) if good else None,
        "captions": [it["caption"] for it in good],
        "indices": [it["index"] for it in good],
        # (epoch, index) of each image: its place in the global sample stream, what its random draws are keyed by
        "keys": [(it.get("epoch", 0), it["index"]) for it in good],
        "skipped": len(items) - len(good),
        "bad_indices": [it["index"] for it in items if it["bad"]],
        "bad_reasons": {it["index"]: it.get("reason", f"image {it['index']}") for it in items if it["bad"]},
    }


class StepBatchSampler(Sampler):
    """Yields this process's (index, epoch) keys for micro-step m, m+1, ... for ever.

    The sample stream is the concatenation of per-epoch permutations (seeded by seed + epoch); micro-step m takes
    positions [m*B*P, (m+1)*B*P), process p the p-th block of B. So the batches depend only on m, never on history.
    order: (seed, epoch) -> a permutation of range(num_samples) (shards: ShardSet.epoch_order, local to shards);
    None: a uniform permutation.
    """

    def __init__(self, num_samples: int, batch_size: int, num_processes: int = 1, process_index: int = 0,
                 seed: int = 0, start: int = 0, order=None) -> None:  # fmt: skip
        if num_samples < 1:
            raise DataError("the dataset is empty")
        self.n, self.b, self.p, self.rank, self.seed, self.start = (
            num_samples, batch_size, num_processes, process_index, seed, start
        )  # fmt: skip
        self.order = order

    def position(self, micro_step: int) -> int:
        """Where micro-step `micro_step` starts in the sample stream (all processes): a resumed run's start."""
        return micro_step * self.b * self.p

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a handful of epochs per sampler
    def _perm(self, epoch: int) -> list[int]:
        if self.order is not None:
            return self.order(self.seed, epoch)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def batch(self, micro_step: int) -> list[tuple[int, int]]:
        first = self.position(micro_step) + self.rank * self.b
        keys = []
        for pos in range(first, first + self.b):
            epoch, i = divmod(pos, self.n)
            keys.append((self._perm(epoch)[i], epoch))
        return keys

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        m = self.start
        while True:
            yield self.batch(m)
            m += 1
