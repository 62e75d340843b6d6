"""Captions for crops: pluggable captioners, boilerplate clean-up, truncation to the text encoder's limit.

Captioners (all callables (image, source_path) -> str; those with needs_image = False are given None):
- TemplateCaptioner("a close-up photo of a {part}")      offline, for close-up sets
- SidecarCaptioner(captions_json=None)                    a same-named .txt beside the source, or a JSON map
                                                          (COCO captions json or {file name: caption})
- HFCaptioner("Salesforce/blip-image-captioning-large")   a transformers image-to-text model (local path or hub id)
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from PIL import Image

# VLM boilerplate (the paper cleans these from its LLaVA captions): leading framing phrases, and participle clauses
# that editorialise instead of describing.
_LEADING = re.compile(
    r"^\s*(?:the|this|in this|in the)\s+(?:image|picture|photo|photograph|scene)\s+"
    r"(?:features|shows|showcases|depicts|displays|captures|presents|contains|is of)\s*:?\s*",
    re.IGNORECASE,
)
_LEADING_COMMA = re.compile(r"^\s*in (?:this|the) (?:image|picture|photo|scene),\s*", re.IGNORECASE)
_CLAUSES = re.compile(
    r",?\s*(?:creating|showcasing|demonstrating|highlighting|adding|emphasizing|emphasising|giving|evoking|"
    r"suggesting|conveying|contributing)\b[^.]*",
    re.IGNORECASE,
)
_TRAILING = re.compile(r"\s*(?:overall|in summary),[^.]*\.?\s*$", re.IGNORECASE)


def clean_caption(text: str) -> str:
    """Remove boilerplate framing and editorial clauses; tidy spaces and punctuation; capital first letter kept."""
    t = " ".join(text.split())
    ended = t.endswith(".")
    t = _LEADING.sub("", t)
    t = _LEADING_COMMA.sub("", t)
    t = _CLAUSES.sub("", t)
    t = _TRAILING.sub("", t)
    t = re.sub(r"\s+([.,;:])", r"\1", t)
    t = re.sub(r"([.,;:]){2,}", r"\1", t).strip(" ,;:")
    if ended and t and not t.endswith("."):
        t += "."
    return t[:1].upper() + t[1:] if t else t


def truncate_caption(text: str, tokenizer=None, max_tokens: int = 77) -> tuple[str, bool]:
    """Cut at a word boundary so the caption fits the text encoder (special tokens included); (text, was_cut).
    Without a tokenizer, max_tokens counts words."""
    words = text.split()

    def fits(ws: list[str]) -> bool:
        if tokenizer is None:
            return len(ws) <= max_tokens
        return len(tokenizer(" ".join(ws), truncation=False).input_ids) <= max_tokens

    if fits(words):
        return text, False
    lo, hi = 0, len(words)
    while lo < hi:  # the longest prefix that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(words[:mid]) else (lo, mid - 1)
    return " ".join(words[:lo]).rstrip(",;:"), True


class TemplateCaptioner:
    needs_image = False  # captioners that never look at the pixels let the builder skip re-reading each crop

    def __init__(self, template: str, **fields: str) -> None:
        self.template, self.fields = template, fields

    def __call__(self, image: Image.Image | None, source: Path) -> str:
        return self.template.format(**self.fields, stem=source.stem, folder=source.parent.name)


class SidecarCaptioner:
    needs_image = False

    def __init__(self, captions_json: str | Path | None = None) -> None:
        self.map: dict[str, str] = {}
        if captions_json is not None:
            data = json.loads(Path(captions_json).read_text())
            if isinstance(data, dict) and "annotations" in data and "images" in data:  # COCO captions
                names = {im["id"]: im["file_name"] for im in data["images"]}
                for a in data["annotations"]:
                    self.map.setdefault(names.get(a["image_id"], ""), a["caption"].strip())
            elif isinstance(data, dict):
                self.map = {str(k): str(v) for k, v in data.items()}
            else:
                raise ValueError(f"{captions_json}: expected COCO captions or a {{file name: caption}} object")

    def __call__(self, image: Image.Image | None, source: Path) -> str:
        txt = source.with_suffix(".txt")
        if txt.is_file():
            return txt.read_text(encoding="utf-8").strip()
        return self.map.get(source.name, "")


class HFCaptioner:
    needs_image = True

    def __init__(self, model: str, device: str | None = None, max_new_tokens: int = 60) -> None:
        from transformers import pipeline

        self.pipe = pipeline("image-to-text", model=model, device=device)
        self.max_new_tokens = max_new_tokens

    def __call__(self, image: Image.Image, source: Path) -> str:
        out = self.pipe(image, max_new_tokens=self.max_new_tokens)
        return out[0]["generated_text"] if out else ""


def build_captioner(spec: str, part: str | None = None, captions_json: str | None = None) -> Callable:
    """'template:<text with {part}>', 'sidecar', or 'hf:<model path or hub id>'."""
    if spec.startswith("template:"):
        return TemplateCaptioner(spec[len("template:") :], part=part or "person")
    if spec == "sidecar":
        return SidecarCaptioner(captions_json)
    if spec.startswith("hf:"):
        return HFCaptioner(spec[3:])
    raise ValueError(f"captioner={spec!r}: use 'template:...', 'sidecar' or 'hf:<model>'")
