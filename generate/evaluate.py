"""``dwm eval ckpt=... data=manifest.json``: metrics of a trained model on held-out shards.

Writes ``<out>/eval.json``, ``<out>/eval.md`` (a Markdown table, also printed) and PNG plots.

Stage A (the M2PEncoder; every checkpoint has one), on the ``split`` clips with audio. Poses are
predicted over each whole clip segment exactly as ``dwm generate`` does (windows of
``audio_window`` frames, cross-faded):

* PCK@0.1 / PCK@0.2 (normalised by the ground-truth torso, neck to mid-hip) and the mean joint
  error (in torsos), both measured in pixels of the cropped frame so x and y weigh the same;
* face-embedding cosine: the M2PEncoder's face branch on a face crop of the clip vs the cached
  ArcFace embedding of that frame;
* Beat Align Score of the predicted poses AND of the ground-truth poses of the same clips, side by
  side, with the chance level (random beats): Bailando's definition (Siyao et al., CVPR 2022: mean
  over music beats of exp(-d^2 / 2 sigma^2), d the distance to the nearest motion beat,
  sigma = 0.05 s) with the speed smoothing scaled to the frame rate (5 frames at 60 fps ->
  2 at 24 fps; see :func:`dwm.training.metrics.motion_beats`). Music beats: the preprocessing
  audio extractor's beat track (``beat_frames`` of each sample);
* pose diversity (Div_k-like, kinetic features standardised by the ground truth's), of the model
  and of the ground truth, over sub-clips of ``diversity_frames`` frames;
* the same numbers for the mean-pose baseline (the mean training pose for every frame, the mean
  training face embedding).

Stages B/C (when the checkpoint has the video model), on up to ``video_samples`` clips of
``video_frames`` frames: the video model renders the clip from the ground-truth poses, a reference
frame outside the clip, its CLIP embedding and the video's ArcFace embedding. The ground-truth
frames are the cached ground-truth LATENTS decoded with the registry VAE (not the thumbnails),
so PSNR / SSIM compare like with like and measure the model, not the VAE. ID similarity: ArcFace
(insightface via the registry, the preprocessing face extractor) on the generated frames vs the
video's reference embedding. Pose accuracy: the preprocessing pose backend re-run on the generated
frames vs the conditioning poses (PCK@0.1 / 0.2). Temporal consistency: mean absolute difference
of frame-to-frame changes, generated vs ground truth (0-255 units, lower is better).

Plots: loss curves of every stage from the TensorBoard logs beside the checkpoint, the per-clip
BAS histogram (with ground truth, random beats and the mean pose marked) and per-joint PCK.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dwm.shared import config as C
from dwm.shared import contract
from dwm.shared.errors import UserFacingError

from dwm.generate import pipeline as G
from dwm.training import metrics

MIN_CONF = 0.3  # joints below this pose score count as missing (as in stage A's validation)
STAGE_A_FEATURES = ("audio_mel", "audio_baseline", "pose_body", "face_present", "face_crop",
                    "face_embed", "face_ref_embed")
VIDEO_FEATURES = ("latents", "pose_body", "pose_heatmap", "face_present", "face_ref_embed")
VIDEO_OPTIONAL = ("clip_frames", "clip_embed")

# Keys of eval.json's "stage_a" and "video" sections (every one is always written).
STAGE_A_KEYS = ("pck@0.1", "pck@0.2", "mean_joint_error", "face_cosine", "bas", "bas_ground_truth",
                "bas_random_beats", "pose_diversity", "pose_diversity_ground_truth")
BASELINE_KEYS = ("pck@0.1", "pck@0.2", "mean_joint_error", "face_cosine", "bas",
                 "pose_diversity")
VIDEO_KEYS = ("psnr", "ssim", "id_similarity", "pose_accuracy@0.1", "pose_accuracy@0.2",
              "temporal_consistency")

DEFINITIONS = {
    "pck": "PCK@t: joint within t x ground-truth torso (neck to mid-hip), pixels of the crop",
    "mean_joint_error": "mean joint distance in ground-truth torsos",
    "face_cosine": "cosine(M2PEncoder face branch, cached ArcFace) on a face crop of the clip",
    "bas": "Beat Align Score, Bailando (Siyao et al. CVPR 2022): mean over music beats of "
           "exp(-d^2/(2 sigma^2)), sigma 0.05 s; kinetic-speed smoothing scaled with fps "
           "(5 frames at 60 fps)",
    "pose_diversity": "mean pairwise distance of kinetic features (standardised by the ground "
                      "truth), over sub-clips",
    "psnr_ssim": "generated frames vs ground-truth latents decoded by the registry VAE",
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
    from dwm.datasets import iter_tar_samples
    from dwm.datasets.pipeline import split_urls
    from dwm.datasets.views import SampleError, decode_features, sample_meta

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


def _sub_clips(poses: list[np.ndarray], length: int) -> list[np.ndarray]:
    """Non-overlapping pieces of ``length`` frames of every sequence (for diversity)."""
    out = []
    for p in poses:
        for s in range(0, len(p) - length + 1, length):
            out.append(p[s : s + length])
    return out


# ---------------------------------------------------------------------------------------------
# stage A
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_stage_a(m2p: torch.nn.Module, clips: list[Clip], stats: dict[str, Any] | None,
                     audio_window: int, baseline_pose: np.ndarray, baseline_face: np.ndarray,
                     diversity_frames: int = 48, seed: int = 0,
                     show_progress: bool = True) -> dict[str, Any]:
    """Stage-A metrics of ``m2p`` on ``clips`` (with audio); see the module docstring."""
    from dwm.datasets.views import face_target, pick_face_frame

    if not clips:
        raise UserFacingError("no clip with audio in the evaluation split: nothing to measure "
                              "the M2PEncoder on")
    p = next(m2p.parameters())
    preds, targets, confs, bases = [], [], [], []
    pred_seqs, gt_seqs = [], []
    bas_model, bas_gt, bas_rand, bas_base = [], [], [], []
    face_pred, face_true = [], []
    size = clips[0].size  # one preprocessing resolution per manifest
    for i, clip in enumerate(tqdm(clips, desc="stage A metrics", unit="clip",
                                  disable=not show_progress, leave=False)):
        f = clip.feats
        gt = f["pose_body"].astype(np.float32)
        t = len(gt)
        poses = G.predict_poses(m2p, f["audio_mel"].astype(np.float32),
                                f["audio_baseline"].astype(np.float32), stats, audio_window,
                                max(1, audio_window // 4), p.device, show_progress=False)
        pred = poses.bodies()
        base = np.broadcast_to(baseline_pose, gt.shape).astype(np.float32)
        preds.append(pred[..., :2])
        targets.append(gt[..., :2])
        confs.append(gt[..., 2])
        bases.append(base[..., :2])
        pred_seqs.append(pred)
        gt_seqs.append(gt)
        beats = [b for b in (clip.meta.get("beat_frames") or []) if 0 <= b < t]
        if beats:
            bas_model.append(metrics.beat_align_score(pred, beats, clip.fps))
            bas_gt.append(metrics.beat_align_score(gt, beats, clip.fps, min_conf=MIN_CONF))
            bas_rand.append(metrics.random_beat_align_score(gt, len(beats), clip.fps,
                                                            seed=seed + i, min_conf=MIN_CONF))
            bas_base.append(metrics.beat_align_score(base, beats, clip.fps))
        frame = pick_face_frame(f["face_present"].astype(bool), np.random.default_rng([seed, i]))
        if frame is not None:
            emb, ok = face_target(f, frame)
            if ok:
                crop = torch.from_numpy(np.array(f["face_crop"][frame])).permute(2, 0, 1)[None]
                crop = crop.to(p.device, p.dtype) / 255.0
                face_pred.append(m2p.encode_face(crop)[0].float().cpu().numpy())
                face_true.append(emb)

    P, T, Cf = np.concatenate(preds), np.concatenate(targets), np.concatenate(confs)
    B = np.concatenate(bases)
    res: dict[str, Any] = {}
    per_joint: dict[str, np.ndarray] = {}
    for tag, pred in (("model", P), ("baseline", B)):
        pk = metrics.pck(pred, T, conf=Cf, thresholds=(0.1, 0.2), min_conf=MIN_CONF, size=size)
        mje = metrics.mean_joint_error(pred, T, conf=Cf, min_conf=MIN_CONF, size=size)
        res[tag] = {"pck@0.1": pk["pck@0.1"], "pck@0.2": pk["pck@0.2"], "mean_joint_error": mje}
        per_joint[tag] = pk["per_joint@0.1"]
        res.setdefault("frames_evaluated", pk["frames_used"])
    if face_true:
        ft = np.stack(face_true)
        res["model"]["face_cosine"] = metrics.face_cosine(np.stack(face_pred), ft)
        res["baseline"]["face_cosine"] = metrics.face_cosine(
            np.broadcast_to(baseline_face, ft.shape), ft)
    else:
        res["model"]["face_cosine"] = res["baseline"]["face_cosine"] = float("nan")

    res["model"]["bas"] = _nanmean(bas_model)
    res["bas_ground_truth"] = _nanmean(bas_gt)
    res["bas_random_beats"] = _nanmean(bas_rand)
    res["baseline"]["bas"] = _nanmean(bas_base)

    # sub-clips of diversity_frames frames; shorter when the split is too small for two of them
    length = max(3, min(diversity_frames, min(len(s) for s in gt_seqs)))
    while length > 6 and len(_sub_clips(gt_seqs, length)) < 2:
        length //= 2
    fps = clips[0].fps
    gt_sub, pred_sub = _sub_clips(gt_seqs, length), _sub_clips(pred_seqs, length)
    base_sub = _sub_clips([np.broadcast_to(baseline_pose, s.shape) for s in gt_seqs], length)
    if len(gt_sub) >= 2:
        feats = {name: np.stack([metrics.kinetic_features(s, fps, MIN_CONF) for s in subs])
                 for name, subs in (("gt", gt_sub), ("model", pred_sub), ("base", base_sub))}
        ref = feats["gt"]
        res["model"]["pose_diversity"] = metrics.div_k(feats["model"], reference=ref)
        res["pose_diversity_ground_truth"] = metrics.div_k(ref, reference=ref)
        res["baseline"]["pose_diversity"] = metrics.div_k(feats["base"], reference=ref)
    else:
        res["model"]["pose_diversity"] = res["baseline"]["pose_diversity"] = float("nan")
        res["pose_diversity_ground_truth"] = float("nan")
    res["diversity_frames"] = length
    res["clips"] = len(clips)
    res["clips_with_beats"] = len(bas_model)
    res["_per_joint"] = per_joint
    res["_bas_per_clip"] = bas_model
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
    from dwm.datasets.views import nearest_clip
    from dwm.preprocess.extractors.base import VideoContext
    from dwm.preprocess.extractors.face import FaceExtractor
    from dwm.preprocess.extractors.pose import PoseExtractor, to_crop

    if not clips:
        raise UserFacingError("no clip with latents in the evaluation split: cannot evaluate the "
                              "video model")
    clip_dim = model.unet.config.cross_attention_dim
    clip_dim = clip_dim if isinstance(clip_dim, int) else int(clip_dim[0])
    pose_ext = PoseExtractor(pcfg, device)
    face_ext = FaceExtractor(pcfg, device)
    rows: dict[str, list[float]] = {k: [] for k in VIDEO_KEYS}
    for i, clip in enumerate(tqdm(clips, desc="video metrics", unit="clip",
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
        det = pose_ext(G._batch(fake))
        det_body = to_crop(det["body"], 0, 0, w, h)
        acc = metrics.pose_accuracy(det_body, cond_pose, min_conf=MIN_CONF, size=(w, h))
        rows["pose_accuracy@0.1"].append(acc["pck@0.1"])
        rows["pose_accuracy@0.2"].append(acc["pck@0.2"])
        if face_ok:
            face_ext.reset(VideoContext(f"eval{i}", str(meta.get("source")), n, clip.fps, w, h))
            fo = face_ext(G._batch(fake, {"pose_body": cond_pose,
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


def markdown_table(report: dict[str, Any]) -> str:
    a = report["stage_a"]
    m, b = a["model"], a["baseline"]
    lines = [f"# Evaluation of `{report['ckpt']}`", "",
             f"Data: `{report['data']}`, split `{report['split']}`, {a['clips']} clips "
             f"({a['clips_with_beats']} with music beats).", "",
             "## Stage A: music -> pose (M2PEncoder)", "",
             "| metric | model | ground truth | mean-pose baseline |",
             "|---|---|---|---|",
             f"| PCK@0.1 (higher is better) | {_fmt(m['pck@0.1'])} | 1.000 | "
             f"{_fmt(b['pck@0.1'])} |",
             f"| PCK@0.2 | {_fmt(m['pck@0.2'])} | 1.000 | {_fmt(b['pck@0.2'])} |",
             f"| mean joint error (torsos, lower is better) | {_fmt(m['mean_joint_error'])} | "
             f"0.000 | {_fmt(b['mean_joint_error'])} |",
             f"| face-embedding cosine | {_fmt(m['face_cosine'])} | 1.000 | "
             f"{_fmt(b['face_cosine'])} |",
             f"| Beat Align Score (Bailando; random beats {_fmt(a['bas_random_beats'])}) | "
             f"{_fmt(m['bas'])} | {_fmt(a['bas_ground_truth'])} | {_fmt(b['bas'])} |",
             f"| pose diversity ({a['diversity_frames']}-frame sub-clips) | "
             f"{_fmt(m['pose_diversity'])} | {_fmt(a['pose_diversity_ground_truth'])} | "
             f"{_fmt(b['pose_diversity'])} |"]
    v = report.get("video")
    lines += ["", "## Stages B/C: pose + identity -> video", ""]
    if v is None:
        lines.append("Not measured: " + (report.get("video_note") or "no video model."))
    else:
        lines += [f"{v['clips']} clips of {v['frames_per_clip']} frames, ground-truth poses, "
                  f"{v['steps']} Euler steps, guidance {v['guidance_scale']:g}; ground-truth "
                  "frames = cached latents decoded by the registry VAE.", "",
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
    from dwm.generate import plots

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
        references={"ground truth": stage_a["bas_ground_truth"],
                    "random beats": stage_a["bas_random_beats"],
                    "mean pose": stage_a["baseline"]["bas"]})
    made["per_joint_pck"] = plots.plot_per_joint_pck(
        {"model": stage_a["_per_joint"]["model"],
         "mean-pose baseline": stage_a["_per_joint"]["baseline"]},
        out / "per_joint_pck.png", threshold=0.1)
    return made


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def main(cfg: C.EvalConfig) -> int:
    from dwm.shared import registry, storage
    from dwm.shared.shards import ManifestError, load_manifest
    from dwm.training.models.animator import VIDEO_COMPONENTS, load_dance_model
    from dwm.training.stages.stage_a import train_statistics

    ckpt = Path(cfg.ckpt)
    if not (ckpt / "model_index.json").is_file():
        raise UserFacingError(f"ckpt={cfg.ckpt}: not a trained model folder (no model_index.json)")
    try:
        manifest = load_manifest(cfg.data)
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
    has_video = all(getattr(model, c) is not None for c in VIDEO_COMPONENTS)
    video_note = None
    if not has_video:
        video_note = "the checkpoint has no video model (a stage-A checkpoint)."
    elif cfg.video_samples <= 0:
        video_note, has_video = "video_samples=0.", False
    meta = G.training_meta(ckpt)
    stats = meta["norm_stats"] or manifest.get("stats")
    audio_window = int(cfg.audio_window or G.train_setting(meta, "audio_window"))

    split = cfg.split
    if split != "all" and not any(s.get("split") == split for s in manifest["shards"]):
        print(f"note: {cfg.data} has no '{split}' shards; evaluating on the train split")
        split = "train"

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    clips = load_clips(manifest, split, cfg.max_samples, STAGE_A_FEATURES, need_audio=True)
    base_pose, base_face = train_statistics(manifest)
    stage_a = evaluate_stage_a(model.m2p, clips, stats, audio_window, base_pose, base_face,
                               cfg.diversity_frames, cfg.seed, show)

    video = None
    if has_video:
        pcfg = G.preprocess_config(cfg.models, recorded=manifest.get("config"))
        if pcfg.pose.backend == "file":  # generated frames have no keypoints file: a model looks
            pcfg.pose.backend = C.PoseConfig().backend
        comps = ["vae", "insightface"] + (["dwpose"] if pcfg.pose.backend == "dwpose" else [])
        registry.ensure_available(cfg.models, comps)
        vclips = load_clips(manifest, split, cfg.video_samples, VIDEO_FEATURES, VIDEO_OPTIONAL)
        settings = G.SamplingSettings(
            steps=cfg.steps, guidance_scale=cfg.guidance_scale,
            pose_scale=cfg.pose_guidance_scale, window=cfg.video_frames, overlap=0,
            svd_fps=int(G.train_setting(meta, "svd_fps")),
            motion_bucket_id=int(G.train_setting(meta, "motion_bucket_id")),
            noise_aug_strength=float(G.train_setting(meta, "noise_aug_strength")))
        vae, _ = registry.load_vae(cfg.models, device=device)
        video = evaluate_video(model, vclips, settings, vae, pcfg, cfg.video_frames, cfg.seed,
                               device, show)

    plots = make_plots(out, ckpt, stage_a)
    stage_a_json = {k: v for k, v in stage_a.items() if not k.startswith("_")}
    stage_a_json["per_joint_pck@0.1"] = {
        "joints": list(contract.BODY_JOINTS),
        "model": stage_a["_per_joint"]["model"].tolist(),
        "baseline": stage_a["_per_joint"]["baseline"].tolist()}
    report = {"ckpt": str(ckpt), "data": str(cfg.data), "split": split,
              "stage": meta.get("stage"), "stage_a": stage_a_json, "video": video,
              "video_note": video_note,
              "plots": plots, "definitions": DEFINITIONS}
    report = _finite(report)
    table = markdown_table(report)
    storage.atomic_write_text(str(out / "eval.json"), json.dumps(report, indent=1))
    storage.atomic_write_text(str(out / "eval.md"), table)
    print(table)
    print(f"eval: {out / 'eval.json'}, {out / 'eval.md'}")
    return 0
