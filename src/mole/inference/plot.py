"""Small PNG charts drawn with Pillow alone (no matplotlib): line charts with bands, heat-map overlays, grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def line_chart(
    series: dict[str, Sequence[float]],
    path: str | Path,
    bands: dict[str, Sequence[float]] | None = None,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    ylim: tuple[float, float] | None = None,
    size: tuple[int, int] = (640, 400),
    xs: Sequence[float] | None = None,
) -> Path:
    """One line per series (x = 0..n-1, or the values `xs` on the tick labels: e.g. logged training steps), with
    an optional +-band per series; legend top right."""
    w, h = size
    left, right, top, bottom = 60, 20, 36, 44
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = _font(12)
    values = [v for s in series.values() for v in s]
    lo = [v - b for k, s in series.items() for v, b in zip(s, (bands or {}).get(k, [0] * len(s)))]
    hi = [v + b for k, s in series.items() for v, b in zip(s, (bands or {}).get(k, [0] * len(s)))]
    y0, y1 = ylim if ylim else (min(lo + values), max(hi + values))
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.05, y1 + 0.05
    n = max(len(s) for s in series.values())
    px = lambda i: left + (w - left - right) * (i / max(1, n - 1))  # noqa: E731
    py = lambda v: top + (h - top - bottom) * (1 - (v - y0) / (y1 - y0))  # noqa: E731
    d.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for k in range(5):  # y ticks
        v = y0 + (y1 - y0) * k / 4
        d.line([left - 4, py(v), left, py(v)], fill=(0, 0, 0))
        d.text((4, py(v) - 6), f"{v:.3f}", fill=(0, 0, 0), font=font)
    for k in range(min(n, 6)):  # x ticks
        i = round(k * (n - 1) / max(1, min(n, 6) - 1))
        tick = str(i) if xs is None or i >= len(xs) else f"{xs[i]:g}"
        d.text((px(i) - 3 * len(tick), h - bottom + 4), tick, fill=(0, 0, 0), font=font)
    for c, (name, s) in enumerate(series.items()):
        color = PALETTE[c % len(PALETTE)]
        if bands and name in bands:
            upper = [(px(i), py(v + b)) for i, (v, b) in enumerate(zip(s, bands[name]))]
            lower = [(px(i), py(v - b)) for i, (v, b) in enumerate(zip(s, bands[name]))]
            overlay = Image.new("RGBA", size, (0, 0, 0, 0))
            ImageDraw.Draw(overlay).polygon(upper + lower[::-1], fill=color + (60,))
            img.paste(overlay, (0, 0), overlay)
            d = ImageDraw.Draw(img)
        d.line([(px(i), py(v)) for i, v in enumerate(s)], fill=color, width=2)
        d.rectangle([w - right - 110, top + 8 + 16 * c, w - right - 98, top + 18 + 16 * c], fill=color)
        d.text((w - right - 92, top + 6 + 16 * c), name, fill=(0, 0, 0), font=font)
    d.text((left, 10), title, fill=(0, 0, 0), font=_font(14))
    d.text(((w - len(xlabel) * 6) // 2, h - 20), xlabel, fill=(0, 0, 0), font=font)
    d.text((4, 18), ylabel, fill=(0, 0, 0), font=font)
    path = Path(path)
    img.save(path)
    return path


def colormap(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB uint8 (a blue-cyan-yellow-red ramp)."""
    x = np.clip(x, 0.0, 1.0)[..., None]
    stops = np.array([[0, 0, 130], [0, 160, 255], [255, 230, 0], [220, 20, 20]], dtype=np.float64)
    pos = x * (len(stops) - 1)
    i = np.clip(pos.astype(int), 0, len(stops) - 2)
    t = pos - i
    rgb = stops[i[..., 0]] * (1 - t) + stops[i[..., 0] + 1] * t
    return rgb.astype(np.uint8)


def overlay(
    image: Image.Image, heat: np.ndarray, alpha: float = 0.5, vmin: float = 0.0, vmax: float = 1.0
) -> Image.Image:
    """Blend a (h, w) map, resized to the image, over it."""
    norm = (heat - vmin) / max(vmax - vmin, 1e-9)
    colored = Image.fromarray(colormap(norm)).resize(image.size, Image.Resampling.BILINEAR)
    return Image.blend(image.convert("RGB"), colored, alpha)


def grid(
    images: Sequence[Image.Image],
    cols: int,
    labels: Sequence[str] | None = None,
    pad: int = 4,
    min_cell: int = 128,
    row_labels: Sequence[str] | None = None,
) -> Image.Image:
    """Images in rows of `cols` (cells of the first image's size, enlarged to at least `min_cell` px so tiny images
    stay visible), with an optional caption under each and an optional line of text above each row (the whole row's
    width: e.g. the prompt the row was generated from)."""
    if not images:
        raise ValueError("grid needs at least one image")
    rows = (len(images) + cols - 1) // cols
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"grid: {len(row_labels)} row_labels for {rows} rows of {cols}; give one label per row")
    w, h = images[0].size
    if min(w, h) < min_cell:
        scale = min_cell / min(w, h)
        w, h = round(w * scale), round(h * scale)
    lab = 14 if labels else 0
    top = 14 if row_labels else 0
    width = cols * (w + pad) + pad
    sheet = Image.new("RGB", (width, rows * (h + pad + lab + top) + pad), "white")
    d = ImageDraw.Draw(sheet)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        x, y = pad + c * (w + pad), pad + r * (h + pad + lab + top) + top
        if row_labels and c == 0:
            d.text((pad, y - top + 1), row_labels[r][: max(4, (width - 2 * pad) // 6)], fill=(0, 0, 0),
                   font=_font(11))  # fmt: skip
        sheet.paste(im.convert("RGB").resize((w, h), Image.Resampling.NEAREST), (x, y))
        if labels:
            d.text((x, y + h + 1), labels[k][: max(4, w // 5)], fill=(0, 0, 0), font=_font(10))
    return sheet


def bar_chart(
    values: dict[str, float],
    errors: dict[str, float] | None,
    path: str | Path,
    title: str = "",
    size: tuple[int, int] = (560, 360),
) -> Path:
    """One bar per label with an optional +-error whisker; the value is printed above each bar."""
    w, h = size
    left, right, top, bottom = 60, 20, 40, 60
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = _font(11)
    errs = errors or {}
    hi = max(v + errs.get(k, 0.0) for k, v in values.items())
    lo = min(0.0, min(v - errs.get(k, 0.0) for k, v in values.items()))
    span = (hi - lo) or 1.0
    py = lambda v: top + (h - top - bottom) * (1 - (v - lo) / span)  # noqa: E731
    n = len(values)
    slot = (w - left - right) / max(1, n)
    d.line([left, py(0), w - right, py(0)], fill=(0, 0, 0))
    for i, (label, v) in enumerate(values.items()):
        x0, x1 = left + slot * i + slot * 0.2, left + slot * (i + 1) - slot * 0.2
        d.rectangle([x0, min(py(v), py(0)), x1, max(py(v), py(0))], fill=PALETTE[i % len(PALETTE)])
        e = errs.get(label, 0.0)
        if e:
            xc = (x0 + x1) / 2
            d.line([xc, py(v - e), xc, py(v + e)], fill=(0, 0, 0), width=2)
            d.line([xc - 5, py(v + e), xc + 5, py(v + e)], fill=(0, 0, 0), width=2)
            d.line([xc - 5, py(v - e), xc + 5, py(v - e)], fill=(0, 0, 0), width=2)
        d.text((x0, py(max(v, 0) + e) - 14), f"{v:.3g}", fill=(0, 0, 0), font=font)
        d.text((x0, h - bottom + 6), label[:16], fill=(0, 0, 0), font=font)
    d.text((left, 12), title, fill=(0, 0, 0), font=_font(14))
    path = Path(path)
    img.save(path)
    return path
