"""CLIP image embeddings of reference-candidate frames: every ``cfg.clip.every_n_frames`` frames
within each segment (at least the segment's first frame)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dwm.shared import pretrained

from .base import ArraySpec, Extractor, FrameBatch, VideoContext


class ClipExtractor(Extractor):
    name = "clip"
    version = "1"

    def __init__(self, cfg, device: str = "cpu"):
        super().__init__(cfg, device)
        # frames per call: enough to hold clip.batch_size selected frames (more on a GPU)
        per_call = cfg.clip.batch_size if device == "cpu" else max(64, cfg.clip.batch_size)
        self.batch_size = max(1, per_call * max(1, cfg.clip.every_n_frames))

    def config(self) -> dict[str, Any]:
        m = self.cfg.models
        return {"every_n_frames": self.cfg.clip.every_n_frames,
                "clip": {"profile": m.profile, "clip": m.clip, "svd": m.svd if not m.clip else ""}}

    def setup(self) -> None:
        self.model, self.preprocess_fn = pretrained.load_clip(self.cfg.models, device=self.device)
        self.model.eval()
        self.dim = int(self.model.config.projection_dim)

    def arrays(self, ctx: VideoContext) -> dict[str, ArraySpec]:
        self.ensure_setup()
        return {
            "frames": ArraySpec((), "int32", "video frame index of each embedded frame", per_frame=False),
            "embed": ArraySpec((self.dim,), "float16", "CLIPVisionModelWithProjection image_embeds",
                               per_frame=False),
        }

    @staticmethod
    def selected(seg_offset: np.ndarray, every: int) -> np.ndarray:
        return np.flatnonzero(seg_offset % max(1, every) == 0)

    def process(self, batch: FrameBatch) -> dict[str, np.ndarray]:
        rows = self.selected(batch.seg_offset, self.cfg.clip.every_n_frames)
        if len(rows) == 0:
            return {"frames": np.zeros(0, np.int32), "embed": np.zeros((0, self.dim), np.float16)}
        pixels = self.preprocess_fn([batch.frames[i] for i in rows])
        pixels = pixels.to(self.device, dtype=next(self.model.parameters()).dtype)
        with torch.inference_mode():
            emb = self.model(pixel_values=pixels).image_embeds
        return {"frames": batch.index[rows].astype(np.int32),
                "embed": emb.float().cpu().numpy().astype(np.float16)}
