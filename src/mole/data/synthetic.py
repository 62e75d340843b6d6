"""Drawn stand-ins for the three training sets, so the embedded demo needs no files: cartoon face close-ups,
cartoon hand close-ups, and small figures in a scene. Deterministic for a seed."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

SKIN = [(241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36), (255, 219, 172)]


def _background(rng: random.Random, size: int) -> Image.Image:
    c1 = tuple(rng.randint(40, 220) for _ in range(3))
    img = Image.new("RGB", (size, size), c1)
    d = ImageDraw.Draw(img)
    for _ in range(3):
        x, y = rng.randint(0, size), rng.randint(0, size)
        r = rng.randint(size // 8, size // 3)
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.randint(40, 220) for _ in range(3)))
    return img


def draw_face(rng: random.Random, size: int = 64) -> Image.Image:
    img = _background(rng, size)
    d = ImageDraw.Draw(img)
    cx, cy = size / 2 + rng.uniform(-3, 3), size / 2 + rng.uniform(-3, 3)
    rx, ry = size * rng.uniform(0.30, 0.38), size * rng.uniform(0.38, 0.46)
    skin = rng.choice(SKIN)
    d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=skin)
    hair = tuple(rng.randint(0, 90) for _ in range(3))
    d.chord([cx - rx, cy - ry, cx + rx, cy + ry * 0.2], 180, 360, fill=hair)
    ey, ex = cy - ry * 0.1, rx * 0.4
    for sx in (-1, 1):
        d.ellipse([cx + sx * ex - 3, ey - 2, cx + sx * ex + 3, ey + 2], fill="white")
        d.ellipse([cx + sx * ex - 1.5, ey - 1.5, cx + sx * ex + 1.5, ey + 1.5], fill=(30, 30, 30))
    d.line([cx, ey + 3, cx - 1, cy + ry * 0.25], fill=tuple(max(0, c - 40) for c in skin), width=1)
    my = cy + ry * 0.5
    d.arc([cx - rx * 0.4, my - 4, cx + rx * 0.4, my + 4], 10, 170, fill=(150, 40, 40), width=2)
    return img


def draw_hand(rng: random.Random, size: int = 64) -> Image.Image:
    img = _background(rng, size)
    d = ImageDraw.Draw(img)
    skin = rng.choice(SKIN)
    cx, cy = size / 2 + rng.uniform(-3, 3), size * 0.62 + rng.uniform(-3, 3)
    pw, ph = size * 0.34, size * 0.30
    d.rounded_rectangle([cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2], radius=5, fill=skin)
    d.rectangle([cx - pw * 0.3, cy + ph / 2, cx + pw * 0.3, size], fill=skin)  # wrist
    raised = rng.randint(1, 4)
    for k in range(4):
        fx = cx - pw / 2 + pw * (k + 0.5) / 4
        length = size * (0.30 if k < raised else 0.08) * rng.uniform(0.9, 1.1)
        d.rounded_rectangle([fx - 3, cy - ph / 2 - length, fx + 3, cy - ph / 2 + 3], radius=3, fill=skin)
    d.rounded_rectangle([cx - pw / 2 - size * 0.16, cy - 3, cx - pw / 2 + 3, cy + 3], radius=3, fill=skin)  # thumb
    return img


def draw_scene(rng: random.Random, size: int = 64) -> Image.Image:
    img = _background(rng, size)
    d = ImageDraw.Draw(img)
    d.rectangle([0, size * 0.75, size, size], fill=tuple(rng.randint(60, 160) for _ in range(3)))  # ground
    for _ in range(rng.randint(1, 3)):
        x, h = rng.uniform(size * 0.15, size * 0.85), size * rng.uniform(0.35, 0.55)
        base = size * 0.8
        skin = rng.choice(SKIN)
        d.ellipse([x - h * 0.09, base - h, x + h * 0.09, base - h * 0.82], fill=skin)  # head
        d.rectangle([x - h * 0.1, base - h * 0.82, x + h * 0.1, base - h * 0.4],
                    fill=tuple(rng.randint(0, 255) for _ in range(3)))  # fmt: skip
        d.line([x - h * 0.05, base - h * 0.4, x - h * 0.08, base], fill=(40, 40, 60), width=2)
        d.line([x + h * 0.05, base - h * 0.4, x + h * 0.08, base], fill=(40, 40, 60), width=2)
    return img


DRAWERS = {
    "face": (draw_face, "a close-up photo of a face"),
    "hand": (draw_hand, "a close-up photo of a hand"),
    "scene": (draw_scene, "a photo of people standing in a park"),
}


def write_synthetic_set(folder: str | Path, kind: str, count: int, size: int = 64, seed: int = 0) -> Path:
    """Write `count` drawn images of `kind` (face, hand, scene) with .txt captions into `folder`."""
    if kind not in DRAWERS:
        raise ValueError(f"kind={kind!r}: use one of {', '.join(sorted(DRAWERS))}")
    draw, caption = DRAWERS[kind]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{kind}-{seed}")
    for i in range(count):
        path = folder / f"{kind}_{i:04d}.png"
        draw(rng, size).save(path)
        path.with_suffix(".txt").write_text(caption)
    return folder
