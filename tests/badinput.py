"""The bad-input corpus of the fault tests, generated with ffmpeg (lavfi testsrc / sine) and the
project's own synthetic dancer, so nothing is downloaded and nothing is shipped.

:func:`make_corpus` writes a folder of videos, one per case, and returns what each case must
become in ``report.json``: its status ("ok" / "skipped" / "failed"), a regular expression its
reason must match, and what "handled" means for the cases that must succeed.

Every good clip carries a *timing band*: the top rows of frame ``i`` are grey level
``band_level(i)``, so the frame a sample shows can be read back from its thumbnail (VFR and
rotation checks compare content, not only metadata).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FPS = 24
W, H = 72, 128  # portrait, like dance video
BAND_ROWS = 20  # rows of the timing band at the top of every frame
BAND_BASE, BAND_STEP = 16, 6


def band_level(i: int) -> int:
    return BAND_BASE + BAND_STEP * i


def band_index(level: float) -> int:
    """Frame index from a measured band grey level."""
    return int(round((float(level) - BAND_BASE) / BAND_STEP))


@dataclass
class Case:
    name: str  # path inside the corpus folder
    expect: str  # "ok", "skipped" or "failed"
    reason: str  # regex the report's reason must match ("" for ok)
    about: str  # what the file is (the report table's first column)
    handled: str = ""  # for ok cases: what the test checks beyond the status


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr[-800:]}")


def ffmpeg(*args: str) -> None:
    _run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args])


def dancer_frames(n: int, seed: int = 0, width: int = W, height: int = H,
                  band: bool = True) -> list[np.ndarray]:
    """The synthetic stick-figure dancer, with the timing band on top."""
    from dwm.shared.synthetic import dancer_pose, render_frame

    rng = np.random.default_rng(seed)
    phase, hue = float(rng.uniform(0, 2 * np.pi)), int(rng.integers(0, 180))
    frames = []
    for i in range(n):
        f = render_frame(dancer_pose(i / FPS, 120.0, width, height, phase), width, height, hue)
        if band:
            f[:BAND_ROWS] = band_level(i) % 256
        frames.append(f)
    return frames


def good_clip(path: Path, seconds: float = 1.5, seed: int = 0, audio: bool = True,
              fps: int = FPS) -> Path:
    """A clean dancer clip (H.264 + AAC beat track) written by the project's own writer."""
    import soundfile as sf

    from dwm.shared.media import write_video
    from dwm.shared.synthetic import AUDIO_SR, beat_track

    n = int(round(seconds * fps))
    wav = None
    if audio:
        wav = path.with_name(path.stem + ".wav")
        sf.write(wav, beat_track(seconds, 120.0, seed=seed), AUDIO_SR)
    try:
        write_video(path, dancer_frames(n, seed), fps, audio=wav)
    finally:
        if wav is not None:
            wav.unlink(missing_ok=True)
    return path


def make_corpus(root: str | Path, seconds: float = 1.5) -> tuple[Path, dict[str, Case]]:
    """Write ``<root>/videos/`` (the input folder) and return it with the cases by file name."""
    root = Path(root)
    src = root / "src"  # intermediate files, outside the input folder
    vids = root / "videos"
    src.mkdir(parents=True, exist_ok=True)
    vids.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    good = good_clip(vids / "good.mp4", seconds, seed=0)
    cases.append(Case("good.mp4", "ok", "", "clean clip with audio",
                      "samples in train/val shards"))

    # the same bytes under a second name, and a symlink to it: computed once
    shutil.copyfile(good, vids / "good_copy.mp4")
    cases.append(Case("good_copy.mp4", "skipped", r"same content as .*good\.mp4",
                      "the same video under a second name"))
    os.symlink(good.resolve(), vids / "good_link.mp4")
    cases.append(Case("good_link.mp4", "skipped", r"same content as .*good\.mp4",
                      "symlink to good.mp4"))

    name = "name with spaces ü ñ 日本.mp4"
    good_clip(vids / name, seconds, seed=1)
    cases.append(Case(name, "ok", "", "file name with spaces and non-ASCII",
                      "sample 'source' keeps the name"))

    (vids / "zero.mp4").write_bytes(b"")
    cases.append(Case("zero.mp4", "failed", r"zero\.mp4.*empty", "zero-byte file"))

    (vids / "notes.mp4").write_text("this is a text file, not a video\n" * 50)
    cases.append(Case("notes.mp4", "skipped", r"notes\.mp4.*not a readable media file",
                      "text file named .mp4"))

    ffmpeg("-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}", "-c:a", "aac",
           str(vids / "audio_only.mp4"))
    cases.append(Case("audio_only.mp4", "skipped", r"audio_only\.mp4.*audio-only",
                      "audio-only file"))

    good_clip(vids / "video_only.mp4", seconds, seed=2, audio=False)
    cases.append(Case("video_only.mp4", "ok", "", "video without audio",
                      "has_audio=false: kept for B/C, unusable for A"))

    ffmpeg("-i", str(good), "-frames:v", "1", "-an", str(vids / "one_frame.mp4"))
    cases.append(Case("one_frame.mp4", "skipped", r"one_frame\.mp4.*1 frame", "1-frame video"))

    ffmpeg("-f", "lavfi", "-i", "testsrc=size=10000x10:rate=24:duration=1", "-pix_fmt",
           "yuv420p", "-c:v", "libx264", "-preset", "ultrafast", str(vids / "wide_10000x10.mp4"))
    cases.append(Case("wide_10000x10.mp4", "skipped",
                      r"wide_10000x10\.mp4.*(aspect|too (small|wide|narrow|thin))",
                      "10000x10 video"))

    # truncated mid-mdat: moov in front (faststart), then the file is cut at 55%
    full = src / "faststart.mp4"
    ffmpeg("-i", str(good_clip(src / "trunc_src.mp4", 2 * seconds, seed=3)), "-c", "copy",
           "-movflags", "+faststart", str(full))
    data = full.read_bytes()
    (vids / "truncated.mp4").write_bytes(data[: int(len(data) * 0.55)])
    cases.append(Case("truncated.mp4", "failed", r"truncated\.mp4.*(truncat|corrupt|decod)",
                      "mp4 cut in the middle of its mdat"))

    # variable frame rate: frames 8..19 dropped, the others keep their timestamps
    cfr = good_clip(src / "vfr_src.mp4", seconds, seed=4, audio=True)
    ffmpeg("-i", str(cfr), "-vf", "select='not(between(n\\,8\\,19))'", "-fps_mode", "passthrough",
           "-c:v", "libx264", "-crf", "12", "-c:a", "copy", str(vids / "vfr.mp4"))
    cases.append(Case("vfr.mp4", "ok", "", "variable frame rate (12 frames missing)",
                      "frames follow the timestamps (band of frame 7 held over the gap)"))

    # rotation: stored landscape (the portrait clip turned 90 degrees clockwise) with a display
    # matrix that turns it back; ffmpeg's own autorotation shows the upright clip (checked)
    rot_src = good_clip(src / "rot_src.mp4", seconds, seed=5, audio=True)
    stored = src / "rot_stored.mp4"
    ffmpeg("-i", str(rot_src), "-vf", "transpose=1", "-c:v", "libx264", "-crf", "12",
           "-c:a", "copy", str(stored))
    ffmpeg("-i", str(stored), "-c", "copy", "-metadata:s:v:0", "rotate=90",
           str(vids / "rotated.mp4"))
    _check_display(vids / "rotated.mp4", rot_src, src)
    cases.append(Case("rotated.mp4", "ok", "", "stored 128x72 + display matrix (90 degrees)",
                      "rotation read, 72x128 upright, same pictures as the unrotated source"))
    return vids, {c.name: c for c in cases}


def first_frame(path: Path, png: Path) -> np.ndarray:
    """Frame 0 as ffmpeg shows it (autorotated), RGB."""
    import cv2

    ffmpeg("-i", str(path), "-frames:v", "1", str(png))
    return cv2.imread(str(png))[:, :, ::-1]


def _check_display(rotated: Path, upright: Path, scratch: Path) -> None:
    a = first_frame(rotated, scratch / "rot_disp.png").astype(int)
    b = first_frame(upright, scratch / "rot_orig.png").astype(int)
    if a.shape != b.shape or np.abs(a - b).mean() > 4:
        raise RuntimeError(f"{rotated}: ffmpeg does not show it upright; the corpus is wrong")


def sources(root: str | Path) -> dict[str, Path]:
    """Intermediate clips a test compares with (the VFR and rotation sources)."""
    root = Path(root) / "src"
    return {"vfr": root / "vfr_src.mp4", "rotated": root / "rot_src.mp4"}
