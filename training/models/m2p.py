"""M2PEncoder: a music window and a reference face -> per-frame pose heatmaps and a face embedding.

Two branches, trained together in stage A (then frozen / slowly tuned in B and C):

* **Audio -> pose.** Per-frame audio features (log-mel + the 35-d FACT/EDGE baseline set) go
  through an input projection, a small temporal convolution (local onsets), sinusoidal positions
  (any window length: W in stage A, T in stage C) and a pre-norm Transformer encoder (padding
  masked). Each frame's token is decoded by a convolutional upsampler into K heatmap logits at
  ``heatmap_height x heatmap_width`` (the latent grid of the preprocessing resolution); joint
  coordinates come from a soft-argmax over the spatial softmax, in [0, 1] of the frame
  (x = (col + 0.5) / width, y = (row + 0.5) / height).
* **Face.** A 112x112 aligned face crop -> a residual CNN (GroupNorm) -> FC -> LayerNorm -> a
  512-d L2-normalised embedding, trained to match the cached ArcFace embedding (so it is
  ArcFace-compatible: the ID adapter of stage B consumes either).

Sizes (``M2PEncoder.from_size``):

* ``tiny`` (0.28 M parameters): tests and the CPU demo; d=64, 2 layers, 56x32 heatmaps.
* ``full`` (55.7 M parameters: audio 26.6 M, heatmap decoder 5.1 M, face 24.0 M).
  The audio encoder is a 512-d, 8-layer, 8-head Transformer: the size of EDGE's and Bailando's
  music-to-motion transformers, enough for 5 s windows of 120 frames with rhythm and phrase
  structure. The heatmap decoder starts from a 7x4 grid with 256 channels and doubles four times
  to 112x64 (512x896 / 8). The face branch is a ResNet-18-like CNN (64-128-256-512 channels,
  2 blocks per stage) with ArcFace's flatten + FC head (GroupNorm instead of BatchNorm): the
  capacity class of the smallest ArcFace backbones (iresnet18), what a student of a glint/w600k
  ArcFace needs to be useful for identity in stage B. A full step (batch 1, W=120) is about
  0.76 TFLOP forward + backward, mostly the decoder's 112x64 convolutions: a GPU model.

Gradient checkpointing (``enable_gradient_checkpointing``) recomputes each Transformer layer and
the per-frame decoder in the backward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

SIZES: dict[str, dict] = {
    "tiny": dict(hidden_dim=64, num_layers=2, num_heads=4, ff_mult=2, conv_kernel=5,
                 decoder_channels=(32, 16, 16), heatmap_height=56, heatmap_width=32,
                 face_channels=(8, 16, 32, 64), face_blocks=(1, 1, 1, 1), face_flatten=False),
    "full": dict(hidden_dim=512, num_layers=8, num_heads=8, ff_mult=4, conv_kernel=5,
                 decoder_channels=(256, 192, 128, 96), heatmap_height=112, heatmap_width=64,
                 face_channels=(64, 128, 256, 512), face_blocks=(2, 2, 2, 2), face_flatten=True),
}


@dataclass
class M2POutput(BaseOutput):
    heatmap_logits: torch.Tensor | None = None  # (B, T, K, H, W)
    coords: torch.Tensor | None = None  # (B, T, K, 2), x, y in [0, 1]
    face_embed: torch.Tensor | None = None  # (B, 512), L2-normalised


def sinusoidal_positions(length: int, dim: int, device, dtype) -> torch.Tensor:
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    steps = torch.arange(0, dim, 2, device=device, dtype=torch.float32)
    freq = torch.exp(steps * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device, dtype=torch.float32)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe.to(dtype)


def soft_argmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(..., H, W) logits -> (..., 2) expected (x, y) in [0, 1] under the spatial softmax."""
    H, W = logits.shape[-2:]
    prob = torch.softmax(logits.flatten(-2).float() / temperature, dim=-1).view(*logits.shape)
    xs = (torch.arange(W, device=logits.device, dtype=prob.dtype) + 0.5) / W
    ys = (torch.arange(H, device=logits.device, dtype=prob.dtype) + 0.5) / H
    x = (prob.sum(-2) * xs).sum(-1)
    y = (prob.sum(-1) * ys).sum(-1)
    return torch.stack([x, y], dim=-1)


def logits_to_heatmaps(logits: torch.Tensor) -> torch.Tensor:
    """Heatmaps in [0, 1] like the preprocessed ones (peak 1): spatial softmax / its max."""
    prob = torch.softmax(logits.flatten(-2).float(), dim=-1)
    prob = prob / prob.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return prob.view(*logits.shape)


class _Block(nn.Module):
    """Pre-norm Transformer encoder layer (self-attention with key padding mask + MLP)."""

    def __init__(self, dim: int, heads: int, ff_mult: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim * ff_mult), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(dim * ff_mult, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        h = self.norm1(x)
        h, _ = self.attn(h, h, h, key_padding_mask=pad, need_weights=False)
        x = x + self.drop(h)
        return x + self.drop(self.ff(self.norm2(x)))


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = nn.GroupNorm(min(8, cout), cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return F.silu(self.norm(self.conv(x)))


class _HeatmapDecoder(nn.Module):
    """Frame token (d) -> K heatmap logits at H x W through len(channels) x2 upsamplings."""

    def __init__(self, dim: int, channels: tuple[int, ...], joints: int, height: int, width: int):
        super().__init__()
        f = 2 ** len(channels)
        if height % f or width % f:
            raise ValueError(f"heatmap size {height}x{width} must be divisible by {f} "
                             f"({len(channels)} upsamplings)")
        self.h0, self.w0, self.c0 = height // f, width // f, channels[0]
        self.proj = nn.Linear(dim, self.c0 * self.h0 * self.w0)
        ups = []
        cin = channels[0]
        for cout in channels:  # one x2 upsampling per entry
            ups.append(_Up(cin, cout))
            cin = cout
        self.ups = nn.Sequential(*ups)
        self.out = nn.Conv2d(cin, joints, 3, padding=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (N, d) -> (N, K, H, W)
        x = self.proj(tokens).view(-1, self.c0, self.h0, self.w0)
        return self.out(self.ups(F.silu(x)))


def _norm(c: int) -> nn.GroupNorm:
    # GroupNorm, not ArcFace's BatchNorm: training batches here are small (and split across
    # ranks), and the embedding must not depend on the batch or on train/eval mode.
    return nn.GroupNorm(min(32, max(1, c // 16)), c)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn2 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=stride, padding=1, bias=False)
        self.act = nn.PReLU(cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _norm(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.act(self.bn2(self.conv1(self.bn1(x)))))
        return h + self.skip(x)


class _FaceNet(nn.Module):
    """iresnet-style face embedder: 112x112 RGB in [0, 1] -> L2-normalised ``embed_dim``."""

    def __init__(self, channels: tuple[int, ...], blocks: tuple[int, ...], embed_dim: int,
                 flatten: bool):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels[0], 3, padding=1, bias=False),
                                  _norm(channels[0]), nn.PReLU(channels[0]))
        layers, cin = [], channels[0]
        for cout, n in zip(channels, blocks):
            for i in range(n):
                layers.append(_ResBlock(cin, cout, 2 if i == 0 else 1))
                cin = cout
        self.body = nn.Sequential(*layers)
        self.bn = _norm(cin)
        side = 112 // 2 ** len(channels)
        self.flatten = flatten
        self.fc = nn.Linear(cin * side * side if flatten else cin, embed_dim)
        self.feat_norm = nn.LayerNorm(embed_dim)

    def forward(self, crop: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.body(self.stem((crop - 0.5) / 0.5)))
        x = x.flatten(1) if self.flatten else x.mean(dim=(2, 3))
        return F.normalize(self.feat_norm(self.fc(x)), dim=-1)


class M2PEncoder(ModelMixin, ConfigMixin):
    """Music-to-pose encoder with a face branch (see the module docstring for sizes and reasons).

    ``forward(audio_mel, audio_baseline, frame_mask=None, face_crop=None)``:
    audio_mel (B, T, n_mels), audio_baseline (B, T, baseline_dim) normalised features;
    frame_mask (B, T) 1 = real frame; face_crop (B, 3, 112, 112) in [0, 1] or None.
    Returns :class:`M2POutput` (heatmap logits (B, T, K, H, W), coords (B, T, K, 2), face
    embedding (B, 512) or None).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, n_mels: int = 80, baseline_dim: int = 35, num_joints: int = 18,
                 heatmap_height: int = 56, heatmap_width: int = 32, hidden_dim: int = 64,
                 num_layers: int = 2, num_heads: int = 4, ff_mult: int = 2, conv_kernel: int = 5,
                 dropout: float = 0.0, decoder_channels: tuple[int, ...] = (32, 16, 16),
                 face_channels: tuple[int, ...] = (8, 16, 32, 64),
                 face_blocks: tuple[int, ...] = (1, 1, 1, 1), face_flatten: bool = False,
                 embed_dim: int = 512, size: str = "tiny"):
        super().__init__()
        d = hidden_dim
        self.in_proj = nn.Linear(n_mels + baseline_dim, d)
        self.local = nn.Conv1d(d, d, conv_kernel, padding=conv_kernel // 2, groups=1)
        self.layers = nn.ModuleList(_Block(d, num_heads, ff_mult, dropout)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(d)
        self.decoder = _HeatmapDecoder(d, tuple(decoder_channels), num_joints, heatmap_height,
                                       heatmap_width)
        self.face = _FaceNet(tuple(face_channels), tuple(face_blocks), embed_dim, face_flatten)
        self.gradient_checkpointing = False

    @classmethod
    def from_size(cls, size: str, **overrides) -> M2PEncoder:
        if size not in SIZES:
            raise ValueError(f"unknown M2PEncoder size {size!r} (one of {', '.join(SIZES)})")
        return cls(**{**SIZES[size], "size": size, **overrides})

    def count_parameters(self) -> dict[str, int]:
        parts = {"audio": [self.in_proj, self.local, self.layers, self.norm],
                 "heatmap_decoder": [self.decoder], "face": [self.face]}
        out = {k: sum(p.numel() for m in ms for p in m.parameters()) for k, ms in parts.items()}
        out["total"] = sum(p.numel() for p in self.parameters())
        return out

    def _ckpt(self, fn, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(fn, *args)
        return fn(*args)

    def encode_audio(self, audio_mel: torch.Tensor, audio_baseline: torch.Tensor,
                     frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, d) frame tokens."""
        x = self.in_proj(torch.cat([audio_mel, audio_baseline], dim=-1))
        x = x + self.local(x.transpose(1, 2)).transpose(1, 2)
        x = x + sinusoidal_positions(x.shape[1], x.shape[2], x.device, x.dtype)
        pad = (frame_mask <= 0) if frame_mask is not None else None
        if pad is not None and pad.all(dim=1).any():  # an all-padding row would give NaN attention
            pad = pad & ~pad.all(dim=1, keepdim=True)
        for layer in self.layers:
            x = self._ckpt(layer, x, pad)
        return self.norm(x)

    def decode_heatmaps(self, tokens: torch.Tensor) -> torch.Tensor:
        B, T, d = tokens.shape
        logits = self._ckpt(self.decoder, tokens.reshape(B * T, d))
        return logits.view(B, T, *logits.shape[1:])

    def encode_face(self, face_crop: torch.Tensor) -> torch.Tensor:
        return self._ckpt(self.face, face_crop)

    def forward(self, audio_mel: torch.Tensor, audio_baseline: torch.Tensor,
                frame_mask: torch.Tensor | None = None, face_crop: torch.Tensor | None = None,
                return_dict: bool = True):
        logits = self.decode_heatmaps(self.encode_audio(audio_mel, audio_baseline, frame_mask))
        coords = soft_argmax(logits)
        face = self.encode_face(face_crop) if face_crop is not None else None
        out = M2POutput(heatmap_logits=logits, coords=coords, face_embed=face)
        return out if return_dict else out.to_tuple()
