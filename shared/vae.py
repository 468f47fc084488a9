"""The VAE: load it from the folder :mod:`.weights` locates, and encode / decode with any of the
three supported classes behind one pair of functions. Preprocessing encodes every training frame
with :func:`encode_latents`; a generated frame becomes pixels in :func:`decode_latents`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from . import weights
from .config import ModelsConfig
from .errors import UserFacingError

VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny", "AutoencoderKLTemporalDecoder")


def load_vae(cfg: ModelsConfig, device="cpu", dtype=None) -> tuple[Any, float]:
    """(vae, scaling_factor). The class comes from the folder's config.json ``_class_name``."""
    # deferred: diffusers takes seconds to import, and every preprocessing run imports this
    # module (the latents extractor does) whether or not it encodes latents
    import diffusers

    folder = weights.component_dir(cfg, "vae")
    name = weights.read_config(folder).get("_class_name", "")
    if name not in VAE_CLASSES:
        raise UserFacingError(
            f"{folder}/config.json: _class_name '{name}' is not a supported VAE ({VAE_CLASSES})"
        )
    vae = getattr(diffusers, name).from_pretrained(
        folder, torch_dtype=dtype or torch.float32, use_safetensors=True,
        variant=weights.safetensors_variant(folder),
    )
    vae = vae.to(device).eval()
    return vae, float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)


def vae_kind(vae) -> str:
    """"kl" (AutoencoderKL), "temporal" (AutoencoderKLTemporalDecoder) or "tiny" (TAESD)."""
    name = type(vae).__name__
    return {"AutoencoderTiny": "tiny", "AutoencoderKLTemporalDecoder": "temporal"}.get(name, "kl")


def _to_pixels(images, device, dtype) -> torch.Tensor:
    """uint8 NHWC/NCHW or float [0,1] NCHW/NHWC (array or tensor) -> NCHW in [-1, 1]."""
    t = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise ValueError(f"expected images [N,H,W,3] or [N,3,H,W], got shape {tuple(t.shape)}")
    if t.shape[1] != 3 and t.shape[-1] == 3:
        t = t.permute(0, 3, 1, 2)
    if t.shape[1] != 3:
        raise ValueError(f"expected 3 colour channels, got shape {tuple(t.shape)}")
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    return (t * 2.0 - 1.0).to(device=device, dtype=dtype)


def _batches(n: int, batch_size: int | None) -> list[tuple[int, int]]:
    step = n if not batch_size or batch_size <= 0 else batch_size
    return [(i, min(i + step, n)) for i in range(0, n, max(step, 1))]


def encode_latents(vae, images, batch_size: int | None = None, grad: bool = False):
    """Images -> UNSCALED latents (the posterior mean for KL VAEs). Multiply by the scaling
    factor from :func:`load_vae` for diffusion. ``images``: uint8 (0..255) or float (0..1),
    NHWC or NCHW, array or tensor. Small batches are faster on CPU."""
    p = next(vae.parameters())
    x = _to_pixels(images, p.device, p.dtype)
    kind = vae_kind(vae)
    out = []
    with contextlib.nullcontext() if grad else torch.no_grad():
        for a, b in _batches(x.shape[0], batch_size):
            enc = vae.encode(x[a:b])
            out.append(enc.latents if kind == "tiny" else enc.latent_dist.mean)
    return torch.cat(out)


def decode_latents(vae, latents, num_frames: int | None = None, batch_size: int | None = None,
                   grad: bool = False):
    """UNSCALED latents [N,4,h,w] -> float images [N,3,8h,8w] in [0, 1].

    The temporal decoder of SVD decodes ``num_frames`` consecutive latents together
    (default: each batch as one clip)."""
    p = next(vae.parameters())
    z = latents.to(device=p.device, dtype=p.dtype)
    kind = vae_kind(vae)
    out = []
    with contextlib.nullcontext() if grad else torch.no_grad():
        for a, b in _batches(z.shape[0], batch_size):
            if kind == "temporal":
                frames = num_frames or (b - a)
                x = vae.decode(z[a:b], num_frames=frames).sample
            else:
                x = vae.decode(z[a:b]).sample
            out.append(((x.float() + 1.0) / 2.0).clamp(0, 1))
    return torch.cat(out)
