"""M2PEncoder: music + a reference body -> a dance (a pose sequence), and a face crop -> identity.

Two branches, trained together in stage A (then frozen / slowly tuned in B and C):

* **Music + reference -> pose: a conditional denoiser** (EDGE-like, EDM-preconditioned). Music to
  dance is one-to-many, so the pose sequence is *sampled*, not regressed (a regressor averages
  the valid dances into one that never happens). The state is the pose sequence in the
  reference body's own units (:func:`reference_frame`: the reference's neck is the origin and
  its torso length the unit; x is measured in frame heights, so the unit is isotropic):
  placement and size of the output follow the reference by construction, and the reference
  pose itself (in those units) is an input, for its proportions. Per frame, a token sums the music (log-mel + the 35-d FACT/EDGE set; a learned
  null token where the music is dropped, which gives classifier-free guidance), the noisy state
  (EDM ``c_in``), the frames given as context (the start pose, the overlap with the previous
  window; a mask says which) and, broadcast, the reference pose and the noise level. A small
  temporal convolution, sinusoidal positions and a pre-norm Transformer encoder follow, and a
  linear head gives F; ``x0 = c_skip x + c_out F`` (EDM, ``pose_sigma_data``).
  Heatmap logits come from x0 (:meth:`M2PEncoder.heatmap_logits`: a Gaussian log-density per
  joint with a learned width, on any grid: 56x32 and 112x64 alike), only where heatmaps are
  consumed: the loss, and the guidance of stages B and C; coordinates are their soft-argmax.
  Sampling (:meth:`M2PEncoder.sample`): ``pose_steps`` Heun steps from ``pose_sigma_max``;
  ``pose_steps=1`` is ``D(0; sigma_max)``, the deterministic one-step prediction (the ablation
  baseline). Long songs: :func:`dwm.training.pose_sampling.sample_dance`.
* **Face.** A 112x112 aligned face crop -> a residual CNN (GroupNorm) -> FC -> LayerNorm -> a
  512-d L2-normalised embedding, trained to match the cached ArcFace embedding (so it is
  ArcFace-compatible: the ID adapter of stage B consumes either).

Sizes (``M2PEncoder.from_size``):

* ``tiny`` (0.28 M parameters): tests and the CPU demo; d=64, 2 layers.
* ``full`` (59.8 M parameters: denoiser 35.7 M, face 24.0 M). The denoiser is a 512-d, 8-layer,
  8-head Transformer: the size of EDGE's and Bailando's music-to-motion transformers, enough for
  5 s windows of 120 frames with rhythm and phrase structure. The face branch is a
  ResNet-18-like CNN (64-128-256-512 channels, 2 blocks per stage) with ArcFace's flatten + FC
  head (GroupNorm instead of BatchNorm): the capacity class of the smallest ArcFace backbones
  (iresnet18), what a student of a glint/w600k ArcFace needs to be useful for identity in B.

A saved model records ``m2p_version``; one from before the denoiser (the regressor with a
convolutional heatmap decoder) is refused with one line (:meth:`M2PEncoder.from_pretrained`).
Gradient checkpointing (``enable_gradient_checkpointing``) recomputes each Transformer layer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from dwm.shared.errors import UserFacingError
from dwm.shared.shards import load_manifest

from ..edm import karras_sigmas

M2P_VERSION = 2  # 1: the music-only regressor with a conv heatmap decoder (refused on load)

SIZES: dict[str, dict] = {
    "tiny": dict(hidden_dim=64, num_layers=2, num_heads=4, ff_mult=2, conv_kernel=5,
                 heatmap_height=56, heatmap_width=32,
                 face_channels=(8, 16, 32, 64), face_blocks=(1, 1, 1, 1), face_flatten=False),
    "full": dict(hidden_dim=512, num_layers=8, num_heads=8, ff_mult=4, conv_kernel=5,
                 heatmap_height=112, heatmap_width=64,
                 face_channels=(64, 128, 256, 512), face_blocks=(2, 2, 2, 2), face_flatten=True),
}
MIN_REF_CONF = 0.3  # reference joints below this score count as missing
# Body-size estimates from single bones, as multiples of the torso (neck to mid-hip), for
# references without visible hips (a portrait): shoulder width, neck to nose.
_SHOULDER_TO_TORSO, _NOSE_TO_TORSO = 0.75, 0.4
_NECK, _NOSE, _R_SH, _L_SH, _R_HIP, _L_HIP = 1, 0, 2, 5, 8, 11


@dataclass
class M2POutput(BaseOutput):
    heatmap_logits: torch.Tensor | None = None  # (B, T, K, H, W), from x0 (when asked for)
    coords: torch.Tensor | None = None  # (B, T, K, 2), x0 as x, y in [0, 1] of the frame
    face_embed: torch.Tensor | None = None  # (B, 512), L2-normalised
    x0: torch.Tensor | None = None  # (B, T, K, 2), x0 in the reference's units (the state)


def reference_frame(ref_pose: torch.Tensor | None, batch: int, aspect: float,
                    device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(centre (B, 2), scale (B,)) of the reference bodies, in frame heights (x times
    ``aspect`` = width / height, so a unit is the same number of pixels on both axes).

    Centre: the neck (else the mean of the visible joints, else the frame centre). Scale: the
    torso, neck to mid-hip; without both hips, the shoulder width or neck-to-nose scaled to a
    torso (else a quarter of the frame height). ``ref_pose``: (B, K, 3) x, y in [0, 1], score;
    None: no reference (frame centre, a quarter-height torso)."""
    if ref_pose is None:
        centre = torch.tensor([0.5 * aspect, 0.5], device=device).expand(batch, 2)
        return centre, torch.full((batch,), 0.25, device=device)
    p = ref_pose.float()
    xy = p[..., :2] * torch.tensor([aspect, 1.0], device=p.device)
    vis = p[..., 2] >= MIN_REF_CONF
    mean = (xy * vis[..., None]).sum(1) / vis.sum(1, keepdim=True).clamp_min(1)
    default = torch.tensor([0.5 * aspect, 0.5], device=p.device).expand_as(mean)
    centre = torch.where(vis.any(1, keepdim=True), mean, default)
    centre = torch.where(vis[:, _NECK, None], xy[:, _NECK], centre)

    def dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).norm(dim=-1)

    mid_hip = (xy[:, _R_HIP] + xy[:, _L_HIP]) / 2
    torso = dist(xy[:, _NECK], mid_hip)
    shoulders = dist(xy[:, _R_SH], xy[:, _L_SH]) / _SHOULDER_TO_TORSO
    nose = dist(xy[:, _NECK], xy[:, _NOSE]) / _NOSE_TO_TORSO
    scale = torch.full_like(torso, 0.25)
    for est, ok in ((nose, vis[:, _NECK] & vis[:, _NOSE]),
                    (shoulders, vis[:, _R_SH] & vis[:, _L_SH]),
                    (torso, vis[:, _NECK] & vis[:, _R_HIP] & vis[:, _L_HIP])):
        scale = torch.where(ok & (est > 1e-3), est, scale)  # later estimates are preferred
    return centre, scale.clamp(0.02, 2.0)


def pose_preconditioning(sigma: torch.Tensor, sigma_data: float):
    """EDM (Karras et al. 2022) c_skip, c_out, c_in, c_noise for data of std ``sigma_data``."""
    s2, d2 = sigma ** 2, sigma_data ** 2
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / (s2 + d2).sqrt()
    c_in = 1.0 / (s2 + d2).sqrt()
    return c_skip, c_out, c_in, 0.25 * sigma.log()


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
    """Pre-norm Transformer encoder layer (self-attention with key padding mask + MLP), its
    norms modulated by the condition (noise level + reference: adaLN, as DiT and EDGE's FiLM),
    so every layer knows how much to trust the noisy input."""

    def __init__(self, dim: int, heads: int, ff_mult: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.ff = nn.Sequential(nn.Linear(dim, dim * ff_mult), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(dim * ff_mult, dim))
        self.drop = nn.Dropout(dropout)
        self.modulation = nn.Linear(dim, 4 * dim)
        nn.init.zeros_(self.modulation.weight)  # starts as a plain pre-norm layer
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None,
                cond: torch.Tensor) -> torch.Tensor:
        scale1, shift1, scale2, shift2 = self.modulation(cond)[:, None].chunk(4, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        h, _ = self.attn(h, h, h, key_padding_mask=pad, need_weights=False)
        x = x + self.drop(h)
        return x + self.drop(self.ff(self.norm2(x) * (1 + scale2) + shift2))


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
    """Music-and-reference-to-pose denoiser with a face branch (see the module docstring).

    ``forward(audio_mel, audio_baseline, frame_mask=None, face_crop=None, *, ref_pose=None,
    noisy=None, sigma=None, known=None, known_mask=None, music_keep=None, heatmaps=True,
    grid=None)``: audio (B, T, n_mels) and (B, T, 35) normalised; frame_mask (B, T) 1 = real
    frame; face_crop (B, 3, 112, 112) in [0, 1] or None; ref_pose (B, K, 3) in [0, 1] of the
    frame + score, or None; noisy (B, T, K, 2) the noisy state at ``sigma`` (B,) (None: the
    deterministic one-step prediction ``D(0; pose_sigma_max)``); known (B, T, K, 2) frames given
    as context in [0, 1] of the frame, where known_mask (B, T) is 1; music_keep (B,) False drops
    the music (the unconditional branch of classifier-free guidance). Returns
    :class:`M2POutput` (x0 as coordinates and state, heatmap logits on ``grid`` (h, w) or the
    config's grid when ``heatmaps``, face embedding or None).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, n_mels: int = 80, baseline_dim: int = 35, num_joints: int = 18,
                 heatmap_height: int = 56, heatmap_width: int = 32, hidden_dim: int = 64,
                 num_layers: int = 2, num_heads: int = 4, ff_mult: int = 2, conv_kernel: int = 5,
                 dropout: float = 0.0, face_channels: tuple[int, ...] = (8, 16, 32, 64),
                 face_blocks: tuple[int, ...] = (1, 1, 1, 1), face_flatten: bool = False,
                 embed_dim: int = 512, size: str = "tiny", pose_sigma_data: float = 0.5,
                 pose_sigma_min: float = 0.002, pose_sigma_max: float = 20.0,
                 heatmap_sigma: float = 1.5, pose_kernel: int = 9,
                 m2p_version: int = M2P_VERSION):
        super().__init__()
        if m2p_version != M2P_VERSION:
            raise UserFacingError(f"M2PEncoder m2p_version={m2p_version}: this code builds "
                                  f"version {M2P_VERSION} (the reference-aware denoiser)")
        d, k = hidden_dim, num_joints
        self.audio_in = nn.Linear(n_mels + baseline_dim, d)
        self.null_music = nn.Parameter(torch.zeros(d))  # the music token when music is dropped
        # the noisy poses enter through a temporal convolution: a move is identified by its
        # trajectory over a beat, not by one frame's noisy joints
        self.pose_in = nn.Conv1d(k * 2, d, pose_kernel, padding=pose_kernel // 2)
        self.known_in = nn.Linear(k * 2 + 1, d)  # context frames (start pose, overlap) + mask
        self.ref_in = nn.Linear(k * 3, d)  # reference pose in its own units + visibility
        self.sigma_in = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.local = nn.Conv1d(d, d, conv_kernel, padding=conv_kernel // 2)
        self.layers = nn.ModuleList(_Block(d, num_heads, ff_mult, dropout)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, k * 2)
        nn.init.zeros_(self.head.weight)  # start as x0 = c_skip x (the EDM identity at low noise)
        nn.init.zeros_(self.head.bias)
        # per-joint Gaussian width of the heatmap logits, in pixels of the config's grid
        self.heatmap_log_width = nn.Parameter(torch.full((k,), math.log(heatmap_sigma)))
        self.face = _FaceNet(tuple(face_channels), tuple(face_blocks), embed_dim, face_flatten)
        self.gradient_checkpointing = False

    # -- building and loading ---------------------------------------------------------------
    @classmethod
    def from_size(cls, size: str, **overrides) -> M2PEncoder:
        if size not in SIZES:
            raise ValueError(f"unknown M2PEncoder size {size!r} (one of {', '.join(SIZES)})")
        return cls(**{**SIZES[size], "size": size, **overrides})

    @classmethod
    def for_data(cls, size: str, manifest_path: str | None = None, **overrides) -> M2PEncoder:
        """A fresh encoder of ``size`` whose heatmap grid is the data's (the manifest's
        ``pose_heatmap`` shape, when the manifest is readable). Any grid works: the heatmaps
        are drawn from coordinates, there is no upsampling stack to fit."""
        grid: dict[str, int] = {}
        if manifest_path:
            try:
                shape = load_manifest(manifest_path)["features"]["pose_heatmap"]["shape"]
                grid = {"heatmap_height": int(shape[-2]), "heatmap_width": int(shape[-1])}
            except (OSError, KeyError, TypeError, ValueError, IndexError):
                grid = {}  # no manifest yet (e.g. a bench on fake data): the size's grid
        return cls.from_size(size, **{**grid, **overrides})

    @classmethod
    def from_train_config(cls, cfg) -> M2PEncoder:
        """A fresh encoder as stage A builds one: ``cfg.model_size``, the grid of ``cfg.data``'s
        manifest, the pose denoiser's sigmas from the config (they are saved with the model)."""
        keys = ("pose_sigma_data", "pose_sigma_min", "pose_sigma_max")
        sigmas = {k: float(getattr(cfg, k)) for k in keys if hasattr(cfg, k)}
        return cls.for_data(cfg.model_size, getattr(cfg, "data", None), **sigmas)

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        """Refuses (one line) a saved encoder from before the reference-aware denoiser: its
        config has no ``m2p_version``, and its weights would not fit."""
        config_file = Path(path) / "config.json"
        try:
            version = json.loads(config_file.read_text()).get("m2p_version")
        except (OSError, ValueError):
            version = M2P_VERSION  # not a local folder: let diffusers say what is wrong
        if version != M2P_VERSION:
            raise UserFacingError(
                f"{config_file}: an M2PEncoder of version {version or 1} (the music-only "
                f"regressor), this code needs version {M2P_VERSION} (reference-aware pose "
                "denoiser); train stage A again")
        return super().from_pretrained(path, *args, **kwargs)

    def count_parameters(self) -> dict[str, int]:
        face = sum(p.numel() for p in self.face.parameters())
        total = sum(p.numel() for p in self.parameters())
        return {"denoiser": total - face, "face": face, "total": total}

    def _ckpt(self, fn, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(fn, *args)
        return fn(*args)

    # -- the reference's units ----------------------------------------------------------------
    @property
    def aspect(self) -> float:
        """Frame width / height (the heatmap grid is the frame at 1/8)."""
        return float(self.config.heatmap_width) / float(self.config.heatmap_height)

    def reference_units(self, ref_pose: torch.Tensor | None, batch: int, device=None):
        """(centre (B, 1, 1, 2), scale (B, 1, 1, 1), the reference pose in its own units
        (B, 1, K, 2), zeros where a joint is missing, visibility (B, K))."""
        centre, scale = reference_frame(ref_pose, batch, self.aspect, device)
        centre, scale = centre[:, None, None], scale[:, None, None, None]
        k = self.config.num_joints
        if ref_pose is None:
            zeros = torch.zeros(batch, 1, k, 2, device=centre.device)
            return centre, scale, zeros, torch.zeros(batch, k, device=centre.device)
        vis = (ref_pose[..., 2].float() >= MIN_REF_CONF).float()
        units = self._to_units(ref_pose[:, None, :, :2].float(), centre, scale) * vis[:, None, :, None]
        return centre, scale, units, vis

    def _to_units(self, coords, centre, scale):
        xy = coords.float() * torch.tensor([self.aspect, 1.0], device=coords.device)
        return (xy - centre) / scale

    def state_of(self, coords: torch.Tensor, ref_pose: torch.Tensor | None) -> torch.Tensor:
        """(B, T, K, 2) coordinates in [0, 1] -> the denoiser's state (reference units)."""
        centre, scale, _, _ = self.reference_units(ref_pose, coords.shape[0], coords.device)
        return self._to_units(coords, centre, scale)

    def coords_of(self, state: torch.Tensor, ref_pose: torch.Tensor | None) -> torch.Tensor:
        """Inverse of :meth:`state_of`."""
        centre, scale, _, _ = self.reference_units(ref_pose, state.shape[0], state.device)
        xy = state.float() * scale + centre
        return xy / torch.tensor([self.aspect, 1.0], device=state.device)

    def heatmap_logits(self, coords: torch.Tensor, grid: tuple[int, int] | None = None
                       ) -> torch.Tensor:
        """(..., K, 2) coordinates -> (..., K, h, w) logits: a Gaussian log-density per joint
        with its learned width (scaled to ``grid``, default the config's)."""
        h, w = grid or (self.config.heatmap_height, self.config.heatmap_width)
        width = self.heatmap_log_width.exp() * (h / self.config.heatmap_height)
        ys = (torch.arange(h, device=coords.device, dtype=torch.float32) + 0.5)
        xs = (torch.arange(w, device=coords.device, dtype=torch.float32) + 0.5)
        cx = coords[..., 0].float()[..., None, None] * w
        cy = coords[..., 1].float()[..., None, None] * h
        d2 = (xs - cx) ** 2 + (ys[:, None] - cy) ** 2
        return -d2 / (2 * width[..., None, None] ** 2)

    # -- the denoiser -------------------------------------------------------------------------
    def _tokens(self, audio_mel, audio_baseline, music_keep):
        x = self.audio_in(torch.cat([audio_mel, audio_baseline], dim=-1))
        if music_keep is not None:
            keep = music_keep.to(x.dtype).reshape(-1, 1, 1)
            x = keep * x + (1 - keep) * self.null_music.to(x.dtype)
        return x

    def denoise_state(self, noisy: torch.Tensor, sigma: torch.Tensor, audio_mel, audio_baseline,
                      frame_mask=None, ref_pose=None, known=None, known_mask=None,
                      music_keep=None) -> torch.Tensor:
        """x0 (B, T, K, 2) in state units from the noisy state at ``sigma`` (B,)."""
        b, t, k, _ = noisy.shape
        sigma = sigma.float().reshape(b)
        c_skip, c_out, c_in, c_noise = pose_preconditioning(sigma, self.config.pose_sigma_data)
        _, _, ref_units, vis = self.reference_units(ref_pose, b, noisy.device)
        x = self._tokens(audio_mel, audio_baseline, music_keep)
        dtype = x.dtype
        pose = (noisy.float() * c_in[:, None, None, None]).reshape(b, t, k * 2).to(dtype)
        x = x + self.pose_in(pose.transpose(1, 2)).transpose(1, 2)
        if known is not None and known_mask is not None:
            m = known_mask.float().reshape(b, t, 1)
            ks = self.state_of(known, ref_pose).reshape(b, t, k * 2) * m
            x = x + self.known_in(torch.cat([ks, m], -1).to(dtype))
        ref = torch.cat([ref_units[:, 0].reshape(b, k * 2), vis], -1)
        emb = self.ref_in(ref.to(dtype)) + self.sigma_in(
            sinusoidal_embedding(c_noise, x.shape[-1]).to(dtype))
        x = x + emb[:, None]
        x = x + self.local(x.transpose(1, 2)).transpose(1, 2)
        x = x + sinusoidal_positions(t, x.shape[2], x.device, dtype)
        pad = (frame_mask <= 0) if frame_mask is not None else None
        if pad is not None and pad.all(dim=1).any():  # an all-padding row would give NaN attention
            pad = pad & ~pad.all(dim=1, keepdim=True)
        cond = F.silu(emb)
        for layer in self.layers:
            x = self._ckpt(layer, x, pad, cond)
        out = self.head(self.norm(x)).float().reshape(b, t, k, 2)
        return noisy.float() * c_skip[:, None, None, None] + out * c_out[:, None, None, None]

    def encode_face(self, face_crop: torch.Tensor) -> torch.Tensor:
        return self._ckpt(self.face, face_crop)

    def forward(self, audio_mel: torch.Tensor, audio_baseline: torch.Tensor,
                frame_mask: torch.Tensor | None = None, face_crop: torch.Tensor | None = None, *,
                ref_pose: torch.Tensor | None = None, noisy: torch.Tensor | None = None,
                sigma: torch.Tensor | None = None, known: torch.Tensor | None = None,
                known_mask: torch.Tensor | None = None, music_keep: torch.Tensor | None = None,
                heatmaps: bool = True, grid: tuple[int, int] | None = None,
                return_dict: bool = True):
        b, t = audio_mel.shape[:2]
        k = self.config.num_joints
        if noisy is None:  # the deterministic one-step prediction D(0; sigma_max)
            noisy = torch.zeros(b, t, k, 2, device=audio_mel.device)
            sigma = torch.full((b,), float(self.config.pose_sigma_max), device=audio_mel.device)
        x0 = self.denoise_state(noisy, sigma, audio_mel, audio_baseline, frame_mask, ref_pose,
                                known, known_mask, music_keep)
        coords = self.coords_of(x0, ref_pose)
        logits = self.heatmap_logits(coords, grid) if heatmaps else None
        face = self.encode_face(face_crop) if face_crop is not None else None
        out = M2POutput(heatmap_logits=logits, coords=coords, face_embed=face, x0=x0)
        return out if return_dict else out.to_tuple()

    # -- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, audio_mel: torch.Tensor, audio_baseline: torch.Tensor, *,
               ref_pose: torch.Tensor | None = None, known: torch.Tensor | None = None,
               known_mask: torch.Tensor | None = None, frame_mask: torch.Tensor | None = None,
               steps: int = 16, music_guidance_scale: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, T, K, 2) coordinates in [0, 1] of the frame (not clipped): ``steps`` Heun steps
        (Karras sigmas from ``pose_sigma_max``); ``steps=1``: the deterministic ``D(0;
        sigma_max)``. Frames where ``known_mask`` is 1 are given (``known`` coordinates) and
        come out as given."""
        b, t = audio_mel.shape[:2]
        k = self.config.num_joints
        device = audio_mel.device
        cfg = self.config
        sigmas = karras_sigmas(int(steps), cfg.pose_sigma_min, cfg.pose_sigma_max).to(device)
        uncond = torch.zeros(b, dtype=torch.bool, device=device)

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            s = sigma.expand(b)
            args = (audio_mel, audio_baseline, frame_mask, ref_pose, known, known_mask)
            cond = self.denoise_state(x, s, *args)
            if music_guidance_scale == 1.0:
                return cond
            free = self.denoise_state(x, s, *args, music_keep=uncond)
            return free + music_guidance_scale * (cond - free)

        if steps == 1:
            x = denoise(torch.zeros(b, t, k, 2, device=device), sigmas[0])
        else:
            noise = torch.randn((b, t, k, 2), generator=generator,
                                device=generator.device if generator is not None else "cpu")
            x = noise.to(device) * sigmas[0]
            for i in range(len(sigmas) - 1):
                s, s_next = sigmas[i], sigmas[i + 1]
                d = (x - denoise(x, s)) / s
                x_next = x + (s_next - s) * d
                if s_next > 0:  # Heun's correction (EDM's deterministic sampler)
                    d2 = (x_next - denoise(x_next, s_next)) / s_next
                    x_next = x + (s_next - s) * (d + d2) / 2
                x = x_next
        coords = self.coords_of(x, ref_pose)
        if known is not None and known_mask is not None:
            m = known_mask.float()[..., None, None] > 0
            coords = torch.where(m, known.float(), coords)
        return coords


def sinusoidal_embedding(values: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) scalars -> (B, dim) sin/cos features (the noise level's embedding)."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=values.device, dtype=torch.float32)
                     * (-math.log(1000.0) / max(half - 1, 1)))
    arg = values.float()[:, None] * freq[None] * 10.0
    return torch.cat([arg.sin(), arg.cos()], -1)
