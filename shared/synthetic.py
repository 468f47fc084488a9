"""Generated dance clips with a beat track: the demo's default input and a test corpus.

The project ships no third-party footage, so ``just demo`` makes its own: a stick-figure dancer
with a face, whose arms, hips and knees move on the beat of a click-and-bass track. The motion is
tied to the beat so that stage A has something real to learn (music -> pose) and the Beat Align
Score of the clips is meaningfully above chance.

:func:`choreography` is the known-answer corpus of stage A's test: one of :data:`MOVES` on every
beat, chosen at random, at any placement and size; :func:`classify_moves` / :func:`valid_moves`
check a pose sequence against it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import soundfile as sf

from .contract import BODY_LIMBS, KEYPOINTS_SIDECAR_SUFFIX
from .media import write_video

AUDIO_SR = 22050


def beat_track(seconds: float, bpm: float, sr: int = AUDIO_SR, seed: int = 0) -> np.ndarray:
    """Mono float32: a click on every beat, a bass note on every other beat, a soft pad."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    root = 110.0 * 2 ** (rng.integers(0, 5) / 12)
    audio = 0.05 * np.sin(2 * np.pi * root * 1.5 * t)
    beat = 60.0 / bpm
    for i, start in enumerate(np.arange(0.0, seconds, beat)):
        s = int(start * sr)
        k = np.arange(min(int(0.05 * sr), n - s))
        audio[s : s + len(k)] += 0.6 * np.exp(-k / (0.008 * sr)) * rng.uniform(-1, 1, len(k))
        if i % 2 == 0:
            k = np.arange(min(int(0.25 * sr), n - s))
            audio[s : s + len(k)] += 0.4 * np.exp(-k / (0.08 * sr)) * np.sin(2 * np.pi * root * k / sr)
    return (audio / max(1e-6, np.abs(audio).max()) * 0.8).astype(np.float32)


def dancer_pose(t: float, bpm: float, width: int, height: int, phase: float = 0.0) -> np.ndarray:
    """(18, 2) pixel coordinates in OpenPose order for time ``t`` seconds."""
    b = 2 * math.pi * (t * bpm / 60.0) + phase  # one cycle per beat
    cx = width / 2 + 0.08 * width * math.sin(b / 2)  # sway over two beats
    bob = 0.03 * height * (1 - math.cos(b))  # lowest between beats, up on the beat
    s = height / 10.0  # body unit
    neck = np.array([cx, 2.2 * s + bob])
    hip_c = neck + [0, 3.0 * s]
    pts = np.zeros((18, 2))
    pts[0] = neck + [0, -0.9 * s]  # nose
    pts[1] = neck
    for side, sign in ((2, -1), (5, 1)):  # right arm (image left), left arm (image right)
        sh = neck + [sign * 0.9 * s, 0.1 * s]
        up = 0.5 + 0.6 * math.sin(b + (math.pi / 2 if sign > 0 else 0.0))  # arms alternate
        el = sh + 1.1 * s * np.array([sign * math.cos(up), math.sin(up)])
        fore = up - 1.2 * math.sin(b)
        wr = el + 1.0 * s * np.array([sign * math.cos(fore) * 0.6, -math.sin(fore)])
        pts[side], pts[side + 1], pts[side + 2] = sh, el, wr
    knee_bend = 0.3 * s * (1 - math.cos(b))
    for hip_i, sign in ((8, -1), (11, 1)):
        hip = hip_c + [sign * 0.5 * s, 0]
        knee = hip + [sign * (0.2 * s + knee_bend), 1.6 * s]
        ankle = knee + [sign * 0.1 * s, 1.6 * s]
        pts[hip_i], pts[hip_i + 1], pts[hip_i + 2] = hip, knee, ankle
    pts[14], pts[15] = pts[0] + [-0.25 * s, -0.2 * s], pts[0] + [0.25 * s, -0.2 * s]  # eyes
    pts[16], pts[17] = pts[0] + [-0.5 * s, -0.1 * s], pts[0] + [0.5 * s, -0.1 * s]  # ears
    return pts


def render_frame(pts: np.ndarray, width: int, height: int, hue: int = 0) -> np.ndarray:
    img = np.zeros((height, width, 3), np.uint8)
    img[:] = np.linspace(40, 90, height, dtype=np.uint8)[:, None, None]  # floor-to-wall gradient
    s = height / 10.0
    color = tuple(int(c) for c in cv2.cvtColor(np.uint8([[[hue % 180, 160, 220]]]), cv2.COLOR_HSV2RGB)[0, 0])
    thick = max(2, int(0.25 * s))
    for a, b in BODY_LIMBS:
        if a in (14, 15, 16, 17) or b in (14, 15, 16, 17):
            continue
        cv2.line(img, tuple(int(v) for v in pts[a]), tuple(int(v) for v in pts[b]), color, thick,
                 cv2.LINE_AA)
    head = tuple(int(v) for v in pts[0] + [0, -0.1 * s])
    cv2.circle(img, head, int(0.6 * s), (224, 182, 150), -1, cv2.LINE_AA)  # skin-toned face
    for eye in (14, 15):
        cv2.circle(img, tuple(int(v) for v in pts[eye] + [0, 0.15 * s]), max(1, int(0.07 * s)),
                   (30, 30, 30), -1, cv2.LINE_AA)
    cv2.ellipse(img, (head[0], head[1] + int(0.3 * s)), (int(0.2 * s), int(0.08 * s)), 0, 0, 180,
                (150, 60, 60), max(1, thick // 3), cv2.LINE_AA)
    return img


def make_dance_clip(path: str | Path, seconds: float = 4.0, bpm: float = 120.0, fps: float = 24.0,
                    width: int = 288, height: int = 512, seed: int = 0, audio: bool = True,
                    keypoints: bool = False) -> Path:
    """Write an mp4 of the stick-figure dancer moving on the beat of its own track; with
    ``keypoints``, also its true poses as ``<stem>.keypoints.json`` (``pose.backend=file``)."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    phase, hue = float(rng.uniform(0, 2 * math.pi)), int(rng.integers(0, 180))
    n = int(round(seconds * fps))
    poses = [dancer_pose(i / fps, bpm, width, height, phase) for i in range(n)]
    if keypoints:
        write_keypoints_file(path, np.stack(poses), fps, width, height)
    frames = (render_frame(pts, width, height, hue) for pts in poses)
    wav = None
    if audio:
        wav = path.with_suffix(".wav")
        sf.write(wav, beat_track(seconds, bpm, seed=seed), AUDIO_SR)
    try:
        write_video(path, frames, fps, audio=wav)
    finally:
        if wav is not None:
            wav.unlink(missing_ok=True)
    return path


def keypoints_document(body: np.ndarray, fps: float, width: int, height: int) -> dict:
    """(T, 18, 2) pixels (or (T, 18, 3) with scores) -> the ``pose.backend=file`` JSON document
    (OpenPose-18 layout); points outside the frame get score 0."""
    body = np.asarray(body, np.float64)
    if body.shape[-1] == 2:
        inside = ((body[..., 0] >= 0) & (body[..., 0] < width) & (body[..., 1] >= 0)
                  & (body[..., 1] < height))
        body = np.concatenate([body, inside[..., None].astype(np.float64)], axis=-1)
    frames = [[[round(float(x), 2), round(float(y), 2), round(float(c), 3)] for x, y, c in f]
              for f in body]
    return {"layout": "openpose_18", "fps": float(fps), "width": int(width), "height": int(height),
            "frames": frames}


def sidecar_of(path: str | Path) -> Path:
    """``dir/dance.mp4`` -> ``dir/dance.keypoints.json`` (what ``pose.backend=file`` reads)."""
    path = Path(path)
    return path.with_name(path.stem + KEYPOINTS_SIDECAR_SUFFIX)


def write_keypoints_file(video_path: str | Path, body: np.ndarray, fps: float, width: int,
                         height: int) -> Path:
    """Write ``<video stem>.keypoints.json`` beside ``video_path``."""
    out = sidecar_of(video_path)
    out.write_text(json.dumps(keypoints_document(body, fps, width, height)))
    return out


# ---------------------------------------------------------------------------------------------
# Choreography: one of a few arm moves on every beat, chosen at random (a known answer)
# ---------------------------------------------------------------------------------------------
# Music to dance is one-to-many: the beat says *when* a move happens, not *which*. A corpus
# where each beat carries one of ``MOVES`` at random has a known answer a model can be checked
# against: a sample must make one valid move per beat, on the beat, and different samples
# choose differently. A regressor averages the moves into one that never happens.
MOVES = ("right_arm_circle", "left_arm_circle", "both_arms_wave")

# The body, in body units: the neck is the origin, y points down, torso (neck to mid-hip) = 1.
_TORSO, _SHOULDER = 1.0, 0.38
_ELBOW_RATIO, _ELBOW_BEND = 0.55, 0.3  # elbow: that share of the shoulder-wrist line, rotated
_HIP, _THIGH, _SHIN = 0.22, 0.9, 0.85
_BODY_TOP, _BODY_BOTTOM = -0.75, _TORSO + _THIGH + _SHIN + 0.05  # head top, feet
BODY_HEIGHT_UNITS = _BODY_BOTTOM - _BODY_TOP
_REST_WRIST = (0.2, 0.8)  # wrist at rest, from the shoulder (x outward, y down)
# Per move and arm ("r": the dancer's right = image left, "l"): the wrist's loop over one beat,
# (direction from the rest position to the top of the loop (x outward, y down), radius,
# turn +1/-1), or None for an arm at rest. The wrist goes round a circle at a speed that is
# zero only on the beat, so a move's only motion beat is the music's beat.
_MOVE_ARMS = {
    0: {"r": ((0.6, -0.8), 0.42, 1.0), "l": None},
    1: {"r": None, "l": ((0.6, -0.8), 0.42, 1.0)},
    2: {"r": ((-0.45, -0.9), 0.4, -1.0), "l": ((-0.45, -0.9), 0.4, -1.0)},
}


@dataclass
class Choreography:
    """A generated dance: per-frame OpenPose-18 keypoints and the move of every beat."""

    keypoints: np.ndarray  # (T, 18, 3): x, y in [0, 1] of the frame (x to width), score
    beat_frames: np.ndarray  # (N,) float frame positions of the beats (first beat at frame 0)
    moves: np.ndarray  # (N,) int: the move (index into MOVES) from beat i to beat i + 1
    fps: float
    bpm: float
    width: int
    height: int
    centre: tuple[float, float]  # where the body's mid-torso is, in [0, 1] of the frame
    scale: float  # body height as a fraction of the frame height


def _ease(phase: np.ndarray) -> np.ndarray:
    """[0, 1] -> [0, 1] with zero slope only at both ends: the dancer stops on the beat."""
    return phase - np.sin(2 * np.pi * phase) / (2 * np.pi)


def _wrist_path(move: int, side: str, phase: np.ndarray) -> np.ndarray:
    """(P, 2) wrist offsets from the shoulder (x outward, y down) over a beat, phase in [0, 1]."""
    rest = np.broadcast_to(np.array(_REST_WRIST), (len(phase), 2)).copy()
    spec = _MOVE_ARMS[int(move)][side] if move >= 0 else None
    if spec is None:
        return rest
    (dx, dy), radius, turn = spec
    d = np.array([dx, dy]) / math.hypot(dx, dy)
    angle = turn * 2 * np.pi * _ease(phase)
    # from the circle's centre (rest + radius * d) the wrist starts at -d (the rest position)
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    rot = np.concatenate([-d[0] * cos + d[1] * sin, -d[0] * sin - d[1] * cos], -1)
    return rest + radius * (d[None] + rot)


def _elbow(wrist: np.ndarray) -> np.ndarray:
    """The elbow part-way along the shoulder-to-wrist line, bent outward by a fixed angle: it
    moves with the wrist at a fixed ratio of its speed, so the whole arm stops only where the
    wrist does (exact bone lengths matter less here than a clean speed profile)."""
    c, s = math.cos(_ELBOW_BEND), math.sin(_ELBOW_BEND)
    return _ELBOW_RATIO * np.stack([c * wrist[:, 0] + s * wrist[:, 1],
                                    -s * wrist[:, 0] + c * wrist[:, 1]], -1)


def body_units_pose(move_of_frame: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """(T, 18, 2) joints in body units (neck at 0, torso 1) for each frame's move and phase."""
    n = len(phase)
    pts = np.zeros((n, 18, 2))
    pts[:, 0] = (0.0, -0.42)  # nose
    for side, sh_i, sign in (("r", 2, -1.0), ("l", 5, 1.0)):
        wrist = np.empty((n, 2))
        for m in np.unique(move_of_frame):
            sel = move_of_frame == m
            wrist[sel] = _wrist_path(int(m), side, phase[sel])
        flip = np.array([sign, 1.0])  # outward is -x for the right arm (image left)
        shoulder = np.array([sign * _SHOULDER, 0.05])
        pts[:, sh_i] = shoulder
        pts[:, sh_i + 1] = shoulder + _elbow(wrist) * flip
        pts[:, sh_i + 2] = shoulder + wrist * flip
    for hip_i, sign in ((8, -1.0), (11, 1.0)):
        hip = np.array([sign * _HIP, _TORSO])
        knee = hip + [sign * 0.04, _THIGH]
        pts[:, hip_i], pts[:, hip_i + 1], pts[:, hip_i + 2] = hip, knee, knee + [0.0, _SHIN]
    nose = pts[:, 0]
    pts[:, 14], pts[:, 15] = nose + (-0.1, -0.08), nose + (0.1, -0.08)  # eyes
    pts[:, 16], pts[:, 17] = nose + (-0.2, -0.02), nose + (0.2, -0.02)  # ears
    return pts


def choreography(seconds: float, bpm: float = 120.0, fps: float = 24.0, *, width: int = 256,
                 height: int = 448, centre: tuple[float, float] = (0.5, 0.5),
                 scale: float = 0.8, seed: int = 0,
                 moves: np.ndarray | None = None) -> Choreography:
    """A dancer who makes one of :data:`MOVES` on every beat (``seed`` picks them, or give
    ``moves``), standing with the mid-torso at ``centre`` ([0, 1] of the frame) and as tall as
    ``scale`` of the frame height. Beats fall at t = i * 60 / bpm, as in :func:`beat_track`."""
    n = int(round(seconds * fps))
    period = fps * 60.0 / bpm  # frames per beat
    beats = np.arange(0.0, n, period)
    if moves is None:
        moves = np.random.default_rng(seed).integers(0, len(MOVES), len(beats))
    moves = np.asarray(moves, np.int64)
    if len(moves) < len(beats):
        raise ValueError(f"{len(beats)} beats need as many moves, got {len(moves)}")
    f = np.arange(n, dtype=np.float64)
    beat_i = np.minimum((f / period).astype(np.int64), len(beats) - 1)
    phase = f / period - beat_i
    units = body_units_pose(moves[beat_i], phase)
    px = height * scale / BODY_HEIGHT_UNITS  # pixels per body unit
    mid_torso_units = np.array([0.0, _TORSO / 2])
    xy = (units - mid_torso_units) * px + np.array([centre[0] * width, centre[1] * height])
    kp = np.concatenate([xy / np.array([width, height]), np.ones((n, 18, 1))], -1)
    return Choreography(keypoints=kp.astype(np.float32), beat_frames=beats,
                        moves=moves[: len(beats)], fps=float(fps), bpm=float(bpm), width=width,
                        height=height, centre=(float(centre[0]), float(centre[1])),
                        scale=float(scale))


_ARM_JOINTS = (3, 4, 6, 7)  # elbows and wrists: where the moves differ
_CHECK_POINTS = 16  # samples per beat interval


def _to_body_units(coords: np.ndarray, width: int, height: int) -> np.ndarray:
    """(T, 18, 2) in [0, 1] -> body units of that dancer: neck at 0, torso (neck to mid-hip) 1,
    measured per clip (median), so placement and size do not matter."""
    px = coords[..., :2] * np.array([width, height])
    neck = px[:, 1]
    mid_hip = (px[:, 8] + px[:, 11]) / 2
    torso = float(np.median(np.linalg.norm(mid_hip - neck, axis=-1)))
    return (px - neck[:, None]) / max(torso, 1e-6)


def move_templates() -> np.ndarray:
    """(len(MOVES) + 1, _CHECK_POINTS, 4, 2): each move's elbows and wrists over a beat in body
    units; the last entry is the arms at rest."""
    phase = np.linspace(0.0, 1.0, _CHECK_POINTS)
    out = [body_units_pose(np.full(_CHECK_POINTS, m), phase)[:, _ARM_JOINTS]
           for m in (*range(len(MOVES)), -1)]
    return np.stack(out)


def classify_moves(coords: np.ndarray, beat_frames: np.ndarray, width: int, height: int,
                   tolerance: float = 0.12, max_shift: float = 2.0) -> np.ndarray:
    """The move made in each beat interval (index into :data:`MOVES`), or -1 where it is none of
    them: the RMS distance of elbows and wrists to every move's path, in torso lengths, is above
    ``tolerance`` (a move up to ``max_shift`` frames early or late still counts), or the arms
    stay nearest to rest. One entry per beat whose next beat lies inside the clip.

    ``coords``: (T, 18, 2 or 3) in [0, 1] of a ``width`` x ``height`` frame."""
    units = _to_body_units(np.asarray(coords, np.float64), width, height)[:, _ARM_JOINTS]
    templates = move_templates()
    t = np.arange(len(units), dtype=np.float64)
    beats = np.asarray(beat_frames, np.float64)
    labels = []
    for a, b in zip(beats[:-1], beats[1:]):
        if b > len(units) - 1:
            break
        best_err = np.full(len(templates), np.inf)
        for shift in np.arange(-max_shift, max_shift + 0.5, 0.5):
            at = np.clip(np.linspace(a, b, _CHECK_POINTS) + shift, 0, len(units) - 1)
            traj = np.stack([np.stack([np.interp(at, t, units[:, j, c]) for c in range(2)], -1)
                             for j in range(units.shape[1])], 1)  # (P, 4, 2)
            err = np.sqrt(((templates - traj[None]) ** 2).sum(-1).mean(axis=(1, 2)))
            best_err = np.minimum(best_err, err)
        best = int(np.argmin(best_err))
        labels.append(best if best < len(MOVES) and best_err[best] <= tolerance else -1)
    return np.asarray(labels, np.int64)


def valid_moves(coords: np.ndarray, beat_frames: np.ndarray, width: int, height: int,
                tolerance: float = 0.12, max_shift: float = 2.0) -> float:
    """Share of beat intervals in which ``coords`` make one of :data:`MOVES` (see
    :func:`classify_moves`)."""
    labels = classify_moves(coords, beat_frames, width, height, tolerance, max_shift)
    return float((labels >= 0).mean()) if len(labels) else 0.0


# ---------------------------------------------------------------------------------------------
# The demo corpus: choreography clips whose pictures and keypoints files agree
# ---------------------------------------------------------------------------------------------
DEMO_TEMPOS = (96.0, 108.0, 120.0, 132.0, 144.0)  # BPM of the training clips, cycled
DEMO_SONG_TEMPO = 114.0  # the demo's new beat track: a tempo no training clip has
# where the demo's reference photo puts the dancer (mid-torso, [0, 1]) and how tall (of the
# frame): off-centre and smaller than any training clip (x 0.35-0.65, 55-75% tall)
DEMO_REFERENCE_PLACE = ((0.3, 0.56), 0.5)
REST_MOVE = -1  # body_units_pose's arms at rest


def unit_pixels(c: Choreography) -> float:
    """Pixels per body unit (the torso length) of a choreography's dancer."""
    return c.height * c.scale / BODY_HEIGHT_UNITS


def render_dancer(keypoints: np.ndarray, width: int, height: int, unit_px: float,
                  hue: int = 0) -> np.ndarray:
    """One frame of the figure drawn on its keypoints ((18, 2+) pixels): every limb from joint to
    joint and the head on the nose, so that the picture and the keypoints file agree."""
    img = np.zeros((height, width, 3), np.uint8)
    img[:] = np.linspace(40, 90, height, dtype=np.uint8)[:, None, None]  # floor-to-wall gradient
    color = tuple(int(v) for v in
                  cv2.cvtColor(np.uint8([[[hue % 180, 160, 230]]]), cv2.COLOR_HSV2RGB)[0, 0])
    thick = max(2, int(round(0.14 * unit_px)))
    pt = [tuple(int(round(v)) for v in keypoints[j, :2]) for j in range(len(keypoints))]
    for a, b in BODY_LIMBS:
        if a in (0, 14, 15, 16, 17) or b in (0, 14, 15, 16, 17):
            continue  # the head is a disc, drawn last
        cv2.line(img, pt[a], pt[b], color, thick, cv2.LINE_AA)
    cv2.line(img, pt[1], pt[0], color, thick, cv2.LINE_AA)  # the neck up to the nose
    cv2.circle(img, pt[0], max(2, int(round(0.3 * unit_px))), (224, 182, 150), -1, cv2.LINE_AA)
    for eye in (14, 15):
        cv2.circle(img, pt[eye], max(1, int(round(0.05 * unit_px))), (30, 30, 30), -1,
                   cv2.LINE_AA)
    return img


def render_choreography(c: Choreography, hue: int = 0) -> list[np.ndarray]:
    px = c.keypoints[..., :2] * np.array([c.width, c.height])
    return [render_dancer(f, c.width, c.height, unit_pixels(c), hue) for f in px]


def keypoints_pixels(c: Choreography) -> np.ndarray:
    """(T, 18, 3): x, y in pixels of the frame, score."""
    return c.keypoints * np.array([c.width, c.height, 1.0], np.float32)


def make_choreography_clip(path: str | Path, seconds: float, bpm: float, fps: float = 24.0,
                           width: int = 128, height: int = 256,
                           centre: tuple[float, float] = (0.5, 0.5), scale: float = 0.7,
                           seed: int = 0, hue: int = 0) -> tuple[Path, Choreography]:
    """An mp4 of :func:`choreography` on its own beat track (beats at i * 60 / bpm, as the
    dance's), with its true keypoints beside it as ``<stem>.keypoints.json``."""
    path = Path(path)
    c = choreography(seconds, bpm, fps, width=width, height=height, centre=centre, scale=scale,
                     seed=seed)
    write_keypoints_file(path, keypoints_pixels(c), fps, width, height)
    wav = path.with_suffix(".wav")
    sf.write(wav, beat_track(seconds, bpm, seed=seed), AUDIO_SR)
    try:
        write_video(path, render_choreography(c, hue), fps, audio=wav, preset="veryfast")
    finally:
        wav.unlink(missing_ok=True)
    return path, c


def make_demo_corpus(out_dir: str | Path, n: int = 5, seconds: float = 4.0, fps: float = 24.0,
                     width: int = 128, height: int = 256, seed: int = 0) -> list[Path]:
    """``n`` choreography clips on beat tracks of :data:`DEMO_TEMPOS` (cycled), each placed and
    sized at random (mid-torso x in [0.35, 0.65], y in [0.45, 0.55]; 55-75% of the frame tall)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    clips = []
    for i in range(n):
        bpm = DEMO_TEMPOS[i % len(DEMO_TEMPOS)]
        centre = (float(rng.uniform(0.35, 0.65)), float(rng.uniform(0.45, 0.55)))
        scale = float(rng.uniform(0.55, 0.75))
        path, _ = make_choreography_clip(out_dir / f"dance_{i:02d}_{int(bpm)}bpm.mp4", seconds,
                                         bpm, fps, width, height, centre, scale,
                                         seed=seed * 1000 + i, hue=int(rng.integers(0, 180)))
        clips.append(path)
    return clips


def rest_pose(width: int, height: int, centre: tuple[float, float], scale: float) -> np.ndarray:
    """(18, 3) the dancer standing with the arms at rest (every move's first and last pose), x, y
    in [0, 1] of the frame."""
    units = body_units_pose(np.array([REST_MOVE]), np.zeros(1))[0]
    px = height * scale / BODY_HEIGHT_UNITS
    xy = (units - np.array([0.0, _TORSO / 2])) * px + np.array([centre[0] * width,
                                                               centre[1] * height])
    return np.concatenate([xy / np.array([width, height]), np.ones((18, 1))], -1).astype(np.float32)


def make_demo_reference(path: str | Path, width: int = 128, height: int = 256,
                        centre: tuple[float, float] = DEMO_REFERENCE_PLACE[0],
                        scale: float = DEMO_REFERENCE_PLACE[1], hue: int = 100) -> tuple[Path, np.ndarray]:
    """A PNG of the dancer at rest, standing where no training clip puts them, with its
    keypoints (one frame) beside it; returns (path, (18, 3) keypoints in [0, 1])."""
    path = Path(path)
    pose = rest_pose(width, height, centre, scale)
    px = pose * np.array([width, height, 1.0], np.float32)
    img = render_dancer(px, width, height, height * scale / BODY_HEIGHT_UNITS, hue)
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    write_keypoints_file(path, px[None], 24.0, width, height)
    return path, pose


def make_demo_song(path: str | Path, seconds: float, bpm: float = DEMO_SONG_TEMPO,
                   seed: int = 777) -> Path:
    """A beat track no training clip has (another tempo and seed), as a WAV file."""
    path = Path(path)
    sf.write(path, beat_track(seconds, bpm, seed=seed), AUDIO_SR)
    return path
