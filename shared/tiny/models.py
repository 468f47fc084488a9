"""Tiny random-init models of the SAME classes as the full ones, for tests and the demo.

Built deterministically (fixed seeds) and saved with ``save_pretrained`` so that the ``tiny``
profile loads them through exactly the ``from_pretrained`` path the full weights use.
Bump :data:`TINY_VERSION` when a config here changes: the stamp makes existing builds rebuild.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_VERSION = "3"
SEED = 0

# AutoencoderKL: 4 blocks -> 8x downsampling, 4 latent channels, SD's scaling factor.
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.18215,
)

# CLIPVisionModelWithProjection: projection_dim = the UNet's cross_attention_dim.
TINY_CLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=64,
    patch_size=8,
    projection_dim=32,
)

# UNetSpatioTemporalConditionModel: channels must be multiples of 32 (its GroupNorms have 32 groups).
TINY_UNET = dict(
    sample_size=None,
    in_channels=8,  # noisy latents + conditioning-frame latents, as SVD
    out_channels=4,
    down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
    up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    block_out_channels=(32, 64),
    addition_time_embed_dim=32,
    projection_class_embeddings_input_dim=96,  # 3 added time ids x 32
    layers_per_block=1,
    cross_attention_dim=32,
    transformer_layers_per_block=1,
    num_attention_heads=(2, 4),
    num_frames=8,
)


# diffusers and transformers are imported in the builders: they take seconds, and every
# tiny-profile run imports this module (for the stamp) while few of them build the models.
def build_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED)
    return AutoencoderKL(**TINY_VAE).eval()


def build_clip():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(SEED + 1)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP)).eval()


def build_unet():
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(SEED + 2)
    return UNetSpatioTemporalConditionModel(**TINY_UNET).eval()


def save_all(root: Path) -> dict[str, Path]:
    """Save the tiny VAE / image encoder / UNet as SVD-style subfolders of ``root``."""
    from transformers.utils import logging as hf_logging

    root = Path(root)
    out = {}
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar for one file, redrawn into every log: noise
    try:
        for sub, build in (("vae", build_vae), ("image_encoder", build_clip),
                           ("unet", build_unet)):
            model = build()
            model.save_pretrained(root / sub, safe_serialization=True)
            out[sub] = root / sub
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return out
