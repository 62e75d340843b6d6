"""The mole-tiny corpus: real face, hand and scene images with captions, read from a data root laid out like
../shared/data (the package never reads that folder by itself: the caller passes the root).

    root/faces/orl/sNN/*.pgm                         ORL faces, 40 people x 10, grey        -> "face"
    root/hands/sign_language_digits/D/*.JPG          hand gestures 0-9                       -> "hand"
    root/hands/11k_hands_sample/*.jpg + HandInfo.csv dorsal / palmar hands with metadata     -> "hand"
    root/scenes/coco_mini/{train2017,val2017}/*.jpg  COCO photos + captions_*.json           -> "scene"

Every item gets a deterministic split: held-out people (ORL s36-s40), every 10th hand and every 10th scene are
"test"; the rest is "train". A fraction of the training close-ups is marked "base" (the base model sees few
close-ups, as web data has few; the experts see all of them), the paper's data story in small.
"""

from __future__ import annotations

import csv
import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

KINDS = ("face", "hand", "scene")
FACE_CAPTIONS = (
    "a close-up photo of a face",
    "a close-up portrait of a person's face",
    "a black and white close-up photo of a man's face",
    "a close-up photo of a face looking at the camera",
    "a grey portrait photo of a face",
)
DIGIT_WORDS = ("a fist", "one finger", "two fingers", "three fingers", "four fingers", "five fingers",
               "six fingers", "seven fingers", "eight fingers", "nine fingers")  # fmt: skip


@dataclass(frozen=True)
class Item:
    path: Path
    kind: str  # face | hand | scene
    captions: tuple[str, ...]
    split: str  # train | test
    group: str  # the source identity (person, hand id, image id): splits never share a group
    in_base: bool  # part of the base model's (close-up poor) training mix


def _stable_fraction(key: str) -> float:
    return (zlib.crc32(key.encode()) % 10_000) / 10_000


def _faces(root: Path, base_fraction: float) -> list[Item]:
    items = []
    for folder in sorted((root / "faces" / "orl").glob("s*")):
        person = int(folder.name[1:])
        split = "test" if person > 35 else "train"
        in_base = split == "train" and person <= round(35 * base_fraction)
        for i, path in enumerate(sorted(folder.glob("*.pgm"))):
            caps = tuple(FACE_CAPTIONS[(i + j) % len(FACE_CAPTIONS)] for j in range(2))
            items.append(Item(path, "face", caps, split, f"orl-{person}", in_base))
    return items


def _hands(root: Path, base_fraction: float) -> list[Item]:
    items = []
    for folder in sorted((root / "hands" / "sign_language_digits").glob("[0-9]")):
        digit = int(folder.name)
        for path in sorted(folder.glob("*")):
            if path.suffix.lower() not in (".jpg", ".jpeg", ".png"):
                continue
            f = _stable_fraction(path.name)
            caps = (f"a close-up photo of a hand showing {DIGIT_WORDS[digit]}", "a close-up photo of a hand")
            items.append(Item(path, "hand", caps, "test" if f < 0.1 else "train", f"sld-{path.stem}",
                              f >= 0.1 and f < 0.1 + 0.9 * base_fraction))  # fmt: skip
    info = root / "hands" / "11k_hands_sample" / "HandInfo.csv"
    if info.is_file():
        with info.open(newline="") as fh:
            rows = {r["imageName"]: r for r in csv.DictReader(fh)}
        for path in sorted((root / "hands" / "11k_hands_sample").glob("*.jpg")):
            r = rows.get(path.name)
            if r is None:
                continue
            side, hand = r["aspectOfHand"].split()
            part = "back" if side == "dorsal" else "palm"
            person = r["gender"].replace("female", "woman").replace("male", "man")
            caps = (f"a close-up photo of the {part} of a {person}'s {hand} hand", f"a close-up photo of a {part}"
                    f" of a hand", "a close-up photo of a hand")  # fmt: skip
            f = _stable_fraction(r["id"])  # split by person: one person's hands stay on one side
            items.append(Item(path, "hand", caps, "test" if f < 0.1 else "train", f"11k-{r['id']}",
                              f >= 0.1 and f < 0.1 + 0.9 * base_fraction))  # fmt: skip
    return items


def _scenes(root: Path) -> list[Item]:
    items = []
    coco = root / "scenes" / "coco_mini"
    # captions: coco_mini's own annotations, then the full COCO val captions for val images they do not cover
    sources = [coco / "annotations" / "captions_train2017.json", coco / "annotations" / "captions_val2017.json",
               root / "prompts" / "coco_captions_val2017.json"]  # fmt: skip
    by_name: dict[str, list[str]] = {}
    for ann in sources:
        if not ann.is_file():
            continue
        data = json.loads(ann.read_text())
        names = {img["id"]: img["file_name"] for img in data["images"]}
        for a in data["annotations"]:
            caps = by_name.setdefault(names[a["image_id"]], [])
            cap = " ".join(a["caption"].strip().split())
            if cap not in caps:
                caps.append(cap)
    for split_dir in ("train2017", "val2017"):
        for path in sorted((coco / split_dir).glob("*.jpg")):
            caps = tuple(by_name.get(path.name, ()))
            if not caps:
                continue
            img = {"id": int(path.stem)}
            split = "test" if img["id"] % 10 == 3 else "train"
            items.append(Item(path, "scene", caps, split, f"coco-{img['id']}", split == "train"))
    return items


def collect_corpus(root: str | Path, base_fraction: float = 0.25, limit: int | None = None) -> list[Item]:
    """All captioned items under `root` (see the module doc); raises if a kind is missing entirely.
    limit: keep the first `limit` items of each (kind, split, in_base) group (quick runs, tests)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {str(root)!r} is not a folder; pass the folder that holds faces/, hands/ "
                                "and scenes/ (e.g. ../shared/data)")  # fmt: skip
    items = _faces(root, base_fraction) + _hands(root, base_fraction) + _scenes(root)
    for kind in KINDS:
        if not any(i.kind == kind for i in items):
            raise FileNotFoundError(f"data root {str(root)!r} has no {kind} images in the expected layout "
                                    "(see mole.pretrain.corpus)")  # fmt: skip
    if limit is not None:
        counts: dict[tuple, int] = {}
        kept = []
        for i in items:
            key = (i.kind, i.split, i.in_base)
            counts[key] = counts.get(key, 0) + 1
            if counts[key] <= limit:
                kept.append(i)
        items = kept
    return items


def summarize(items: list[Item]) -> dict:
    out: dict = {}
    for i in items:
        d = out.setdefault(i.kind, {"train": 0, "test": 0, "base": 0})
        d[i.split] += 1
        d["base"] += int(i.in_base)
    return out
