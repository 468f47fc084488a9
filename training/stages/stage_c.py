"""Stage C: clips of T frames. Only the UNet's temporal layers learn (plus, optionally, the
M2PEncoder at ``m2p_lr_stage_c``); everything stage B trained is frozen.

- Temporal curriculum: T grows linearly from ``sequence_length`` to ``max_sequence_length`` over
  the stage (:meth:`StageC.sequence_length`, asked by the data pipeline for each step).
- Guidance: the M2PEncoder's denoising of the clip's ground-truth poses (at a sigma up to
  ``scheduled_sampling_sigma``, as in stage B) and its face embedding, mixed with the ground
  truth by ``stage_c_m2p_mix`` (1 = all M2P); the pose detached, the face detached unless the
  M2PEncoder trains. The pose scale is ``guidance_scale`` (stage B's ramp is over).
- Loss: ``diffusion_loss_weight * L_diff + id_loss_weight * L_id + temporal_loss_weight * L_temp
  (+ pose_loss_weight * L_heat while the M2PEncoder trains)``, padded frames excluded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dwm.training import losses, schedules
from dwm.training.models.animator import denoise
from dwm.training.models.dance_model import DanceModel

from .stage_b import VideoStage, validation_losses, weighted_total


class StageC(VideoStage):
    name = "C"
    view = "C"

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.current_length = int(cfg.sequence_length)

    def total_steps(self, cfg: Any) -> int:
        return int(cfg.stage_c_steps)

    def sequence_length(self, step: int, total_steps: int) -> int:
        return schedules.curriculum_length(step, total_steps, int(self.cfg.sequence_length),
                                           int(self.cfg.max_sequence_length))

    def on_step_start(self, step: int, total_steps: int) -> None:
        self.current_length = self.sequence_length(step, total_steps)

    def _losses(self, model: DanceModel, batch: dict[str, Any], step: int, total_steps: int,
                sigma: torch.Tensor | None = None, generator: torch.Generator | None = None,
                dropout: float | None = None) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        m2p_trains = schedules.m2p_trains("C", cfg, step, total_steps) and model.training
        gt_pose = batch["heatmap"].float()  # (B, T, K, h, w)
        pose, face, heat_loss = self.guidance(model, batch, gt_pose, float(cfg.stage_c_m2p_mix),
                                              m2p_trains, None, generator)
        cond = self.conditioning(model, batch, pose, face, float(cfg.guidance_scale),
                                 cfg.condition_dropout if dropout is None else dropout, generator)
        target = batch["latents"].float()
        frame_mask = batch["frame_mask"].float()
        noisy, sigma = self.noise(target, sigma, generator)
        denoised = denoise(model, noisy, sigma, cond)
        out = {"diff": losses.diffusion_loss(denoised, target, sigma, frame_mask),
               "id": losses.face_region_loss(denoised, target, sigma, batch["face_mask"].float(),
                                             cfg.face_mask_weight, frame_mask),
               "temp": losses.temporal_loss(denoised, target, sigma, frame_mask)}
        if heat_loss is not None:
            out["heat"] = heat_loss
        return out

    def compute_loss(self, model: DanceModel, batch: dict[str, Any], step: int,
                     total_steps: int) -> tuple[torch.Tensor, dict[str, float]]:
        terms = self._losses(model, batch, step, total_steps)
        logs = {k: float(v.detach()) for k, v in terms.items()}
        logs["seq_len"] = float(batch["latents"].shape[1])
        return weighted_total(self.cfg, terms), logs

    @torch.no_grad()
    def validate(self, model: DanceModel, val_batches: list[dict[str, Any]], step: int,
                 writer: Any, out_dir: Path) -> dict[str, float]:
        return validation_losses(self, model, val_batches, step)
