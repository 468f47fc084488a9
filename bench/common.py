"""What every section shares: resolved inputs (video, TAESD, tiny models), sizes for quick runs,
thread settings, and results that later sections build on (the decode reference, the output of
the whole preprocessing pipeline)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import torch

from dwm.shared import media
from dwm.shared.config import BenchConfig, PreprocessConfig, build_preprocess_config
from dwm.shared.errors import ConfigError, UserFacingError

REPO = Path(__file__).resolve().parents[1]  # the checkout holding bench/
TITLES = {  # the sections of the report, in order (bench/__init__.py runs them)
    "1": "decode limit",
    "2": "preprocess",
    "3": "cache reuse",
    "4": "loader",
    "5": "train step",
    "6": "storage",
}


def samples_dir() -> Path:
    """``$DWM_SAMPLES``, else ``../shared/samples`` beside the repository (as the tests do)."""
    env = os.environ.get("DWM_SAMPLES")
    return Path(env) if env else REPO.parent / "shared" / "samples"


def set_threads(n: int) -> None:
    torch.set_num_threads(max(1, n))
    cv2.setNumThreads(max(1, n))


@dataclass
class Bench:
    cfg: BenchConfig
    out: Path
    video: Path
    taesd: Path
    models_dir: Path
    repeats: int
    quick: bool
    # filled as sections run
    decode_fps: float | None = None  # section 1 at the preprocess resolution (median)
    decode_inputs: dict[str, Any] = field(default_factory=dict)
    full_run: Path | None = None  # output folder of one whole-pipeline preprocess (cache + shards)
    full_frames: int = 0

    @classmethod
    def create(cls, cfg: BenchConfig) -> Bench:
        video = Path(cfg.video) if cfg.video else samples_dir() / "dance_music.mp4"
        taesd = Path(cfg.taesd) if cfg.taesd else samples_dir() / "weights" / "taesd"
        if not video.is_file():
            raise UserFacingError(f"bench video {video} not found: give video=PATH (default: "
                                  f"the sample ../shared/samples/dance_music.mp4)")
        if not media.probe(video)["has_video"]:
            raise UserFacingError(f"video={video}: has no video stream (give a dance video)")
        if not (taesd / "config.json").is_file():
            raise UserFacingError(f"TAESD folder {taesd} not found (needs config.json + "
                                  f"diffusion_pytorch_model.safetensors of madebyollin/taesd): "
                                  f"give taesd=PATH")
        unknown = sorted({str(s) for s in cfg.sections} - set(TITLES))
        if unknown:
            raise ConfigError(f"sections: unknown section(s) {unknown} (one of "
                              f"{', '.join(TITLES)})")
        for key in ("repeats", "threads"):
            if getattr(cfg, key) < 1:
                raise ConfigError(f"{key}={getattr(cfg, key)}: must be >= 1")
        out = Path(cfg.out).resolve()
        out.mkdir(parents=True, exist_ok=True)
        repeats = max(1, min(cfg.repeats, 1) if cfg.quick else cfg.repeats)
        return cls(cfg, out, video.resolve(), taesd.resolve(), out / "models", repeats, cfg.quick)

    # -- sizes ------------------------------------------------------------------------------
    @property
    def seconds(self) -> float:
        """Seconds of the video for runs with model extractors (TAESD is slow on a CPU)."""
        return 0.34 if self.quick else float(self.cfg.seconds)  # quick: 8 frames

    @property
    def decode_seconds(self) -> float:
        """Seconds of the video for the decode limit and the cheap pipeline (0: all of it)."""
        return 1.0 if self.quick else 0.0

    @property
    def threads(self) -> int:
        return int(self.cfg.threads)

    def input_dir(self) -> Path:
        """A folder holding only (a link to) the bench video: the preprocess input."""
        d = self.out / "input"
        d.mkdir(parents=True, exist_ok=True)
        link = d / self.video.name
        if not link.exists():
            link.symlink_to(self.video)
        return d

    def preprocess_config(self, out: Path, extractors: list[str] | None = None,
                          **overrides: Any) -> PreprocessConfig:
        """The tiny profile (256x448) with mediapipe pose and real TAESD latents, on the first
        ``seconds`` of the video; one video, so no validation hold-out."""
        ov = {"profile": "tiny", "input_dir": str(self.input_dir()), "out": str(out),
              "models.models_dir": str(self.models_dir), "models.vae": str(self.taesd),
              "pose.backend": self.cfg.pose_backend, "decode.max_seconds": self.seconds,
              "shards.holdout_fraction": 0.0, "workers": 1}
        if not self.quick:  # two segments in the 2 s default, one per loader worker (section 5)
            ov["decode.segment_frames"] = 24
        if self.quick:
            # about a quarter of the tiny profile's pixels (heatmaps, image / 8, must stay
            # divisible by 8); two 4-frame segments, so that each of 2 loader workers gets one
            ov.update({"decode.width": 128, "decode.height": 256, "decode.segment_frames": 4,
                       "decode.min_frames": 4})
            ov.pop("models.vae")  # the tiny profile's VAE: TAESD is the slowest part
        if extractors is not None:
            ov["extractors"] = ",".join(extractors)
        ov.update(overrides)
        return build_preprocess_config([f"{k}={v}" for k, v in ov.items()])

    def base_inputs(self, pcfg: PreprocessConfig | None = None, **extra: Any) -> dict[str, Any]:
        d: dict[str, Any] = {"video": self.video.name}
        if pcfg is not None:
            d.update(res=f"{pcfg.decode.width}x{pcfg.decode.height}", fps=pcfg.decode.fps,
                     seconds=pcfg.decode.max_seconds or "all")
        d.update(threads=self.threads, repeats=self.repeats)
        d.update(extra)
        return d
