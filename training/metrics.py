"""Evaluation metrics: pure functions on numpy arrays (torch tensors are accepted and converted).

Stage A (music -> pose): :func:`pck`, :func:`mean_joint_error`, :func:`face_cosine`,
:func:`beat_align_score` (+ :func:`motion_beats`, :func:`random_beat_align_score`),
:func:`pose_diversity` (+ :func:`kinetic_features`), :func:`mean_pose_baseline`.
Stages B/C (pose/identity -> video): :func:`psnr`, :func:`ssim`, :func:`id_similarity`,
:func:`pose_accuracy`, :func:`temporal_consistency`.

Conventions: poses are (..., K, 2) x, y or (..., K, 3) x, y, score, in the units the caller
chose (the shard contract stores [0, 1] of the cropped frame; pass ``size=(W, H)`` to measure in
pixels, which keeps distances isotropic on non-square frames). Frames are uint8 RGB (H, W, 3) or
clips (T, H, W, 3). A metric that has nothing to measure returns NaN rather than a made-up value.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.signal import argrelextrema

from dwm.shared import contract

__all__ = [
    "torso_size",
    "pck",
    "mean_joint_error",
    "face_cosine",
    "motion_beats",
    "beat_align_score",
    "random_beat_align_score",
    "kinetic_features",
    "pose_diversity",
    "mean_pose_baseline",
    "psnr",
    "ssim",
    "id_similarity",
    "pose_accuracy",
    "temporal_consistency",
    "BAILANDO_SIGMA_SECONDS",
    "BAILANDO_SMOOTH_FRAMES_AT_60",
]

# Bailando (Siyao et al., CVPR 2022) scores at 60 fps with exp(-d^2 / (2 * 9)), d in frames:
# a Gaussian of sigma 3 frames at 60 fps = 0.05 s. We keep that TIME scale at any fps.
BAILANDO_SIGMA_SECONDS = 3.0 / 60.0
# Bailando smooths the kinetic speed with a Gaussian of sigma 5 frames, set for 60 fps motion.
BAILANDO_SMOOTH_FRAMES_AT_60 = 5.0


def _np(x, dtype=np.float64) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=dtype)


def _split_pose(poses, min_conf: float, size: tuple[float, float] | None):
    """(..., K, 2|3) -> xy (..., K, 2) in the requested units, visible mask (..., K)."""
    p = _np(poses)
    if p.ndim < 2 or p.shape[-1] not in (2, 3):
        raise ValueError(f"poses must be (..., K, 2) or (..., K, 3), got {p.shape}")
    xy = p[..., :2].copy()
    if size is not None:
        xy *= np.asarray(size, np.float64)
    vis = np.isfinite(xy).all(-1)
    if p.shape[-1] == 3:
        vis &= p[..., 2] >= min_conf
    return xy, vis


# ---------------------------------------------------------------------------------------------
# Stage A: poses
# ---------------------------------------------------------------------------------------------
def torso_size(target_xy, visible=None) -> np.ndarray:
    """Torso size per frame: distance from contract.NECK to the mid-point of the two hips
    (contract.R_HIP, contract.L_HIP). target_xy: (N, K, 2); visible: (N, K) bool.
    NaN where the neck or either hip is not visible, or the torso has zero length."""
    xy = _np(target_xy)
    vis = np.ones(xy.shape[:2], bool) if visible is None else np.asarray(visible, bool)
    mid_hip = 0.5 * (xy[:, contract.R_HIP] + xy[:, contract.L_HIP])
    size = np.linalg.norm(xy[:, contract.NECK] - mid_hip, axis=-1)
    ok = vis[:, contract.NECK] & vis[:, contract.R_HIP] & vis[:, contract.L_HIP] & (size > 0)
    return np.where(ok, size, np.nan)


def pck(
    pred,
    target,
    conf=None,
    thresholds: Sequence[float] = (0.1, 0.2),
    min_conf: float = 0.3,
    pred_conf=None,
    size: tuple[float, float] | None = None,
) -> dict:
    """Percentage of Correct Keypoints, normalised by the TARGET's torso size.

    A joint is correct when ``||pred - target|| <= t * torso`` where torso = :func:`torso_size`
    of the target frame (neck to mid-hip, same units as the distances). Evaluated joints: target
    confidence ``conf >= min_conf`` (all when conf is None), in frames whose torso is visible
    (frames without one are skipped: there is no scale). A predicted joint whose ``pred_conf``
    is below ``min_conf`` (a missed detection) counts as wrong.

    pred, target: (N, K, 2) (a third column is ignored here; pass scores as conf / pred_conf).
    conf, pred_conf: (N, K) or None. size: (W, H) multiplies x and y before measuring.

    Returns ``{"pck@t": float, "per_joint@t": (K,) array (NaN for never-evaluated joints),
    "frames_used": int, "joints_evaluated": int}`` for each threshold t; PCK is in [0, 1] and
    NaN when nothing could be evaluated.
    """
    p_xy, _ = _split_pose(pred, -np.inf, size)
    t_xy, _ = _split_pose(target, -np.inf, size)
    if p_xy.shape != t_xy.shape or p_xy.ndim != 3:
        raise ValueError(f"pck: pred {p_xy.shape} and target {t_xy.shape} must both be (N, K, 2)")
    n, k = t_xy.shape[:2]
    t_vis = np.isfinite(t_xy).all(-1)
    if conf is not None:
        t_vis &= _np(conf).reshape(n, k) >= min_conf
    p_ok = np.isfinite(p_xy).all(-1)
    if pred_conf is not None:
        p_ok &= _np(pred_conf).reshape(n, k) >= min_conf

    torso = torso_size(np.nan_to_num(t_xy), t_vis)
    frame_ok = np.isfinite(torso)
    evaluated = t_vis & frame_ok[:, None]
    dist = np.linalg.norm(np.nan_to_num(p_xy) - np.nan_to_num(t_xy), axis=-1)
    out: dict = {"frames_used": int(frame_ok.sum()), "joints_evaluated": int(evaluated.sum())}
    per_joint_count = evaluated.sum(0)
    for t in thresholds:
        correct = evaluated & p_ok & (dist <= t * np.where(frame_ok, torso, 0.0)[:, None])
        total = evaluated.sum()
        out[f"pck@{t:g}"] = float(correct.sum() / total) if total else float("nan")
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"per_joint@{t:g}"] = np.where(
                per_joint_count > 0, correct.sum(0) / np.maximum(per_joint_count, 1), np.nan
            )
    return out


def mean_joint_error(
    pred,
    target,
    conf=None,
    min_conf: float = 0.3,
    normalize: bool = True,
    size: tuple[float, float] | None = None,
) -> float:
    """Mean Euclidean distance between predicted and target joints over the joints whose target
    conf >= min_conf. With ``normalize`` (default) each distance is divided by the target frame's
    torso size (as in :func:`pck`; frames without a torso are skipped), so 0.1 means a tenth of a
    torso. Without it the result is in the input units (times ``size`` if given). NaN if empty."""
    p_xy, _ = _split_pose(pred, -np.inf, size)
    t_xy, _ = _split_pose(target, -np.inf, size)
    if p_xy.shape != t_xy.shape:
        raise ValueError(f"mean_joint_error: pred {p_xy.shape} != target {t_xy.shape}")
    p_xy, t_xy = p_xy.reshape(-1, *p_xy.shape[-2:]), t_xy.reshape(-1, *t_xy.shape[-2:])
    vis = np.isfinite(t_xy).all(-1) & np.isfinite(p_xy).all(-1)
    if conf is not None:
        vis &= _np(conf).reshape(vis.shape) >= min_conf
    dist = np.linalg.norm(np.nan_to_num(p_xy) - np.nan_to_num(t_xy), axis=-1)
    if normalize:
        t_vis = np.isfinite(t_xy).all(-1)
        if conf is not None:
            t_vis &= _np(conf).reshape(t_vis.shape) >= min_conf
        torso = torso_size(np.nan_to_num(t_xy), t_vis)
        vis &= np.isfinite(torso)[:, None]
        dist = dist / np.where(np.isfinite(torso), torso, 1.0)[:, None]
    return float(dist[vis].mean()) if vis.any() else float("nan")


def face_cosine(pred, target, eps: float = 1e-8) -> float:
    """Mean cosine similarity between corresponding rows of pred and target (N, D), e.g.
    predicted vs ground-truth face embeddings or expression codes. Rows where the TARGET is all
    zeros (no face: the contract stores zeros there) are skipped. 1 = identical directions,
    0 = orthogonal. NaN when no row is left."""
    p, t = _np(pred), _np(target)
    p, t = p.reshape(-1, p.shape[-1]), t.reshape(-1, t.shape[-1])
    if p.shape != t.shape:
        raise ValueError(f"face_cosine: pred {p.shape} != target {t.shape}")
    tn, pn = np.linalg.norm(t, axis=1), np.linalg.norm(p, axis=1)
    keep = tn > eps
    if not keep.any():
        return float("nan")
    cos = (p[keep] * t[keep]).sum(1) / (np.maximum(pn[keep], eps) * tn[keep])
    return float(cos.mean())


def _mean_joint_speed(motion, min_conf: float) -> np.ndarray:
    xy, vis = _split_pose(motion, min_conf, None)
    if xy.ndim != 3:
        raise ValueError(f"motion must be (T, K, 2|3), got {xy.shape}")
    xy = np.where(vis[..., None], xy, np.nan)
    if len(xy) < 3:
        return np.zeros(len(xy))
    vel = np.gradient(xy, axis=0)  # central differences: speed[t] belongs to frame t
    with np.errstate(invalid="ignore"), _quiet_nanmean():
        speed = np.nanmean(np.linalg.norm(vel, axis=-1), axis=1)
    bad = ~np.isfinite(speed)
    if bad.all():
        return np.zeros(len(xy))
    if bad.any():  # frames with no visible joint: interpolate so smoothing stays defined
        idx = np.arange(len(speed))
        speed[bad] = np.interp(idx[bad], idx[~bad], speed[~bad])
    return speed


@contextlib.contextmanager
def _quiet_nanmean():
    """nanmean/nanstd of an all-NaN column warns; we turn those into explicit fallbacks."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def motion_beats(motion, fps: float, smooth_sigma: float | None = None, min_conf: float = 0.3):
    """Kinematic beats: frames where the smoothed mean joint speed has a local minimum.

    Speed = mean over visible joints of the per-frame displacement (central differences).
    Smoothing: a Gaussian of ``smooth_sigma`` frames, by default Bailando's 5 frames at 60 fps
    SCALED to the motion's frame rate (5 * fps / 60, i.e. 2 at 24 fps). Bailando's fixed 5 frames
    is a 0.083 s window at 60 fps but 0.21 s at 24 fps, which smears out most beats (measured on
    the 12 s sample dance at 24 fps: unscaled, 7 motion beats are left and real dance scores at
    chance; scaled, Bailando's form gives 0.575 for the real dance against 0.45 for random beats).
    Returns int frame indices."""
    speed = _mean_joint_speed(motion, min_conf)
    sigma = BAILANDO_SMOOTH_FRAMES_AT_60 * fps / 60.0 if smooth_sigma is None else smooth_sigma
    if sigma > 0 and len(speed) > 1:
        speed = gaussian_filter1d(speed, sigma, mode="nearest")
    return argrelextrema(speed, np.less)[0]


def beat_align_score(
    motion,
    music_beat_frames,
    fps: float,
    sigma_seconds: float = BAILANDO_SIGMA_SECONDS,
    smooth_sigma: float | None = None,
    min_conf: float = 0.3,
) -> float:
    """Beat Align Score, Bailando's definition (Siyao et al., "Bailando: 3D Dance Generation by
    Actor-Critic GPT with Choreographic Memory", CVPR 2022, Sec. 5 / their ``calc_ba_score``):

        BAS = 1/|B_music| * sum over music beats b of exp(-min_m (b - m)^2 / (2 sigma^2))

    i.e. the mean over MUSIC beats of a Gaussian of the distance to the nearest MOTION beat m
    (from :func:`motion_beats`). sigma is Bailando's time scale, 3 frames at 60 fps = 0.05 s,
    converted to frames at ``fps`` (FACT/AIST++ averages over motion beats instead; we do not).
    The speed smoothing is scaled with fps as explained in :func:`motion_beats`.

    motion: (T, K, 2|3); music_beat_frames: beat positions in frames at ``fps`` (beats outside
    [0, T) are dropped). Returns a value in [0, 1]; 0 when the motion has no beat; NaN when no
    music beat falls inside the clip.
    """
    t = _np(motion).shape[0]
    beats = _np(music_beat_frames).ravel()
    beats = beats[(beats >= 0) & (beats < t)]
    if beats.size == 0:
        return float("nan")
    mb = motion_beats(motion, fps, smooth_sigma, min_conf).astype(np.float64)
    if mb.size == 0:
        return 0.0
    sigma_frames = sigma_seconds * fps
    nearest = np.min(np.abs(beats[:, None] - mb[None, :]), axis=1)
    return float(np.mean(np.exp(-(nearest**2) / (2.0 * sigma_frames**2))))


def random_beat_align_score(
    motion, num_beats: int, fps: float, trials: int = 50, seed: int = 0, **kw
) -> float:
    """Chance level of :func:`beat_align_score` for this motion: the mean BAS over ``trials``
    sets of ``num_beats`` beats drawn uniformly (without replacement) from the clip's frames."""
    t = _np(motion).shape[0]
    if num_beats < 1 or t < 1:
        return float("nan")
    rng = np.random.default_rng(seed)
    n = min(num_beats, t)
    scores = [
        beat_align_score(motion, np.sort(rng.choice(t, n, replace=False)), fps, **kw)
        for _ in range(trials)
    ]
    return float(np.nanmean(scores))


def kinetic_features(motion, fps: float, min_conf: float = 0.3) -> np.ndarray:
    """A fixed-length motion descriptor of one pose sequence (T, K, 2|3), in the spirit of
    AIST++/Bailando's kinetic features: per joint, mean speed and mean acceleration magnitude
    (units per second, per second^2) and the standard deviation of x and of y. Shape (4K,).
    Invisible joints are ignored (a joint never visible contributes zeros)."""
    xy, vis = _split_pose(motion, min_conf, None)
    if xy.ndim != 3 or len(xy) < 3:
        raise ValueError(f"kinetic_features: need (T>=3, K, 2|3), got {xy.shape}")
    xy = np.where(vis[..., None], xy, np.nan)
    vel = np.gradient(xy, axis=0) * fps
    acc = np.gradient(vel, axis=0) * fps
    with _quiet_nanmean():
        feats = np.concatenate([
            np.nanmean(np.linalg.norm(vel, axis=-1), axis=0),
            np.nanmean(np.linalg.norm(acc, axis=-1), axis=0),
            np.nanstd(xy[..., 0], axis=0),
            np.nanstd(xy[..., 1], axis=0),
        ])  # fmt: skip
    return np.nan_to_num(feats, nan=0.0)


def pose_diversity(sequences, fps: float = 24.0, reference=None) -> float:
    """Div_k-like diversity (Bailando / FACT report the mean pairwise distance between the
    kinetic features of generated dances): the mean Euclidean distance over all pairs i < j of
    the features of the N sequences.

    sequences: (N, T, K, 2|3) / a list of (T_i, K, 2|3) pose sequences (features via
    :func:`kinetic_features`), or an (N, D) array of ready-made features. reference: optional
    ground-truth sequences (same forms); when given, every feature is standardised with the
    reference's mean and std first, as Bailando does, so generated and real dances are measured
    on the same scale (compare with ``pose_diversity(reference, reference=reference)``).
    Identical sequences give 0. Raises ValueError for fewer than 2 sequences."""

    def feats(x) -> np.ndarray:
        if isinstance(x, np.ndarray) and x.ndim == 2:
            return x.astype(np.float64)
        if hasattr(x, "detach") and x.ndim == 2:
            return _np(x)
        return np.stack([kinetic_features(s, fps) for s in x])

    f = feats(sequences)
    if len(f) < 2:
        raise ValueError(f"pose_diversity: need at least 2 sequences, got {len(f)}")
    if reference is not None:
        r = feats(reference)
        # a feature the reference never varies (e.g. a joint it never sees) has no scale to
        # standardise by: it is left out rather than divided by ~0
        keep = r.std(0) > 1e-9
        f = (f[:, keep] - r[:, keep].mean(0)) / r[:, keep].std(0)
    d = np.linalg.norm(f[:, None, :] - f[None, :, :], axis=-1)
    iu = np.triu_indices(len(f), k=1)
    return float(d[iu].mean())


def mean_pose_baseline(train_poses, min_conf: float = 0.3) -> np.ndarray:
    """The trivial baseline for stage A: the average training pose, to be predicted for every
    frame. train_poses: (N, K, 3) or a list of (T_i, K, 3) arrays (scores used to ignore
    low-confidence joints; (…, K, 2) counts every joint). Returns (K, 3) float32: mean x, y over
    the confident observations of each joint, and score 1 (0 with x = y = 0.5 for a joint never
    seen). Use ``np.broadcast_to(base, (T, K, 3))`` to predict a clip."""
    if isinstance(train_poses, (list, tuple)):
        arrs = [_np(a) for a in train_poses]
        if not arrs:
            raise ValueError("mean_pose_baseline: no poses")
        k = arrs[0].shape[-2]
        train_poses = np.concatenate([a.reshape(-1, k, a.shape[-1]) for a in arrs])
    xy, vis = _split_pose(train_poses, min_conf, None)
    xy = xy.reshape(-1, *xy.shape[-2:])
    vis = vis.reshape(-1, vis.shape[-1])
    count = vis.sum(0)
    total = np.where(vis[..., None], np.nan_to_num(xy), 0.0).sum(0)
    mean = np.where(count[:, None] > 0, total / np.maximum(count, 1)[:, None], 0.5)
    score = (count > 0).astype(np.float64)
    return np.concatenate([mean, score[:, None]], axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Stages B/C: frames
# ---------------------------------------------------------------------------------------------
def _as_clips(a, b, what: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(_np(a, np.float32) if hasattr(a, "detach") else a), np.asarray(
        _np(b, np.float32) if hasattr(b, "detach") else b
    )
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ: {a.shape} vs {b.shape}")
    if a.ndim == 3:
        a, b = a[None], b[None]
    if a.ndim != 4:
        raise ValueError(f"{what}: expected (H, W, C) or (T, H, W, C), got {a.shape}")
    return a, b


def psnr(pred, target, data_range: float = 255.0, max_db: float = 100.0) -> float:
    """Peak signal-to-noise ratio in dB: 10 log10(data_range^2 / MSE), computed per frame and
    averaged over frames. pred, target: (H, W, C) or (T, H, W, C), uint8 (data_range 255) or
    float. A frame with MSE 0 scores ``max_db`` (100 dB) so that averages stay finite."""
    a, b = _as_clips(pred, target, "psnr")
    scores = []
    for x, y in zip(a, b):
        mse = float(np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2))
        scores.append(max_db if mse == 0 else min(max_db, 10 * np.log10(data_range**2 / mse)))
    return float(np.mean(scores))


def ssim(pred, target, data_range: float = 255.0) -> float:
    """Structural similarity (Wang et al. 2004), per frame, averaged over frames: skimage's
    ``structural_similarity`` with the paper's settings (Gaussian window sigma 1.5, K1 0.01,
    K2 0.03, population covariance), colour channels averaged. 1 = identical."""
    from skimage.metrics import structural_similarity

    a, b = _as_clips(pred, target, "ssim")
    scores = [
        structural_similarity(
            x, y, data_range=data_range, channel_axis=-1, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False,
        )  # fmt: skip
        for x, y in zip(a.astype(np.float64), b.astype(np.float64))
    ]
    return float(np.mean(scores))


def id_similarity(embeddings_generated, embedding_ref, eps: float = 1e-8) -> float:
    """Identity preservation: mean cosine similarity between the ArcFace embedding of each
    generated frame (T, D) and the reference face's embedding (D,). Frames whose embedding is all
    zeros (no face detected; the contract's convention) are skipped. NaN if none is left."""
    g = _np(embeddings_generated)
    r = _np(embedding_ref).ravel()
    g = g.reshape(-1, r.size)
    rn = np.linalg.norm(r)
    if rn <= eps:
        raise ValueError("id_similarity: the reference embedding is all zeros (no face)")
    gn = np.linalg.norm(g, axis=1)
    keep = gn > eps
    if not keep.any():
        return float("nan")
    return float(((g[keep] @ r) / (gn[keep] * rn)).mean())


def pose_accuracy(
    detected,
    conditioning,
    thresholds: Sequence[float] = (0.1, 0.2),
    min_conf: float = 0.3,
    size: tuple[float, float] | None = None,
) -> dict:
    """Pose accuracy of generated video: :func:`pck` of the poses RE-DETECTED on the generated
    frames (T, K, 3) against the conditioning poses (T, K, 3). Joints are evaluated where the
    conditioning score >= min_conf; a joint the detector missed (score < min_conf) is wrong.
    Pass ``size=(W, H)`` when coordinates are normalised on a non-square frame."""
    det, cond = _np(detected), _np(conditioning)
    if det.shape[-1] != 3 or cond.shape[-1] != 3:
        raise ValueError(f"pose_accuracy: need (T, K, 3) poses, got {det.shape} and {cond.shape}")
    return pck(det[..., :2], cond[..., :2], conf=cond[..., 2], thresholds=thresholds,
               min_conf=min_conf, pred_conf=det[..., 2], size=size)  # fmt: skip


def temporal_consistency(generated, ground_truth) -> float:
    """Temporal error against the ground truth (lower is better, 0 = same motion):

        mean over t, pixels, channels of |(g[t+1] - g[t]) - (r[t+1] - r[t])|

    for clips (T, H, W, C), in intensity units of the input (0-255 for uint8). It penalises
    flicker and motion the real video does not have, independently of a constant colour error.
    Needs T >= 2."""
    g, r = _as_clips(generated, ground_truth, "temporal_consistency")
    if len(g) < 2:
        raise ValueError("temporal_consistency: need at least 2 frames")
    total = 0.0
    for t in range(len(g) - 1):  # one pair at a time: whole clips in float would not fit
        dg = g[t + 1].astype(np.float32) - g[t].astype(np.float32)
        dr = r[t + 1].astype(np.float32) - r[t].astype(np.float32)
        total += float(np.abs(dg - dr).mean())
    return total / (len(g) - 1)
