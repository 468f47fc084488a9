"""Faces (insightface FaceAnalysis, detection + recognition) of the main dancer, per frame.

Per frame: box, 5 landmarks, detection score, L2-normalised 512-d ArcFace embedding, the aligned
112x112 crop (``face_align.norm_crop``) and a soft face mask at latent and at image resolution.
When the detector misses, the mask comes from the pose's face/head points; when both miss,
``present`` is False and the mask is all zeros. An all-ones mask is never written.
The reference embedding is the one of the best frontal face of the video
(detection score x frontalness from the landmarks).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dwm.shared import weights
from dwm.shared.contract import FACE_CROP_SIZE, FACE_EMBED_DIM

from .base import ArraySpec, Extractor, FrameBatch, VideoContext, onnx_providers

# Body joints (OpenPose order) on the head: nose, eyes, ears.
HEAD_JOINTS = (0, 14, 15, 16, 17)


def soft_ellipse_mask(box: np.ndarray, h: int, w: int, dilate: float) -> np.ndarray:
    """Box [x0, y0, x1, y1] in [0, 1] -> (h, w) float mask: 1 inside an ellipse grown by
    ``dilate``, falling smoothly to 0 at its rim."""
    cx, cy = (box[0] + box[2]) / 2 * w, (box[1] + box[3]) / 2 * h
    ax = max(0.5, (box[2] - box[0]) / 2 * w * dilate)
    ay = max(0.5, (box[3] - box[1]) / 2 * h * dilate)
    ys = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(w, dtype=np.float32)[None, :] + 0.5
    r2 = ((xs - cx) / ax) ** 2 + ((ys - cy) / ay) ** 2
    t = np.clip((1.0 - r2) / 0.4, 0.0, 1.0)
    return t * t * (3 - 2 * t)  # smoothstep


def mask_u8(box: np.ndarray, h: int, w: int, dilate: float) -> np.ndarray | None:
    m = np.round(soft_ellipse_mask(box, h, w, dilate) * 255).astype(np.uint8)
    if m.min() == 255 or m.max() == 0:  # a mask that says "everywhere" or "nowhere" is no mask
        return None
    return m


def frontalness(kps: np.ndarray) -> float:
    """5 landmarks (left eye, right eye, nose, left mouth, right mouth, image order) -> [0, 1]:
    1 when the nose sits midway between the eyes and the mouth corners."""
    le, re, nose, lm, rm = kps
    eye_dist = abs(re[0] - le[0]) + 1e-6
    yaw = abs(nose[0] - (le[0] + re[0]) / 2) / eye_dist
    mouth_yaw = abs(nose[0] - (lm[0] + rm[0]) / 2) / eye_dist
    return float(max(0.0, 1.0 - (yaw + mouth_yaw)))


def pose_face_box(face_pts: np.ndarray, body_pts: np.ndarray, min_score: float) -> np.ndarray | None:
    """Face box in [0, 1] from the pose: 68 face points, else the head joints (nose, eyes, ears)."""
    pts = face_pts[face_pts[:, 2] >= min_score, :2]
    if len(pts) < 3:
        head = body_pts[list(HEAD_JOINTS)]
        pts = head[head[:, 2] >= min_score, :2]
    if len(pts) < 2:
        return None
    x0, y0 = pts.min(axis=0)
    x1, y1 = pts.max(axis=0)
    size = max(x1 - x0, (y1 - y0) * 0.75, 0.02)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    # points cover eyes..mouth; a face box is about 1.4x that, a bit taller than wide
    half_w, half_h = size * 0.7, size * 0.9
    box = np.array([cx - half_w, cy - half_h * 0.9, cx + half_w, cy + half_h * 1.1], np.float32)
    return box


class FaceExtractor(Extractor):
    name = "face"
    version = "1"

    def __init__(self, cfg, device: str = "cpu"):
        super().__init__(cfg, device)
        self.batch_size = cfg.face.batch_size

    def config(self) -> dict[str, Any]:
        f, m = self.cfg.face, self.cfg.models
        return {"det_size": f.det_size, "det_threshold": f.det_threshold,
                "mask_dilate": f.mask_dilate, "min_score": self.cfg.pose.min_score,
                "downsample": self.cfg.pose.heatmap_downsample,
                "models": {"profile": m.profile, "pack": m.insightface_pack}}

    def setup(self) -> None:
        from insightface.app import FaceAnalysis  # deferred: optional, and seconds to import

        root, pack = weights.insightface_root(self.cfg.models)
        app = FaceAnalysis(name=pack, root=str(root), allowed_modules=["detection", "recognition"],
                           providers=onnx_providers(self.device))
        d = int(self.cfg.face.det_size)
        app.prepare(ctx_id=0 if self.device == "cuda" else -1, det_size=(d, d),
                    det_thresh=self.cfg.face.det_threshold)
        self.det = app.det_model
        self.rec = app.models.get("recognition")
        if self.rec is None:
            raise RuntimeError(f"insightface pack {pack} under {root} has no recognition model")

    def arrays(self, ctx: VideoContext) -> dict[str, ArraySpec]:
        ds = self.cfg.pose.heatmap_downsample
        h, w = ctx.height // ds, ctx.width // ds
        return {
            "present": ArraySpec((), "bool", "a face was found (detector, or pose face points)"),
            "detected": ArraySpec((), "bool", "the face detector found it (embedding valid)"),
            "box": ArraySpec((4,), "float32", "x0, y0, x1, y1 in [0,1]; 0 if none"),
            "landmarks": ArraySpec((5, 2), "float32", "5 points in [0,1]; 0 if not detected"),
            "score": ArraySpec((), "float32", "detection score; 0 if none"),
            "embed": ArraySpec((FACE_EMBED_DIM,), "float16", "L2-normalised ArcFace; 0 if none"),
            "mask": ArraySpec((h, w), "uint8", "soft face mask at latent resolution, value*255"),
            "mask_full": ArraySpec((ctx.height, ctx.width), "uint8",
                                   "soft face mask at image resolution, value*255", chunk=16),
            "crop": ArraySpec((FACE_CROP_SIZE, FACE_CROP_SIZE, 3), "uint8",
                              "aligned RGB face crop; zeros if not detected", chunk=64),
        }

    def reset(self, ctx: VideoContext) -> None:
        super().reset(ctx)
        self.best = (-1.0, None, -1)  # (quality, embedding, frame)

    def _pick(self, bboxes: np.ndarray, head_xy: np.ndarray | None) -> int:
        """The dancer's face: the detection nearest the pose's head, else the largest x score."""
        areas = (bboxes[:, 2] - bboxes[:, 0]) * (bboxes[:, 3] - bboxes[:, 1])
        if head_xy is not None:
            inside = ((bboxes[:, 0] <= head_xy[0]) & (head_xy[0] <= bboxes[:, 2])
                      & (bboxes[:, 1] <= head_xy[1]) & (head_xy[1] <= bboxes[:, 3]))
            if inside.any():
                idx = np.flatnonzero(inside)
                return int(idx[np.argmax(areas[idx] * bboxes[idx, 4])])
        return int(np.argmax(areas * bboxes[:, 4]))

    def process(self, batch: FrameBatch) -> dict[str, np.ndarray]:
        from insightface.utils.face_align import norm_crop  # deferred: optional (see setup)

        ctx = self.ctx
        H, W = batch.frames.shape[1:3]
        ds = self.cfg.pose.heatmap_downsample
        h, w = H // ds, W // ds
        b = len(batch.frames)
        spec = self.arrays(ctx)
        out = {k: np.zeros((b, *s.tail), s.dtype) for k, s in spec.items()}
        pose_body = batch.extras.get("pose_body")
        pose_face = batch.extras.get("pose_face")
        min_score = self.cfg.pose.min_score
        crops_bgr, crop_rows = [], []
        for i, frame in enumerate(batch.frames):
            bgr = np.ascontiguousarray(frame[:, :, ::-1])
            bboxes, kpss = self.det.detect(bgr, max_num=0, metric="default")
            head_xy = None
            if pose_body is not None:
                nose = pose_body[i, 0]
                if nose[2] >= min_score:
                    head_xy = (nose[0] * W, nose[1] * H)
            box = None
            if len(bboxes) and kpss is not None:
                j = self._pick(bboxes, head_xy)
                kps = kpss[j].astype(np.float32)
                box = np.array([bboxes[j, 0] / W, bboxes[j, 1] / H, bboxes[j, 2] / W,
                                bboxes[j, 3] / H], np.float32)
                box = np.clip(box, 0.0, 1.0)
                if box[2] - box[0] > 1e-3 and box[3] - box[1] > 1e-3:
                    out["detected"][i] = True
                    out["score"][i] = float(bboxes[j, 4])
                    out["landmarks"][i] = kps / np.array([W, H], np.float32)
                    crop = norm_crop(bgr, landmark=kps, image_size=FACE_CROP_SIZE)
                    crops_bgr.append(crop)
                    crop_rows.append(i)
                    out["crop"][i] = crop[:, :, ::-1]
                else:
                    box = None
            if box is None and pose_face is not None and pose_body is not None:
                box = pose_face_box(pose_face[i], pose_body[i], min_score)
                if box is not None:
                    box = np.clip(box, 0.0, 1.0)
                    if box[2] - box[0] < 1e-3 or box[3] - box[1] < 1e-3:
                        box = None
            if box is None:
                continue
            m_lat = mask_u8(box, h, w, self.cfg.face.mask_dilate)
            m_full = mask_u8(box, H, W, self.cfg.face.mask_dilate)
            if m_lat is None or m_full is None:  # degenerate: never an all-ones mask
                out["detected"][i] = False
                continue
            out["present"][i] = True
            out["box"][i] = box
            out["mask"][i] = m_lat
            out["mask_full"][i] = m_full
        if crops_bgr:
            feats = np.asarray(self.rec.get_feat(crops_bgr), np.float32).reshape(len(crops_bgr), -1)
            norms = np.linalg.norm(feats, axis=1, keepdims=True)
            feats = feats / np.maximum(norms, 1e-8)
            for row, i in enumerate(crop_rows):
                if not out["detected"][i]:
                    continue
                out["embed"][i] = feats[row, :FACE_EMBED_DIM].astype(np.float16)
                kps_px = out["landmarks"][i] * np.array([W, H], np.float32)
                quality = float(out["score"][i]) * frontalness(kps_px)
                if quality > self.best[0]:
                    self.best = (quality, feats[row, :FACE_EMBED_DIM].copy(), int(batch.index[i]))
        # frames where detection was dropped as degenerate keep no crop/landmarks
        lost = ~out["detected"]
        out["crop"][lost] = 0
        out["landmarks"][lost] = 0
        out["score"][lost] = 0
        return out

    def finish(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        quality, emb, frame = self.best
        ref = np.zeros(FACE_EMBED_DIM, np.float32) if emb is None else emb.astype(np.float32)
        return {"ref_embed": ref}, {"ref_frame": frame if emb is not None else None,
                                    "ref_quality": round(max(quality, 0.0), 6)}
