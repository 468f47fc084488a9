"""Losses of stages B and C.

- ``diffusion_loss`` (L_diff): EDM-weighted MSE between the denoised latents and the target
  latents (the seed's ``MSE(model_pred, target_latents)`` with SVD's weighting).
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

    ``decode_faces`` maps (B, C, h, w) latents to (B, 3, 112, 112) face crops in [0, 1] (VAE
    decode + aligned crop, differentiable); ``arcface`` maps crops to (B, 512) embeddings. Samples
    at high noise are left out: their denoised estimates are too blurry for a face recogniser.
    """
    use = sigma <= max_sigma
    if valid is not None:
        use = use & (valid > 0)
    if not bool(use.any()):
        return denoised.sum() * 0.0  # keeps the graph (DDP) and the dtype
    crops = decode_faces(denoised[use])
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
