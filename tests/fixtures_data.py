"""Fixtures for preprocessed data: real shards from the sample video (owned by the preprocess work).

``sample_dataset`` -> Path of a ``manifest.json``: the real dance video (shared/samples) split by
ffmpeg into two videos (0-7 s and 7-12 s, re-encoded at 540x960), preprocessed with the tiny
profile (tiny models), the real mediapipe pose, 256x448, 24 fps, 48-frame segments.
It has train AND val splits, audio, faces (stand-in detector, pose fallback), latents, clip and
thumbs. ``sample_dataset_dir`` is its output folder (shards, cache/, report.json);
``sample_videos_dir`` the two input clips; ``sample_dataset_cfg`` the PreprocessConfig used
(do not mutate it: ``copy.deepcopy`` it for variants).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import subprocess
from pathlib import Path

import pytest

__all__ = ["sample_videos_dir", "sample_dataset_cfg", "sample_dataset_dir", "sample_dataset",
           "make_sample_clips", "sample_preprocess_config", "one_torch_thread", "zstd_frames"]


def zstd_frames(data: bytes) -> list[bytes]:
    """Every zstd frame of an ``.npy.zst`` member, decompressed (zstandard alone, no project
    code: each is a whole ``.npy``)."""
    import zstandard

    out, rest = [], bytes(data)
    while rest:
        d = zstandard.ZstdDecompressor().decompressobj()
        out.append(d.decompress(rest))
        rest = d.unused_data
    return out

# (name, start s, duration s or None for the rest)
SAMPLE_CLIPS = (("dance_a.mp4", 0.0, 7.0), ("dance_b.mp4", 7.0, None))


def make_sample_clips(video: Path, out_dir: Path, size: str = "540:960") -> Path:
    """Split the real sample video into the two clips (H.264 + AAC), deterministic bytes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, start, dur in SAMPLE_CLIPS:
        cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-ss", f"{start}", "-i", str(video)]
        if dur is not None:
            cmd += ["-t", f"{dur}"]
        cmd += ["-vf", f"scale={size}", "-c:v", "libx264", "-preset", "ultrafast", "-crf", "23",
                "-c:a", "aac", "-b:a", "96k", "-map_metadata", "-1",
                "-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact",
                str(out_dir / name)]
        subprocess.run(cmd, check=True)
    return out_dir


def sample_preprocess_config(videos: Path, out: Path, models_cfg, **overrides):
    """The fixture's config: tiny profile, mediapipe pose, 256x448, 24 fps, 48-frame segments."""
    from dwm.shared.config import build_preprocess_config

    cfg = build_preprocess_config([
        f"input_dir={videos}", f"out={out}", "profile=tiny", "pose.backend=mediapipe",
        "decode.width=256", "decode.height=448", "decode.fps=24", "decode.segment_frames=48",
        "decode.min_frames=8", "workers=1", "device=cpu",
        *[f"{k}={v}" for k, v in overrides.items()],
    ])
    cfg.models = dataclasses.replace(models_cfg)
    return cfg


@pytest.fixture(scope="session")
def sample_videos_dir(tmp_path_factory, dance_video) -> Path:
    return make_sample_clips(dance_video, tmp_path_factory.mktemp("sample_videos"))


@pytest.fixture(scope="session")
def sample_dataset_cfg(sample_videos_dir, tiny_models_cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("sample_dataset")
    return sample_preprocess_config(sample_videos_dir, out, tiny_models_cfg)


@pytest.fixture(scope="session")
def sample_dataset_dir(sample_dataset_cfg) -> Path:
    from dwm.preprocess.run import main

    os.environ.setdefault("DWM_PROGRESS", "0")
    with one_torch_thread():
        rc = main(copy.deepcopy(sample_dataset_cfg))
    assert rc == 0
    return Path(sample_dataset_cfg.out)


@contextlib.contextmanager
def one_torch_thread():
    """The tiny VAE encodes one small frame per call: on a busy 2-core machine one thread is
    3-6x faster than two (measured), and it keeps the session's own setting afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sample_dataset(sample_dataset_dir) -> Path:
    manifest = sample_dataset_dir / "manifest.json"
    assert manifest.is_file(), f"preprocessing wrote no manifest in {sample_dataset_dir}"
    return manifest
