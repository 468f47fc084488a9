"""ReferenceNet (after CHAMP / Animate Anyone) for the SVD UNet.

It is the same architecture class as the denoising UNet (initialised from the same weights) and
runs once per sample on the reference frame as a one-frame clip. Its spatial self-attention
layers carry :class:`~dwm.training.models.attention.ReferenceWriter` processors that record their
input tokens; the denoising UNet's spatial self-attention reads them. Its output sample is not
used. Its temporal layers run (one frame) but never train (see the freeze matrix).
"""

from __future__ import annotations

import torch
from diffusers.models.unets.unet_spatio_temporal_condition import UNetSpatioTemporalConditionModel


class ReferenceNet(UNetSpatioTemporalConditionModel):
    """A one-frame SVD UNet whose job is to fill the reference bank."""

    @classmethod
    def from_unet(cls, unet: UNetSpatioTemporalConditionModel) -> ReferenceNet:
        """A ReferenceNet with the UNet's config and a copy of its weights."""
        ref = cls.from_config(unet.config)
        if not next(unet.parameters()).is_meta:
            ref.load_state_dict(unet.state_dict())
        dtype = next(unet.parameters()).dtype
        return ref if dtype == torch.float32 else ref.to(dtype)

    def write_reference(self, model_input: torch.Tensor, c_noise: torch.Tensor,
                        context: torch.Tensor, added_time_ids: torch.Tensor) -> None:
        """Run on (B, C_in, h, w) inputs as one-frame clips; the writers fill the bank."""
        self(model_input[:, None], c_noise, encoder_hidden_states=context,
             added_time_ids=added_time_ids, return_dict=False)
