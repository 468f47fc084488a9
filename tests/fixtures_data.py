"""Fixtures for preprocessed data: real shards from the sample video.

``sample_dataset``: the real dance video (../shared/samples/dance_music.mp4) cut into two videos
(0-7 s and 7-12 s, re-encoded small so it is quick), preprocessed with the tiny profile (tiny
registry models, stand-in face ONNX) and the **mediapipe** pose backend (real pose), at 256x448,
24 fps, 48-frame segments. Two videos give a train and a val split. Paid once per session.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dwm.shared import config as C

SAMPLE_CLIPS = (("dance_a.mp4", 0.0, 7.0), ("dance_b.mp4", 7.0, 5.0))


def cut_clip(src: Path, dst: Path, start: float, seconds: float, width: int = 540) -> Path:
    """Re-encode a window of ``src`` (small, fast preset) with its audio."""
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-ss", str(start), "-t", str(seconds), "-i", str(src),
         "-vf", f"scale={width}:-2", "-c:v", "libx264", "-preset", "ultrafast", "-crf", "20",
         "-c:a", "aac", "-b:a", "96k", str(dst)],
        check=True,
    )
    return dst


def tiny_preprocess_config(videos: Path, out: Path, models_cfg, *extra: str):
    return C.build_preprocess_config([
        "profile=tiny", f"input_dir={videos}", f"out={out}", "pose.backend=mediapipe",
        f"models.models_dir={models_cfg.models_dir}", "decode.width=256", "decode.height=448",
        "decode.fps=24", "decode.segment_frames=48", *extra,
    ])


@pytest.fixture(scope="session")
def sample_videos_dir(tmp_path_factory, dance_video) -> Path:
    videos = tmp_path_factory.mktemp("sample_videos")
    for name, start, seconds in SAMPLE_CLIPS:
        cut_clip(dance_video, videos / name, start, seconds)
    return videos


@pytest.fixture(scope="session")
def sample_dataset_dir(tmp_path_factory, sample_videos_dir, tiny_models_cfg) -> Path:
    from dwm.preprocess import run

    out = tmp_path_factory.mktemp("sample_dataset")
    cfg = tiny_preprocess_config(sample_videos_dir, out, tiny_models_cfg)
    run.main(cfg)
    return out


@pytest.fixture(scope="session")
def sample_dataset(sample_dataset_dir) -> Path:
    manifest = sample_dataset_dir / "manifest.json"
    assert manifest.exists(), f"preprocessing wrote no manifest in {sample_dataset_dir}"
    return manifest
