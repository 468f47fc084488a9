"""Evaluation metrics: pure functions on numpy arrays (torch tensors are accepted and converted).

Stage A (music -> pose), against the ground truth: :func:`pck`, :func:`mean_joint_error`,
:func:`face_cosine`, :func:`mean_pose_baseline`. Motion metrics that a jittering, frozen or
averaging model cannot pass (each is meant to be read beside the ground truth's own value):
:func:`beat_scores` (beat precision / recall / F1 beside Bailando's :func:`beat_align_score`;
beats from :func:`motion_beats` and :func:`music_beats`), :func:`fid_k` and :func:`div_k` (of
:func:`kinetic_features`), :func:`speed_accel_ratios`, :func:`reference_consistency` and
:func:`seed_diversity`.
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
from scipy.signal import find_peaks

from dwm.shared import contract

__all__ = [
    "torso_size",
    "pck",
    "mean_joint_error",
    "face_cosine",
    "motion_speed",
    "motion_beats",
    "music_beats",
    "beat_align_score",
    "random_beat_align_score",
    "beat_scores",
    "kinetic_features",
    "fid_k",
    "div_k",
    "speed_accel_ratios",
    "reference_consistency",
    "seed_diversity",
    "mean_pose_baseline",
    "psnr",
    "ssim",
    "id_similarity",
    "pose_accuracy",
    "temporal_consistency",
    "BAILANDO_SIGMA_SECONDS",
    "BAILANDO_SMOOTH_FRAMES_AT_60",
    "BEAT_TOLERANCE_SECONDS",
    "MOTION_BEAT_MIN_PROMINENCE",
]

# Bailando (Siyao et al., CVPR 2022) scores at 60 fps with exp(-d^2 / (2 * 9)), d in frames:
# a Gaussian of sigma 3 frames at 60 fps = 0.05 s. We keep that TIME scale at any fps.
BAILANDO_SIGMA_SECONDS = 3.0 / 60.0
# Bailando smooths the kinetic speed with a Gaussian of sigma 5 frames, set for 60 fps motion.
BAILANDO_SMOOTH_FRAMES_AT_60 = 5.0
# Beat-tracking evaluation's usual window (mir_eval's F-measure): a motion beat within 0.07 s of a
# music beat is a hit; 1 frame either side at 24 fps, so chance precision stays near 1/4.
BEAT_TOLERANCE_SECONDS = 0.07
# A speed minimum is a motion beat only when the smoothed mean joint speed rises by this much
# (frame units per second) on both sides: a still pose has no beats rather than beats at random.
MOTION_BEAT_MIN_PROMINENCE = 0.002


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


def _masked_xy(motion, min_conf: float, size, what: str) -> np.ndarray:
    """(T, K, 2|3) -> (T, K, 2) float64 with NaN where a joint is not visible."""
    xy, vis = _split_pose(motion, min_conf, size)
    if xy.ndim != 3:
        raise ValueError(f"{what}: motion must be (T, K, 2|3), got {xy.shape}")
    return np.where(vis[..., None], xy, np.nan)


def _mean_joint_speed(motion, min_conf: float) -> np.ndarray:
    """(T,) mean over visible joints of the per-frame displacement (central differences)."""
    xy = _masked_xy(motion, min_conf, None, "motion_speed")
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


def motion_speed(motion, fps: float, smooth_sigma: float | None = None,
                 min_conf: float = 0.3) -> np.ndarray:
    """The kinetic speed curve that motion beats are read from: per frame, the mean over visible
    joints of the joint speed (central differences), in coordinate units per second, smoothed by
    a Gaussian of ``smooth_sigma`` frames. By default that is Bailando's 5 frames at 60 fps
    SCALED to the motion's frame rate (5 * fps / 60, i.e. 2 at 24 fps): the fixed 5 frames are
    0.083 s at 60 fps but 0.21 s at 24 fps, which smears out most beats (measured: unscaled, the
    real sample dance at 24 fps scores at chance). motion: (T, K, 2|3). Returns (T,) float64."""
    speed = _mean_joint_speed(motion, min_conf) * fps
    sigma = BAILANDO_SMOOTH_FRAMES_AT_60 * fps / 60.0 if smooth_sigma is None else smooth_sigma
    if sigma > 0 and len(speed) > 1:
        speed = gaussian_filter1d(speed, sigma, mode="nearest")
    return speed


def motion_beats(motion, fps: float, smooth_sigma: float | None = None, min_conf: float = 0.3,
                 min_prominence: float = MOTION_BEAT_MIN_PROMINENCE) -> np.ndarray:
    """Kinematic beats (Bailando-style): frames where the :func:`motion_speed` curve has a local
    minimum, i.e. the body momentarily stops. A minimum counts only when the speed rises by at
    least ``min_prominence`` (coordinate units per second) on both sides (scipy's peak
    prominence), so that a pose that does not move, or only wobbles by numerical noise, has no
    beats at all instead of beats at random. Returns int frame indices, ascending."""
    speed = motion_speed(motion, fps, smooth_sigma, min_conf)
    prominence = min_prominence if min_prominence > 0 else None
    peaks, _ = find_peaks(-speed, prominence=prominence)
    return peaks.astype(np.int64)


def music_beats(audio_baseline) -> np.ndarray:
    """Music beat frames from an ``audio_baseline`` feature (T, 35), whose last column is the
    preprocessing beat track as a one-hot per video frame (see dwm.shared.contract). Works on
    the raw feature and on a standardised one (the one-hot keeps two levels either way): frames
    above the midpoint of the column's range. Returns int frame indices; none when the column
    is constant (no beat in the window). The sample metadata's ``beat_frames`` hold the same
    frames for a whole segment."""
    col = _np(audio_baseline)[..., -1].ravel()
    lo, hi = float(col.min(initial=0.0)), float(col.max(initial=0.0))
    if not col.size or hi - lo < 1e-6:
        return np.zeros(0, np.int64)
    return np.flatnonzero(col > 0.5 * (lo + hi)).astype(np.int64)


def _clip_beats(music_beat_frames, t: int) -> np.ndarray:
    beats = _np(music_beat_frames).ravel()
    return beats[(beats >= 0) & (beats < t)]


def beat_align_score(
    motion,
    music_beat_frames,
    fps: float,
    sigma_seconds: float = BAILANDO_SIGMA_SECONDS,
    smooth_sigma: float | None = None,
    min_conf: float = 0.3,
    min_prominence: float = MOTION_BEAT_MIN_PROMINENCE,
) -> float:
    """Beat Align Score, Bailando's definition (Siyao et al., "Bailando: 3D Dance Generation by
    Actor-Critic GPT with Choreographic Memory", CVPR 2022, Sec. 5 / their ``calc_ba_score``):

        BAS = 1/|B_music| * sum over music beats b of exp(-min_m (b - m)^2 / (2 sigma^2))

    i.e. the mean over MUSIC beats of a Gaussian of the distance to the nearest MOTION beat m
    (from :func:`motion_beats`). sigma is Bailando's time scale, 3 frames at 60 fps = 0.05 s,
    converted to frames at ``fps`` (FACT/AIST++ averages over motion beats instead; we do not).
    The speed smoothing is scaled with fps as explained in :func:`motion_speed`. Because only
    music beats are averaged, motion beats everywhere (jitter) raise BAS: read it beside the
    beat precision of :func:`beat_scores`.

    motion: (T, K, 2|3); music_beat_frames: beat positions in frames at ``fps`` (beats outside
    [0, T) are dropped). Returns a value in [0, 1]; 0 when the motion has no beat; NaN when no
    music beat falls inside the clip.
    """
    beats = _clip_beats(music_beat_frames, _np(motion).shape[0])
    if beats.size == 0:
        return float("nan")
    mb = motion_beats(motion, fps, smooth_sigma, min_conf, min_prominence).astype(np.float64)
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


def _match_beats(motion_b: np.ndarray, music_b: np.ndarray, tol: float) -> int:
    """Number of one-to-one pairs (motion beat, music beat) at most ``tol`` frames apart,
    closest pairs first (as mir_eval's beat F-measure matches them)."""
    if not motion_b.size or not music_b.size:
        return 0
    d = np.abs(motion_b[:, None] - music_b[None, :])
    cand = np.argwhere(d <= tol)
    cand = cand[np.argsort(d[cand[:, 0], cand[:, 1]], kind="stable")]
    used_m, used_b = set(), set()
    for i, j in cand:
        if i not in used_m and j not in used_b:
            used_m.add(i)
            used_b.add(j)
    return len(used_m)


def beat_scores(
    motion,
    music_beat_frames,
    fps: float,
    tolerance_s: float = BEAT_TOLERANCE_SECONDS,
    smooth_sigma: float | None = None,
    min_conf: float = 0.3,
    min_prominence: float = MOTION_BEAT_MIN_PROMINENCE,
) -> dict[str, float]:
    """Motion beats (:func:`motion_beats`) against music beats, as a beat tracker is scored:

    * ``beat_precision``: share of motion beats within ``tolerance_s`` of a music beat (a
      jittering pose stops everywhere and scores about the chance level, the tolerance window
      over the beat period);
    * ``beat_recall``: share of music beats within ``tolerance_s`` of a motion beat;
    * ``beat_f1``: their harmonic mean (0 for a pose that never stops or never moves);
    * ``bas``: Bailando's :func:`beat_align_score` of the same motion, for comparison.

    Beats are paired one-to-one, closest first. The tolerance is a time (default 0.07 s, the
    usual beat-tracking window), converted to frames at ``fps`` and at least half a frame, so
    the same motion scores the same at any frame rate. motion: (T, K, 2|3); music_beat_frames
    in frames at ``fps``; beats outside [0, T) are dropped. All NaN when no music beat falls in
    the clip; precision 0 when the motion has no beat."""
    beats = _clip_beats(music_beat_frames, _np(motion).shape[0])
    if beats.size == 0:
        nan = float("nan")
        return {"beat_precision": nan, "beat_recall": nan, "beat_f1": nan, "bas": nan}
    mb = motion_beats(motion, fps, smooth_sigma, min_conf, min_prominence).astype(np.float64)
    hits = _match_beats(mb, beats, max(tolerance_s * fps, 0.5))
    precision = hits / mb.size if mb.size else 0.0
    recall = hits / beats.size
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    bas = beat_align_score(motion, beats, fps, smooth_sigma=smooth_sigma, min_conf=min_conf,
                           min_prominence=min_prominence)
    return {"beat_precision": float(precision), "beat_recall": float(recall),
            "beat_f1": float(f1), "bas": bas}


def kinetic_features(motion, fps: float, min_conf: float = 0.3) -> np.ndarray:
    """The kinetic feature of one pose sequence (T, K, 2|3), AIST++/Bailando's definition in 2D:
    per joint, the mean horizontal kinetic energy mean(vx^2 / 2), the mean vertical kinetic
    energy mean(vy^2 / 2) and the mean energy expenditure mean(|a|), with v and a by central
    differences in coordinate units per second (per second^2). Shape (3K,): all K horizontal,
    then all K vertical, then all K expenditure terms. A joint is used where its score >=
    min_conf; a joint never visible contributes zeros. Needs T >= 3."""
    xy = _masked_xy(motion, min_conf, None, "kinetic_features")
    if len(xy) < 3:
        raise ValueError(f"kinetic_features: need (T>=3, K, 2|3), got {xy.shape}")
    vel = np.gradient(xy, axis=0) * fps
    acc = np.gradient(vel, axis=0) * fps
    with _quiet_nanmean():
        feats = np.concatenate([
            np.nanmean(0.5 * vel[..., 0] ** 2, axis=0),
            np.nanmean(0.5 * vel[..., 1] ** 2, axis=0),
            np.nanmean(np.linalg.norm(acc, axis=-1), axis=0),
        ])  # fmt: skip
    return np.nan_to_num(feats, nan=0.0)


def _features(x, fps: float, what: str) -> np.ndarray:
    """(N, D) features, or sequences (N, T, K, 2|3) / a list of (T_i, K, 2|3) -> their
    :func:`kinetic_features`."""
    if isinstance(x, (list, tuple)):
        if x and _np(x[0]).ndim == 1:
            return np.stack([_np(f) for f in x])
        return np.stack([kinetic_features(s, fps) for s in x])
    a = _np(x)
    if a.ndim == 2:
        return a
    if a.ndim == 4:
        return np.stack([kinetic_features(s, fps) for s in a])
    raise ValueError(f"{what}: expected features (N, D) or sequences (N, T, K, 2|3), got {a.shape}")


def _standardiser(real: np.ndarray):
    """Bailando measures FID_k and Div_k on features standardised by the REAL dances' mean and
    std. A feature the real dances never vary (a joint they never show) has no scale of its own:
    it takes the mean scale of the others, so a model that moves it is still seen."""
    mean, std = real.mean(0), real.std(0)
    varied = std > 1e-12
    std = np.where(varied, std, std[varied].mean() if varied.any() else 1.0)
    return lambda f: (f - mean) / std


def _shrunk_cov(f: np.ndarray) -> np.ndarray:
    """Sample covariance shrunk towards its diagonal by D / (N + D): with few clips (N << D)
    the off-diagonal terms are noise and the full matrix is singular."""
    n, d = f.shape
    if n < 2:
        return np.zeros((d, d))
    cov = np.cov(f, rowvar=False).reshape(d, d)
    lam = d / (n + d)
    return (1.0 - lam) * cov + lam * np.diag(np.diag(cov))


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(0.5 * (m + m.T))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def fid_k(generated, real, fps: float = 24.0, standardise: bool = True) -> float:
    """FID_k (Bailando / AIST++): the Fréchet distance between Gaussians fitted to the kinetic
    features of generated and of real dances,

        ||mu_g - mu_r||^2 + tr(S_g + S_r - 2 (S_r^1/2 S_g S_r^1/2)^1/2).

    generated (N, D), real (M, D): :func:`kinetic_features` rows, or the sequences themselves
    ((N, T, K, 2|3) or lists of (T_i, K, 2|3)). With ``standardise`` (default) both are first
    standardised by the real features' mean and std, as Bailando does. Small-N regularisation:
    each covariance is shrunk towards its diagonal by D / (N + D), and the matrix square root is
    taken on symmetric PSD matrices (no complex round-off). 0 for real against itself; a frozen
    or averaging model lands far from the real dances. Needs N, M >= 1."""
    g, r = _features(generated, fps, "fid_k"), _features(real, fps, "fid_k")
    if not len(g) or not len(r) or g.shape[1] != r.shape[1]:
        raise ValueError(f"fid_k: need non-empty features of one size, got {g.shape}, {r.shape}")
    if standardise:
        scale = _standardiser(r)
        g, r = scale(g), scale(r)
    sg, sr = _shrunk_cov(g), _shrunk_cov(r)
    sr_half = _sqrt_psd(sr)
    cross = np.trace(_sqrt_psd(sr_half @ sg @ sr_half))
    dist = np.sum((g.mean(0) - r.mean(0)) ** 2) + np.trace(sg) + np.trace(sr) - 2.0 * cross
    return float(max(dist, 0.0))


def div_k(features, reference=None, fps: float = 24.0) -> float:
    """Div_k (Bailando / FACT): the mean Euclidean distance over all pairs i < j of the kinetic
    features of N dances. features: (N, D) rows of :func:`kinetic_features` or the sequences
    ((N, T, K, 2|3) or a list of (T_i, K, 2|3)). reference: the real dances (same forms); when
    given, every feature is first standardised by the reference's mean and std (as in
    :func:`fid_k`), so a model's value reads against ``div_k(real, reference=real)``. Identical
    dances give 0; averaged dances, less than the real ones. Raises ValueError for N < 2."""
    f = _features(features, fps, "div_k")
    if len(f) < 2:
        raise ValueError(f"div_k: need at least 2 dances, got {len(f)}")
    if reference is not None:
        f = _standardiser(_features(reference, fps, "div_k"))(f)
    d = np.linalg.norm(f[:, None, :] - f[None, :, :], axis=-1)
    return float(d[np.triu_indices(len(f), k=1)].mean())


def _speed_accel(motions, fps: float, min_conf: float, size) -> tuple[float, float]:
    """Mean joint speed and mean acceleration magnitude over the visible joints of one or more
    sequences, in units per second (per second^2)."""
    speeds, accels = [], []
    for m in motions:
        xy = _masked_xy(m, min_conf, size, "speed_accel_ratios")
        if len(xy) < 3:
            continue
        vel = np.gradient(xy, axis=0) * fps
        acc = np.gradient(vel, axis=0) * fps
        speeds.append(np.linalg.norm(vel, axis=-1).ravel())
        accels.append(np.linalg.norm(acc, axis=-1).ravel())
    if not speeds:
        return float("nan"), float("nan")
    with _quiet_nanmean():
        return float(np.nanmean(np.concatenate(speeds))), float(np.nanmean(np.concatenate(accels)))


def _sequences(x) -> list:
    if isinstance(x, (list, tuple)):
        return list(x)
    a = _np(x)
    return list(a) if a.ndim == 4 else [a]


def speed_accel_ratios(motion, real_motion, fps: float, min_conf: float = 0.3,
                       size: tuple[float, float] | None = None) -> dict[str, float]:
    """How fast the motion moves compared with real dance: ``speed_ratio`` = mean joint speed
    of ``motion`` / that of ``real_motion``, ``accel_ratio`` the same for the acceleration
    magnitude (visible joints, central differences). 1 = as fast as the real dance; a frozen
    pose scores 0, jitter far above 1. motion, real_motion: (T, K, 2|3), (N, T, K, 2|3) or
    lists of sequences (of any lengths); ``size=(W, H)`` measures in pixels so that x and y
    weigh the same. NaN when the real motion does not move (or is shorter than 3 frames)."""
    s, a = _speed_accel(_sequences(motion), fps, min_conf, size)
    rs, ra = _speed_accel(_sequences(real_motion), fps, min_conf, size)
    ratio = lambda x, y: x / y if np.isfinite(x) and np.isfinite(y) and y > 0 else float("nan")
    return {"speed_ratio": ratio(s, rs), "accel_ratio": ratio(a, ra)}


def reference_consistency(motion, ref_pose, min_conf: float = 0.3,
                          size: tuple[float, float] | None = None) -> dict[str, float]:
    """Does the dance keep the body of the reference (the person in the photo)?

    * ``bone_length_error``: over the limbs of contract.BODY_LIMBS that the reference shows
      (both joints with score >= min_conf), the mean over frames and limbs of
      |length in the frame - length in the reference|, divided by the reference's size (the mean
      length of those reference limbs). 0.1 = limbs 10 % off. 2D lengths also change when a real
      dancer turns, so read it beside the ground truth's value.
    * ``frame0_distance``: the mean distance between the joints of frame 0 and of the reference
      (joints visible in both), in units of the frame (the contract's [0, 1] coordinates).
    * ``in_frame``: the share of visible joints, over all frames, with x and y in [0, 1].

    motion: (T, K, 2|3) in [0, 1] frame coordinates; ref_pose: (K, 2|3) in the same frame.
    ``size=(W, H)`` measures bone lengths in pixels (isotropic on non-square frames); the other
    two stay in frame units. Each value is NaN when there is nothing to measure."""
    xy = _masked_xy(motion, min_conf, None, "reference_consistency")
    ref, ref_vis = _split_pose(_np(ref_pose)[None], min_conf, None)
    ref, ref_vis = ref[0], ref_vis[0]
    if ref.shape != xy.shape[1:]:
        raise ValueError(f"reference_consistency: ref_pose {ref.shape} does not match the "
                         f"motion's joints {xy.shape[1:]}")
    scale = np.ones(2) if size is None else np.asarray(size, np.float64)
    limbs = np.array([(a, b) for a, b in contract.BODY_LIMBS
                      if max(a, b) < len(ref) and ref_vis[a] and ref_vis[b]]).reshape(-1, 2)
    bone_err = float("nan")
    if len(limbs):
        ref_len = np.linalg.norm((ref[limbs[:, 0]] - ref[limbs[:, 1]]) * scale, axis=-1)
        if ref_len.mean() > 0:
            lens = np.linalg.norm((xy[:, limbs[:, 0]] - xy[:, limbs[:, 1]]) * scale, axis=-1)
            err = np.abs(lens - ref_len[None]) / ref_len.mean()
            with _quiet_nanmean():
                bone_err = float(np.nanmean(err)) if np.isfinite(err).any() else float("nan")
    both = ref_vis & np.isfinite(xy[0]).all(-1) if len(xy) else np.zeros(len(ref), bool)
    frame0 = (float(np.linalg.norm(xy[0][both] - ref[both], axis=-1).mean()) if both.any()
              else float("nan"))
    seen = np.isfinite(xy).all(-1)
    inside = seen & (xy >= 0).all(-1) & (xy <= 1).all(-1)
    in_frame = float(inside.sum() / seen.sum()) if seen.any() else float("nan")
    return {"bone_length_error": bone_err, "frame0_distance": frame0, "in_frame": in_frame}


def seed_diversity(samples, min_conf: float = 0.3,
                   size: tuple[float, float] | None = None) -> float:
    """How different the dances of one song are across seeds: samples (S, T, K, 2|3), S >= 2
    generations of the same song; the mean over pairs i < j of the mean joint distance between
    sample i and sample j (frames and joints visible in both), in coordinate units (pixels with
    ``size=(W, H)``). 0 for a deterministic model, whatever ``seed`` says."""
    xy, vis = _split_pose(samples, min_conf, size)
    if xy.ndim != 4 or len(xy) < 2:
        raise ValueError(f"seed_diversity: need (S>=2, T, K, 2|3) samples, got {xy.shape}")
    dists = []
    for i in range(len(xy)):
        for j in range(i + 1, len(xy)):
            both = vis[i] & vis[j]
            if both.any():
                dists.append(np.linalg.norm(xy[i] - xy[j], axis=-1)[both].mean())
    return float(np.mean(dists)) if dists else float("nan")


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
