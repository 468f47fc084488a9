"""Generated dance clips with a beat track: the demo's default input and a test corpus.

The project ships no third-party footage, so ``just demo`` makes its own: a stick-figure dancer
with a face, whose arms, hips and knees move on the beat of a click-and-bass track. The motion is
tied to the beat so that stage A has something real to learn (music -> pose) and the Beat Align
Score of the clips is meaningfully above chance.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import soundfile as sf

from .contract import BODY_LIMBS, KEYPOINTS_SIDECAR_SUFFIX

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
    from .media import write_video

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


def make_demo_corpus(out_dir: str | Path, n: int = 3, seconds: float = 4.0, **kw) -> list[Path]:
    """``n`` clips at different tempi (100-140 BPM), each with its beat track."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bpms = np.linspace(100, 140, n) if n > 1 else [120.0]
    return [make_dance_clip(out_dir / f"synthetic_{i:02d}_{int(b)}bpm.mp4", seconds, float(b),
                            seed=i, **kw) for i, b in enumerate(bpms)]


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


def write_keypoints_file(video_path: str | Path, body: np.ndarray, fps: float, width: int,
                         height: int) -> Path:
    """Write ``<video stem>.keypoints.json`` beside ``video_path``."""
    video_path = Path(video_path)
    out = video_path.with_name(video_path.stem + KEYPOINTS_SIDECAR_SUFFIX)
    out.write_text(json.dumps(keypoints_document(body, fps, width, height)))
    return out
