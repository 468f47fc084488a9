"""Extractors behind one small interface (see :mod:`.base`); :func:`build` makes the enabled ones."""

from __future__ import annotations

from dwm.shared.config import ConfigError, PreprocessConfig

from .audio import AudioExtractor
from .base import ArraySpec, Extractor, FrameBatch, VideoContext
from .clip import ClipExtractor
from .face import FaceExtractor
from .latents import LatentExtractor
from .pose import PoseExtractor
from .thumbs import ThumbExtractor

REGISTRY: dict[str, type[Extractor]] = {
    cls.name: cls
    for cls in (AudioExtractor, PoseExtractor, FaceExtractor, LatentExtractor, ClipExtractor,
                ThumbExtractor)
}
# Frame extractors run in this order on each decoded segment.
FRAME_ORDER = ("face", "latents", "clip", "thumbs")


def check_names(cfg: PreprocessConfig) -> None:
    unknown = [n for n in cfg.extractors if n not in REGISTRY]
    if unknown:
        raise ConfigError(f"unknown extractor(s) {unknown} in 'extractors' (known: {list(REGISTRY)})")


def build(cfg: PreprocessConfig, device: str = "cpu") -> dict[str, Extractor]:
    check_names(cfg)
    return {n: REGISTRY[n](cfg, device) for n in REGISTRY if n in cfg.extractors}


__all__ = ["ArraySpec", "Extractor", "FrameBatch", "VideoContext", "REGISTRY", "FRAME_ORDER",
           "build", "check_names"]
