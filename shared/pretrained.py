"""The pretrained CLIP image encoder and SVD UNet, loaded from the folders :mod:`.weights`
locates (the VAE has its own module, :mod:`.vae`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from . import weights
from .config import ModelsConfig

# CLIP's normalisation (OpenAI); SVD's feature extractor uses the same numbers.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_clip(cfg: ModelsConfig, device="cpu", dtype=None) -> tuple[Any, Callable]:
    """(CLIPVisionModelWithProjection, preprocess_fn); see :func:`make_clip_preprocess`."""
    # deferred (as load_unet's diffusers): transformers takes seconds to import, and most
    # importers of this module load only one of the two models
    from transformers import CLIPVisionModelWithProjection

    folder = weights.component_dir(cfg, "clip")
    model = CLIPVisionModelWithProjection.from_pretrained(
        folder, dtype=dtype or torch.float32, use_safetensors=True,
        variant=weights.safetensors_variant(folder),
    ).to(device).eval()
    return model, make_clip_preprocess(model)


def make_clip_preprocess(model) -> Callable:
    """``preprocess(list of HxWx3 uint8 RGB arrays) -> [N,3,S,S]`` tensor on the model's device
    and dtype: stretched to the model's ``image_size`` with antialiasing, as SVD's pipeline does,
    and normalised with CLIP's mean/std, so no processor config is needed."""
    size = int(model.config.image_size)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    def preprocess(images: Sequence[np.ndarray]) -> torch.Tensor:
        p = next(model.parameters())
        out = []
        for img in images:
            arr = np.asarray(img)
            if arr.ndim != 3 or arr.shape[2] != 3:
                raise ValueError(f"CLIP preprocess expects HxWx3 RGB images, got {arr.shape}")
            t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None].float()
            t = t / 255.0 if arr.dtype == np.uint8 else t
            t = F.interpolate(t, size=(size, size), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 1)
            out.append((t - mean) / std)
        if not out:
            raise ValueError("CLIP preprocess got no images")
        return torch.cat(out).to(device=p.device, dtype=p.dtype)

    preprocess.image_size = size  # type: ignore[attr-defined]
    return preprocess


def load_unet(cfg: ModelsConfig, device="cpu", dtype=None):
    """SVD's UNetSpatioTemporalConditionModel."""
    from diffusers import UNetSpatioTemporalConditionModel  # deferred: see load_clip

    folder = weights.component_dir(cfg, "unet")
    return UNetSpatioTemporalConditionModel.from_pretrained(
        folder, torch_dtype=dtype or torch.float32, use_safetensors=True,
        variant=weights.safetensors_variant(folder),
    ).to(device).eval()
