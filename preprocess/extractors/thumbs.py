"""JPEG thumbnails of every cropped frame (``cfg.thumbs.width`` wide, aspect kept)."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from .base import ArraySpec, Extractor, FrameBatch, VideoContext


class ThumbExtractor(Extractor):
    name = "thumbs"
    version = "1"
    batch_size = 48

    def config(self) -> dict[str, Any]:
        return {"width": self.cfg.thumbs.width, "quality": self.cfg.thumbs.quality}

    def arrays(self, ctx: VideoContext) -> dict[str, ArraySpec]:
        return {
            "jpeg": ArraySpec((), "uint8", "concatenated JPEG files", per_frame=False, chunk=1 << 20),
            "sizes": ArraySpec((), "int64", "bytes of each frame's JPEG (offsets = cumsum)"),
        }

    def process(self, batch: FrameBatch) -> dict[str, np.ndarray]:
        h0, w0 = batch.frames.shape[1:3]
        w = int(self.cfg.thumbs.width)
        h = max(1, int(round(h0 * w / w0)))
        blobs = []
        for frame in batch.frames:
            small = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)
            # cvtColor, not a reversed view: imencode would copy the view first (2x slower)
            ok, enc = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR),
                                   [cv2.IMWRITE_JPEG_QUALITY, int(self.cfg.thumbs.quality)])
            if not ok:
                raise RuntimeError("JPEG encoding failed")
            blobs.append(enc.reshape(-1))
        return {"jpeg": np.concatenate(blobs).astype(np.uint8),
                "sizes": np.array([len(b) for b in blobs], np.int64)}
