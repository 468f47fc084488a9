"""Is this file a dance video? Judged by content (ffprobe through :func:`dwm.shared.media.probe`,
and decord), never by its name.

A file counts as a video when ffprobe finds a real video stream (not cover art: an ``attached_pic``
mjpeg stream in an .ogg/.mp3 is a picture, not a video), the stream has more than one frame, and
decord can open it and read its first frame. Everything else gets a one-line reason that names the
file. The probe also records what the shards' metadata needs: original fps, size, rotation, and
whether there is an audio track.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import decord

from dwm.shared import media

PROBE_VERSION = "1"

# Codecs that hold still pictures; a single-frame stream of these is an image, not a video.
_IMAGE_CODECS = {"png", "mjpeg", "bmp", "gif", "webp", "tiff", "jpeg2000", "ppm", "pgm", "pam"}


class NotAVideo(Exception):
    """The file is not usable as a video; ``status`` is "skipped" (not a video) or "failed"."""

    def __init__(self, reason: str, status: str = "skipped"):
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass
class ProbeInfo:
    orig_fps: float
    orig_width: int  # display orientation (after rotation)
    orig_height: int
    rotation: int  # degrees clockwise to turn the decoded frame for display: 0, 90, 180, 270
    num_frames: int  # decodable source frames (decord's count)
    duration: float  # seconds of video
    has_audio: bool
    video_codec: str
    audio_codec: str | None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ProbeInfo:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def _decord_open(path: str) -> tuple[int, float]:
    """(frames, fps) as decord counts them, after decoding the first frame: decord is what
    decodes the video later, so it must be able to."""
    vr = decord.VideoReader(path, num_threads=1)
    n = len(vr)
    fps = float(vr.get_avg_fps() or 0)
    if n > 0:
        vr[0]
    return n, fps


def _is_real_video(s: dict) -> bool:
    if s["codec_type"] != "video" or s["attached_pic"] or s["still_image"]:
        return False
    nb = s["num_frames"]
    return not (s["codec_name"] in _IMAGE_CODECS and nb is not None and nb <= 1)


def _ffprobe(path: str) -> dict:
    try:
        return media.probe(path)
    except media.UnreadableMediaError as e:
        status = "failed" if e.timed_out else "skipped"
        raise NotAVideo(f"{path}: not a readable media file ({e.detail})", status) from None


def probe_file(path: str) -> ProbeInfo:
    """Probe one file; raise :class:`NotAVideo` with the reason when it is not a usable video."""
    if not os.path.isfile(path):
        raise NotAVideo(f"{path}: not a regular file")
    if os.path.getsize(path) == 0:
        raise NotAVideo(f"{path}: empty file (0 bytes)", "failed")
    # ffprobe (a subprocess, most of it process start-up) and decord's open run side by side;
    # ffprobe's verdict is read first, so the reasons are those of ffprobe then decord
    with ThreadPoolExecutor(max_workers=1) as pool:
        probed = pool.submit(_ffprobe, path)
        try:
            opened: tuple[int, float] | Exception = _decord_open(path)
        except Exception as e:  # decord raises its own DECORDError / RuntimeError
            opened = e
        info = probed.result()
    streams = info["streams"]
    videos = [s for s in streams if _is_real_video(s)]
    audios = [s for s in streams if s["codec_type"] == "audio"]
    if not videos:
        if any(s["codec_type"] == "video" for s in streams) and audios:
            raise NotAVideo(f"{path}: audio with cover art only (its picture stream is not a video)")
        if audios:
            raise NotAVideo(f"{path}: audio-only file (no video stream)")
        if any(s["codec_type"] == "video" for s in streams):
            raise NotAVideo(f"{path}: a still image, not a video")
        raise NotAVideo(f"{path}: no video stream")
    vs = sorted(videos, key=lambda s: -int(s["default"]))[0]
    rotation = vs["rotation"]
    w, h = int(vs["width"] or 0), int(vs["height"] or 0)
    if rotation in (90, 270):
        w, h = h, w

    if isinstance(opened, Exception):
        text = str(opened).strip()
        msg = text.splitlines()[0][:200] if text else type(opened).__name__
        raise NotAVideo(f"{path}: video stream cannot be decoded (truncated or corrupt: {msg})",
                        "failed")
    n, fps = opened
    fps = fps or vs["fps"]
    if n <= 1:
        raise NotAVideo(f"{path}: video stream has {n} frame(s)")
    if not fps or fps <= 0 or fps > 1000:
        raise NotAVideo(f"{path}: video stream has no usable frame rate ({fps})", "failed")
    fmt_dur = float(info["duration"] or 0)
    return ProbeInfo(
        orig_fps=round(fps, 6),
        orig_width=w,
        orig_height=h,
        rotation=rotation,
        num_frames=int(n),
        duration=round(n / fps if fps else fmt_dur, 6),
        has_audio=bool(audios),
        video_codec=str(vs["codec_name"]),
        audio_codec=str(audios[0]["codec_name"]) if audios else None,
    )
