"""training/metrics.py: every metric on inputs with a known answer, plus BAS on the real sample."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dwm.shared import contract
from dwm.training import metrics as M


def _body(n: int = 1, score: float = 1.0) -> np.ndarray:
    """(n, 18, 3) standing bodies; torso (neck (0.5, 0.2) to mid-hip (0.5, 0.5)) = 0.3."""
    xy = np.array([
        [0.50, 0.10], [0.50, 0.20], [0.40, 0.20], [0.35, 0.35], [0.33, 0.50],
        [0.60, 0.20], [0.65, 0.35], [0.67, 0.50], [0.45, 0.50], [0.45, 0.70],
        [0.45, 0.90], [0.55, 0.50], [0.55, 0.70], [0.55, 0.90], [0.48, 0.08],
        [0.52, 0.08], [0.46, 0.09], [0.54, 0.09],
    ], np.float64)  # fmt: skip
    b = np.concatenate([xy, np.full((18, 1), score)], axis=1)
    return np.repeat(b[None], n, axis=0)


# ---- PCK / joint error -----------------------------------------------------------------------
def test_torso_size():
    t = _body(2)
    assert M.torso_size(t[..., :2]) == pytest.approx([0.3, 0.3])
    vis = np.ones((2, 18), bool)
    vis[1, contract.L_HIP] = False
    s = M.torso_size(t[..., :2], vis)
    assert s[0] == pytest.approx(0.3) and np.isnan(s[1])


def test_pck_perfect_and_known_offset():
    target = _body(4)
    res = M.pck(target[..., :2], target[..., :2], target[..., 2])
    assert res["pck@0.1"] == 1.0 and res["pck@0.2"] == 1.0
    assert res["frames_used"] == 4 and res["joints_evaluated"] == 72
    # every joint 0.045 off = 0.15 torso: wrong at 0.1, right at 0.2
    pred = target[..., :2] + [0.045, 0.0]
    res = M.pck(pred, target[..., :2], target[..., 2])
    assert res["pck@0.1"] == 0.0 and res["pck@0.2"] == 1.0
    # only the right wrist is off: per-joint PCK says which one
    pred = target[..., :2].copy()
    pred[:, 4] += [0.0, 0.045]
    res = M.pck(pred, target[..., :2], target[..., 2], thresholds=(0.1,))
    assert res["pck@0.1"] == pytest.approx(17 / 18)
    pj = res["per_joint@0.1"]
    assert pj.shape == (18,) and pj[4] == 0.0 and (np.delete(pj, 4) == 1.0).all()


def test_pck_skips_low_confidence_and_torsoless_frames():
    target = _body(3)
    conf = np.ones((3, 18))
    pred = target[..., :2].copy()
    pred[:, 0] += 0.2  # the nose is far off ...
    conf[:, 0] = 0.1  # ... but not confidently annotated: not evaluated
    conf[2, contract.NECK] = 0.0  # frame 2 has no torso: skipped entirely
    pred[2] += 1.0
    res = M.pck(pred, target[..., :2], conf)
    assert res["pck@0.1"] == 1.0 and res["frames_used"] == 2
    assert res["joints_evaluated"] == 2 * 17
    assert np.isnan(res["per_joint@0.1"][0])  # never evaluated
    # nothing to evaluate at all -> NaN, not a made-up number
    assert math.isnan(M.pck(pred, target[..., :2], np.zeros((3, 18)))["pck@0.1"])


def test_pck_missed_predictions_and_pixel_units():
    target = _body(2)
    pred_conf = np.ones((2, 18))
    pred_conf[:, :9] = 0.0  # the detector missed 9 joints: they count as wrong
    res = M.pck(target[..., :2], target[..., :2], target[..., 2], pred_conf=pred_conf)
    assert res["pck@0.2"] == pytest.approx(0.5)
    # size=(W, H): a torso of 0.3 * 1000 px; an x offset of 0.1 * 100 px = 10 px = 0.033 torso
    pred = target[..., :2] + [0.1, 0.0]
    assert M.pck(pred, target[..., :2], size=(100, 1000))["pck@0.1"] == 1.0
    assert M.pck(pred, target[..., :2])["pck@0.1"] == 0.0  # unitless: 0.1 / 0.3 torso
    with pytest.raises(ValueError):
        M.pck(pred[:1], target[..., :2])


def test_mean_joint_error_known_values_and_torch():
    target = _body(3)
    pred = target[..., :2] + [0.03, 0.0]
    assert M.mean_joint_error(pred, target[..., :2]) == pytest.approx(0.1)  # 0.03 / 0.3 torso
    assert M.mean_joint_error(pred, target[..., :2], normalize=False) == pytest.approx(0.03)
    assert M.mean_joint_error(target[..., :2], target[..., :2]) == 0.0
    t = torch.tensor(target[..., :2], dtype=torch.float32)
    assert M.mean_joint_error(t + torch.tensor([0.03, 0.0]), t) == pytest.approx(0.1, rel=1e-4)


def test_face_cosine():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 16))
    assert M.face_cosine(a, a) == pytest.approx(1.0)
    assert M.face_cosine(-a, a) == pytest.approx(-1.0)
    assert M.face_cosine(3.0 * a, a) == pytest.approx(1.0)  # scale-free
    e = np.eye(2)
    assert M.face_cosine(e[[0]], e[[1]]) == pytest.approx(0.0)
    t = a.copy()
    t[2] = 0.0  # no face in the target: skipped, not counted as 0
    p = a.copy()
    p[2] = -a[2]
    assert M.face_cosine(p, t) == pytest.approx(1.0)
    assert math.isnan(M.face_cosine(a, np.zeros_like(a)))


# ---- beats -----------------------------------------------------------------------------------
def _oscillating_motion(seconds: float, fps: float, period_s: float, phase: float = 0.0):
    """Every joint swings x = 0.1 cos(2 pi t / period): speed minima at t = k * period / 2."""
    t = np.arange(int(round(seconds * fps))) / fps
    body = _body(len(t))
    body[..., 0] += 0.1 * np.cos(2 * np.pi * t / period_s + phase)[:, None]
    return body


def test_motion_beats_found_where_the_speed_stops_at_any_fps():
    for fps in (24, 30, 60):
        motion = _oscillating_motion(4.0, fps, period_s=1.0)
        beats = M.motion_beats(motion, fps) / fps  # seconds
        expected = np.arange(0.5, 4.0 - 0.25, 0.5)
        assert len(beats) == len(expected), (fps, beats)
        assert np.abs(beats - expected).max() <= 1.0 / fps + 1e-9


def test_beat_align_score_known_answers():
    fps = 24
    motion = _oscillating_motion(8.0, fps, period_s=1.0)  # motion beats every 12 frames
    on_beat = np.arange(12, 180, 12)
    assert M.beat_align_score(motion, on_beat, fps) == pytest.approx(1.0, abs=1e-6)
    # half a motion period late: the nearest motion beat is 6 frames = 0.25 s away
    off = M.beat_align_score(motion, on_beat + 6, fps)
    assert off == pytest.approx(math.exp(-(0.25**2) / (2 * M.BAILANDO_SIGMA_SECONDS**2)), abs=1e-6)
    # a 1-frame shift costs exactly Bailando's Gaussian of 1/24 s
    one = M.beat_align_score(motion, on_beat + 1, fps)
    assert one == pytest.approx(math.exp(-((1 / 24) ** 2) / (2 * 0.05**2)), abs=1e-6)
    assert 1.0 > one > off
    # random beats score lower than the real ones
    assert M.random_beat_align_score(motion, len(on_beat), fps, trials=30) < 0.7
    # beats outside the clip are dropped; no beat inside -> NaN; still motion -> 0
    assert M.beat_align_score(motion, np.r_[on_beat, -5, 10_000], fps) == pytest.approx(1.0)
    assert math.isnan(M.beat_align_score(motion, [], fps))
    assert M.beat_align_score(_body(100), on_beat[:5], fps) == 0.0


def _stop_and_go(beat_frames, n: int, width: float = 1.0) -> np.ndarray:
    """The body glides right at constant speed and briefly stops (a dip of ``width`` frames) on
    each beat."""
    t = np.arange(n)
    dips = np.exp(-((t[:, None] - np.asarray(beat_frames)[None]) ** 2) / (2 * width**2)).sum(1)
    speed = 1.0 - 0.9 * np.clip(dips, 0, 1)
    x = (np.cumsum(speed) - 0.5 * speed) * 0.004  # central differences give back `speed`
    body = _body(n)
    body[..., 0] += x[:, None]
    return body


def test_bas_smoothing_scales_with_fps():
    # irregular beats 6-12 frames apart at 24 fps: Bailando's unscaled 5-frame smoothing (set
    # for 60 fps; 0.21 s here) merges neighbouring stops, the fps-scaled one (2 frames) does not
    fps = 24
    beats = np.cumsum(np.random.default_rng(3).integers(6, 13, 20))
    motion = _stop_and_go(beats, int(beats[-1]) + 10)
    assert M.motion_beats(motion, fps).tolist() == beats.tolist()
    assert M.beat_align_score(motion, beats, fps) == pytest.approx(1.0)
    assert len(M.motion_beats(motion, fps, smooth_sigma=5.0)) < len(beats) // 2
    assert M.beat_align_score(motion, beats, fps, smooth_sigma=5.0) < 0.5


def test_bas_ignores_low_confidence_joints():
    fps = 24
    motion = _oscillating_motion(4.0, fps, period_s=1.0)
    noisy = motion.copy()
    rng = np.random.default_rng(0)
    noisy[:, 10:, :2] = rng.random((len(noisy), 8, 2))  # jittering junk ...
    noisy[:, 10:, 2] = 0.0  # ... flagged as undetected
    beats = np.arange(12, 90, 12)
    assert M.beat_align_score(noisy, beats, fps) == pytest.approx(
        M.beat_align_score(motion, beats, fps)
    )


# ---- beat precision / recall / F1: a frozen, jittering or off-beat pose cannot pass ------------
def test_beat_scores_of_a_dance_that_stops_on_every_beat_at_any_fps():
    for fps in (24, 60):
        beats = np.round(np.arange(0.5, 7.5, 0.5) * fps).astype(int)  # 120 BPM
        motion = _stop_and_go(beats, int(8 * fps), width=fps / 24)
        s = M.beat_scores(motion, beats, fps)
        assert s == pytest.approx({"beat_precision": 1.0, "beat_recall": 1.0, "beat_f1": 1.0,
                                   "bas": 1.0}, abs=1e-6), fps
        # the tolerance is a time: 0.05 s late is a hit at both rates, 0.15 s late a miss
        assert M.beat_scores(motion, beats + round(0.05 * fps), fps)["beat_f1"] == 1.0
        assert M.beat_scores(motion, beats + round(0.15 * fps), fps)["beat_f1"] == 0.0


def test_frozen_pose_has_no_beats_and_no_speed():
    fps, beats = 24, np.arange(12, 180, 12)
    frozen = _body(192)
    assert M.motion_beats(frozen, fps).size == 0
    assert M.beat_scores(frozen, beats, fps) == {"beat_precision": 0.0, "beat_recall": 0.0,
                                                 "beat_f1": 0.0, "bas": 0.0}
    # a model that only wobbles by numerical noise is still frozen: no beats at random
    wobble = frozen.copy()
    wobble[..., :2] += np.random.default_rng(0).normal(0, 1e-5, wobble[..., :2].shape)
    assert M.beat_scores(wobble, beats, fps)["beat_f1"] == 0.0
    real = _oscillating_motion(8.0, fps, 1.0)
    assert M.speed_accel_ratios(frozen, real, fps) == {"speed_ratio": 0.0, "accel_ratio": 0.0}
    assert np.all(M.motion_speed(frozen, fps) == 0.0)


def test_stopping_everywhere_keeps_bas_but_not_precision():
    # BAS averages over music beats only: a motion that stops on every beat AND twice in
    # between scores as well as the dance, beat precision sees the extra stops (80 BPM)
    fps, beats = 24, np.arange(18, 186, 18)
    dance = _stop_and_go(beats, 192)
    busy = _stop_and_go(np.arange(6, 186, 6), 192)  # includes every beat
    d, b = M.beat_scores(dance, beats, fps), M.beat_scores(busy, beats, fps)
    assert b["bas"] == pytest.approx(d["bas"]) == pytest.approx(1.0)
    assert b["beat_recall"] == 1.0 and b["beat_precision"] == pytest.approx(1 / 3, abs=0.02)
    assert b["beat_f1"] < 0.55 < d["beat_f1"]
    # random jitter around a standing pose: precision near chance (the +-1-frame window over the
    # 12-frame beat period, 1/4), far below the dance's
    beats = np.arange(12, 180, 12)
    rng = np.random.default_rng(1)
    precision = []
    for _ in range(10):
        jitter = _body(192)
        jitter[..., :2] += rng.normal(0, 0.01, jitter[..., :2].shape)
        precision.append(M.beat_scores(jitter, beats, fps)["beat_precision"])
    assert np.mean(precision) < 0.4
    assert M.speed_accel_ratios(jitter, dance, fps)["accel_ratio"] > 5


def test_beat_scores_edge_cases():
    motion = _oscillating_motion(4.0, 24, 1.0)
    empty = M.beat_scores(motion, [500, -3], 24)  # no music beat inside the clip
    assert set(empty) == {"beat_precision", "beat_recall", "beat_f1", "bas"}
    assert all(math.isnan(v) for v in empty.values())
    # each music beat pairs with one motion beat only: two beats on one stop = recall 1/2
    s = M.beat_scores(motion, [12, 13], 24)
    assert s["beat_recall"] == 0.5


def test_music_beats_from_the_audio_baseline():
    base = np.zeros((40, contract.AUDIO_BASELINE_DIM), np.float16)
    base[[3, 15, 27], -1] = 1.0
    assert M.music_beats(base).tolist() == [3, 15, 27]
    standardised = (base.astype(np.float32) - 0.075) / 0.26  # as the loader's norm stats do
    assert M.music_beats(standardised).tolist() == [3, 15, 27]
    assert M.music_beats(np.zeros((40, 35))).size == 0
    assert M.music_beats(torch.from_numpy(standardised)).tolist() == [3, 15, 27]


# ---- kinetic features, FID_k, Div_k ------------------------------------------------------------
def test_kinetic_features_known_values():
    fps = 24
    motion = _body(30)
    motion[:, 4, 0] += np.arange(30) * 0.01  # the right wrist glides right at 0.24 / s
    f = M.kinetic_features(motion, fps)
    k = contract.NUM_BODY_JOINTS
    assert f.shape == (3 * k,)
    assert f[4] == pytest.approx(0.5 * 0.24**2)  # horizontal kinetic energy
    assert f[k + 4] == pytest.approx(0.0) and f[2 * k + 4] == pytest.approx(0.0, abs=1e-9)
    assert np.delete(f, [4]) == pytest.approx(0.0, abs=1e-9)  # nothing else moves
    motion[:, 5, 2] = 0.0  # a joint never seen: zeros, not NaN
    assert np.isfinite(M.kinetic_features(motion, fps)).all()
    with pytest.raises(ValueError):
        M.kinetic_features(motion[:2], fps)


def _dance_corpus(n: int, seed: int, frames: int = 96, fps: float = 24.0) -> np.ndarray:
    """n "real" dances: every limb swings at its own tempo, amplitude and phase per clip."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames)[:, None] / fps
    out = _body(frames)[None].repeat(n, 0)
    for i in range(n):
        amp = rng.uniform(0.03, 0.08, (1, 18, 2))
        freq = rng.choice([1.0, 2.0], (1, 18, 1))
        phase = rng.uniform(0, 2 * np.pi, (1, 18, 2))
        out[i, :, :, :2] += amp * np.sin(2 * np.pi * freq * t[..., None] + phase)
    return out


def test_fid_k_and_div_k_see_averaging_and_freezing():
    real, other = _dance_corpus(24, seed=0), _dance_corpus(24, seed=1)
    # the regressor's failure: the average of the valid dances (of 2, of 4 at a time)
    averaged2 = np.stack([real[i : i + 2].mean(0) for i in range(0, 24, 2)] * 2)
    averaged = np.stack([real[i : i + 4].mean(0) for i in range(0, 24, 4)] * 4)
    frozen = _body(96)[None].repeat(24, 0)
    assert M.fid_k(real, real) == pytest.approx(0.0, abs=1e-6)
    fid_other, fid_avg2, fid_avg = (M.fid_k(x, real) for x in (other, averaged2, averaged))
    assert 2 * fid_other < fid_avg2 < fid_avg < M.fid_k(frozen, real)
    div_real = M.div_k(real, reference=real)
    assert M.div_k(other, reference=real) == pytest.approx(div_real, rel=0.3)
    assert M.div_k(averaged, reference=real) < 0.7 * div_real
    assert M.div_k(frozen, reference=real) == 0.0
    # features or sequences, arrays or lists: the same numbers
    feats = np.stack([M.kinetic_features(s, 24) for s in real])
    assert M.div_k(list(real), reference=feats) == pytest.approx(div_real)
    assert M.fid_k(feats[:3], feats) == pytest.approx(M.fid_k(real[:3], list(real)))
    assert M.div_k(feats) > 0
    with pytest.raises(ValueError):
        M.div_k(real[:1])
    with pytest.raises(ValueError):
        M.fid_k(feats[:, :5], feats)


def test_fid_k_small_n_stays_finite_and_ordered():
    # fewer clips than features (N << D = 54): the shrunk covariances keep it defined
    real = _dance_corpus(5, seed=2)
    near = real + np.random.default_rng(0).normal(0, 1e-3, real.shape) * [1, 1, 0]
    assert math.isfinite(M.fid_k(real[:1], real)) and M.fid_k(real[:1], real[:1]) == 0.0
    assert M.fid_k(near, real) < M.fid_k(real.mean(0, keepdims=True).repeat(5, 0), real)


# ---- speed, reference consistency, seed diversity ----------------------------------------------
def test_speed_accel_ratios_of_a_faster_dance():
    fps = 24
    real = _oscillating_motion(8.0, fps, 2.0)
    assert M.speed_accel_ratios(real, real, fps) == pytest.approx(
        {"speed_ratio": 1.0, "accel_ratio": 1.0})
    twice = _oscillating_motion(8.0, fps, 1.0)  # the same swing at double tempo
    r = M.speed_accel_ratios(twice, [real[:100], real[100:]], fps)
    assert r["speed_ratio"] == pytest.approx(2.0, rel=0.03)
    assert r["accel_ratio"] == pytest.approx(4.0, rel=0.05)
    assert math.isnan(M.speed_accel_ratios(real, _body(50), fps)["speed_ratio"])


def test_reference_consistency_follows_the_photo():
    ref = _body(1)[0]
    dance = _oscillating_motion(2.0, 24, 1.0, phase=np.pi / 2)  # starts at the reference pose
    dance[..., 0] -= 0.1 * np.cos(np.pi / 2)
    rc = M.reference_consistency(dance, ref)
    assert rc["frame0_distance"] == pytest.approx(0.0, abs=1e-9)
    assert rc["bone_length_error"] == pytest.approx(0.0, abs=1e-9)  # a rigid sway
    assert rc["in_frame"] == 1.0
    # the training dancers' size and place instead of the photo's: 1.5x as big, 0.2 to the left
    other = _body(10)
    other[..., :2] = (other[..., :2] - 0.5) * 1.5 + 0.5 - [0.2, 0.0]
    rc = M.reference_consistency(other, ref)
    assert rc["bone_length_error"] == pytest.approx(0.5)
    assert rc["frame0_distance"] > 0.2
    inside = ((other[0, :, :2] >= 0) & (other[0, :, :2] <= 1)).all(-1)
    assert 0 < inside.mean() < 1 and rc["in_frame"] == pytest.approx(inside.mean())
    # a head-and-shoulders portrait: only the limbs it shows are compared
    portrait = ref.copy()
    portrait[8:14, 2] = 0.0
    moved = _body(4)
    moved[:, 8:14, :2] += 0.3  # legs anywhere: not in the photo, not measured
    assert M.reference_consistency(moved, portrait)["bone_length_error"] == pytest.approx(0.0)
    # non-square frames: bone lengths in pixels
    assert M.reference_consistency(other, ref, size=(256, 448))["bone_length_error"] == (
        pytest.approx(0.5))
    with pytest.raises(ValueError):
        M.reference_consistency(other, ref[:10])


def test_seed_diversity():
    a = _oscillating_motion(2.0, 24, 1.0)
    b = a.copy()
    b[..., 0] += 0.1
    assert M.seed_diversity(np.stack([a, a, a])) == 0.0  # a deterministic model
    assert M.seed_diversity(np.stack([a, b])) == pytest.approx(0.1)
    assert M.seed_diversity(np.stack([a, a, b])) == pytest.approx(2 * 0.1 / 3)
    assert M.seed_diversity(np.stack([a, b]), size=(200, 100)) == pytest.approx(20.0)
    with pytest.raises(ValueError):
        M.seed_diversity(a[None])


# ---- baseline ----------------------------------------------------------------------------------
def test_mean_pose_baseline():
    p = _body(4)
    p[:2, :, 0] += 0.1
    p[3, 5, :2] = [5.0, 5.0]  # a wild joint ...
    p[3, 5, 2] = 0.0  # ... with no confidence: ignored
    p[:, 17, 2] = 0.0  # never seen
    base = M.mean_pose_baseline(p)
    assert base.shape == (18, 3) and base.dtype == np.float32
    assert base[0, 0] == pytest.approx(0.55) and base[0, 1] == pytest.approx(0.10)
    assert base[5, 0] == pytest.approx((0.7 + 0.7 + 0.6) / 3)
    assert base[17].tolist() == [0.5, 0.5, 0.0] and base[0, 2] == 1.0
    assert np.allclose(M.mean_pose_baseline([p[:2], p[2:]]), base)
    # the baseline predicts the average pose: PCK 1 on a clip that is the average pose
    clip = np.broadcast_to(base, (6, 18, 3))
    assert M.pck(clip[..., :2], clip[..., :2])["pck@0.1"] == 1.0


# ---- frames ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:40]
    frames = [np.stack([(xx * 4 + t) % 200 + 20, (yy * 3) % 200 + 20, np.full_like(xx, 120)], -1)
              for t in range(6)]  # fmt: skip
    return np.clip(np.array(frames) + rng.integers(-5, 5, (6, 48, 40, 3)), 0, 255).astype(np.uint8)


def _noisy(clip: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(clip + rng.normal(0, sigma, clip.shape), 0, 255).astype(np.uint8)


def test_psnr(clip):
    assert M.psnr(clip, clip) == 100.0
    mid = np.clip(clip, 0, 245)  # +10 then gives MSE 100 exactly
    assert M.psnr(mid + 10, mid) == pytest.approx(10 * math.log10(255**2 / 100))
    scores = [M.psnr(_noisy(clip, s), clip) for s in (2, 8, 20, 50)]
    assert all(a > b for a, b in zip(scores, scores[1:]))
    assert M.psnr(clip[0], clip[0]) == 100.0  # a single frame works too
    with pytest.raises(ValueError):
        M.psnr(clip[:2], clip)


def test_ssim(clip):
    assert M.ssim(clip, clip) == pytest.approx(1.0)
    scores = [M.ssim(_noisy(clip, s), clip) for s in (2, 8, 20, 50)]
    assert all(a > b for a, b in zip(scores, scores[1:]))
    assert scores[-1] < 0.8


def test_id_similarity():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=512)
    gen = np.repeat(ref[None], 4, 0) * rng.uniform(0.5, 2.0, (4, 1))
    assert M.id_similarity(gen, ref) == pytest.approx(1.0)
    gen[1] = 0.0  # no face found in frame 1: skipped
    assert M.id_similarity(gen, ref) == pytest.approx(1.0)
    other = rng.normal(size=(4, 512))
    assert abs(M.id_similarity(other, ref)) < 0.2  # unrelated identities: near 0
    assert math.isnan(M.id_similarity(np.zeros((3, 512)), ref))
    with pytest.raises(ValueError, match="reference"):
        M.id_similarity(gen, np.zeros(512))


def test_pose_accuracy():
    cond = _body(5)
    assert M.pose_accuracy(cond, cond)["pck@0.1"] == 1.0
    det = cond.copy()
    det[:, 2:8, 2] = 0.0  # arms: the detector found only 12 of 18 joints on the generated frames
    assert M.pose_accuracy(det, cond)["pck@0.2"] == pytest.approx(12 / 18)
    cond_low = cond.copy()
    cond_low[:, 2:8, 2] = 0.0  # ... and those were not in the conditioning either: not counted
    assert M.pose_accuracy(det, cond_low)["pck@0.2"] == 1.0


def test_temporal_consistency(clip):
    assert M.temporal_consistency(clip, clip) == 0.0
    mid = np.clip(clip, 20, 235)
    assert M.temporal_consistency(mid + 10, mid) == 0.0  # a constant colour error is not temporal
    flicker = mid.astype(np.int16) + np.array([10, -10, 10, -10, 10, -10])[:, None, None, None]
    assert M.temporal_consistency(flicker.astype(np.uint8), mid) == pytest.approx(20.0)
    frozen = np.repeat(mid[:1], len(mid), axis=0)  # a still image where the video moves
    assert M.temporal_consistency(frozen, mid) > 0.5
    with pytest.raises(ValueError):
        M.temporal_consistency(clip[:1], clip[:1])


# ---- real sample: ground-truth dance vs its music --------------------------------------------
@pytest.fixture(scope="module")
def sample_pose_and_beats(sample_dataset):
    """The session's sample shards (the real dance through the project's mediapipe backend and
    audio extractor, 24 fps): the longer video's segments put back in order, its poses and
    music beats in frames of the whole video."""
    from dwm.datasets import iter_tar_samples
    from dwm.datasets.pipeline import split_urls
    from dwm.datasets.views import decode_features, sample_meta
    from dwm.shared.shards import load_manifest

    videos: dict[str, list] = {}
    for url in split_urls(load_manifest(str(sample_dataset)), "all"):
        for raw in iter_tar_samples(url):
            meta = sample_meta(raw)
            pose = decode_features(raw, ("pose_body",))["pose_body"]
            videos.setdefault(meta["video_hash"], []).append((meta, np.array(pose)))
    segments = sorted(max(videos.values(), key=len), key=lambda s: s[0]["start_frame"])
    starts = [m["start_frame"] for m, _ in segments]
    assert starts == list(np.cumsum([0] + [len(p) for _, p in segments[:-1]]))  # no gap
    poses = np.concatenate([p for _, p in segments])
    beats = np.concatenate([np.asarray(m["beat_frames"], int) + m["start_frame"]
                            for m, _ in segments])
    return poses, beats, float(segments[0][0]["fps"])


@pytest.mark.filterwarnings("ignore:SymbolDatabase.GetPrototype")
def test_real_dance_beats_align_better_than_chance(sample_pose_and_beats):
    poses, beats, fps = sample_pose_and_beats
    assert fps == pytest.approx(24.0)
    assert (poses[..., 2] > 0.5).mean() > 0.8  # the dancer was found
    assert len(beats) > 10  # ~117 BPM over 7 s
    real = M.beat_align_score(poses, beats, fps)
    chance = M.random_beat_align_score(poses, len(beats), fps, trials=200, seed=0)
    # same tempo, wrong phase: beats a quarter period (about 3 frames) early/late
    period = int(round(np.median(np.diff(beats))))
    shifts = (-period // 2, -period // 4, period // 4, period // 2)
    off_phase = np.mean([M.beat_align_score(poses, beats + s, fps) for s in shifts])
    assert real > chance + 0.08, (real, chance)
    assert real > off_phase, (real, off_phase)
    # the mean-pose baseline does not move, so it has no beats at all
    base = np.broadcast_to(M.mean_pose_baseline(poses), poses.shape)
    assert M.beat_align_score(base, beats, fps) == 0.0
    # and the metrics agree that the real poses are a perfect match with themselves
    assert M.pck(poses[..., :2], poses[..., :2], poses[..., 2])["pck@0.1"] == 1.0
    # beat F1 (0.43 measured) sees the same: above random beats (0.19) and the wrong phase
    f1 = M.beat_scores(poses, beats, fps)["beat_f1"]
    rng = np.random.default_rng(0)
    random_f1 = np.mean([
        M.beat_scores(poses, np.sort(rng.choice(len(poses), len(beats), replace=False)),
                      fps)["beat_f1"]
        for _ in range(100)])  # fmt: skip
    off_phase_f1 = np.mean([M.beat_scores(poses, beats + s, fps)["beat_f1"] for s in shifts])
    assert f1 > random_f1 + 0.15 and f1 > off_phase_f1 + 0.15, (f1, random_f1, off_phase_f1)
    assert M.beat_scores(base, beats, fps)["beat_f1"] == 0.0


# ---- plots (generate/plots.py) ---------------------------------------------------------------
def _is_png(path) -> bool:
    data = open(path, "rb").read()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_loss_curves_from_tensorboard_logs(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from dwm.generate import plots

    for stage, scale in (("A", 1.0), ("C", 3.0)):
        with SummaryWriter(tmp_path / f"stage_{stage}" / "logs") as w:
            for step in range(30):
                w.add_scalar("train/loss", scale / (1 + step), step)
                w.add_scalar("train/lr", 1e-4, step)
                if step % 10 == 0:
                    w.add_scalar("val/loss", scale / (1 + step) + 0.1, step)
    scalars = plots.read_scalars(tmp_path / "stage_A" / "logs")
    assert set(scalars) == {"train/loss", "train/lr", "val/loss"}
    steps, values = scalars["train/loss"]
    assert steps.tolist() == list(range(30)) and values[3] == pytest.approx(0.25)
    out = plots.plot_loss_curves(tmp_path)
    assert out == str(tmp_path / "plots" / "loss_curves.png") and _is_png(out)
    with pytest.raises(FileNotFoundError, match="stage_B"):
        plots.plot_loss_curves(tmp_path, stages=("B",))


def test_bas_histogram_and_per_joint_pck_pngs(tmp_path):
    from dwm.generate import plots

    rng = np.random.default_rng(0)
    out = plots.plot_bas_histogram(np.r_[rng.uniform(0.1, 0.6, 40), np.nan], tmp_path / "bas.png",
                                   references={"ground truth": 0.36, "random beats": 0.18})
    assert _is_png(out)
    target = _body(4)
    pred = target[..., :2].copy()
    pred[:, 4] += 0.05
    pj = M.pck(pred, target[..., :2])["per_joint@0.1"]
    pj[0] = np.nan
    out = plots.plot_per_joint_pck({"model": pj, "mean pose": np.full(18, 0.3)},
                                   tmp_path / "sub" / "pck.png", threshold=0.1)  # fmt: skip
    assert _is_png(out)
    with pytest.raises(ValueError):
        plots.plot_per_joint_pck(np.ones(5), tmp_path / "bad.png")
