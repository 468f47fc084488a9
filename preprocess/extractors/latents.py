"""VAE latents of the cropped frames: the latent *mean* (optionally std), fp16, unscaled.

The scaling factor of the VAE is recorded with the entry (and in each sample's metadata): a
consumer multiplies by it. Frames are encoded in small batches (``cfg.latents.batch_size``), which
are faster on CPU and keep memory low; on cuda the model runs in fp16.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dwm.shared import vae
from dwm.shared.contract import LATENT_CHANNELS, LATENT_DOWNSAMPLE

from .base import ArraySpec, Extractor, FrameBatch, VideoContext


class LatentExtractor(Extractor):
    name = "latents"
    version = "1"

    def __init__(self, cfg, device: str = "cpu"):
        super().__init__(cfg, device)
        # CPU: small batches are fastest; a GPU wants large ones
        self.batch_size = cfg.latents.batch_size if device == "cpu" else max(32, cfg.latents.batch_size)

    def config(self) -> dict[str, Any]:
        m = self.cfg.models
        return {"store_std": self.cfg.latents.store_std,
                "vae": {"profile": m.profile, "vae": m.vae, "svd": m.svd if not m.vae else ""}}

    def setup(self) -> None:
        self.dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.vae, self.scaling_factor = vae.load_vae(self.cfg.models, device=self.device,
                                                     dtype=self.dtype)
        self.vae.eval()

    def arrays(self, ctx: VideoContext) -> dict[str, ArraySpec]:
        h, w = ctx.height // LATENT_DOWNSAMPLE, ctx.width // LATENT_DOWNSAMPLE
        specs = {"mean": ArraySpec((LATENT_CHANNELS, h, w), "float16", "VAE latent mean, unscaled")}
        if self.cfg.latents.store_std:
            specs["std"] = ArraySpec((LATENT_CHANNELS, h, w), "float16", "VAE latent std")
        return specs

    def process(self, batch: FrameBatch) -> dict[str, np.ndarray]:
        if not self.cfg.latents.store_std:
            mean = vae.encode_latents(self.vae, batch.frames)
            return {"mean": mean.float().cpu().numpy().astype(np.float16)}
        x = torch.from_numpy(np.ascontiguousarray(batch.frames)).permute(0, 3, 1, 2)
        x = (x.to(self.device, self.dtype) / 127.5) - 1.0
        with torch.inference_mode():
            enc = self.vae.encode(x)
        if hasattr(enc, "latent_dist"):  # KL VAEs: a diagonal Gaussian
            mean, std = enc.latent_dist.mean, enc.latent_dist.std
        else:  # AutoencoderTiny: deterministic latents, std 0
            mean = enc.latents
            std = torch.zeros_like(mean)
        return {"mean": mean.float().cpu().numpy().astype(np.float16),
                "std": std.float().cpu().numpy().astype(np.float16)}

    def finish(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return {}, {"scaling_factor": float(self.scaling_factor),
                    "vae_class": type(self.vae).__name__}
