"""Stage B: single frames. The UNet's spatial layers, the ReferenceNet, the pose guider and the ID
adapter learn to render the reference person in the target frame's pose.

Per micro-batch (view B, see :mod:`dwm.datasets.views`):

1. Guidance. Until the last ``scheduled_sampling_fraction`` of the stage the pose heatmap and the
   face embedding are the ground truth; then the M2PEncoder's are mixed in with ratio r ramping
   0 -> 1. Its pose is its *denoising of the ground-truth poses* of the audio window around the
   target (noised at a sigma drawn log-uniformly up to ``scheduled_sampling_sigma``, with the
   music and the reference frame's pose), detached: it still describes the target frame, with
   the errors the M2PEncoder makes. A free-running sample would be another dance, and the UNet
   would learn to ignore the pose. Samples without audio keep the ground-truth pose. Whenever
   the M2PEncoder has no LR (the freeze matrix delays it to ``m2p_unfreeze_fraction_b``) its
   outputs are detached; while it trains, L_heat keeps its heatmaps tied to the target pose.
2. EDM step: log-normal sigma, noisy target, one denoiser call with the reference (ReferenceNet +
   SVD concat), CLIP token, face tokens and pose guidance scaled by the condition ramp; condition
   dropout per sample (see :func:`dwm.training.schedules.dropout_masks`).
3. Loss: ``diffusion_loss_weight * L_diff + id_loss_weight * L_id + pose_loss_weight * L_heat``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dwm.training import edm, losses, schedules
from dwm.training.models.animator import (SVD_SCALING_FACTOR, Conditioning, build_dance_model,
                                          conditioning_latent, denoise)
from dwm.training.models.dance_model import DanceModel

from .base import Stage

VALIDATION_SIGMAS = (0.05, 0.5, 2.0, 10.0)  # fixed noise levels of the validation loss
VALIDATION_SEED = 1234


class VideoStage(Stage):
    """What stages B and C share: model building, guidance from the M2PEncoder, conditioning."""

    def build_model(self, cfg: Any, init_path: str | None) -> DanceModel:
        # gradient checkpointing is switched on by the engine (cfg.gradient_checkpointing)
        return build_dance_model(cfg, self.name, init_path)

    # -- inputs --------------------------------------------------------------------------------
    @staticmethod
    def clip_context(model: DanceModel, batch: dict[str, Any], b: int,
                     device: torch.device) -> torch.Tensor:
        """(B, D) CLIP embeddings; zeros where a sample has none (the unconditional token)."""
        dim = model.unet.config.cross_attention_dim
        dim = dim if isinstance(dim, int) else int(dim[0])
        clip = batch.get("clip_embed")
        if clip is None or clip.shape[-1] != dim:
            return torch.zeros(b, dim, device=device)
        valid = batch.get("clip_valid")
        clip = clip.float()
        return clip * valid.float()[:, None] if valid is not None else clip

    def m2p_guidance(self, model: DanceModel, batch: dict[str, Any], frames: torch.Tensor | None,
                     trains: bool, grid: tuple[int, int], generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The M2PEncoder's denoising of the ground-truth poses: (heatmap logits on its grid
        (B, F, K, H, W), heatmaps on the latent ``grid`` (B, F, K, h, w) in [0, 1] (detached),
        face embedding (B, 512)); logits and face are detached unless it ``trains``.
        ``frames``: (B,) index of the one frame per sample to keep (stage B: the target in its
        audio window), or None for all (stage C: the clip)."""
        from dwm.training.models.m2p import logits_to_heatmaps

        m2p = model.m2p
        m2p.train(trains and model.training)
        # BatchNorm keeps stage A's statistics: per-device batches of the video stages are tiny
        # (often 1, where BatchNorm cannot even train) and mostly one video.
        for module in m2p.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
        seq = batch["window_coords"] if frames is not None else batch["coords"]
        seq = seq.float()
        ref_pose = batch["ref_pose"].float()
        b, device = seq.shape[0], seq.device
        sigma = self.scheduled_sampling_sigmas(m2p, b, generator).to(device)
        noise = torch.randn(seq.shape, generator=generator,
                            device=generator.device if generator is not None else "cpu")
        with torch.set_grad_enabled(trains and torch.is_grad_enabled()):
            state = m2p.state_of(seq, ref_pose)
            noisy = state + noise.to(device) * sigma[:, None, None, None]
            out = m2p(batch["audio_mel"], batch["audio_baseline"], batch.get("frame_mask"),
                      batch["ref_face_crop"], ref_pose=ref_pose, noisy=noisy, sigma=sigma)
        logits, coords = out.heatmap_logits, out.coords
        if frames is not None:
            pick = torch.arange(b, device=device), frames
            logits, coords = logits[pick][:, None], coords[pick][:, None]
        heat = logits_to_heatmaps(m2p.heatmap_logits(coords.detach(), grid))
        face = out.face_embed
        if not trains:
            logits, face = logits.detach(), face.detach()
        return logits, heat.detach(), face

    def scheduled_sampling_sigmas(self, m2p, batch: int,
                                  generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) noise levels of the ground-truth poses the M2PEncoder denoises for guidance:
        log-uniform in [pose_sigma_min, scheduled_sampling_sigma]."""
        lo = math.log(float(m2p.config.pose_sigma_min))
        hi = math.log(max(float(self.cfg.scheduled_sampling_sigma), m2p.config.pose_sigma_min))
        u = torch.rand(batch, generator=generator,
                       device=generator.device if generator is not None else "cpu")
        return (lo + u * (hi - lo)).exp()

    def guidance(self, model: DanceModel, batch: dict[str, Any], gt_pose: torch.Tensor,
                 ratio: float, m2p_trains: bool, frames: torch.Tensor | None,
                 generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(pose (B, F, K, h, w), face embedding (B, 512), L_heat or None)."""
        gt_face = batch["face_embed"].float()
        if model.m2p is None or (ratio <= 0 and not m2p_trains):
            return gt_pose, gt_face, None
        logits, m2p_pose, m2p_face = self.m2p_guidance(model, batch, frames, m2p_trains,
                                                       tuple(gt_pose.shape[-2:]), generator)
        heat_loss = None
        if m2p_trains:
            conf = batch["conf"].float()
            if frames is None:
                conf = conf * batch["frame_mask"].float()[..., None]
            else:
                conf = conf[:, None]
            conf = conf * batch["audio_valid"].float().reshape(-1, 1, 1)
            heat_loss = losses.heatmap_loss(logits.flatten(0, 1), gt_pose.flatten(0, 1),
                                            conf.flatten(0, 1))
        audio_ok = batch["audio_valid"].float()
        pose = schedules.mix_guidance(m2p_pose, gt_pose, ratio * audio_ok)
        face = schedules.mix_guidance(m2p_face.float(), gt_face, ratio)
        face = F.normalize(face, dim=-1) * (gt_face.norm(dim=-1, keepdim=True) > 0)
        return pose, face, heat_loss

    def conditioning(self, model: DanceModel, batch: dict[str, Any], pose: torch.Tensor,
                     face: torch.Tensor, pose_scale: float, dropout: float,
                     generator: torch.Generator | None = None) -> Conditioning:
        cfg = self.cfg
        ref = batch["ref_latent"].float()
        b, device = ref.shape[0], ref.device
        keep_pose, keep_app = schedules.dropout_masks(b, dropout, device=device)
        # The shards' latents are scaled; SVD concatenates the unscaled latent of ITS VAE. The
        # factor is the SVD VAE's even when preprocessing used TAESD (whose latents already live
        # in the scaled SD/SVD space).
        scale = SVD_SCALING_FACTOR
        return Conditioning(
            ref_latent=ref, clip_embed=self.clip_context(model, batch, b, device),
            face_embed=face, pose=pose, pose_scale=pose_scale,
            keep_pose=keep_pose, keep_appearance=keep_app,
            keep_face=batch["face_valid"].float() > 0,
            concat_latent=conditioning_latent(ref, scale, cfg.noise_aug_strength, generator),
            scaling_factor=scale,
            added_time_ids=edm.added_time_ids(b, cfg.svd_fps, cfg.motion_bucket_id,
                                              cfg.noise_aug_strength, device=device))

    def noise(self, target: torch.Tensor, sigma: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(noisy latents, sigma) for (B, F, C, h, w) targets."""
        b = target.shape[0]
        if sigma is None:
            sigma = edm.sample_sigmas(b, self.cfg.edm_p_mean, self.cfg.edm_p_std,
                                      generator=generator, device=target.device)
        noise = torch.randn(target.shape, generator=generator,
                            device=generator.device if generator is not None else "cpu")
        return edm.add_noise(target, sigma, noise.to(target.device, target.dtype)), sigma


class StageB(VideoStage):
    name = "B"
    view = "B"

    def total_steps(self, cfg: Any) -> int:
        return int(cfg.stage_b_steps)

    def _losses(self, model: DanceModel, batch: dict[str, Any], step: int, total_steps: int,
                sigma: torch.Tensor | None = None, generator: torch.Generator | None = None,
                dropout: float | None = None) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        ratio = schedules.scheduled_sampling_ratio(step, total_steps,
                                                   cfg.scheduled_sampling_fraction)
        m2p_trains = schedules.m2p_trains("B", cfg, step, total_steps) and model.training
        gt_pose = batch["heatmap"].float()[:, None]  # (B, 1, K, h, w)
        pose, face, heat_loss = self.guidance(model, batch, gt_pose, ratio, m2p_trains,
                                              batch["audio_target"], generator)
        scale = schedules.condition_scale(step, total_steps, cfg.guidance_scale)
        cond = self.conditioning(model, batch, pose, face, scale,
                                 cfg.condition_dropout if dropout is None else dropout, generator)
        target = batch["target_latent"].float()[:, None]
        noisy, sigma = self.noise(target, sigma, generator)
        denoised = denoise(model, noisy, sigma, cond)
        out = {"diff": losses.diffusion_loss(denoised, target, sigma)}
        if cfg.id_loss_form == "arcface":
            out["id"] = self.arcface_loss(batch, denoised[:, 0], sigma)
        else:
            out["id"] = losses.face_region_loss(denoised, target, sigma,
                                                batch["face_mask"].float()[:, None],
                                                cfg.face_mask_weight)
        if heat_loss is not None:
            out["heat"] = heat_loss
        return out

    # -- the ArcFace form of L_id (id_loss_form=arcface) ---------------------------------------
    def identity_models(self, device: torch.device
                        ) -> tuple[torch.nn.Module, torch.nn.Module, float]:
        """(VAE, TorchArcFace, the VAE's scaling factor), frozen, loaded on first use (not
        pickled with the stage)."""
        cached = self.__dict__.get("_identity_models")
        if cached is None:
            from dwm.shared.errors import UserFacingError
            from dwm.shared.registry import load_vae

            if not self.cfg.arcface_weights:
                raise UserFacingError(
                    "id_loss_form=arcface needs arcface_weights=<folder with config.json and "
                    "safetensors of a dwm.training.losses.TorchArcFace>")
            if not Path(self.cfg.arcface_weights).is_dir():
                raise UserFacingError(f"arcface_weights={self.cfg.arcface_weights}: no such "
                                      "folder (config.json + diffusion_pytorch_model.safetensors)")
            vae, vae_scale = load_vae(self.cfg.models, device=device)
            arcface = losses.TorchArcFace.from_pretrained(self.cfg.arcface_weights).to(device)
            for m in (vae, arcface):
                m.requires_grad_(False).eval()
            cached = self.__dict__["_identity_models"] = (vae, arcface, float(vae_scale))
        return cached

    def arcface_loss(self, batch: dict[str, Any], denoised: torch.Tensor,
                     sigma: torch.Tensor) -> torch.Tensor:
        vae, arcface, vae_scale = self.identity_models(denoised.device)
        mask = batch["face_mask"].float()
        decode = losses.make_face_decoder(vae, vae_scale, mask)
        valid = batch["face_valid"].float() * (mask.flatten(1).amax(-1) > 0.5).float()
        return losses.arcface_identity_loss(denoised, sigma, decode, arcface,
                                            batch["face_embed"].float(), valid,
                                            self.cfg.arcface_max_sigma)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_identity_models", None)  # data-loader workers get the config only
        return state

    def compute_loss(self, model: DanceModel, batch: dict[str, Any], step: int,
                     total_steps: int) -> tuple[torch.Tensor, dict[str, float]]:
        terms = self._losses(model, batch, step, total_steps)
        total = weighted_total(self.cfg, terms)
        logs = {k: float(v.detach()) for k, v in terms.items()}
        logs["scheduled_sampling"] = schedules.scheduled_sampling_ratio(
            step, total_steps, self.cfg.scheduled_sampling_fraction)
        logs["condition_scale"] = schedules.condition_scale(step, total_steps,
                                                            self.cfg.guidance_scale)
        return total, logs

    @torch.no_grad()
    def validate(self, model: DanceModel, val_batches: list[dict[str, Any]], step: int,
                 writer: Any, out_dir: Path) -> dict[str, float]:
        return validation_losses(self, model, val_batches, step)


def weighted_total(cfg: Any, terms: dict[str, torch.Tensor]) -> torch.Tensor:
    weights = {"diff": cfg.diffusion_loss_weight, "id": cfg.id_loss_weight,
               "heat": cfg.pose_loss_weight, "temp": cfg.temporal_loss_weight}
    return sum(weights[k] * v for k, v in terms.items())


def validation_losses(stage: VideoStage, model: DanceModel, val_batches: list[dict[str, Any]],
                      step: int) -> dict[str, float]:
    """Loss terms at fixed noise levels and fixed noise, no condition dropout, guidance as at
    ``step`` (comparable across steps: only the model changes)."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    total_steps = stage.total_steps(stage.cfg)
    try:
        for batch in val_batches:
            for sigma_value in VALIDATION_SIGMAS:
                gen = torch.Generator().manual_seed(VALIDATION_SEED)
                b = batch["ref_latent"].shape[0]
                sigma = torch.full((b,), sigma_value, device=batch["ref_latent"].device)
                terms = stage._losses(model, batch, step, total_steps, sigma=sigma, generator=gen,
                                      dropout=0.0)
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n += 1
    finally:
        model.train(was_training)
    return {f"loss_{k}": v / max(n, 1) for k, v in sums.items()}
