"""One small interface for every extractor (video2dataset style).

An extractor has a ``name``, a ``version`` (bump it when its output changes), the ``config`` that
affects its output (both go into the cache key), and is called on a *batch*: a
:class:`FrameBatch` of frames, or the audio track. Models load lazily on the first call, once
per process, on ``device`` ("cpu" or "cuda"). ``calls`` counts invocations, so a test can assert
that a cached run did no extractor work at all.

Per video: :meth:`reset` before the first batch, :meth:`finish` after the last one (for
video-level results such as the reference face embedding). :meth:`arrays` declares the per-frame
arrays (first axis = frames of the video) and the appended ones (variable length), so results are
written into the cache segment by segment and memory stays bounded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from dwm.shared.config import PreprocessConfig


@dataclass
class ArraySpec:
    tail: tuple[int, ...]  # shape after the first (frame or row) axis
    dtype: str
    doc: str
    per_frame: bool = True  # first axis = frames of the video; else rows appended per batch
    chunk: int = 0  # rows per chunk along the first axis (0: one segment)


@dataclass
class FrameBatch:
    frames: np.ndarray  # (B, H, W, 3) uint8 RGB
    index: np.ndarray  # (B,) frame indices in the video's resampled timeline
    seg_offset: np.ndarray  # (B,) index within the segment
    segment: int
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. pose points of these frames


@dataclass
class VideoContext:
    video_hash: str
    path: str
    num_frames: int  # resampled frames of all kept segments
    fps: float
    width: int  # frame size the extractor sees
    height: int
    duration: float = 0.0
    source_frames: int = 0  # frames of the source video at source_fps (0: unknown)
    source_fps: float = 0.0


class Extractor:
    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    kind: ClassVar[str] = "frames"  # "frames": cropped frames; "audio": the audio track
    batch_size: int = 16

    def __init__(self, cfg: PreprocessConfig, device: str = "cpu"):
        self.cfg = cfg
        self.device = device
        self.calls = 0
        self._ready = False

    # -- identity -------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """What affects the output (goes into the cache key)."""
        return {}

    def file_inputs(self, path: str) -> dict[str, str]:
        """Content hashes of the side files this extractor reads for the video at ``path``
        (they go into its cache key, so editing one recomputes this entry only)."""
        return {}

    # -- lifecycle ------------------------------------------------------------------------
    def setup(self) -> None:
        """Load models (called once, lazily)."""

    def ensure_setup(self) -> None:
        if not self._ready:
            self.setup()
            self._ready = True

    def reset(self, ctx: VideoContext) -> None:
        self.ctx = ctx

    def arrays(self, ctx: VideoContext) -> dict[str, ArraySpec]:
        return {}

    def __call__(self, batch: Any) -> dict[str, Any]:
        self.ensure_setup()
        self.calls += 1
        return self.process(batch)

    def process(self, batch: Any) -> dict[str, Any]:
        raise NotImplementedError

    def finish(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Video-level arrays and attributes, after the last batch."""
        return {}, {}


def onnx_providers(device: str) -> list[str]:
    if device == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]
