"""Pose guidance encoder (CHAMP's guidance encoder, at latent resolution).

K pose heatmaps per frame, already at the latent grid (image / 8) in the shards, go through a
small conv stack to the width of the UNet's first block. The last conv is zero-initialised, so
a freshly built guider leaves the pretrained UNet untouched; a learnable scalar ``scale`` lets
training turn the guidance up or down as a whole. The output is added to the UNet's sample right
after ``conv_in`` (see :func:`dwm.training.models.animator.install_wiring`).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class PoseGuider(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, in_channels: int = 18, out_channels: int = 320,
                 block_channels: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for ch in block_channels:
            # two 3x3 convs per width: receptive field enough to see limbs, not whole bodies
            layers += [nn.Conv2d(prev, ch, 3, padding=1), nn.SiLU(),
                       nn.Conv2d(ch, ch, 3, padding=1), nn.SiLU()]
            prev = ch
        self.body = nn.Sequential(*layers)
        self.proj_out = nn.Conv2d(prev, out_channels, 3, padding=1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        # 1 element, not 0-dim: FSDP2's fully_shard refuses scalar parameters
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, heatmaps: torch.Tensor) -> torch.Tensor:
        """(N, K, h, w) heatmaps in [0, 1] -> (N, out_channels, h, w) residual for conv_in."""
        if heatmaps.ndim != 4 or heatmaps.shape[1] != self.config.in_channels:
            raise ValueError(f"PoseGuider expects (N, {self.config.in_channels}, h, w) heatmaps, "
                             f"got {tuple(heatmaps.shape)}")
        return self.proj_out(self.body(heatmaps)) * self.scale
