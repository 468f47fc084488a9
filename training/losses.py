"""Losses of stages B and C.

- ``diffusion_loss`` (L_diff): EDM-weighted MSE between the denoised latents and the target
  latents (the plain ``MSE(model_pred, target_latents)``, with SVD's weighting).
- ``face_region_loss`` (L_id, latent form, the default): the same weighted error inside the
  soft face mask, times ``face_mask_weight - 1``; so ``L_diff + L_id`` is exactly the MSE with
  weight ``face_mask_weight`` (3) inside the face and 1 outside (StableAnimator's face-masked
  objective); ``id_loss_weight`` scales how much of that emphasis is used.
- ``arcface_identity_loss`` (L_id, embedding form): 1 - cosine between ArcFace embeddings of the
  decoded face crop and the reference identity, for low-noise samples only.
- ``heatmap_loss`` (L_heat): cross-entropy between the M2PEncoder's spatial softmax and the target
  heatmap normalised to a distribution, per visible joint.
- ``temporal_loss`` (L_temp): frame-to-frame differences of the denoised latents matched to those
  of the targets.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from dwm.shared.vae import decode_latents

from . import edm


def _per_sample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], *([1] * (like.ndim - 1))).to(like.dtype)


def _masked_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` (B, ...) over elements, with per-element ``weights`` broadcastable."""
    if weights is None:
        return values.mean()
    weights = torch.broadcast_to(weights, values.shape)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def diffusion_loss(denoised: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor,
                   frame_mask: torch.Tensor | None = None) -> torch.Tensor:
    """EDM-weighted MSE. ``denoised``/``target``: (B, [F,] C, h, w); ``sigma``: (B,);
    ``frame_mask``: (B, F), 0 for padded frames (excluded)."""
    err = (denoised.float() - target.float()) ** 2
    err = err * _per_sample(edm.loss_weight(sigma.float()), err)
    weights = None
    if frame_mask is not None:
        weights = frame_mask.float().reshape(*frame_mask.shape, 1, 1, 1)
    return _masked_mean(err, weights)


def face_weight_map(face_mask: torch.Tensor, inside: float = 3.0) -> torch.Tensor:
    """Per-pixel weight: ``inside`` in the (soft) face mask, 1 outside."""
    return 1.0 + (inside - 1.0) * face_mask.float()


def face_region_loss(denoised: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor,
                     face_mask: torch.Tensor, face_mask_weight: float = 3.0,
                     frame_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Extra EDM-weighted squared error inside the face: ``(face_mask_weight - 1) * mask * err``,
    normalised like :func:`diffusion_loss` (per element of the whole latent), so that
    ``diffusion_loss + face_region_loss`` = MSE weighted by :func:`face_weight_map`.

    ``face_mask``: (B, [F,] h, w) in [0, 1] at latent resolution."""
    err = (denoised.float() - target.float()) ** 2
    err = err * _per_sample(edm.loss_weight(sigma.float()), err)
    extra = (face_weight_map(face_mask, face_mask_weight) - 1.0).unsqueeze(-3)  # channel axis
    weights = None
    if frame_mask is not None:
        weights = frame_mask.float().reshape(*frame_mask.shape, 1, 1, 1)
        extra = extra * weights
    num = (err * extra).sum()
    den = (torch.broadcast_to(weights, err.shape).sum() if weights is not None
           else torch.tensor(float(err.numel()), device=err.device))
    return num / den.clamp_min(1.0)


def arcface_identity_loss(denoised: torch.Tensor, sigma: torch.Tensor,
                          decode_faces: Callable[[torch.Tensor], torch.Tensor],
                          arcface: torch.nn.Module, target_embed: torch.Tensor,
                          valid: torch.Tensor | None = None,
                          max_sigma: float = 1.0) -> torch.Tensor:
    """1 - cos(ArcFace(decode_faces(denoised)), target_embed) over samples with sigma <= max_sigma.

    ``decode_faces(latents, index)`` maps (N, C, h, w) latents of the samples ``index`` to
    (N, 3, 112, 112) face crops in [0, 1] (VAE decode + crop, differentiable); ``arcface`` maps
    crops to (N, 512) embeddings. Samples at high noise are left out: their denoised estimates
    are too blurry for a face recogniser.
    """
    use = sigma <= max_sigma
    if valid is not None:
        use = use & (valid > 0)
    if not bool(use.any()):
        return denoised.sum() * 0.0  # keeps the graph (DDP) and the dtype
    crops = decode_faces(denoised[use], use.nonzero().squeeze(1))
    emb = F.normalize(arcface(crops).float(), dim=-1)
    ref = F.normalize(target_embed[use].float(), dim=-1)
    return (1.0 - (emb * ref).sum(-1)).mean()


def heatmap_loss(logits: torch.Tensor, target: torch.Tensor,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """Spatial cross-entropy. ``logits``/``target``: (N, K, H, W) (target heatmaps >= 0, any
    scale; resized to the logits' grid when they differ); ``weights``: (N, K) (confidence, 0 for
    missing joints). Joints whose target is empty are left out."""
    if target.shape[-2:] != logits.shape[-2:]:
        target = F.interpolate(target.float(), size=logits.shape[-2:], mode="bilinear",
                               align_corners=False)
    t = target.float().flatten(-2).clamp_min(0)
    mass = t.sum(-1)
    dist = t / mass.clamp_min(1e-8)[..., None]
    logp = torch.log_softmax(logits.float().flatten(-2), dim=-1)
    ce = -(dist * logp).sum(-1)  # (N, K)
    w = (mass > 1e-6).float()
    if weights is not None:
        w = w * weights.float()
    return (ce * w).sum() / w.sum().clamp_min(1e-8)


def temporal_loss(denoised: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor | None = None,
                  frame_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between frame differences of denoised and target latents, (B, F, C, h, w).

    With ``sigma``, the error is EDM-weighted like :func:`diffusion_loss` (same scale at every
    noise level). A pair of frames counts only when both are real frames."""
    if denoised.shape[1] < 2:
        return denoised.sum() * 0.0
    d_pred = denoised.float()[:, 1:] - denoised.float()[:, :-1]
    d_true = target.float()[:, 1:] - target.float()[:, :-1]
    err = (d_pred - d_true) ** 2
    if sigma is not None:
        err = err * _per_sample(edm.loss_weight(sigma.float()), err)
    weights = None
    if frame_mask is not None:
        pair = frame_mask.float()[:, 1:] * frame_mask.float()[:, :-1]
        weights = pair.reshape(*pair.shape, 1, 1, 1)
    return _masked_mean(err, weights)


# ---------------------------------------------------------------------------------------------
# The ArcFace form of L_id: a differentiable torch ArcFace and a face crop from decoded frames
# ---------------------------------------------------------------------------------------------
class _IBasicBlock(torch.nn.Module):
    """iresnet block: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        nn = torch.nn
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class TorchArcFace(ModelMixin, ConfigMixin):
    """ArcFace iresnet backbone in torch (parameter names follow insightface's arcface_torch
    iresnet, so its published state dicts convert to safetensors key for key).

    Input: (B, 3, 112, 112) RGB in [0, 1]; output: (B, embed_dim) L2-normalised.
    ``layers=(3, 13, 30, 3)`` is iresnet100, ``(2, 2, 2, 2)`` iresnet18; tests use a tiny
    one. Load real weights with ``TorchArcFace.from_pretrained(folder)`` (config.json +
    safetensors)."""

    @register_to_config
    def __init__(self, layers: tuple[int, ...] = (3, 13, 30, 3),
                 widths: tuple[int, ...] = (64, 128, 256, 512), embed_dim: int = 512,
                 input_size: int = 112):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = nn.PReLU(widths[0])
        cin = widths[0]
        for i, (n, cout) in enumerate(zip(layers, widths)):
            blocks = [_IBasicBlock(cin, cout, 2)]
            blocks += [_IBasicBlock(cout, cout, 1) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout
        self.num_stages = len(layers)
        side = input_size // 2 ** len(layers)
        self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
        self.fc = nn.Linear(cin * side * side, embed_dim)
        self.features = nn.BatchNorm1d(embed_dim, eps=1e-5)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1((crops - 0.5) / 0.5)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = self.bn2(x).flatten(1)
        return F.normalize(self.features(self.fc(x)), dim=-1)


def face_boxes_from_masks(face_mask: torch.Tensor, threshold: float = 0.5,
                          grow: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Square boxes (B, 4) x0, y0, x1, y1 in [0, 1] around each (B, h, w) mask's pixels above
    ``threshold`` (grown by ``grow``), and (B,) validity (False for empty masks)."""
    b, h, w = face_mask.shape
    on = face_mask > threshold
    valid = on.flatten(1).any(-1)
    ys = torch.arange(h, device=face_mask.device, dtype=torch.float32)
    xs = torch.arange(w, device=face_mask.device, dtype=torch.float32)
    big = torch.tensor(1e9, device=face_mask.device)
    rows, cols = on.any(-1), on.any(-2)  # (B, h), (B, w)
    y0 = torch.where(rows, ys, big).amin(-1) / h
    y1 = (torch.where(rows, ys, -big).amax(-1) + 1) / h
    x0 = torch.where(cols, xs, big).amin(-1) / w
    x1 = (torch.where(cols, xs, -big).amax(-1) + 1) / w
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    # square in pixels: the side is the larger extent, measured in the same unit on both axes
    side_px = torch.maximum((x1 - x0) * w, (y1 - y0) * h) * grow
    half_x, half_y = side_px / w / 2, side_px / h / 2
    boxes = torch.stack([cx - half_x, cy - half_y, cx + half_x, cy + half_y], dim=-1)
    boxes = torch.where(valid[:, None], boxes, torch.tensor([0.0, 0.0, 1.0, 1.0],
                                                             device=face_mask.device))
    return boxes, valid


def crop_boxes(images: torch.Tensor, boxes: torch.Tensor, size: int = 112) -> torch.Tensor:
    """Differentiable crops (B, 3, size, size) of ``boxes`` (B, 4, in [0, 1]) from (B, 3, H, W)."""
    b = images.shape[0]
    x0, y0, x1, y1 = boxes.unbind(-1)
    theta = torch.zeros(b, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = (x1 - x0)
    theta[:, 0, 2] = x0 + x1 - 1
    theta[:, 1, 1] = (y1 - y0)
    theta[:, 1, 2] = y0 + y1 - 1
    grid = F.affine_grid(theta, (b, 3, size, size), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


def make_face_decoder(vae: torch.nn.Module, scaling_factor: float,
                      face_mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``decode_faces`` for :func:`arcface_identity_loss`: scaled (N, C, h, w) latents -> VAE
    decode (with gradient) -> square crop around the face mask's box -> (N, 3, 112, 112).
    The crop is box-based, not 5-point aligned (the target frame's landmarks are not in view B)."""
    boxes, _ = face_boxes_from_masks(face_mask, grow=1.2)

    def decode(latents: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        images = decode_latents(vae, latents / scaling_factor, num_frames=1, grad=True)
        sel = boxes if index is None else boxes[index]
        return crop_boxes(images.to(latents.dtype), sel)

    return decode
