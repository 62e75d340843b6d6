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

# The VLM frame (the paper cleans it from its LLaVA captions): a leading "The image shows" / "In this picture, (we can
# see)" / "This is a photo of", and a closing sentence or clause about the picture's mood ("Overall, the scene ...",
# ", creating a serene atmosphere"). Only the frame goes: verbs are matched as whole words and only inside the frame,
# so "A man giving a thumbs up" and "A Thanksgiving dinner" are left alone.
_MEDIUM = r"(?:image|picture|photo|photograph|scene|shot|snapshot|illustration|painting|artwork)"
_VERB = (r"(?:features|shows|showcases|depicts|displays|captures|presents|contains|portrays|illustrates|"
         r"is of|is showing|is depicting|appears to show|seems to show)")  # fmt: skip
_LEADING = re.compile(
    rf"^\s*(?:(?:the|this|in this|in the)\s+{_MEDIUM}\s+(?:we can see|you can see|there (?:is|are)|{_VERB})"
    rf"|(?:in|within)\s+(?:this|the)\s+{_MEDIUM}\s*,\s*(?:we can see|you can see|there (?:is|are))?"
    rf"|(?:this|it)\s+is\s+(?:an?|the)\s+{_MEDIUM}\s+(?:of|showing|depicting)"
    rf"|(?:the|this)\s+{_MEDIUM}\s+(?=(?:we can see|you can see)\b))\s*:?\s*",
    re.IGNORECASE,
)
_MOOD = r"(?:atmosphere|ambiance|ambience|mood|feel|feeling|vibe|scene|setting|environment|sense of [a-z ]+)"
_MOOD_CLAUSE = re.compile(
    rf",?\s*\b(?:creating|adding to|adding|giving|evoking|contributing to|enhancing|conveying)\s+"
    rf"(?:an?|the|to the)\s+(?:[a-z-]+\s+){{0,4}}{_MOOD}\b"
    rf"(?:\s+(?:to|of|for|in) (?:the|this) {_MEDIUM})?(?=\s*[.]|\s*$)",
    re.IGNORECASE,
)
_TRAILING = re.compile(rf"(?<=[.!?])\s*(?:overall|in summary|in conclusion),?\s+(?:the|this)\s+{_MEDIUM}\b[^.]*\.?\s*$",
                       re.IGNORECASE)  # fmt: skip


def clean_caption(text: str) -> str:
    """Remove the VLM frame (leading "The image shows", "In this picture, ..."; a closing "Overall, the image ..."
    sentence or ", creating a ... atmosphere" clause); tidy spaces; first letter capital. Content words stay."""
    t = " ".join(text.split())
    ended = t.endswith(".")
    t = _TRAILING.sub("", t)
    t = _LEADING.sub("", t)
    t = _MOOD_CLAUSE.sub("", t)
    t = re.sub(r"\s+([.,;:])(?=\s|$)", r"\1", t)
    t = re.sub(r"([.,;:]){2,}(?=\s|$)", r"\1", t).strip(" ,;:")
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


PAPER_CAPTION_PROMPT = "Describe this image in one sentence with details."  # the paper's LLaVA prompt


def find_clip_tokenizer():
    """The real CLIP tokenizer when one is on this machine, else None (truncation then counts words): the folder in
    $MOLE_CLIP_TOKENIZER (vocab.json + merges.txt), or openai/clip-vit-large-patch14 in the Hugging Face cache
    (local files only: nothing is downloaded)."""
    import os

    from transformers import CLIPTokenizer

    folder = os.environ.get("MOLE_CLIP_TOKENIZER")
    if folder:
        if not (Path(folder) / "vocab.json").is_file():
            raise FileNotFoundError(f"MOLE_CLIP_TOKENIZER={folder}: no vocab.json there (want vocab.json + merges.txt)")
        return CLIPTokenizer(str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"), model_max_length=77)
    try:
        return CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14", local_files_only=True)
    except (OSError, ValueError):
        return None


class SidecarCaptioner:
    needs_image = False

    def __init__(self, captions_json: str | Path | list | tuple | None = None) -> None:
        """`captions_json`: one file or several (the first that has a caption for a file wins)."""
        self.map: dict[str, str] = {}
        sources = captions_json if isinstance(captions_json, (list, tuple)) else [captions_json]
        for one in sources:
            if one is None:
                continue
            for name, caption in self._read(one).items():
                if caption:
                    self.map.setdefault(name, caption)

    @staticmethod
    def _read(captions_json: str | Path) -> dict[str, str]:
        out: dict[str, str] = {}
        if captions_json is not None:
            if not Path(captions_json).is_file():
                raise FileNotFoundError(f"captions_json={captions_json}: no such file")
            data = json.loads(Path(captions_json).read_text())
            if isinstance(data, dict) and "annotations" in data and "images" in data:  # COCO captions
                names = {im["id"]: im["file_name"] for im in data["images"]}
                for a in data["annotations"]:
                    out.setdefault(names.get(a["image_id"], ""), a["caption"].strip())
            elif isinstance(data, dict):
                out = {str(k): str(v).strip() for k, v in data.items()}
            else:
                raise ValueError(f"{captions_json}: expected COCO captions or a {{file name: caption}} object")
        return out

    def __call__(self, image: Image.Image | None, source: Path) -> str:
        txt = source.with_suffix(".txt")
        if txt.is_file():
            return txt.read_text(encoding="utf-8").strip()
        return self.map.get(source.name, "")


class HFCaptioner:
    """A transformers image-to-text model; `prompt` (e.g. PAPER_CAPTION_PROMPT) is given to models that take one
    and its echo is cut from the answer."""

    needs_image = True

    def __init__(self, model: str, device: str | None = None, max_new_tokens: int = 60, prompt: str | None = None):
        from transformers import pipeline

        self.pipe = pipeline("image-to-text", model=model, device=device)
        self.max_new_tokens, self.prompt = max_new_tokens, prompt

    def __call__(self, image: Image.Image, source: Path) -> str:
        kwargs = {"max_new_tokens": self.max_new_tokens}
        if self.prompt:
            kwargs["prompt"] = self.prompt
        out = self.pipe(image, **kwargs)
        text = out[0]["generated_text"] if out else ""
        if self.prompt and text.strip().startswith(self.prompt):
            text = text.strip()[len(self.prompt) :]
        return text.strip()


class ChainCaptioner:
    """Several caption sources at once: the first non-empty caption wins (e.g. sidecar, then a VLM)."""

    def __init__(self, captioners: list) -> None:
        self.captioners = captioners
        self.needs_image = any(getattr(c, "needs_image", True) for c in captioners)

    def __call__(self, image: Image.Image | None, source: Path) -> str:
        for c in self.captioners:
            text = c(image if getattr(c, "needs_image", True) else None, source)
            if text and text.strip():
                return text
        return ""


def build_captioner(spec: str | list | tuple, part: str | None = None, captions_json=None,
                    prompt: str | None = None) -> Callable:  # fmt: skip
    """'template:<text with {part}>', 'sidecar', or 'hf:<model path or hub id>'; a list of them is tried in order."""
    if isinstance(spec, (list, tuple)):
        if len(spec) == 1:
            return build_captioner(spec[0], part, captions_json, prompt)
        return ChainCaptioner([build_captioner(s, part, captions_json, prompt) for s in spec])
    if spec.startswith("template:"):
        return TemplateCaptioner(spec[len("template:") :], part=part or "person")
    if spec == "sidecar":
        return SidecarCaptioner(captions_json)
    if spec.startswith("hf:"):
        return HFCaptioner(spec[3:], prompt=prompt)
    raise ValueError(f"captioner={spec!r}: use 'template:...', 'sidecar' or 'hf:<model>'")
