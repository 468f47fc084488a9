"""Whole-body pose of the main dancer: 18 body points (OpenPose order), 2 x 21 hand points, 68 face
points, each (x, y, score); Gaussian heatmaps of the body at latent resolution.

Backends (``cfg.pose.backend``):

* ``dwpose``: DWpose ONNX through rtmlib + onnxruntime (YOLOX person detector, then RTMPose on
  each person box; COCO-WholeBody 133 points, mapped to our layout; neck = mean of shoulders).
* ``mediapipe``: BlazePose from mediapipe 0.10.14 (its model ships in the wheel), 33 points
  mapped to the same layout; hand/face points that BlazePose has are filled, the rest score 0.

The pose runs on the *uncropped* (aspect-kept) frames: its track decides where the crop goes.
Points come back in decode pixels; :func:`to_crop` turns them into [0, 1] crop coordinates.
The main dancer is the largest, most central person at the start; after that the tracker follows
the same person by box overlap and centre distance.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dwm.shared import weights
from dwm.shared.contract import NUM_BODY_JOINTS, NUM_FACE_POINTS, NUM_HAND_JOINTS

from . import keypoints_file
from .base import ArraySpec, Extractor, FrameBatch, VideoContext

N_HANDS = 2 * NUM_HAND_JOINTS

# COCO-WholeBody (133) index of each OpenPose-18 joint; -1 = neck (mean of the shoulders).
COCO_TO_OPENPOSE = (0, -1, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
WB_FACE = slice(23, 91)  # 68 face points
WB_LHAND = slice(91, 112)
WB_RHAND = slice(112, 133)

# OpenPose BODY_25 index of each OpenPose-18 joint (25 adds mid-hip 8 and six foot points).
BODY25_TO_OPENPOSE = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)

# BlazePose (33) index of each OpenPose-18 joint; -1 = neck.
BLAZE_TO_OPENPOSE = (0, -1, 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7)
# BlazePose wrist / pinky / index / thumb knuckles -> hand layout (0 wrist, 2 thumb MCP,
# 5 index MCP, 17 pinky MCP); left hand first.
BLAZE_HANDS = ((0, 15), (17, 17), (5, 19), (2, 21))  # (hand index, blaze index) for the left hand
BLAZE_HANDS_R = ((0, 16), (17, 18), (5, 20), (2, 22))
# BlazePose face points -> iBUG 68: nose tip 30, eye corners 36/39 (right eye) 42/45 (left eye),
# mouth corners 48 (right) / 54 (left).
BLAZE_FACE = ((30, 0), (42, 1), (45, 3), (39, 4), (36, 6), (54, 9), (48, 10))


def _empty_person() -> dict[str, np.ndarray]:
    return {"body": np.zeros((NUM_BODY_JOINTS, 3), np.float32),
            "hands": np.zeros((N_HANDS, 3), np.float32),
            "face": np.zeros((NUM_FACE_POINTS, 3), np.float32),
            "box": np.zeros(4, np.float32)}


def wholebody_to_person(kpts: np.ndarray, scores: np.ndarray, box=None) -> dict[str, np.ndarray]:
    """COCO-WholeBody (133, 2) + (133,) -> our layout (pixels)."""
    p = _empty_person()
    pts = np.concatenate([kpts.astype(np.float32), scores.astype(np.float32)[:, None]], axis=1)
    for j, c in enumerate(COCO_TO_OPENPOSE):
        if c >= 0:
            p["body"][j] = pts[c]
    ls, rs = pts[5], pts[6]
    p["body"][1] = [(ls[0] + rs[0]) / 2, (ls[1] + rs[1]) / 2, min(ls[2], rs[2])]
    p["face"] = pts[WB_FACE].copy()
    p["hands"] = np.concatenate([pts[WB_LHAND], pts[WB_RHAND]], axis=0)
    p["box"] = np.asarray(box if box is not None else _box_of(p["body"], 0.0), np.float32)[:4]
    return p


def openpose_to_person(pts: np.ndarray, layout: str) -> dict[str, np.ndarray]:
    """OpenPose-18 or BODY_25 (N, 3) -> our layout (pixels); no hand or face points."""
    p = _empty_person()
    p["body"] = pts[list(BODY25_TO_OPENPOSE) if layout == "openpose_25" else slice(0, 18)].copy()
    p["box"] = _box_of(p["body"], 1e-6)
    return p


def blaze_to_person(lm: np.ndarray, width: int, height: int) -> dict[str, np.ndarray]:
    """BlazePose (33, 4: x, y normalised, z, visibility) -> our layout (pixels)."""
    p = _empty_person()
    pts = np.stack([lm[:, 0] * width, lm[:, 1] * height, lm[:, 3]], axis=1).astype(np.float32)
    for j, c in enumerate(BLAZE_TO_OPENPOSE):
        if c >= 0:
            p["body"][j] = pts[c]
    ls, rs = pts[11], pts[12]
    p["body"][1] = [(ls[0] + rs[0]) / 2, (ls[1] + rs[1]) / 2, min(ls[2], rs[2])]
    for h_idx, b_idx in BLAZE_HANDS:
        p["hands"][h_idx] = pts[b_idx]
    for h_idx, b_idx in BLAZE_HANDS_R:
        p["hands"][NUM_HAND_JOINTS + h_idx] = pts[b_idx]
    for f_idx, b_idx in BLAZE_FACE:
        p["face"][f_idx] = pts[b_idx]
    p["box"] = _box_of(pts, 0.3)
    return p


def _box_of(points: np.ndarray, min_score: float) -> np.ndarray:
    ok = points[:, 2] >= min_score
    if ok.sum() < 2:
        return np.zeros(4, np.float32)
    xy = points[ok, :2]
    return np.array([xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max()], np.float32)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    ua = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / ua) if ua > 0 else 0.0


class MainDancerTracker:
    """Pick the largest, most central person, then follow them by IoU / centre distance."""

    def __init__(self, width: int, height: int, fps: float, min_score: float):
        self.w, self.h = width, height
        self.diag = float(np.hypot(width, height))
        self.min_score = min_score
        self.max_lost = max(1, int(round(fps)))  # re-pick after a second without a match
        self.prev: np.ndarray | None = None
        self.lost = 0

    def _box(self, p: dict) -> np.ndarray:
        b = _box_of(p["body"], self.min_score)
        return b if b[2] > b[0] else p["box"]

    def _prominence(self, box: np.ndarray) -> float:
        area = (box[2] - box[0]) * (box[3] - box[1]) / (self.w * self.h)
        c = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
        off = np.hypot(c[0] - self.w / 2, c[1] - self.h / 2) / (self.diag / 2)
        return float(area * (1.0 - 0.7 * min(1.0, off)))

    def update(self, persons: list[dict]) -> dict | None:
        persons = [p for p in persons if (p["body"][:, 2] >= self.min_score).sum() >= 3]
        if not persons:
            self.lost += 1
            return None
        boxes = [self._box(p) for p in persons]
        pick = None
        if self.prev is not None and self.lost <= self.max_lost:
            pc = np.array([(self.prev[0] + self.prev[2]) / 2, (self.prev[1] + self.prev[3]) / 2])
            best = -1e9
            for i, b in enumerate(boxes):
                c = np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
                dist = float(np.hypot(*(c - pc))) / self.diag
                iou = _iou(b, self.prev)
                if iou < 0.1 and dist > 0.15:
                    continue
                s = iou - dist
                if s > best:
                    best, pick = s, i
            if pick is None:
                self.lost += 1
                return None
        else:
            pick = int(np.argmax([self._prominence(b) for b in boxes]))
        self.prev, self.lost = boxes[pick], 0
        return persons[pick]


class _MediapipeBackend:
    def __init__(self, device: str):
        import mediapipe as mp  # deferred: optional, only the mediapipe backend needs it

        self.mp = mp
        self.pose = None

    def reset(self, ctx: VideoContext) -> None:
        if self.pose is not None:
            self.pose.close()
        # model_complexity=1 is the model inside the 0.10.14 wheel (0 and 2 would download).
        self.pose = self.mp.solutions.pose.Pose(static_image_mode=False, model_complexity=1,
                                                enable_segmentation=False,
                                                min_detection_confidence=0.5,
                                                min_tracking_confidence=0.5)

    def __call__(self, frame_rgb: np.ndarray) -> list[dict]:
        h, w = frame_rgb.shape[:2]
        res = self.pose.process(frame_rgb)
        if res.pose_landmarks is None:
            return []
        lm = np.array([[p.x, p.y, p.z, p.visibility] for p in res.pose_landmarks.landmark],
                      np.float32)
        return [blaze_to_person(lm, w, h)]


class _DWposeBackend:
    def __init__(self, models_cfg, device: str):
        from rtmlib import YOLOX, RTMPose  # deferred: only the dwpose backend needs it

        det_path, pose_path = weights.dwpose_paths(models_cfg)
        dev = "cuda" if device == "cuda" else "cpu"
        self.det = YOLOX(str(det_path), model_input_size=(640, 640), backend="onnxruntime",
                         device=dev)
        self.pose = RTMPose(str(pose_path), model_input_size=(288, 384), backend="onnxruntime",
                            device=dev)

    def reset(self, ctx: VideoContext) -> None:
        pass

    def __call__(self, frame_rgb: np.ndarray) -> list[dict]:
        bgr = np.ascontiguousarray(frame_rgb[:, :, ::-1])  # DWpose was trained on OpenCV BGR
        boxes = self.det(bgr)
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        if len(boxes) == 0:
            return []
        kpts, scores = self.pose(bgr, bboxes=boxes.tolist())
        kpts = np.asarray(kpts, np.float32).reshape(len(boxes), -1, 2)
        scores = np.asarray(scores, np.float32).reshape(len(boxes), -1)
        return [wholebody_to_person(k, s, b) for k, s, b in zip(kpts, scores, boxes)]


class _FileBackend:
    """Keypoints of each video from its sidecar file, scaled to the frames the pose sees."""

    def reset(self, ctx: VideoContext) -> None:
        kp = keypoints_file.load(keypoints_file.sidecar_path(ctx.path))
        keypoints_file.check_fits(kp, ctx.source_frames or ctx.num_frames,
                                  ctx.source_fps or ctx.fps, ctx.width, ctx.height)
        pts = kp.points.copy()
        pts[..., 0] *= ctx.width / kp.width
        pts[..., 1] *= ctx.height / kp.height
        self.kp, self.fps = kp, ctx.fps
        if kp.layout == "coco_wholebody_133":
            self.persons = [wholebody_to_person(f[:, :2], f[:, 2]) for f in pts]
        else:
            self.persons = [openpose_to_person(f, kp.layout) for f in pts]

    def at(self, index: np.ndarray) -> list[dict | None]:
        return [self.persons[k] if self.kp.present[k] else None
                for k in keypoints_file.frame_at(self.kp, index, self.fps)]


class PoseExtractor(Extractor):
    """Batch of uncropped frames -> main dancer's points in decode pixels (tracked per video)."""

    name = "pose"
    version = "1"
    kind = "pose"

    def __init__(self, cfg, device: str = "cpu"):
        super().__init__(cfg, device)
        self.batch_size = cfg.pose.batch_size

    def config(self) -> dict[str, Any]:
        p = self.cfg.pose
        c = {"backend": p.backend, "min_score": p.min_score, "sigma": p.heatmap_sigma,
             "downsample": p.heatmap_downsample, "min_person_fraction": p.min_person_fraction}
        if p.backend == "dwpose":
            m = self.cfg.models
            c["models"] = {"profile": m.profile, "det": m.dwpose_det, "pose": m.dwpose_pose}
        return c

    @property
    def needs_frames(self) -> bool:
        """False for ``file``: the keypoints are read, not seen, so nothing is decoded for them."""
        return self.cfg.pose.backend != "file"

    def file_inputs(self, path: str) -> dict[str, str]:
        if self.cfg.pose.backend != "file":
            return {}
        return {"keypoints": keypoints_file.file_digest(keypoints_file.sidecar_path(path))}

    def setup(self) -> None:
        if self.cfg.pose.backend == "file":
            self.backend = _FileBackend()
        elif self.cfg.pose.backend == "mediapipe":
            self.backend = _MediapipeBackend(self.device)
        else:
            self.backend = _DWposeBackend(self.cfg.models, self.device)

    def reset(self, ctx: VideoContext) -> None:
        super().reset(ctx)
        self.ensure_setup()
        self.backend.reset(ctx)
        self.tracker = MainDancerTracker(ctx.width, ctx.height, ctx.fps, self.cfg.pose.min_score)

    def process(self, batch: FrameBatch) -> dict[str, np.ndarray]:
        out = {k: [] for k in ("body", "hands", "face")}
        found = []
        if self.cfg.pose.backend == "file":
            min_score = self.cfg.pose.min_score
            persons = [p if p is not None and (p["body"][:, 2] >= min_score).sum() >= 3 else None
                       for p in self.backend.at(batch.index)]
        else:
            persons = [self.tracker.update(self.backend(frame)) for frame in batch.frames]
        for person in persons:
            found.append(person is not None)
            person = person or _empty_person()
            for k in out:
                out[k].append(person[k])
        res = {k: np.stack(v).astype(np.float32) for k, v in out.items()}
        res["found"] = np.array(found, bool)
        return res


# ---------------------------------------------------------------------------------------------
# crop and heatmaps
# ---------------------------------------------------------------------------------------------
def choose_crop(body_px: np.ndarray, found: np.ndarray, decode_w: int, decode_h: int, width: int,
                height: int, min_score: float) -> tuple[int, int, bool]:
    """Crop origin (x0, y0) centred on the dancer's median box centre over the segment;
    (centre crop, False) when nobody was found."""
    centres = []
    for pts, ok in zip(body_px, found):
        if not ok:
            continue
        b = _box_of(pts, min_score)
        if b[2] > b[0]:
            centres.append(((b[0] + b[2]) / 2, (b[1] + b[3]) / 2))
    if not centres:
        return (decode_w - width) // 2, (decode_h - height) // 2, False
    cx, cy = np.median(np.array(centres), axis=0)
    x0 = int(np.clip(round(cx - width / 2), 0, decode_w - width))
    y0 = int(np.clip(round(cy - height / 2), 0, decode_h - height))
    return x0, y0, True


def to_crop(points: np.ndarray, x0: int, y0: int, width: int, height: int) -> np.ndarray:
    """(..., 3) decode pixels -> [0, 1] crop coordinates; points with score 0 become all zeros."""
    out = points.astype(np.float32).copy()
    out[..., 0] = (points[..., 0] - x0) / width
    out[..., 1] = (points[..., 1] - y0) / height
    out[points[..., 2] <= 0] = 0.0
    return out


def keep_inside(points: np.ndarray) -> np.ndarray:
    """Points outside the crop count as missing (score 0, zeros), so every kept x, y is in [0, 1]."""
    out = points.copy()
    bad = (out[..., 0] < 0) | (out[..., 0] > 1) | (out[..., 1] < 0) | (out[..., 1] > 1)
    out[bad] = 0.0
    return out


def render_heatmaps(body: np.ndarray, h: int, w: int, sigma: float, min_score: float) -> np.ndarray:
    """(T, 18, 3) in [0, 1] crop coords -> (T, 18, h, w) uint8 Gaussians (peak 255)."""
    t = body.shape[0]
    ys = np.arange(h, dtype=np.float32)[None, None, :, None] + 0.5
    xs = np.arange(w, dtype=np.float32)[None, None, None, :] + 0.5
    cx = (body[..., 0] * w)[..., None, None]
    cy = (body[..., 1] * h)[..., None, None]
    g = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2.0 * sigma * sigma))
    valid = (body[..., 2] >= min_score)[..., None, None]
    hm = np.where(valid, g, 0.0)
    return np.round(hm * 255.0).astype(np.uint8).reshape(t, NUM_BODY_JOINTS, h, w)


def pose_arrays(num_segments: int, h: int, w: int) -> dict[str, ArraySpec]:
    return {
        "body": ArraySpec((NUM_BODY_JOINTS, 3), "float32", "x, y in [0,1] of the crop, score"),
        "hands": ArraySpec((N_HANDS, 3), "float32", "left 21 then right 21; x, y, score"),
        "face": ArraySpec((NUM_FACE_POINTS, 3), "float32", "68 face points; x, y, score"),
        "heatmap": ArraySpec((NUM_BODY_JOINTS, h, w), "uint8",
                             "body Gaussians at latent resolution, value*255", chunk=16),
        "found": ArraySpec((), "bool", "the main dancer was found in this frame"),
    }
