"""ID adapter (after StableAnimator): a 512-d ArcFace embedding -> N face tokens, plus the face
key/value projections used by the UNet's spatial cross-attention.

The face tokens are appended to the CLIP image token, so the UNet's cross-attention context is
``1 + N`` tokens. Each spatial cross-attention layer named in ``face_layers`` gets a
:class:`FaceKV` (``face_to_k``/``face_to_v``) here, so the weights the attention processors use
are this model's parameters: they train, freeze and save with the ID adapter.

At initialisation ``face_to_k`` may be copied from the layer's ``to_k`` (IP-Adapter practice) and
``face_to_v`` is zero, so a fresh adapter does not change the UNet's output.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class FaceKV(nn.Module):
    """The face tokens' own key/value projections for one cross-attention layer."""

    def __init__(self, context_dim: int, inner_dim: int):
        super().__init__()
        self.face_to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.face_to_v = nn.Linear(context_dim, inner_dim, bias=False)
        nn.init.zeros_(self.face_to_v.weight)


class PerceiverBlock(nn.Module):
    """Latents attend to [embedding tokens, latents], then a feed-forward; pre-norm, residual."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_latents = nn.LayerNorm(dim)
        self.norm_inputs = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * 4), nn.GELU(),
                                nn.Linear(dim * 4, dim))

    def forward(self, latents: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        q = self.norm_latents(latents)
        kv = torch.cat([self.norm_inputs(inputs), q], dim=1)
        latents = latents + self.attn(q, kv, kv, need_weights=False)[0]
        return latents + self.ff(latents)


class IDAdapter(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, embed_dim: int = 512, num_tokens: int = 4, cross_attention_dim: int = 1024,
                 inner_dim: int = 768, depth: int = 2, heads: int = 8,
                 num_embed_tokens: int = 4, face_layers: tuple[str, ...] = (),
                 face_layer_dims: tuple[int, ...] = ()):
        super().__init__()
        if len(face_layers) != len(face_layer_dims):
            raise ValueError("face_layers and face_layer_dims must have the same length")
        # the single embedding becomes a few tokens so the perceiver has something to attend over
        self.embed_proj = nn.Linear(embed_dim, num_embed_tokens * inner_dim)
        self.latents = nn.Parameter(torch.randn(1, num_tokens, inner_dim) * inner_dim ** -0.5)
        self.blocks = nn.ModuleList(PerceiverBlock(inner_dim, heads) for _ in range(depth))
        self.proj_out = nn.Linear(inner_dim, cross_attention_dim)
        self.norm_out = nn.LayerNorm(cross_attention_dim)
        self.face_kv = nn.ModuleList(FaceKV(cross_attention_dim, d) for d in face_layer_dims)

    def forward(self, face_embed: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) face embedding -> (B, num_tokens, cross_attention_dim) face tokens."""
        cfg = self.config
        if face_embed.ndim != 2 or face_embed.shape[1] != cfg.embed_dim:
            raise ValueError(f"IDAdapter expects (B, {cfg.embed_dim}) embeddings, "
                             f"got {tuple(face_embed.shape)}")
        b = face_embed.shape[0]
        inputs = self.embed_proj(face_embed.to(self.embed_proj.weight.dtype))
        inputs = inputs.view(b, cfg.num_embed_tokens, cfg.inner_dim)
        latents = self.latents.expand(b, -1, -1)
        for block in self.blocks:
            latents = block(latents, inputs)
        return self.norm_out(self.proj_out(latents))

    @torch.no_grad()
    def init_face_keys_from(self, unet: nn.Module) -> None:
        """Copy each layer's ``to_k`` into ``face_to_k`` (fresh adapters only)."""
        modules = dict(unet.named_modules())
        for name, kv in zip(self.config.face_layers, self.face_kv):
            to_k = modules[name].to_k
            if to_k.weight.shape == kv.face_to_k.weight.shape and not to_k.weight.is_meta:
                kv.face_to_k.weight.copy_(to_k.weight)
