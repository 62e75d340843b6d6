"""Image quality and near-duplicate signals.

- variance of the Laplacian: the classic sharpness baseline (low = blurry);
- a small CNN blur / low-quality classifier trained from a few hundred labelled positives and negatives by
  `mole data train-filter` (the paper used VGG19 filters; this is the same idea at a size that trains on a CPU);
- a 64-bit perceptual hash (DCT of a 32x32 grey image) with a band index for near-duplicate search.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import nn

from .dataset import IMAGE_EXTS, load_rgb

logger = logging.getLogger(__name__)


def laplacian_variance(image: Image.Image, size: int | None = None) -> float:
    """Variance of the 4-neighbour Laplacian of the grey image, at its own resolution (or, with `size`, with the
    longer side scaled down to `size`: resampling changes the figure, so compare images at their source size)."""
    g = image.convert("L")
    scale = 1.0 if size is None else size / max(g.size)
    if scale < 1:
        g = g.resize((max(1, round(g.width * scale)), max(1, round(g.height * scale))), Image.Resampling.BILINEAR)
    a = np.asarray(g, dtype=np.float64)
    if min(a.shape) < 3:
        return 0.0
    lap = 4 * a[1:-1, 1:-1] - a[:-2, 1:-1] - a[2:, 1:-1] - a[1:-1, :-2] - a[1:-1, 2:]
    return float(lap.var())


# ---------------------------------------------------------------------------------------------------- pHash
_DCT = None


def _dct_matrix(n: int = 32) -> np.ndarray:
    k = np.arange(n)
    m = np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))
    m[0] *= 1 / np.sqrt(2)
    return m * np.sqrt(2 / n)


def phash(image: Image.Image) -> int:
    """64-bit perceptual hash: low 8x8 DCT frequencies of a 32x32 grey image, thresholded at their median."""
    global _DCT
    if _DCT is None:
        _DCT = _dct_matrix(32)
    a = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT @ a @ _DCT.T)[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class DuplicateIndex:
    """Near-duplicate search over 64-bit hashes: 4 bands of 16 bits; by pigeonhole, any hash within distance 3 of a
    stored one shares at least one band with it, so only those candidates are compared."""

    def __init__(self, max_distance: int = 3) -> None:
        if not 0 <= max_distance <= 3:
            raise ValueError(f"max_distance={max_distance}: the 4-band index finds distances 0..3")
        self.max_distance = max_distance
        self.bands: list[dict[int, list[int]]] = [{} for _ in range(4)]

    def add_if_new(self, h: int) -> bool:
        """True (and stored) if no stored hash is within max_distance; False for a near-duplicate."""
        keys = [(h >> (16 * i)) & 0xFFFF for i in range(4)]
        for band, key in zip(self.bands, keys):
            for other in band.get(key, ()):
                if hamming(h, other) <= self.max_distance:
                    return False
        for band, key in zip(self.bands, keys):
            band.setdefault(key, []).append(h)
        return True


# ---------------------------------------------------------------------------------------------------- blur CNN
class BlurNet(nn.Module):
    """A small CNN: P(sharp / good quality) from a 128x128 RGB image."""

    SIZE = 128

    def __init__(self) -> None:
        super().__init__()
        layers, c = [], 3
        for width in (16, 32, 64, 64):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
            c = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, 3, 128, 128) in [-1, 1] -> (b,) logits
        return self.head(self.features(x).mean((2, 3)))[:, 0]

    @staticmethod
    def prepare(image: Image.Image) -> torch.Tensor:
        """Centre square crop at 128 px: blur is judged at (close to) native resolution, not after heavy downscale."""
        img = image.convert("RGB")
        s = min(img.size)
        left, top = (img.width - s) // 2, (img.height - s) // 2
        img = img.crop((left, top, left + s, top + s)).resize((BlurNet.SIZE, BlurNet.SIZE), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


class BlurFilter:
    """A trained BlurNet: score(image) = P(sharp)."""

    def __init__(self, net: BlurNet) -> None:
        self.net = net.eval()

    @classmethod
    def load(cls, path: str | Path) -> BlurFilter:
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"blur filter {path} does not exist; train one with `mole data train-filter`")
        net = BlurNet()
        net.load_state_dict(load_file(str(path)))
        return cls(net)

    @torch.no_grad()
    def score(self, images: list[Image.Image]) -> list[float]:
        x = torch.stack([BlurNet.prepare(im) for im in images])
        return torch.sigmoid(self.net(x)).tolist()


def _images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of images")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS)


def train_blur_filter(
    good: str | Path,
    bad: str | Path | None,
    out: str | Path,
    epochs: int = 10,
    synthetic_blur: bool = True,
    seed: int = 0,
    holdout: float = 0.2,
) -> dict:
    """Train a BlurNet on images labelled good (a folder) vs bad (a folder, and/or blurred copies of the good ones
    when synthetic_blur); save safetensors to `out`; return held-out accuracy and counts."""
    from safetensors.torch import save_file

    rng = random.Random(seed)
    torch.manual_seed(seed)
    # the split is by source image: a blurred copy always falls on the same side as its sharp twin, so the held-out
    # accuracy is measured on images whose twins the net never saw
    good_files, bad_files = _images(good), (_images(bad) if bad else [])
    groups = [[(load_rgb(p), 1.0)] for p in good_files] + [[(load_rgb(p), 0.0)] for p in bad_files]
    if synthetic_blur:
        for g in groups[: len(good_files)]:
            im = g[0][0]
            g.append((im.filter(ImageFilter.GaussianBlur(radius=rng.uniform(1.5, 4.0) * max(im.size) / 256)), 0.0))
    n_pos = sum(y == 1.0 for g in groups for _, y in g)
    n_neg = sum(y == 0.0 for g in groups for _, y in g)
    if n_pos < 4 or n_neg < 4:
        raise ValueError(f"need at least 4 good and 4 bad images, got {n_pos} and {n_neg}")
    rng.shuffle(groups)
    n_val = max(1, round(len(groups) * holdout))
    val = [(BlurNet.prepare(im), y) for g in groups[:n_val] for im, y in g]
    train = [(BlurNet.prepare(im), y) for g in groups[n_val:] for im, y in g]
    net = BlurNet()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    x_tr = torch.stack([x for x, _ in train])
    y_tr = torch.tensor([y for _, y in train])
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(train))
        for i in range(0, len(train), 16):
            idx = perm[i : i + 16]
            xb = x_tr[idx]
            if torch.rand(()) < 0.5:
                xb = xb.flip(-1)
            loss = nn.functional.binary_cross_entropy_with_logits(net(xb), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        logger.info("blur filter epoch %d: loss %.4f", epoch, float(loss.detach()))
    net.eval()
    with torch.no_grad():
        pred = torch.sigmoid(net(torch.stack([x for x, _ in val]))) > 0.5
    acc = float((pred.float() == torch.tensor([y for _, y in val])).float().mean())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out))
    return {"holdout_accuracy": acc, "train": len(train), "holdout": len(val), "good": n_pos, "bad": n_neg,
            "split": "by source image", "holdout_sources": n_val}  # fmt: skip
