"""Stage A: the M2PEncoder alone learns to dance (music + reference body -> poses, as a
denoiser) and face crop -> ArcFace.

Per sample (view A): the target window's poses are put in the reference body's units
(:meth:`M2PEncoder.state_of`), noised at a log-normal sigma (``pose_p_mean``, ``pose_p_std``),
with the music dropped (``music_dropout``: classifier-free guidance) and the first frame
(``pose_known_start_prob``: generation starts from the photo's pose) or the first 1..W/2 frames
(``pose_known_prefix_prob``: a long song's window continues the last) given as context. Loss on
the denoised x0 (weighted by joint confidence and the frame mask, context frames left out):

    L_denoise = MSE(x0, target) in reference units (x0 prediction, as EDGE)
    L_vel     = L1(x0[t+1] - x0[t], target[t+1] - target[t])            (EDGE's velocity term)
    L_heat    = CE(spatial softmax of x0's heatmap logits, target heatmap)
                + coord_loss_weight * L1(soft-argmax coords, target coords)
    L_face    = 1 - cos(pred, ArcFace)   (face_loss=l2: squared L2 of the normalised vectors)
    L = pose_denoise_loss_weight L_denoise + velocity_loss_weight L_vel
        + pose_loss_weight L_heat + face_loss_weight L_face

ArcFace, the VAE and CLIP are never loaded here: their outputs come from the shards.
Validation (fixed seeds): a dance sampled with ``pose_steps`` from the window's first pose and
the reference, beside the one-step prediction (``onestep_``), the mean pose (``baseline_``) and
the ground truth (``gt_``): PCK@0.1/0.2 and mean joint error (which reward the average: read
them with the rest), beat precision/recall/F1 and BAS, speed ratio to the ground truth,
reference consistency (bone lengths, frame-0 distance, joints in frame), seed diversity, face
cosine; TensorBoard images of sampled vs target skeletons on the thumbnails and an mp4 of the
sampled skeleton with the music muxed in (when the source video is reachable).
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
from dwm.shared import media
from dwm.shared.shards import load_manifest

from .. import metrics
from ..losses import heatmap_loss
from ..models.dance_model import DanceModel
from ..models.m2p import M2PEncoder, soft_argmax
from .base import Stage

log = logging.getLogger(__name__)

MIN_CONF = 0.3  # joints below this pose score count as missing in the metrics
VAL_SEED = 1234  # validation samples the same noise every time: only the model changes


def pose_context(frames: int, batch: int, cfg, device) -> torch.Tensor:
    """(B, W) known-frame mask of a training step: the first frame with probability
    ``pose_known_start_prob``, else the first 1..W/2 frames with ``pose_known_prefix_prob``."""
    u = torch.rand(batch)
    n = torch.randint(1, max(2, frames // 2 + 1), (batch,))
    start, prefix = float(cfg.pose_known_start_prob), float(cfg.pose_known_prefix_prob)
    count = torch.where(u < start, torch.ones_like(n),
                        torch.where(u < start + prefix, n, torch.zeros_like(n)))
    return (torch.arange(frames)[None] < count[:, None]).float().to(device)


def heatmap_frames(frames: int, count: int, device) -> torch.Tensor:
    """Indices of the frames that get L_heat this step: ``count`` drawn at random (all when
    ``count`` is 0 or at least the window)."""
    if count <= 0 or count >= frames:
        return torch.arange(frames, device=device)
    return torch.randperm(frames)[:count].sort().values.to(device)


def stage_a_losses(m2p, batch: dict[str, Any], cfg) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted stage-A loss of the M2PEncoder ``m2p`` on a view-A batch (noise, music dropout
    and context frames drawn from torch's global RNG, which checkpoints save)."""
    coords = batch["coords"].float()  # (B, W, K, 2)
    B, W, K = coords.shape[:3]
    device = coords.device
    ref_pose = batch["ref_pose"].float()
    target = m2p.state_of(coords, ref_pose)
    sigma = (torch.randn(B) * cfg.pose_p_std + cfg.pose_p_mean).exp().to(device)
    noisy = target + torch.randn(target.shape).to(device) * sigma[:, None, None, None]
    known = pose_context(W, B, cfg, device) * batch["frame_mask"].float()
    music_keep = (torch.rand(B) >= float(cfg.music_dropout)).to(device)
    # the face branch only runs when its loss counts (a 112x112 CNN per sample)
    face_crop = batch["face_crop"] if cfg.face_loss_weight > 0 else None
    out = m2p(batch["audio_mel"], batch["audio_baseline"], batch["frame_mask"], face_crop,
              ref_pose=ref_pose, noisy=noisy, sigma=sigma, known=coords, known_mask=known,
              music_keep=music_keep, heatmaps=False)
    weights = batch["conf"].float() * batch["frame_mask"].float()[..., None]  # (B, W, K)
    free = weights * (1.0 - known)[..., None]  # context frames are given, not learned
    sq = ((out.x0 - target) ** 2).sum(-1)  # (B, W, K): EDGE's simple x0 loss, unweighted
    denoise = (sq * free).sum() / free.sum().clamp_min(1e-8)
    pair = weights[:, 1:] * weights[:, :-1]
    vel_err = ((out.x0[:, 1:] - out.x0[:, :-1]) - (target[:, 1:] - target[:, :-1])).abs().sum(-1)
    vel = (vel_err * pair).sum() / pair.sum().clamp_min(1e-8)
    # L_heat on a few frames per window: it ties x0 to the heatmaps the video stages consume,
    # and full (B, W, K, h, w) maps every step cost more than the whole denoiser on a CPU
    frames = heatmap_frames(W, int(cfg.heatmap_loss_frames), device)
    logits = m2p.heatmap_logits(out.coords[:, frames])  # (B, F, K, H, Wd)
    nf, wf = len(frames), free[:, frames]
    target_maps = batch["heatmap"][:, frames]
    ce = heatmap_loss(logits.reshape(B * nf, K, *logits.shape[-2:]),
                      target_maps.reshape(B * nf, K, *target_maps.shape[-2:]),
                      wf.reshape(B * nf, K))
    l1 = (soft_argmax(logits) - coords[:, frames]).abs().sum(-1)  # (B, F, K)
    coord = (l1 * wf).sum() / wf.sum().clamp_min(1e-8)
    l_heat = ce + cfg.coord_loss_weight * coord
    terms = {"denoise": float(denoise.detach()), "velocity": float(vel.detach()),
             "heatmap_ce": float(ce.detach()), "coord_l1": float(coord.detach())}
    total = (cfg.pose_denoise_loss_weight * denoise + cfg.velocity_loss_weight * vel
             + cfg.pose_loss_weight * l_heat)
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
        return DanceModel(m2p=M2PEncoder.from_train_config(cfg))

    def compute_loss(self, model, batch, step, total_steps):
        return stage_a_losses(model.m2p, batch, self.cfg)

    # -- validation ----------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, model, val_batches, step, writer, out_dir: Path) -> dict[str, float]:
        if not val_batches:
            return {}
        if self._baseline is None:
            self._baseline = train_statistics(load_manifest(self.cfg.data))
        base_pose, base_face = self._baseline
        m2p = model.m2p
        cols: dict[str, list] = {k: [] for k in ("sample", "onestep", "target", "conf", "ref",
                                                   "beats", "seed2")}
        faces_p, faces_t, sizes, fps = [], [], [], 24.0
        first = None
        for bi, batch in enumerate(val_batches):
            mask_t = batch["frame_mask"]
            start = torch.zeros_like(mask_t)
            start[:, 0] = 1.0  # the dance starts from the window's first pose, as from a photo
            common = dict(ref_pose=batch["ref_pose"].float(), known=batch["coords"].float(),
                          known_mask=start, frame_mask=mask_t)
            samples = [m2p.sample(batch["audio_mel"], batch["audio_baseline"], **common,
                                  steps=int(self.cfg.pose_steps),
                                  music_guidance_scale=float(self.cfg.music_guidance_scale),
                                  generator=torch.Generator().manual_seed(VAL_SEED + bi + s))
                       for s in (0, 1000)]
            onestep = m2p.sample(batch["audio_mel"], batch["audio_baseline"], **common, steps=1)
            face = m2p.encode_face(batch["face_crop"])
            mask = mask_t.cpu().numpy() > 0
            c = samples[0].float().cpu().numpy()
            t = batch["coords"].float().cpu().numpy()
            conf = batch["conf"].float().cpu().numpy()
            for i, meta in enumerate(batch["meta"]):
                cols["sample"].append(c[i][mask[i]])
                cols["seed2"].append(samples[1][i].float().cpu().numpy()[mask[i]])
                cols["onestep"].append(onestep[i].float().cpu().numpy()[mask[i]])
                cols["target"].append(t[i][mask[i]])
                cols["conf"].append(conf[i][mask[i]])
                cols["ref"].append(batch["ref_pose"][i].float().cpu().numpy())
                cols["beats"].append(metrics.music_beats(
                    batch["audio_baseline"][i].float().cpu().numpy()[mask[i]]))
                sizes.append((meta.get("width") or 1, meta.get("height") or 1))
                fps = float(meta.get("fps") or fps)
            valid = batch["face_valid"].cpu().numpy() > 0
            faces_p.append(face.float().cpu().numpy()[valid])
            faces_t.append(batch["face_embed"].float().cpu().numpy()[valid])
            if first is None:
                first = (batch, c[0])
        size = sizes[0]  # one preprocessing resolution per manifest
        res = self._pose_metrics(cols, base_pose, size, fps)
        fp, ft = np.concatenate(faces_p), np.concatenate(faces_t)
        if len(ft):
            res["face_cosine"] = metrics.face_cosine(fp, ft)
            res["baseline_face_cosine"] = metrics.face_cosine(
                np.broadcast_to(base_face, ft.shape), ft)
        self._log_media(first, size, step, writer, out_dir)
        return {k: float(v) for k, v in res.items() if np.isfinite(v)}

    @staticmethod
    def _pose_metrics(cols: dict[str, list], base_pose: np.ndarray, size, fps: float
                      ) -> dict[str, float]:
        T, Cf = np.concatenate(cols["target"]), np.concatenate(cols["conf"])
        flat = {"": np.concatenate(cols["sample"]), "onestep_": np.concatenate(cols["onestep"]),
                "baseline_": np.broadcast_to(base_pose[:, :2], T.shape)}
        res: dict[str, float] = {}
        for tag, pred in flat.items():
            p = metrics.pck(pred, T, conf=Cf, thresholds=(0.1, 0.2), min_conf=MIN_CONF, size=size)
            res[f"{tag}pck@0.1"] = p["pck@0.1"]
            res[f"{tag}pck@0.2"] = p["pck@0.2"]
            res[f"{tag}mean_joint_error"] = metrics.mean_joint_error(
                pred, T, conf=Cf, min_conf=MIN_CONF, size=size)
        # motion metrics per clip, averaged: the sample, the one-step, the ground truth
        gt = [np.concatenate([t, c[..., None]], -1) for t, c in zip(cols["target"], cols["conf"])]
        per: dict[str, list[float]] = {}
        for tag, seqs in (("", cols["sample"]), ("onestep_", cols["onestep"]), ("gt_", gt)):
            for seq, beats, ref, real in zip(seqs, cols["beats"], cols["ref"], gt):
                if len(seq) < 3:
                    continue
                for k, v in metrics.beat_scores(seq, beats, fps).items():
                    per.setdefault(tag + k, []).append(v)
                for k, v in metrics.reference_consistency(seq, ref, MIN_CONF, size).items():
                    per.setdefault(tag + k, []).append(v)
                if tag != "gt_":
                    ratios = metrics.speed_accel_ratios(seq, real, fps, MIN_CONF, size)
                    for k, v in ratios.items():
                        per.setdefault(tag + k, []).append(v)
        pairs = [np.stack([a, b]) for a, b in zip(cols["sample"], cols["seed2"]) if len(a)]
        per["seed_diversity"] = [metrics.seed_diversity(p, MIN_CONF) for p in pairs]
        for k, v in per.items():
            v = np.asarray(v, np.float64)
            res[k] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
        return res

    def _log_media(self, first, size, step, writer, out_dir: Path) -> None:
        batch, pred = first
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
