"""Stage A: the M2PEncoder alone learns music window -> pose heatmaps, and face crop -> ArcFace.

Loss (all terms weighted by joint confidence and the frame mask; joints without a target heatmap
are left out):

    L_heat = CE(spatial softmax of logits, normalised target heatmap)
             + coord_loss_weight * L1(soft-argmax coords, target coords)
    L_face = 1 - cos(pred, ArcFace)   (face_loss=l2: squared L2 of the normalised vectors)
    L      = pose_loss_weight * L_heat + face_loss_weight * L_face

ArcFace, the VAE and CLIP are never loaded here: their outputs come from the shards.
Validation: PCK@0.1/0.2 (torso-normalised), mean joint error, face cosine, each beside the same
numbers for a mean-pose baseline (mean train pose per joint, mean train face embedding);
TensorBoard images of predicted vs target skeletons on the frame thumbnails and an mp4 of the
predicted skeleton with the music muxed in (when the source video is reachable).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from dwm.datasets import iter_tar_samples
from dwm.datasets.pipeline import split_urls
from dwm.datasets.views import decode_features, sample_meta
from dwm.shared.shards import load_manifest

from .. import metrics
from ..losses import heatmap_loss
from ..models.dance_model import DanceModel
from ..models.m2p import M2PEncoder
from .base import Stage

log = logging.getLogger(__name__)

MIN_CONF = 0.3  # joints below this pose score count as missing in the metrics


def stage_a_losses(out, batch: dict[str, Any], cfg) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted stage-A loss from an M2POutput and a view-A batch (also used by stage B/C code)."""
    logits = out.heatmap_logits  # (B, W, K, H, Wd)
    B, W, K = logits.shape[:3]
    weights = batch["conf"].float() * batch["frame_mask"].float()[..., None]  # (B, W, K)
    ce = heatmap_loss(logits.reshape(B * W, K, *logits.shape[-2:]),
                      batch["heatmap"].reshape(B * W, K, *batch["heatmap"].shape[-2:]),
                      weights.reshape(B * W, K))
    l1 = (out.coords.float() - batch["coords"].float()).abs().sum(-1)  # (B, W, K)
    coord = (l1 * weights).sum() / weights.sum().clamp_min(1e-8)
    l_heat = ce + cfg.coord_loss_weight * coord
    terms = {"heatmap_ce": float(ce.detach()), "coord_l1": float(coord.detach())}
    total = cfg.pose_loss_weight * l_heat
    if out.face_embed is not None:
        pred = F.normalize(out.face_embed.float(), dim=-1)
        tgt = F.normalize(batch["face_embed"].float(), dim=-1)
        if cfg.face_loss == "l2":
            per = ((pred - tgt) ** 2).sum(-1)
        else:
            per = 1.0 - (pred * tgt).sum(-1)
        valid = batch["face_valid"].float()
        l_face = (per * valid).sum() / valid.sum().clamp_min(1.0)
        total = total + cfg.face_loss_weight * l_face
        terms["face"] = float(l_face.detach())
    terms["pose"] = float(l_heat.detach())
    return total, terms


def resolve_source(manifest_path: str, source: str | None) -> str | None:
    """The original video of a sample, for its audio: ``source`` as given when it exists, else
    relative to the ``input_dir`` that preprocessing recorded in report.json beside the manifest."""
    if not source:
        return None
    if Path(source).is_file():
        return source
    try:
        report = json.loads((Path(manifest_path).parent / "report.json").read_text())
        cand = Path(report["input_dir"]) / source
        return str(cand) if cand.is_file() else None
    except (OSError, KeyError, ValueError, TypeError):
        return None


def _thumb(jpeg: bytes) -> np.ndarray | None:
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    return None if img is None else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def train_statistics(manifest: dict[str, Any],
                     max_samples: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Mean-pose baseline (K, 3) and mean face embedding (512,) of the train split."""
    poses, faces = [], []
    for url in split_urls(manifest, "train"):
        for raw in iter_tar_samples(url):
            feats = decode_features(raw, ("pose_body", "face_ref_embed"))
            poses.append(feats["pose_body"])
            faces.append(feats["face_ref_embed"].astype(np.float32))
            if len(poses) >= max_samples:
                break
    if not poses:
        raise ValueError("no train samples to build the mean-pose baseline from")
    face = np.mean(faces, 0)
    face = face / max(np.linalg.norm(face), 1e-8)
    return metrics.mean_pose_baseline(poses, MIN_CONF), face.astype(np.float32)


class StageA(Stage):
    name = "A"
    view = "A"
    find_unused_parameters = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self._baseline: tuple[np.ndarray, np.ndarray] | None = None

    def total_steps(self, cfg) -> int:
        return int(cfg.stage_a_steps)

    def val_view_options(self) -> dict[str, Any]:
        return {"with_thumbs": True}

    def build_model(self, cfg, init_path: str | None) -> DanceModel:
        if init_path:  # continue from an earlier M2PEncoder (e.g. init=<stage_A/final>)
            return DanceModel.from_pretrained(init_path, components=("m2p",))
        return DanceModel(m2p=M2PEncoder.from_size(cfg.model_size, **self._heatmap_size(cfg)))

    @staticmethod
    def _heatmap_size(cfg) -> dict[str, int]:
        """Heatmap grid from the manifest (the preprocessed latent grid), when readable."""
        try:
            feat = load_manifest(cfg.data)["features"].get("pose_heatmap", {})
            shape = feat.get("shape")
            h, w = int(shape[-2]), int(shape[-1])
            return {"heatmap_height": h, "heatmap_width": w}
        except Exception:
            return {}

    def compute_loss(self, model, batch, step, total_steps):
        out = model.m2p(batch["audio_mel"], batch["audio_baseline"], batch["frame_mask"],
                        batch["face_crop"])
        return stage_a_losses(out, batch, self.cfg)

    # -- validation ----------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, model, val_batches, step, writer, out_dir: Path) -> dict[str, float]:
        if not val_batches:
            return {}
        if self._baseline is None:
            self._baseline = train_statistics(load_manifest(self.cfg.data))
        base_pose, base_face = self._baseline
        preds, targets, confs, faces_p, faces_t, sizes = [], [], [], [], [], []
        first = None
        for batch in val_batches:
            out = model.m2p(batch["audio_mel"], batch["audio_baseline"], batch["frame_mask"],
                            batch["face_crop"])
            mask = batch["frame_mask"].cpu().numpy() > 0
            c = out.coords.float().cpu().numpy()
            t = batch["coords"].float().cpu().numpy()
            conf = batch["conf"].float().cpu().numpy()
            for i, meta in enumerate(batch["meta"]):
                preds.append(c[i][mask[i]])
                targets.append(t[i][mask[i]])
                confs.append(conf[i][mask[i]])
                sizes.append((meta.get("width") or 1, meta.get("height") or 1))
            valid = batch["face_valid"].cpu().numpy() > 0
            faces_p.append(out.face_embed.float().cpu().numpy()[valid])
            faces_t.append(batch["face_embed"].float().cpu().numpy()[valid])
            if first is None:
                first = (batch, c[0], out)
        res: dict[str, float] = {}
        size = sizes[0]  # one preprocessing resolution per manifest
        P, T, Cf = np.concatenate(preds), np.concatenate(targets), np.concatenate(confs)
        base = np.broadcast_to(base_pose[:, :2], T.shape)
        for tag, pred in (("", P), ("baseline_", base)):
            p = metrics.pck(pred, T, conf=Cf, thresholds=(0.1, 0.2), min_conf=MIN_CONF, size=size)
            res[f"{tag}pck@0.1"] = p["pck@0.1"]
            res[f"{tag}pck@0.2"] = p["pck@0.2"]
            res[f"{tag}mean_joint_error"] = metrics.mean_joint_error(
                pred, T, conf=Cf, min_conf=MIN_CONF, size=size)
        fp, ft = np.concatenate(faces_p), np.concatenate(faces_t)
        if len(ft):
            res["face_cosine"] = metrics.face_cosine(fp, ft)
            res["baseline_face_cosine"] = metrics.face_cosine(
                np.broadcast_to(base_face, ft.shape), ft)
        self._log_media(first, size, step, writer, out_dir)
        return {k: float(v) for k, v in res.items()}

    def _log_media(self, first, size, step, writer, out_dir: Path) -> None:
        from dwm.shared import media

        batch, pred, _ = first
        meta = batch["meta"][0]
        n = int(meta.get("length") or len(pred))
        target = batch["coords"][0].float().cpu().numpy()
        conf = batch["conf"][0].float().cpu().numpy()
        tgt = np.concatenate([target, conf[..., None]], -1)[:n]
        prd = np.concatenate([pred, np.ones_like(pred[..., :1])], -1)[:n]
        thumbs = (batch.get("thumbs") or [[]])[0]
        panel = (int(size[0]) // 2 * 2 or 256, int(size[1]) // 2 * 2 or 448)
        half = (panel[0] // 2, panel[1] // 2)  # each of the three panels at half the frame size
        if writer is not None:
            frames = np.linspace(0, n - 1, num=min(4, n)).round().astype(int)
            pics = []
            for f in frames:
                bg = _thumb(thumbs[f]) if f < len(thumbs) else None
                pics.append(media.side_by_side(prd[f], tgt[f], image=bg, size=half))
            writer.add_image("val/skeletons", media.image_grid(pics, cols=1), step,
                             dataformats="HWC")
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            fps = float(meta.get("fps") or 24.0)
            audio = resolve_source(self.cfg.data, meta.get("source"))
            start = ((meta.get("segment_start") or 0) + (meta.get("window_start") or 0)) / fps
            frames = (media.side_by_side(prd[i], tgt[i], size=half) for i in range(n))
            media.write_video(out_dir / f"step_{step:06d}.mp4", frames, fps, audio=audio,
                              audio_start=start if audio else 0.0)
        except Exception as e:  # no ffmpeg, unreadable source: the metrics still count
            log.warning("stage A validation video not written: %s", e)
