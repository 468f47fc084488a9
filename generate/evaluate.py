"""``dwm eval ckpt=... data=manifest.json``: metrics of a trained model on held-out shards.

Writes ``<out>/eval.json``, ``<out>/eval.md`` (a Markdown table, also printed) and PNG plots.

Stage A (the M2PEncoder; every checkpoint has one), on the ``split`` clips with audio. Every
metric is given for five predictors, scored by the same code on the same clips, so that a
jittering, frozen or averaging model shows up beside what real dance scores:

* **model**: the M2PEncoder's poses, predicted over each whole clip segment exactly as
  ``dwm generate`` does, through :func:`predict_poses_for` (the one place that asks the model);
* **one-step**: its deterministic one-step prediction (``pose_steps=1``), the ablation baseline
  of a generative pose model;
* **ground truth**: the clip's own poses (PCK 1, FID_k 0, speed ratio 1, frame-0 distance 0);
* **mean pose**: the mean training pose in every frame (the mean training face embedding);
* **another clip**: the real dance of another clip (of another video when there is one) played
  against this clip's music: real motion, wrong song.

The metrics (:mod:`dwm.training.metrics`):

* PCK@0.1 / PCK@0.2 (normalised by the ground-truth torso, neck to mid-hip) and the mean joint
  error (in torsos), both measured in pixels of the cropped frame so x and y weigh the same;
* face-embedding cosine: the M2PEncoder's face branch on a face crop of the clip vs the cached
  ArcFace embedding of that frame;
* beat precision / recall / F1: motion beats (speed minima) against the music beats (the
  preprocessing audio extractor's beat track, ``beat_frames`` of each sample) within 0.07 s,
  beside Bailando's Beat Align Score (Siyao et al., CVPR 2022) and its random-beat chance level.
  BAS averages over music beats only, so jitter raises it; precision does not let it;
* FID_k and Div_k of the 2D kinetic features of ``diversity_frames``-frame sub-clips, against the
  ground truth's (standardised by it);
* speed and acceleration ratios to the ground truth;
* reference consistency against the clip's frame-0 pose (what ``generate`` gets from the photo):
  bone-length error, frame-0 distance, share of joints in frame;
* seed diversity: the distance between ``seeds`` samples of each clip.

Stages B/C (when the checkpoint has the video model), on up to ``video_samples`` clips of
``video_frames`` frames: the video model renders the clip from the ground-truth poses, a reference
frame outside the clip, its CLIP embedding and the video's ArcFace embedding. The ground-truth
frames are the cached ground-truth LATENTS decoded with the VAE (not the thumbnails),
so PSNR / SSIM compare like with like and measure the model, not the VAE. ID similarity: ArcFace
(insightface, the preprocessing face extractor) on the generated frames vs the
video's reference embedding. Pose accuracy: the preprocessing pose backend re-run on the generated
frames vs the conditioning poses (PCK@0.1 / 0.2). Temporal consistency: mean absolute difference
of frame-to-frame changes, generated vs ground truth (0-255 units, lower is better).

Plots: loss curves of every stage from the TensorBoard logs beside the checkpoint, the per-clip
BAS histogram (with ground truth, random beats and another clip marked), per-joint PCK and the
beat alignment of one clip over time (speed curves with music and motion beats marked).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dwm.datasets import iter_tar_samples
from dwm.datasets.pipeline import split_urls
from dwm.datasets.views import (SampleError, decode_features, face_target, nearest_clip,
                                pick_face_frame, sample_meta)
from dwm.preprocess.extractors.base import VideoContext
from dwm.preprocess.extractors.face import FaceExtractor
from dwm.preprocess.extractors.pose import PoseExtractor, to_crop
from dwm.shared import config as C
from dwm.shared import contract, storage, weights
from dwm.shared import vae as vae_io
from dwm.shared.errors import UserFacingError
from dwm.shared.progress import progress
from dwm.shared.shards import ManifestError, check_shards_present, load_manifest
from dwm.training import metrics
from dwm.training.checkpoint import check_model_folder
from dwm.training.models.animator import load_dance_model
from dwm.training.stages.stage_a import train_statistics

from dwm.generate import pipeline as G
from dwm.generate import plots

MIN_CONF = 0.3  # joints below this pose score count as missing (as in stage A's validation)
STAGE_A_FEATURES = ("audio_mel", "audio_baseline", "pose_body", "face_present", "face_crop",
                    "face_embed", "face_ref_embed")
VIDEO_FEATURES = ("latents", "pose_body", "pose_heatmap", "face_present", "face_ref_embed")
VIDEO_OPTIONAL = ("clip_frames", "clip_embed")

# The columns of the stage-A table: each is scored by the same code on the same clips.
PREDICTORS = ("model", "one_step", "ground_truth", "mean_pose", "other_clip")
PREDICTOR_TITLES = {"model": "model", "one_step": "one-step", "ground_truth": "ground truth",
                    "mean_pose": "mean pose", "other_clip": "another clip"}
# Keys of each predictor's entry in eval.json's "stage_a" section (every one is always written;
# null where it does not apply) and of the "video" section.
STAGE_A_METRICS = ("pck@0.1", "pck@0.2", "mean_joint_error", "face_cosine", "beat_precision",
                   "beat_recall", "beat_f1", "bas", "fid_k", "div_k", "speed_ratio",
                   "accel_ratio", "bone_length_error", "frame0_distance", "in_frame",
                   "seed_diversity")
VIDEO_KEYS = ("psnr", "ssim", "id_similarity", "pose_accuracy@0.1", "pose_accuracy@0.2",
              "temporal_consistency")

DEFINITIONS = {
    "predictors": "model: the M2PEncoder's sample; one-step: its deterministic one-step "
                  "prediction (pose_steps=1); ground truth: the clip's own poses; mean pose: "
                  "the mean training pose in every frame; another clip: the real dance of "
                  "another clip (another video when there is one) played against this music",
    "pck": "PCK@t: joint within t x ground-truth torso (neck to mid-hip), pixels of the crop",
    "mean_joint_error": "mean joint distance in ground-truth torsos",
    "face_cosine": "cosine(M2PEncoder face branch, cached ArcFace) on a face crop of the clip",
    "beat_f1": "motion beats (local minima of the fps-scaled smoothed joint speed) against the "
               "music beats, paired one-to-one within +-0.07 s: precision, recall, F1; "
               "a frozen pose scores 0, jitter scores low precision",
    "bas": "Beat Align Score, Bailando (Siyao et al. CVPR 2022): mean over music beats of "
           "exp(-d^2/(2 sigma^2)), sigma 0.05 s; kinetic-speed smoothing scaled with fps "
           "(5 frames at 60 fps); it averages over music beats only, so jitter raises it",
    "fid_k": "Frechet distance of AIST++/Bailando kinetic features (2D) of sub-clips against "
             "the ground truth's, standardised by the ground truth's; lower is better",
    "div_k": "mean pairwise distance of those standardised kinetic features; near the ground "
             "truth's is right, an averaging model is lower",
    "speed_ratio": "mean joint speed (acceleration) over the ground truth's, 1 = as fast",
    "reference": "reference = the clip's frame-0 pose (generate: the photo's). Bone-length "
                 "error: mean |limb length - reference limb length| / the reference's mean "
                 "limb length; frame-0 distance: mean joint distance in frame units; in frame: "
                 "share of joints inside the frame",
    "seed_diversity": "mean joint distance (frame units) between samples of one clip with "
                      "different seeds; 0 = one song, one dance",
    "psnr_ssim": "generated frames vs ground-truth latents decoded by the VAE",
    "id_similarity": "ArcFace cosine, generated frames vs the video's reference embedding",
    "pose_accuracy": "PCK of the pose backend re-run on generated frames vs conditioning poses",
    "temporal_consistency": "mean |d/dt generated - d/dt ground truth|, 0-255 units, lower is "
                            "better",
}


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
@dataclass
class Clip:
    meta: dict[str, Any]
    feats: dict[str, np.ndarray]

    @property
    def fps(self) -> float:
        return float(self.meta.get("fps") or 24.0)

    @property
    def size(self) -> tuple[float, float]:
        return float(self.meta.get("width") or 1), float(self.meta.get("height") or 1)


def load_clips(manifest: dict[str, Any], split: str, max_samples: int, names: tuple[str, ...],
               optional: tuple[str, ...] = (), need_audio: bool = False) -> list[Clip]:
    """Up to ``max_samples`` samples of ``split`` in manifest order (deterministic); samples
    that lack a needed feature are skipped."""
    splits = ("train", "val") if split == "all" else (split,)
    urls = [u for s in splits for u in split_urls(manifest, s)]
    clips: list[Clip] = []
    for url in urls:
        for raw in iter_tar_samples(url):
            meta = sample_meta(raw)
            if need_audio and not meta.get("has_audio"):
                continue
            try:
                feats = decode_features(raw, names, optional)
            except SampleError:
                continue
            clips.append(Clip(meta, feats))
            if max_samples and len(clips) >= max_samples:
                return clips
    return clips


def _finite(v: Any) -> Any:
    """JSON value: floats that are not finite become null (JSON has no NaN)."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(float(v)) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def _nanmean(values: list[float]) -> float:
    arr = np.asarray([v for v in values if v is not None], np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")


# ---------------------------------------------------------------------------------------------
# stage A
# ---------------------------------------------------------------------------------------------
def song_of(clip: Clip) -> G.SongFeatures:
    """The clip's music as ``DancePipeline`` takes a song: the cached audio features."""
    f = clip.feats
    return G.SongFeatures(mel=f["audio_mel"].astype(np.float32),
                          baseline=f["audio_baseline"].astype(np.float32),
                          beat_frames=list(clip.meta.get("beat_frames") or []),
                          tempo=float(clip.meta.get("tempo") or 0.0),
                          num_frames=len(f["audio_mel"]), fps=clip.fps)


def reference_of(clip: Clip, body: np.ndarray, face_frame: int | None) -> G.Reference:
    """The reference ``DancePipeline`` dances from, taken from the clip: ``body`` (K, 3) in
    crop coordinates and the face of ``face_frame``. The poses need no pixels of the photo, so
    the image is left black."""
    f = clip.feats
    face_embed, ok = face_target(f, face_frame)
    face_crop = (np.array(f["face_crop"][face_frame]) if face_frame is not None
                 else np.zeros((contract.FACE_CROP_SIZE,) * 2 + (3,), np.uint8))
    w, h = (int(v) for v in clip.size)
    return G.Reference(image=np.zeros((h, w, 3), np.uint8), body=body.astype(np.float32),
                       crop_box=(0, 0, w, h), face_detected=bool(ok), face_embed=face_embed,
                       face_crop=face_crop)


@torch.no_grad()
def predict_poses_for(pipe: G.DancePipeline, clip: Clip, reference: G.Reference,
                      pose_steps: int | None = None, seed: int = 0,
                      audio_window: int = 0) -> np.ndarray:
    """The model's poses (T, K, 3), score 1, for one clip's music: the one place the eval asks
    for poses, through ``DancePipeline.predict_poses`` as ``dwm generate`` does (over the whole
    segment, windows of ``audio_window`` frames; 0: the training run's).

    reference: the body the dance should start from and keep (the clip's frame 0, as generate
    uses the photo's body); ``pose_steps``: sampling steps (None: the model's default; 1: the
    deterministic one-step prediction, the eval's ablation); ``seed``: the sampling noise."""
    steps = int(pose_steps or G.train_setting(pipe.meta, "pose_steps"))
    poses = pipe.predict_poses(song_of(clip), reference, seed=seed, pose_steps=steps,
                               window=audio_window)
    return poses.bodies()


@torch.no_grad()
def predict_face_for(pipe: G.DancePipeline, clip: Clip, frame: int) -> np.ndarray:
    """The M2PEncoder face branch's embedding (D,) of the clip's face crop at ``frame``."""
    m2p = pipe.model.m2p
    p = next(m2p.parameters())
    crop = torch.from_numpy(np.array(clip.feats["face_crop"][frame])).permute(2, 0, 1)[None]
    return m2p.encode_face(crop.to(p.device, p.dtype) / 255.0)[0].float().cpu().numpy()


def other_clip_index(clips: list[Clip], i: int) -> int | None:
    """The clip whose real dance is played against clip i's music: the next clip of another
    video (cyclically), else the next clip; None when there is only one clip."""
    n = len(clips)
    order = [(i + d) % n for d in range(1, n)]
    video = clips[i].meta.get("video_hash")
    for j in order:
        if clips[j].meta.get("video_hash") != video:
            return j
    return order[0] if order else None


def fit_length(seq: np.ndarray, t: int) -> np.ndarray:
    """``seq`` cut or extended to t frames; extended by playing it back and forth, so the motion
    stays continuous (a wrap-around would add a jump that looks like a fast move)."""
    n = len(seq)
    if n >= t or n < 2:
        return seq[np.minimum(np.arange(t), n - 1)]
    period = 2 * (n - 1)
    idx = np.arange(t) % period
    return seq[np.where(idx < n, idx, period - idx)]


def _sub_clips(poses: list[np.ndarray], length: int) -> list[np.ndarray]:
    """Non-overlapping pieces of ``length`` frames of every sequence (for FID_k and Div_k)."""
    out = []
    for p in poses:
        for s in range(0, len(p) - length + 1, length):
            out.append(p[s : s + length])
    return out


def _sample_seed(seed: int, clip: int, sample: int) -> int:
    return int(np.random.SeedSequence([seed, clip, sample]).generate_state(1)[0])


@torch.no_grad()
def evaluate_stage_a(pipe: G.DancePipeline, clips: list[Clip], baseline_pose: np.ndarray,
                     baseline_face: np.ndarray, audio_window: int = 0, diversity_frames: int = 48,
                     seed: int = 0, seeds: int = 4, show_progress: bool = True) -> dict[str, Any]:
    """Stage-A metrics (:data:`STAGE_A_METRICS`) of every predictor in :data:`PREDICTORS` on
    ``clips`` (with audio); see the module docstring. ``audio_window``: the M2PEncoder's window
    (0: the training run's); ``seeds``: samples per clip for the seed diversity of the model and
    of the one-step prediction (< 2: not measured)."""
    if not clips:
        raise UserFacingError("no clip with audio in the evaluation split: nothing to measure "
                              "the M2PEncoder on")
    size = clips[0].size  # one preprocessing resolution per manifest
    fps = clips[0].fps
    seqs: dict[str, list[np.ndarray]] = {name: [] for name in PREDICTORS}
    beat_rows: dict[str, list[dict[str, float]]] = {name: [] for name in PREDICTORS}
    ref_rows: dict[str, list[dict[str, float]]] = {name: [] for name in PREDICTORS}
    seed_div: dict[str, list[float]] = {name: [] for name in PREDICTORS}
    faces: dict[str, list[np.ndarray]] = {name: [] for name in PREDICTORS}
    face_true, bas_rand, beats_of = [], [], []
    face_frames = [pick_face_frame(c.feats["face_present"].astype(bool),
                                   np.random.default_rng([seed, i])) for i, c in enumerate(clips)]
    for i, clip in enumerate(progress(clips, desc="stage A metrics", unit="clip",
                                  disable=not show_progress, leave=False)):
        gt = clip.feats["pose_body"].astype(np.float32)
        t = len(gt)
        reference = reference_of(clip, gt[0], face_frames[i])
        j = other_clip_index(clips, i)

        def sample(steps: int | None, s: int) -> np.ndarray:
            return predict_poses_for(pipe, clip, reference, steps, _sample_seed(seed, i, s),
                                     audio_window)

        model = [sample(None, s) for s in range(max(1, seeds))]
        # deterministic by construction: two samples show it, at half the cost of four
        one_step = [sample(1, s) for s in range(min(2, max(1, seeds)))]
        preds = {"model": model[0], "one_step": one_step[0], "ground_truth": gt,
                 "mean_pose": np.broadcast_to(baseline_pose, gt.shape).astype(np.float32),
                 "other_clip": (None if j is None else
                                fit_length(clips[j].feats["pose_body"].astype(np.float32), t))}
        if seeds >= 2:
            seed_div["model"].append(metrics.seed_diversity(np.stack(model), size=None))
            seed_div["one_step"].append(metrics.seed_diversity(np.stack(one_step), size=None))
            seed_div["mean_pose"].append(0.0)  # the same pose whatever the seed
        beats = [b for b in (clip.meta.get("beat_frames") or []) if 0 <= b < t]
        beats_of.append(beats)
        if beats:
            bas_rand.append(metrics.random_beat_align_score(gt, len(beats), clip.fps,
                                                            seed=seed + i, min_conf=MIN_CONF))
        for name, pred in preds.items():
            if pred is None:
                continue
            seqs[name].append(pred)
            if beats:
                beat_rows[name].append(metrics.beat_scores(pred, beats, clip.fps,
                                                           min_conf=MIN_CONF))
            ref_rows[name].append(metrics.reference_consistency(pred, reference.body, MIN_CONF,
                                                                size))
        frame = face_frames[i]
        if frame is not None:
            emb, ok = face_target(clip.feats, frame)
            if ok:
                face_true.append(emb)
                model_face = predict_face_for(pipe, clip, frame)
                faces["model"].append(model_face)
                faces["one_step"].append(model_face)  # the face branch does not sample
                faces["ground_truth"].append(emb)
                faces["mean_pose"].append(baseline_face)
                other = None
                if j is not None and face_frames[j] is not None:
                    other, other_ok = face_target(clips[j].feats, face_frames[j])
                faces["other_clip"].append(other if other is not None and other_ok
                                           else np.zeros_like(emb))

    gt_all = np.concatenate(seqs["ground_truth"])
    target, conf = gt_all[..., :2], gt_all[..., 2]
    # sub-clips of diversity_frames frames; shorter when the split is too small for two of them
    length = max(3, min(diversity_frames, min(len(s) for s in seqs["ground_truth"])))
    while length > 6 and len(_sub_clips(seqs["ground_truth"], length)) < 2:
        length //= 2
    real_feats = np.array([metrics.kinetic_features(s, fps, MIN_CONF)
                           for s in _sub_clips(seqs["ground_truth"], length)])  # (N, D); N may be 0

    res: dict[str, Any] = {"predictors": list(PREDICTORS)}
    per_joint: dict[str, np.ndarray] = {}
    for name in PREDICTORS:
        row: dict[str, float] = {k: float("nan") for k in STAGE_A_METRICS}
        res[name] = row
        if not seqs[name]:  # the other-clip column with a single clip
            per_joint[name] = np.full(contract.NUM_BODY_JOINTS, np.nan)
            continue
        pred_all = np.concatenate(seqs[name])
        pk = metrics.pck(pred_all[..., :2], target, conf=conf, thresholds=(0.1, 0.2),
                         min_conf=MIN_CONF, size=size)
        row["pck@0.1"], row["pck@0.2"] = pk["pck@0.1"], pk["pck@0.2"]
        per_joint[name] = pk["per_joint@0.1"]
        res.setdefault("frames_evaluated", pk["frames_used"])
        row["mean_joint_error"] = metrics.mean_joint_error(pred_all[..., :2], target, conf=conf,
                                                           min_conf=MIN_CONF, size=size)
        if face_true:
            row["face_cosine"] = metrics.face_cosine(np.stack(faces[name]), np.stack(face_true))
        for key in ("beat_precision", "beat_recall", "beat_f1", "bas"):
            row[key] = _nanmean([r[key] for r in beat_rows[name]])
        feats = [metrics.kinetic_features(s, fps, MIN_CONF)
                 for s in _sub_clips(seqs[name], length)]
        if len(feats) >= 2 and len(real_feats) >= 2:
            row["fid_k"] = metrics.fid_k(np.stack(feats), real_feats)
            row["div_k"] = metrics.div_k(np.stack(feats), reference=real_feats)
        row.update(metrics.speed_accel_ratios(seqs[name], seqs["ground_truth"], fps,
                                              min_conf=MIN_CONF, size=size))
        for key in ("bone_length_error", "frame0_distance", "in_frame"):
            row[key] = _nanmean([r[key] for r in ref_rows[name]])
        row["seed_diversity"] = _nanmean(seed_div[name])
    res["bas_random_beats"] = _nanmean(bas_rand)
    res["diversity_frames"] = length
    res["diversity_sub_clips"] = len(real_feats)
    res["seeds"] = seeds
    res["clips"] = len(clips)
    res["clips_with_beats"] = len(beat_rows["ground_truth"])
    res["_per_joint"] = per_joint
    res["_bas_per_clip"] = [r["bas"] for r in beat_rows["model"]]
    first = int(np.argmax([len(b) for b in beats_of]))  # the clip with the most music beats
    res["_beat_example"] = {"clip": clips[first].meta.get("key"), "fps": clips[first].fps,
                            "music_beats": beats_of[first],
                            "poses": {name: seqs[name][first] for name in
                                      ("ground_truth", "model", "other_clip")
                                      if len(seqs[name]) > first}}
    return res


# ---------------------------------------------------------------------------------------------
# stages B/C
# ---------------------------------------------------------------------------------------------
def _clip_window(clip: Clip, frames: int) -> tuple[int, int, int]:
    """(start, length, reference frame): the clip's middle ``frames`` frames; the reference is a
    frame with a face outside them when there is one (as view C picks it)."""
    t = len(clip.feats["latents"])
    n = min(frames, t)
    start = (t - n) // 2
    outside = np.r_[0:start, start + n : t]
    faces = clip.feats["face_present"].astype(bool)
    if len(outside):
        with_face = outside[faces[outside]]
        pool = with_face if len(with_face) else outside
        ref = int(pool[np.argmin(np.abs(pool - start))])  # nearest: same scene, different pose
    else:
        ref = start
    return start, n, ref


@torch.no_grad()
def evaluate_video(model: Any, clips: list[Clip], settings: G.SamplingSettings, vae: Any,
                   pcfg: C.PreprocessConfig, frames: int, seed: int, device: str = "cpu",
                   show_progress: bool = True) -> dict[str, Any]:
    """Stages B/C metrics of the video model on ``clips``; see the module docstring."""
    if not clips:
        raise UserFacingError("no clip with latents in the evaluation split: cannot evaluate the "
                              "video model")
    clip_dim = model.unet.config.cross_attention_dim
    clip_dim = clip_dim if isinstance(clip_dim, int) else int(clip_dim[0])
    pose_ext = PoseExtractor(pcfg, device)
    face_ext = FaceExtractor(pcfg, device)
    rows: dict[str, list[float]] = {k: [] for k in VIDEO_KEYS}
    for i, clip in enumerate(progress(clips, desc="video metrics", unit="clip",
                                  disable=not show_progress, leave=False)):
        f, meta = clip.feats, clip.meta
        sf = float(meta.get("latent_scaling_factor") or 1.0)
        start, n, ref = _clip_window(clip, frames)
        lat = torch.from_numpy(f["latents"][start : start + n].astype(np.float32)) * sf
        pose = torch.from_numpy(contract.heatmap_to_float(f["pose_heatmap"][start : start + n]))
        cond_pose = f["pose_body"][start : start + n].astype(np.float32)
        ref_latent = torch.from_numpy(f["latents"][ref].astype(np.float32)) * sf
        clip_emb, ok = nearest_clip(f, ref, clip_dim)
        if not ok or clip_emb.shape[-1] != clip_dim:
            clip_emb = np.zeros(clip_dim, np.float32)  # the unconditional CLIP token
        face = f["face_ref_embed"].astype(np.float32)
        face_ok = bool(np.linalg.norm(face) > 1e-3)
        gen = torch.Generator().manual_seed(seed + i)
        out = G.sample_latents(model, pose, ref_latent, torch.from_numpy(clip_emb),
                               torch.from_numpy(face), face_ok, sf, settings, gen,
                               show_progress=False)
        fake = G.decode_frames(vae, out, sf, show_progress=False)
        real = G.decode_frames(vae, lat, sf, show_progress=False)
        rows["psnr"].append(metrics.psnr(fake, real))
        rows["ssim"].append(metrics.ssim(fake, real))
        rows["temporal_consistency"].append(
            metrics.temporal_consistency(fake, real) if n >= 2 else float("nan"))
        h, w = fake.shape[1:3]
        # pose backend re-run on the generated frames (they are already the crop)
        pose_ext.reset(VideoContext(f"eval{i}", str(meta.get("source")), n, clip.fps, w, h))
        det = pose_ext(G.frame_batch(fake))
        det_body = to_crop(det["body"], 0, 0, w, h)
        acc = metrics.pose_accuracy(det_body, cond_pose, min_conf=MIN_CONF, size=(w, h))
        rows["pose_accuracy@0.1"].append(acc["pck@0.1"])
        rows["pose_accuracy@0.2"].append(acc["pck@0.2"])
        if face_ok:
            face_ext.reset(VideoContext(f"eval{i}", str(meta.get("source")), n, clip.fps, w, h))
            fo = face_ext(G.frame_batch(fake, {"pose_body": cond_pose,
                                          "pose_face": np.zeros((n, contract.NUM_FACE_POINTS, 3),
                                                                np.float32)}))
            emb = fo["embed"].astype(np.float32)
            rows["id_similarity"].append(metrics.id_similarity(emb, face))
    res: dict[str, Any] = {k: _nanmean(v) for k, v in rows.items()}
    res["clips"] = len(clips)
    res["frames_per_clip"] = int(min(frames, min(len(c.feats["latents"]) for c in clips)))
    res["steps"] = settings.steps
    res["guidance_scale"] = settings.guidance_scale
    return res


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else "n/a"
    return str(v)


# (label, key, digits): the rows of the stage-A table
STAGE_A_ROWS = (
    ("PCK@0.1 (higher is better)", "pck@0.1", 3),
    ("PCK@0.2", "pck@0.2", 3),
    ("mean joint error (torsos, lower is better)", "mean_joint_error", 3),
    ("face-embedding cosine", "face_cosine", 3),
    ("beat precision (motion beats on a music beat)", "beat_precision", 3),
    ("beat recall (music beats with a motion beat)", "beat_recall", 3),
    ("beat F1", "beat_f1", 3),
    ("Beat Align Score (Bailando{random})", "bas", 3),
    ("FID_k (kinetic features vs the real clips, lower is better)", "fid_k", 2),
    ("Div_k", "div_k", 2),
    ("speed ratio to the real dance (1 = as fast)", "speed_ratio", 2),
    ("acceleration ratio", "accel_ratio", 2),
    ("bone-length error vs the reference (lower is better)", "bone_length_error", 3),
    ("frame-0 distance to the reference (frame units)", "frame0_distance", 3),
    ("joints in frame (share)", "in_frame", 3),
    ("seed diversity ({seeds}; frame units)", "seed_diversity", 4),
)


def markdown_table(report: dict[str, Any]) -> str:
    a = report["stage_a"]
    names = a["predictors"]
    seeds = int(a.get("seeds") or 0)
    seeds_note = f"{seeds} seeds" + (", one-step 2" if seeds > 2 else "")
    random_note = (f"; random beats {_fmt(a['bas_random_beats'])}"
                   if a.get("bas_random_beats") is not None else "")
    lines = [f"# Evaluation of `{report['ckpt']}`", "",
             f"Data: `{report['data']}`, split `{report['split']}`, {a['clips']} clips "
             f"({a['clips_with_beats']} with music beats).", "",
             "## Stage A: music -> pose (M2PEncoder)", "",
             "Each column is scored by the same code on the same clips: " +
             DEFINITIONS["predictors"] + f". FID_k / Div_k over {a['diversity_sub_clips']} "
             f"ground-truth sub-clips of {a['diversity_frames']} frames (few sub-clips make "
             "FID_k unstable).", "",
             "| metric | " + " | ".join(PREDICTOR_TITLES[n] for n in names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for label, key, digits in STAGE_A_ROWS:
        label = label.format(random=random_note, seeds=seeds_note)
        lines.append(f"| {label} | " + " | ".join(_fmt(a[n][key], digits) for n in names) + " |")
    v = report.get("video")
    lines += ["", "## Stages B/C: pose + identity -> video", ""]
    if v is None:
        lines.append("Not measured: " + (report.get("video_note") or "no video model."))
    else:
        lines += [f"{v['clips']} clips of {v['frames_per_clip']} frames, ground-truth poses, "
                  f"{v['steps']} Euler steps, guidance {v['guidance_scale']:g}; ground-truth "
                  "frames = cached latents decoded by the VAE.", "",
                  "| metric | value |", "|---|---|",
                  f"| PSNR (dB, higher is better) | {_fmt(v['psnr'], 2)} |",
                  f"| SSIM | {_fmt(v['ssim'])} |",
                  f"| ID similarity (ArcFace cosine) | {_fmt(v['id_similarity'])} |",
                  f"| pose accuracy PCK@0.1 | {_fmt(v['pose_accuracy@0.1'])} |",
                  f"| pose accuracy PCK@0.2 | {_fmt(v['pose_accuracy@0.2'])} |",
                  f"| temporal consistency (0-255, lower is better) | "
                  f"{_fmt(v['temporal_consistency'], 2)} |"]
    lines += ["", "Definitions:", ""]
    lines += [f"- **{k}**: {d}" for k, d in DEFINITIONS.items()]
    if report.get("plots"):
        lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in report["plots"].values())]
    return "\n".join(lines) + "\n"


def output_dir_of(ckpt: Path) -> Path | None:
    """The training output folder whose ``stage_X/logs`` hold the TensorBoard logs: the parent
    of ``final/`` or of ``stage_X/final``."""
    for cand in (ckpt.parent, ckpt.parent.parent):
        if any((cand / f"stage_{s}" / "logs").is_dir() for s in "ABC"):
            return cand
    return None


def make_plots(out: Path, ckpt: Path, stage_a: dict[str, Any]) -> dict[str, str]:
    made: dict[str, str] = {}
    logs = output_dir_of(ckpt)
    if logs is not None:
        try:
            made["loss_curves"] = plots.plot_loss_curves(logs, out / "loss_curves.png")
        except FileNotFoundError as e:
            print(f"note: no loss curves ({e})")
    else:
        print(f"note: no TensorBoard logs beside {ckpt} (stage_X/logs): no loss curves")
    made["bas_histogram"] = plots.plot_bas_histogram(
        stage_a["_bas_per_clip"], out / "bas_histogram.png",
        references={"ground truth": stage_a["ground_truth"]["bas"],
                    "random beats": stage_a["bas_random_beats"],
                    "another clip": stage_a["other_clip"]["bas"]})
    made["per_joint_pck"] = plots.plot_per_joint_pck(
        {"model": stage_a["_per_joint"]["model"],
         "mean pose": stage_a["_per_joint"]["mean_pose"]},
        out / "per_joint_pck.png", threshold=0.1)
    ex = stage_a["_beat_example"]
    if ex["music_beats"]:
        made["beat_alignment"] = plots.plot_beat_alignment(
            {PREDICTOR_TITLES[n]: p for n, p in ex["poses"].items()}, ex["music_beats"],
            ex["fps"], out / "beat_alignment.png", min_conf=MIN_CONF,
            title=f"Beat alignment, clip {ex['clip']}")
    return made


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def main(cfg: C.EvalConfig) -> int:
    ckpt = Path(cfg.ckpt)
    check_model_folder(ckpt)
    if cfg.max_samples < 1:
        raise C.ConfigError(f"max_samples={cfg.max_samples}: must be >= 1")
    try:
        manifest = load_manifest(cfg.data)
        check_shards_present(manifest)
    except ManifestError as e:
        raise UserFacingError(str(e)) from None
    device = cfg.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserFacingError(f"device={device}: CUDA is not available on this machine")
    torch.manual_seed(cfg.seed)
    show = not cfg.quiet
    model = load_dance_model(ckpt, device=device)
    if model.m2p is None:
        raise UserFacingError(f"ckpt={cfg.ckpt}: has no M2PEncoder (m2p)")
    meta = G.training_meta(ckpt)
    # the data's statistics stand in when the checkpoint did not record the training data's
    meta["norm_stats"] = meta["norm_stats"] or manifest.get("stats")
    pipe = G.DancePipeline(model, meta, cfg.models, device=device, show_progress=False)
    has_video = pipe.has_video
    video_note = None
    if not has_video:
        video_note = "the checkpoint has no video model (a stage-A checkpoint)."
    elif cfg.video_samples <= 0:
        video_note, has_video = "video_samples=0.", False

    split = cfg.split
    if split != "all" and not any(s.get("split") == split for s in manifest["shards"]):
        print(f"note: {cfg.data} has no '{split}' shards; evaluating on the train split")
        split = "train"

    out = Path(cfg.out)
    clips = load_clips(manifest, split, cfg.max_samples, STAGE_A_FEATURES, need_audio=True)
    base_pose, base_face = train_statistics(manifest)
    stage_a = evaluate_stage_a(pipe, clips, base_pose, base_face, cfg.audio_window,
                               cfg.diversity_frames, cfg.seed, cfg.seeds, show)

    video = None
    if has_video:
        pcfg = G.preprocess_config(cfg.models, recorded=manifest.get("config"))
        if pcfg.pose.backend == "file":  # generated frames have no keypoints file: a model looks
            pcfg.pose.backend = C.PoseConfig().backend
        comps = ["vae", "insightface"] + (["dwpose"] if pcfg.pose.backend == "dwpose" else [])
        weights.ensure_available(cfg.models, comps)
        vclips = load_clips(manifest, split, cfg.video_samples, VIDEO_FEATURES, VIDEO_OPTIONAL)
        settings = G.SamplingSettings(
            steps=cfg.steps, guidance_scale=cfg.guidance_scale,
            pose_scale=cfg.pose_guidance_scale, window=cfg.video_frames, overlap=0,
            svd_fps=int(G.train_setting(meta, "svd_fps")),
            motion_bucket_id=int(G.train_setting(meta, "motion_bucket_id")),
            noise_aug_strength=float(G.train_setting(meta, "noise_aug_strength")))
        vae, _ = vae_io.load_vae(cfg.models, device=device)
        video = evaluate_video(model, vclips, settings, vae, pcfg, cfg.video_frames, cfg.seed,
                               device, show)

    out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails leaves nothing
    made_plots = make_plots(out, ckpt, stage_a)
    stage_a_json = {k: v for k, v in stage_a.items() if not k.startswith("_")}
    stage_a_json["per_joint_pck@0.1"] = {
        "joints": list(contract.BODY_JOINTS),
        **{name: stage_a["_per_joint"][name].tolist() for name in PREDICTORS}}
    report = {"ckpt": str(ckpt), "data": str(cfg.data), "split": split,
              "stage": meta.get("stage"), "stage_a": stage_a_json, "video": video,
              "video_note": video_note,
              "plots": made_plots, "definitions": DEFINITIONS}
    report = _finite(report)
    table = markdown_table(report)
    storage.atomic_write_text(str(out / "eval.json"), json.dumps(report, indent=1))
    storage.atomic_write_text(str(out / "eval.md"), table)
    print(table)
    print(f"eval: {out / 'eval.json'}, {out / 'eval.md'}")
    return 0
