"""Media helpers shared by validation, generation, evaluation and the demo.

* :func:`draw_skeleton`, :func:`side_by_side`, :func:`image_grid`: pictures as uint8 RGB arrays.
* :func:`write_video`: H.264 mp4 (yuv420p) through an ``ffmpeg`` subprocess fed raw frames on
  stdin, optionally muxed with the audio track of any file ffmpeg reads. Same input -> same bytes.
* :func:`skeleton_video`: a pose sequence as a video, over black or over background frames.
* :func:`probe` (ffprobe as a dict) and :func:`load_audio` (mono float32 from any file's audio):
  the project's one ffprobe wrapper and one audio loader (preprocessing uses both).

All arrays are RGB (not OpenCV's BGR). Pose coordinates follow ``contract``: x, y in [0, 1] of
the frame, plus a score. Everything here needs the Debian ``ffmpeg`` / ``ffprobe`` binaries only
for the video and audio functions; drawing needs OpenCV.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from . import contract, storage
from .errors import UserFacingError

__all__ = [
    "MediaError",
    "LIMB_COLORS",
    "draw_skeleton",
    "side_by_side",
    "image_grid",
    "write_video",
    "skeleton_video",
    "UnreadableMediaError",
    "probe",
    "load_audio",
]


class MediaError(UserFacingError):
    """A media file could not be read or written; the message names the file and the reason."""


class UnreadableMediaError(MediaError):
    """ffprobe cannot read the file (not media, or corrupt); ``detail`` is ffprobe's reason."""

    def __init__(self, path: str, detail: str, timed_out: bool = False):
        super().__init__(f"{path}: ffprobe cannot read it ({detail})")
        self.detail = detail
        self.timed_out = timed_out


# OpenPose's rainbow: one colour per limb of contract.BODY_LIMBS (RGB), and per joint.
_RAINBOW = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
LIMB_COLORS: tuple[tuple[int, int, int], ...] = _RAINBOW[: len(contract.BODY_LIMBS)]
JOINT_COLORS: tuple[tuple[int, int, int], ...] = _RAINBOW[: contract.NUM_BODY_JOINTS]


# ---------------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------------
def _as_rgb_uint8(image: np.ndarray, what: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"{what}: expected HxWx3 RGB, got shape {image.shape}")
    image = image[:, :, :3]
    if image.dtype != np.uint8:
        unit_range = image.size and float(np.nanmax(image)) <= 1.0
        if np.issubdtype(image.dtype, np.floating) and unit_range:
            image = image * 255.0  # float images in [0, 1]
        image = np.clip(np.nan_to_num(image), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    w, h = int(size[0]), int(size[1])
    if image.shape[1] == w and image.shape[0] == h:
        return image.copy()
    interp = cv2.INTER_AREA if w * h < image.shape[0] * image.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(image, (w, h), interpolation=interp)


def draw_skeleton(
    image: np.ndarray | None,
    body: np.ndarray,
    color: tuple[int, int, int] | None = None,
    min_score: float = 0.3,
    size: tuple[int, int] | None = None,
    thickness: int | None = None,
) -> np.ndarray:
    """Draw an 18-joint OpenPose body on ``image`` (or on black) and return a new uint8 RGB array.

    body: (18, 2) or (18, 3) with x, y in [0, 1] of the picture and an optional score; joints
    with a score below ``min_score`` or non-finite coordinates are left out, and so are limbs
    touching them. color: one RGB colour for everything, or None for OpenPose's per-limb colours.
    size: (W, H) of the output; required when ``image`` is None, else the image is resized to it.
    """
    body = np.asarray(body, dtype=np.float32)
    if body.ndim != 2 or body.shape[0] != contract.NUM_BODY_JOINTS or body.shape[1] not in (2, 3):
        raise ValueError(f"body: expected ({contract.NUM_BODY_JOINTS}, 3), got {body.shape}")
    if image is None:
        if size is None:
            raise ValueError("draw_skeleton: give an image or size=(W, H)")
        canvas = np.zeros((int(size[1]), int(size[0]), 3), np.uint8)
    else:
        canvas = _as_rgb_uint8(image)
        canvas = _resize(canvas, size) if size is not None else canvas.copy()
    h, w = canvas.shape[:2]
    if thickness is None:  # scale strokes with the picture: 4 px at 512 wide
        thickness = max(1, round(min(w, h) / 128))
    radius = max(1, thickness)

    score = body[:, 2] if body.shape[1] == 3 else np.ones(len(body), np.float32)
    visible = np.isfinite(body[:, :2]).all(axis=1) & (score >= min_score)
    pts = np.zeros((len(body), 2), np.int64)
    pts[visible] = np.round(body[visible, :2] * np.array([w, h], np.float32)).astype(np.int64)
    # keep cv2 away from absurd coordinates (it draws with int32)
    pts = np.clip(pts, -4 * max(w, h), 5 * max(w, h))

    for (a, b), limb_color in zip(contract.BODY_LIMBS, LIMB_COLORS):
        if visible[a] and visible[b]:
            c = tuple(int(v) for v in (color or limb_color))
            cv2.line(canvas, tuple(map(int, pts[a])), tuple(map(int, pts[b])), c, thickness,
                     cv2.LINE_AA)  # fmt: skip
    for j in np.flatnonzero(visible):
        c = tuple(int(v) for v in (color or JOINT_COLORS[j]))
        cv2.circle(canvas, tuple(map(int, pts[j])), radius + 1, c, -1, cv2.LINE_AA)
    return canvas


def _label(image: np.ndarray, text: str) -> np.ndarray:
    scale = max(0.4, image.shape[1] / 640)
    thick = max(1, round(scale * 1.5))
    org = (int(6 * scale), int(22 * scale))
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(image, text, org, font, scale, (0, 0, 0), thick + 2, cv2.LINE_AA)  # outline
    cv2.putText(image, text, org, font, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return image


def side_by_side(
    pred: np.ndarray,
    target: np.ndarray,
    image: np.ndarray | None = None,
    size: tuple[int, int] | None = None,
    min_score: float = 0.3,
    labels: bool = True,
) -> np.ndarray:
    """"Predicted vs target" picture: three panels [target | predicted | both overlaid].

    pred, target: (18, 2|3) bodies in [0, 1]. image: optional background (drawn under every
    panel). size: (W, H) of one panel; default the image's size, or 256x448 without an image.
    In the overlay the target is white and the prediction keeps OpenPose's colours.
    """
    if size is None:
        size = (image.shape[1], image.shape[0]) if image is not None else (256, 448)
    panel_bg = _resize(_as_rgb_uint8(image), size) if image is not None else None
    left = draw_skeleton(panel_bg, target, min_score=min_score, size=size)
    mid = draw_skeleton(panel_bg, pred, min_score=min_score, size=size)
    both = draw_skeleton(panel_bg, target, color=(255, 255, 255), min_score=min_score, size=size)
    both = draw_skeleton(both, pred, min_score=min_score)
    if labels:
        _label(left, "target")
        _label(mid, "predicted")
        _label(both, "overlay")
    return np.concatenate([left, mid, both], axis=1)


def image_grid(
    images: Sequence[np.ndarray], cols: int, pad: int = 0, background: int = 0
) -> np.ndarray:
    """Tile images row-major into ``cols`` columns. Cells take the largest height and width;
    smaller images sit at the top-left of their cell. Grey images become RGB."""
    if not len(images):
        raise ValueError("image_grid: no images")
    if cols < 1:
        raise ValueError(f"image_grid: cols must be >= 1, got {cols}")
    imgs = [_as_rgb_uint8(im, f"image_grid[{i}]") for i, im in enumerate(images)]
    cols = min(cols, len(imgs))
    rows = -(-len(imgs) // cols)
    ch = max(im.shape[0] for im in imgs)
    cw = max(im.shape[1] for im in imgs)
    grid = np.full((rows * ch + (rows - 1) * pad, cols * cw + (cols - 1) * pad, 3), background,
                   np.uint8)  # fmt: skip
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        y, x = r * (ch + pad), c * (cw + pad)
        grid[y : y + im.shape[0], x : x + im.shape[1]] = im
    return grid


# ---------------------------------------------------------------------------------------------
# ffmpeg / ffprobe
# ---------------------------------------------------------------------------------------------
def _binary(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        raise MediaError(
            f"{name} was not found on PATH; install it (Debian/Ubuntu: apt-get install ffmpeg)"
        )
    return exe


def _local_input(path: str | os.PathLike, what: str) -> str:
    p = str(path)
    if storage.is_url(p):
        return p  # ffmpeg reads http(s) itself; other schemes fail with ffmpeg's own message
    if p.startswith("file://"):
        p = p[len("file://") :]
    if not os.path.isfile(p):
        raise MediaError(f"{what} {p}: no such file")
    return p


def _fps_of(rate: str | None) -> float | None:
    try:
        f = Fraction(rate) if rate else None
    except (ValueError, ZeroDivisionError):
        return None
    return float(f) if f else None


def _rotation_of(stream: dict) -> int:
    """Degrees CLOCKWISE to turn decoded frames for display: the display matrix angle ffprobe
    prints is counter-clockwise (-90 on a phone video means: turn 90 degrees clockwise to show
    it); the old ``rotate`` tag is clockwise."""
    for side in stream.get("side_data_list", []) or []:
        if "rotation" in side:
            return int(round(-float(side["rotation"]))) % 360
    rot = (stream.get("tags") or {}).get("rotate")
    return int(round(float(rot))) % 360 if rot else 0


def probe(path: str | os.PathLike, timeout: float = 60) -> dict:
    """ffprobe a file. Returns::

        {"path", "format", "duration" (s or None), "has_video", "has_audio",
         "width", "height", "fps", "rotation", "num_frames"  (first real video stream, or None;
         width/height as coded; rotation = degrees clockwise to turn frames for display),
         "streams": [{"index", "codec_type", "codec_name", "duration", "fps", "width", "height",
                      "rotation", "num_frames", "sample_rate", "channels", "attached_pic",
                      "still_image", "default"}]}

    Cover art (an mjpeg "video" stream marked attached_pic, as in many .ogg/.mp3 files) is listed
    with ``attached_pic=True`` and does not count as video. A file ffprobe cannot read within
    ``timeout`` seconds raises :class:`UnreadableMediaError`.
    """
    src = _local_input(path, "probe:")
    cmd = [_binary("ffprobe"), "-v", "error", "-print_format", "json", "-show_format",
           "-show_streams", src]  # fmt: skip
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UnreadableMediaError(src, f"timed out after {timeout:g} s: corrupt file?",
                                   timed_out=True) from None
    if res.returncode != 0:
        msg = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "unreadable"
        raise UnreadableMediaError(src, msg)
    raw = json.loads(res.stdout or "{}")
    fmt = raw.get("format", {})

    def num(v, cast=float):
        try:
            return cast(v) if v not in (None, "N/A") else None
        except (TypeError, ValueError):
            return None

    streams = []
    for s in raw.get("streams", []):
        streams.append(
            {
                "index": s.get("index"),
                "codec_type": s.get("codec_type"),
                "codec_name": s.get("codec_name"),
                "duration": num(s.get("duration")),
                "fps": _fps_of(s.get("avg_frame_rate")) or _fps_of(s.get("r_frame_rate"))
                if s.get("codec_type") == "video" else None,  # fmt: skip
                "width": num(s.get("width"), int),
                "height": num(s.get("height"), int),
                "rotation": _rotation_of(s) if s.get("codec_type") == "video" else 0,
                "num_frames": num(s.get("nb_frames"), int),
                "sample_rate": num(s.get("sample_rate"), int),
                "channels": num(s.get("channels"), int),
                "attached_pic": bool((s.get("disposition") or {}).get("attached_pic", 0)),
                "still_image": bool((s.get("disposition") or {}).get("still_image", 0)),
                "default": bool((s.get("disposition") or {}).get("default", 0)),
            }
        )
    videos = [s for s in streams if s["codec_type"] == "video" and not s["attached_pic"]]
    v = videos[0] if videos else {}
    return {
        "path": src,
        "format": fmt.get("format_name"),
        "duration": num(fmt.get("duration")),
        "has_video": bool(videos),
        "has_audio": any(s["codec_type"] == "audio" for s in streams),
        "width": v.get("width"),
        "height": v.get("height"),
        "fps": v.get("fps"),
        "rotation": v.get("rotation", 0),
        "num_frames": v.get("num_frames"),
        "streams": streams,
    }


def load_audio(
    path: str | os.PathLike,
    sr: int = 22050,
    start: float = 0.0,
    duration: float | None = None,
) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of any file ffmpeg reads (mp4, ogg with cover art, wav, ...)
    to mono float32 at ``sr`` Hz. ``start``/``duration`` in seconds select a window.
    Returns (samples, sr). Raises MediaError naming the file when it has no audio stream."""
    src = _local_input(path, "load_audio:")
    cmd = [_binary("ffmpeg"), "-nostdin", "-v", "error"]
    if start:
        cmd += ["-ss", f"{float(start):.6f}"]  # an input option: ffmpeg seeks, not decodes
    cmd += ["-i", src]
    if duration is not None:
        cmd += ["-t", f"{float(duration):.6f}"]
    cmd += ["-map", "0:a:0", "-vn", "-ac", "1", "-ar", str(int(sr)),
            "-f", "f32le", "-acodec", "pcm_f32le", "pipe:1"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True)
    if res.returncode != 0:
        err = res.stderr.decode(errors="replace").strip()
        if "matches no streams" in err:  # ffmpeg's words for a -map with nothing to map
            raise MediaError(f"{src}: has no audio stream")
        last = err.splitlines()[-1] if err else "error"
        raise MediaError(f"{src}: ffmpeg cannot decode its audio ({last})")
    samples = np.frombuffer(res.stdout, dtype="<f4").astype(np.float32)
    return samples, int(sr)


def _frames_iter(frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    if isinstance(frames, np.ndarray) and frames.ndim == 3:  # one frame, not a clip
        frames = frames[None]
    yield from frames


def _new_file_mode() -> int:
    """The mode a plainly created file gets (0666 less the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_video(
    path: str | os.PathLike,
    frames: Iterable[np.ndarray],
    fps: float,
    audio: str | os.PathLike | None = None,
    audio_start: float = 0.0,
    audio_duration: float | None = None,
    crf: int = 18,
    preset: str = "medium",
    threads: int = 1,
    audio_bitrate: str = "192k",
) -> str:
    """Write frames (an iterable of HxWx3 uint8 RGB, all the same size) as an H.264 mp4.

    * yuv420p; odd sizes are padded to even with black (one pixel right/bottom).
    * audio: any file ffmpeg reads; its first AUDIO stream is used (cover-art video streams are
      ignored), from ``audio_start`` s, for at most ``audio_duration`` s, encoded as AAC. The
      audio track is then cut, or padded with silence, to exactly the video's length.
    * Deterministic: same frames + same audio + same options -> same bytes (bitexact flags, no
      metadata, and a FIXED x264 thread count, since x264's output depends on it; keep
      ``threads`` constant when bytes must match across machines).
    * Atomic: written under a temporary name next to ``path``, renamed when complete.
      fsspec URLs are written locally first, then uploaded atomically.

    Returns the path written. Raises ValueError for bad frames, MediaError for ffmpeg failures.
    """
    if not fps or fps <= 0:
        raise ValueError(f"write_video {path}: fps must be > 0, got {fps}")
    ffmpeg = _binary("ffmpeg")
    audio_src = _local_input(audio, "write_video: audio file") if audio is not None else None
    if audio_src is not None and not probe(audio_src)["has_audio"]:
        raise MediaError(f"{audio_src}: has no audio stream (asked to mux it into {path})")

    out = str(path)
    remote = storage.is_url(out)
    if out.startswith("file://"):
        out = out[len("file://") :]
    final_dir = tempfile.gettempdir() if remote else (os.path.dirname(os.path.abspath(out)) or ".")
    os.makedirs(final_dir, exist_ok=True)
    base = os.path.basename(out)
    tmp_video = tempfile.NamedTemporaryFile(
        dir=final_dir, prefix=f"{storage.TMP_MARK}{base}-v-", suffix=".mp4", delete=False
    ).name
    tmp_final = tempfile.NamedTemporaryFile(
        dir=final_dir, prefix=f"{storage.TMP_MARK}{base}-", suffix=".mp4", delete=False
    ).name
    bitexact = ["-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact",
                "-map_metadata", "-1", "-map_chapters", "-1"]  # fmt: skip
    try:
        it = _frames_iter(frames)
        first = next(it, None)
        if first is None:
            raise ValueError(f"write_video {out}: no frames")
        first = _as_rgb_uint8(first, f"write_video {out}: frame 0")
        h, w = first.shape[:2]
        rate = Fraction(fps).limit_denominator(1001)
        # pass 1: video only. Frames go in raw on stdin; the pad filter makes sizes even.
        cmd = [ffmpeg, "-nostdin", "-v", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(rate),
               "-i", "pipe:0",
               "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2:0:0:black,format=yuv420p",
               "-c:v", "libx264", "-preset", preset, "-crf", str(int(crf)),
               "-threads", str(int(threads)), "-pix_fmt", "yuv420p",
               *bitexact, "-an", "-f", "mp4", tmp_video]  # fmt: skip
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        n = 0
        try:
            frame = first
            while frame is not None:
                if frame.shape[:2] != (h, w):
                    raise ValueError(
                        f"write_video {out}: frame {n} is {frame.shape[1]}x{frame.shape[0]}, "
                        f"frame 0 is {w}x{h}; all frames must have the same size"
                    )
                proc.stdin.write(frame.tobytes())
                n += 1
                nxt = next(it, None)
                frame = None if nxt is None else _as_rgb_uint8(nxt, f"write_video {out}: frame {n}")
            proc.stdin.close()
        except BrokenPipeError:
            pass  # ffmpeg died; its stderr below says why
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        err = proc.stderr.read().decode(errors="replace")
        if proc.wait() != 0:
            raise MediaError(f"write_video {out}: ffmpeg failed: {err.strip()[-500:]}")

        if audio_src is None:
            os.replace(tmp_video, tmp_final)
        else:
            # pass 2: copy the video, add the audio cut/padded to the exact video length.
            length = n / float(rate)
            cmd = [ffmpeg, "-nostdin", "-v", "error", "-y", "-i", tmp_video]
            if audio_start:
                cmd += ["-ss", f"{float(audio_start):.6f}"]
            if audio_duration is not None:  # input option: cuts the audio only, not the video
                cmd += ["-t", f"{float(audio_duration):.6f}"]
            cmd += ["-i", audio_src, "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy",
                    "-af", "apad", "-c:a", "aac", "-b:a", audio_bitrate,
                    "-t", f"{length:.6f}", *bitexact, "-f", "mp4", tmp_final]  # fmt: skip
            res = subprocess.run(cmd, capture_output=True)
            if res.returncode != 0:
                msg = res.stderr.decode(errors="replace").strip()[-500:]
                raise MediaError(f"write_video {out}: muxing audio from {audio_src} failed: {msg}")
        if remote:
            with open(tmp_final, "rb") as fh:
                storage.atomic_write_bytes(out, fh.read())
        else:
            os.chmod(tmp_final, _new_file_mode())  # temp files are 0600; outputs are not
            os.replace(tmp_final, out)
    finally:
        for tmp in (tmp_video, tmp_final):
            if os.path.exists(tmp):
                os.remove(tmp)
    return str(path)


def skeleton_video(
    path: str | os.PathLike,
    poses: np.ndarray,
    fps: float,
    size: tuple[int, int] = (512, 896),
    audio: str | os.PathLike | None = None,
    background_frames: Iterable[np.ndarray] | None = None,
    audio_start: float = 0.0,
    min_score: float = 0.3,
    color: tuple[int, int, int] | None = None,
    **video_kwargs,
) -> str:
    """Render poses (T, 18, 2|3) as an mp4 of size (W, H), over black or over
    ``background_frames`` (resized to ``size``; the video stops at the shorter of the two).
    ``audio``/``audio_start`` and further keyword arguments go to :func:`write_video`."""
    poses = np.asarray(poses, dtype=np.float32)
    if poses.ndim != 3 or poses.shape[1] != contract.NUM_BODY_JOINTS:
        raise ValueError(f"skeleton_video {path}: poses must be (T, 18, 3), got {poses.shape}")

    def gen() -> Iterator[np.ndarray]:
        bgs = iter(background_frames) if background_frames is not None else None
        for body in poses:
            bg = None
            if bgs is not None:
                bg = next(bgs, None)
                if bg is None:
                    return
            yield draw_skeleton(bg, body, color=color, min_score=min_score, size=size)

    return write_video(path, gen(), fps, audio=audio, audio_start=audio_start, **video_kwargs)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as uint8 RGB (MediaError naming the file when unreadable)."""
    data = np.frombuffer(storage.read_bytes(path), np.uint8) if storage.exists(path) else None
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data is not None and data.size else None
    if img is None:
        raise MediaError(f"{path}: not a readable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def write_image(path: str | os.PathLike, image: np.ndarray) -> str:
    """Write uint8 RGB as PNG/JPEG (by extension), atomically."""
    ext = Path(str(path)).suffix.lower() or ".png"
    ok, buf = cv2.imencode(ext, cv2.cvtColor(_as_rgb_uint8(image), cv2.COLOR_RGB2BGR))
    if not ok:
        raise MediaError(f"{path}: cannot encode an image with extension {ext}")
    storage.atomic_write_bytes(path, buf.tobytes())
    return str(path)
