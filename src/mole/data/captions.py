"""Captions for crops: pluggable captioners, boilerplate clean-up, truncation to the text encoder's limit.

Captioners (all callables (image, source_path) -> str; those with needs_image = False are given None; `level` says
what a caption describes: "crop" (made for the crop) or "photo" (written for the whole source photo)):
- TemplateCaptioner("a close-up photo of a {part}")      offline, level crop
- SidecarCaptioner(captions_json=None)                    a same-named .txt beside the source, or a JSON map
                                                          (COCO captions json or {file name: caption}); level photo
- HFCaptioner("Salesforce/blip-image-captioning-large")   a transformers vision-language model per crop (local folder
                                                          or hub id; the paper captions every crop with LLaVA)
`caption_crop` runs them in order: a photo-level caption is used only when it is about a person
(`mole.eval.human_text`), and the row says which captioner wrote it and at which level.
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
    level, name = "crop", "template"

    def __init__(self, template: str, **fields: str) -> None:
        if not template.strip():
            raise ValueError("captioner='template:': the template is empty; write what the crops show, e.g. "
                             "'template:a photo of a {part}'")  # fmt: skip
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
    level, name = "photo", "sidecar"

    def __init__(self, captions_json: str | Path | list | tuple | None = None) -> None:
        """`captions_json`: one file or several (their captions for a file are tried in order: files first, then
        the captions within a file, COCO's five per image in file order)."""
        self.map: dict[str, list[str]] = {}
        sources = captions_json if isinstance(captions_json, (list, tuple)) else [captions_json]
        for one in sources:
            if one is None:
                continue
            for name, captions in self._read(one).items():
                self.map.setdefault(name, []).extend(c for c in captions if c)

    @staticmethod
    def _read(captions_json: str | Path) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        if captions_json is not None:
            if not Path(captions_json).is_file():
                raise FileNotFoundError(f"captions_json={captions_json}: no such file")
            data = json.loads(Path(captions_json).read_text())
            if isinstance(data, dict) and "annotations" in data and "images" in data:  # COCO captions
                names = {im["id"]: im["file_name"] for im in data["images"]}
                for a in data["annotations"]:
                    out.setdefault(names.get(a["image_id"], ""), []).append(a["caption"].strip())
            elif isinstance(data, dict):
                out = {str(k): [str(v).strip()] for k, v in data.items()}
            else:
                raise ValueError(f"{captions_json}: expected COCO captions or a {{file name: caption}} object")
        return out

    def captions(self, source: Path) -> list[str]:
        """Every caption this source has: the .txt beside it, then those of the JSON maps."""
        txt = source.with_suffix(".txt")
        found = [txt.read_text(encoding="utf-8").strip()] if txt.is_file() else []
        return [c for c in found + self.map.get(source.name, []) if c]

    def __call__(self, image: Image.Image | None, source: Path) -> str:
        found = self.captions(source)
        return found[0] if found else ""


class HFCaptioner:
    """A transformers vision-language model that captions each crop (the paper's path: LLaVA, prompt
    PAPER_CAPTION_PROMPT, one caption per crop): a local folder or a hub id, loaded with AutoProcessor and
    AutoModelForImageTextToText (BLIP, GIT, LLaVA, Qwen-VL, ... and VisionEncoderDecoder models). `prompt` is given
    to models that take one (through the processor's chat template when it has one); only the new text is kept."""

    needs_image = True
    level, name = "crop", "hf"

    def __init__(self, model: str, device: str | None = None, max_new_tokens: int = 60, prompt: str | None = None):
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.processor = AutoProcessor.from_pretrained(model)
        if AutoConfig.from_pretrained(model).model_type == "vision-encoder-decoder":
            from transformers import VisionEncoderDecoderModel

            self.model = VisionEncoderDecoderModel.from_pretrained(model)
        else:
            self.model = AutoModelForImageTextToText.from_pretrained(model)
        self.model.to(self.device).eval()
        self.max_new_tokens, self.prompt = max_new_tokens, prompt

    def __call__(self, image: Image.Image, source: Path) -> str:
        import torch

        kwargs: dict = {"images": image.convert("RGB"), "return_tensors": "pt"}
        if self.prompt:
            if getattr(self.processor, "chat_template", None):
                messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
                kwargs["text"] = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            else:
                kwargs["text"] = self.prompt
        inputs = self.processor(**kwargs).to(self.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        ids = inputs.get("input_ids")
        if ids is not None and not self.model.config.is_encoder_decoder and out.shape[1] > ids.shape[1] and \
                torch.equal(out[:, : ids.shape[1]], ids):
            out = out[:, ids.shape[1] :]  # a decoder-only model echoes its prompt: keep the answer
        text = self.processor.batch_decode(out, skip_special_tokens=True)[0].strip()
        if self.prompt and text.startswith(self.prompt):
            text = text[len(self.prompt) :].strip()
        return text


class ChainCaptioner:
    """Several caption sources at once: the first non-empty caption wins (e.g. sidecar, then a VLM)."""

    def __init__(self, captioners: list) -> None:
        self.captioners = captioners
        self.needs_image = any(getattr(c, "needs_image", True) for c in captioners)

    def __call__(self, image: Image.Image | None, source: Path) -> str:
        return caption_crop(self.captioners, image, source)[0]


def caption_crop(captioners: list, image: Image.Image | None, source: Path,
                 about_a_person: bool = False) -> tuple[str, str | None, str | None]:  # fmt: skip
    """(caption, captioner name, level) from the first captioner that gives one; ("", None, None) when none does.
    With `about_a_person` (scene windows: a window is a part of the photo its caption was written for), a
    photo-level caption counts only when it is about a person (`mole.eval.human_text.is_human_text`; the first of
    the photo's captions that is): "A red fire hydrant on a street" is no caption for a person window."""
    from ..eval.human_text import is_human_text

    for c in captioners:
        if about_a_person and getattr(c, "level", "crop") == "photo":
            found = c.captions(source) if hasattr(c, "captions") else [c(None, source)]
            text = next((t for t in found if t.strip() and is_human_text(t)), "")
        else:
            text = c(image if getattr(c, "needs_image", True) else None, source)
        if text and text.strip():
            return text.strip(), getattr(c, "name", type(c).__name__), getattr(c, "level", "crop")
    return "", None, None


def build_captioners(spec: str | list | tuple, fallback: str, part: str | None = None, captions_json=None,
                     prompt: str | None = None) -> list:  # fmt: skip
    """The captioners of `spec` in order, ending with the `fallback` template (unless `spec` already ends with a
    template): every crop gets a caption, and its manifest row says which captioner wrote it."""
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not specs or not str(specs[-1]).startswith("template:"):
        specs.append(fallback)
    return [build_captioner(s, part, captions_json, prompt) for s in specs]


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
