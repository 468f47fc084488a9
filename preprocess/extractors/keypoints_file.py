"""Keypoints read from a sidecar file instead of a pose model (``pose.backend=file``).

For researchers who already have 2D keypoints: DWpose or OpenPose run elsewhere, a mocap
projection, a dataset's own annotations. The file sits beside the video, ``<video stem>.keypoints.json``
(``dance.mp4`` -> ``dance.keypoints.json``), and holds one person per frame (JSON only)::

    {"layout": "openpose_18",          # or "openpose_25" (BODY_25), "coco_wholebody_133"
     "fps": 30,                        # frame rate of the keypoint frames
     "width": 1080, "height": 1920,    # the frame the pixel coordinates are in
     "frames": [[[x, y, score], ...],  # frame 0: one [x, y, score] per layout point
                null,                  # frame 1: nobody in the frame
                ...]}

A point with score 0 (or a non-finite x or y) is missing; a frame may also be a flat list of the
layout's 3 x N numbers (OpenPose's ``pose_keypoints_2d``). Coordinates are pixels of a
``width`` x ``height`` frame in display orientation; any size with the video's aspect ratio works
(they are scaled to the decode size). Frame k is at time k / fps; the file must cover the video:
its frame count may differ from ``video frames x fps / video fps`` by at most one.

This module only reads and checks the file; :mod:`.pose` maps it to our 18-joint layout.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dwm.shared.contract import KEYPOINTS_SIDECAR_SUFFIX as SIDECAR_SUFFIX
from dwm.shared.errors import UserFacingError

# points per frame of each layout
LAYOUTS = {"openpose_18": 18, "openpose_25": 25, "coco_wholebody_133": 133}
# the file may be one frame longer or shorter than the video (container and encoder round-off)
FRAME_COUNT_TOLERANCE = 1.0
ASPECT_TOLERANCE = 0.02  # the decode size is rounded up to whole pixels


class KeypointsFileError(UserFacingError):
    """A sidecar keypoints file that is missing or does not fit its video; the message names it."""


def sidecar_path(video_path: str | Path) -> Path:
    """``dir/dance.mp4`` -> ``dir/dance.keypoints.json``."""
    p = Path(video_path)
    return p.with_name(p.stem + SIDECAR_SUFFIX)


def is_sidecar(path: str | Path) -> bool:
    return str(path).endswith(SIDECAR_SUFFIX)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeypointsFileError(
            f"{path}: keypoints file missing (pose.backend=file reads each video's keypoints "
            f"from <video stem>{SIDECAR_SUFFIX} beside it)") from None
    except OSError as e:
        raise KeypointsFileError(f"{path}: cannot read the keypoints file ({e.strerror})") from None


def file_digest(path: str | Path) -> str:
    """Content hash of the sidecar (part of the pose entry's cache key)."""
    return hashlib.sha256(_read_bytes(Path(path))).hexdigest()[:16]


@dataclass
class KeypointsFile:
    path: Path
    layout: str
    fps: float
    width: float
    height: float
    points: np.ndarray  # (N, P, 3) float32: x, y in pixels of width x height, score (0: missing)
    present: np.ndarray  # (N,) bool: the frame holds a person (not null)

    @property
    def num_frames(self) -> int:
        return len(self.points)


def _positive(doc: dict, key: str, path: Path) -> float:
    if key not in doc:
        raise KeypointsFileError(f"{path}: missing key '{key}'")
    v = doc[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise KeypointsFileError(f"{path}: '{key}' must be a positive number, got {v!r}")
    return float(v)


def load(path: str | Path) -> KeypointsFile:
    """Read and check a sidecar file (its own consistency; :func:`check_fits` checks the video)."""
    path = Path(path)
    try:
        doc = json.loads(_read_bytes(path))
    except (UnicodeDecodeError, ValueError) as e:
        raise KeypointsFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise KeypointsFileError(f"{path}: the top level must be an object with 'layout', 'fps', "
                                 "'width', 'height' and 'frames'")
    layout = doc.get("layout")
    if layout not in LAYOUTS:
        raise KeypointsFileError(f"{path}: layout {layout!r} is not one of {sorted(LAYOUTS)}")
    fps = _positive(doc, "fps", path)
    width, height = _positive(doc, "width", path), _positive(doc, "height", path)
    frames = doc.get("frames")
    if not isinstance(frames, list) or not frames:
        raise KeypointsFileError(f"{path}: 'frames' must be a non-empty list (one entry per frame)")
    n_pts = LAYOUTS[layout]
    points = np.zeros((len(frames), n_pts, 3), np.float32)
    present = np.zeros(len(frames), bool)
    for k, frame in enumerate(frames):
        if frame is None or frame == []:
            continue
        try:
            a = np.asarray(frame, np.float64)
        except (TypeError, ValueError):
            raise KeypointsFileError(f"{path}: frame {k} is not a list of [x, y, score] "
                                     "numbers") from None
        if a.ndim == 1 and a.size % 3 == 0:  # OpenPose's flat pose_keypoints_2d
            a = a.reshape(-1, 3)
        if a.ndim != 2 or a.shape[1] != 3:
            raise KeypointsFileError(f"{path}: frame {k}: each point must be [x, y, score], got "
                                     f"an array of shape {list(a.shape)}")
        if a.shape[0] != n_pts:
            raise KeypointsFileError(f"{path}: frame {k} has {a.shape[0]} points; layout "
                                     f"{layout} has {n_pts} (wrong layout?)")
        missing = ~np.isfinite(a).all(axis=1) | ~(a[:, 2] > 0)
        a[missing] = 0.0
        points[k] = a
        present[k] = True
    return KeypointsFile(path, layout, fps, width, height, points, present)


def check_fits(kp: KeypointsFile, video_frames: int, video_fps: float, width: int,
               height: int) -> None:
    """The file covers the video (frame count at its fps) and has its aspect ratio."""
    expected = video_frames * kp.fps / video_fps
    if abs(kp.num_frames - expected) > FRAME_COUNT_TOLERANCE + 1e-6:
        raise KeypointsFileError(
            f"{kp.path}: {kp.num_frames} frames at {kp.fps:g} fps "
            f"({kp.num_frames / kp.fps:.2f} s); the video has {video_frames} frames at "
            f"{video_fps:g} fps ({video_frames / video_fps:.2f} s): wrong frame count")
    ar_file, ar_video = kp.width / kp.height, width / height
    if abs(ar_file - ar_video) > ASPECT_TOLERANCE * ar_video:
        raise KeypointsFileError(
            f"{kp.path}: keypoints are for a {kp.width:g}x{kp.height:g} frame; the video's frames "
            f"are {width}x{height} (another aspect ratio)")


def frame_at(kp: KeypointsFile, index: np.ndarray, fps: float) -> np.ndarray:
    """Keypoint frame of each decoded frame ``index`` at ``fps``: the one on screen at that time,
    ``floor(i * file_fps / fps)``, the rule the frame decoder uses for the video's own frames, so
    a file at the video's frame rate gives every decoded frame its own keypoints."""
    k = np.floor(np.asarray(index, np.float64) * kp.fps / fps + 1e-6).astype(np.int64)
    return np.clip(k, 0, kp.num_frames - 1)
