"""Schedules of stages B and C, each driven by one config key and a pure function of the step.

- :func:`scheduled_sampling_ratio` (``scheduled_sampling_fraction``): over the last fraction of
  stage B, r ramps 0 -> 1 and the pose/face guidance is ``r * m2p + (1 - r) * ground truth``.
- :func:`condition_scale` (``guidance_scale``): ``min(guidance_scale, 0.5 + step / (0.3 total))``
  multiplies the pose guidance in stage B.
- :func:`m2p_trains` (freeze matrix): whether the M2PEncoder has a non-zero LR at this point of the
  stage; when it does not, its outputs are detached.
- :func:`curriculum_length` (``sequence_length`` -> ``max_sequence_length``): the T of stage C's
  batches grows linearly with progress.
- :func:`dropout_masks` (``condition_dropout``): which samples lose their pose guidance and which
  lose their appearance (CLIP token + reference latent + ReferenceNet features + face tokens),
  independently, each with probability ``condition_dropout``.
"""

from __future__ import annotations

from typing import Any

import torch

from . import freeze


def progress(step: int, total_steps: int) -> float:
    """Fraction of the stage done before optimiser step ``step`` (0-based), in [0, 1]."""
    if total_steps <= 0:
        return 1.0
    return min(1.0, max(0.0, step / total_steps))


def scheduled_sampling_ratio(step: int, total_steps: int, fraction: float) -> float:
    """0 until the last ``fraction`` of the stage starts, then linear to 1 at the last step
    (``step = total_steps - 1``)."""
    if fraction <= 0 or total_steps <= 0:
        return 0.0
    last = max(total_steps - 1, 1)
    start = (1.0 - min(fraction, 1.0)) * last
    if step >= last:
        return 1.0
    return float(min(1.0, max(0.0, (step - start) / (last - start))))


def mix_guidance(m2p: torch.Tensor, gt: torch.Tensor, ratio: float | torch.Tensor) -> torch.Tensor:
    """``ratio * m2p + (1 - ratio) * gt`` (ratio a float or per-sample (B,))."""
    if isinstance(ratio, torch.Tensor):
        ratio = ratio.to(gt.dtype).reshape(ratio.shape[0], *([1] * (gt.ndim - 1)))
    return ratio * m2p + (1 - ratio) * gt


def condition_scale(step: int, total_steps: int, guidance_scale: float) -> float:
    """``min(guidance_scale, 0.5 + step / (0.3 * total_steps))``."""
    if total_steps <= 0:
        return float(guidance_scale)
    return float(min(guidance_scale, 0.5 + step / (0.3 * total_steps)))


def m2p_trains(stage: str, cfg: Any, step: int, total_steps: int) -> bool:
    """Whether the M2PEncoder gets a non-zero LR at ``step`` (read from the freeze matrix)."""
    rule = next(r for r in freeze.FREEZE_MATRIX if r.group == "m2p")
    mode = rule.stages[stage]
    return freeze.is_trainable(mode, cfg) and \
        freeze.group_lr(mode, cfg, progress(step, total_steps)) > 0


def curriculum_length(step: int, total_steps: int, start_length: int, max_length: int) -> int:
    """T for ``step``: ``start_length`` at the first step, ``max_length`` at the last, linear."""
    if max_length <= start_length or total_steps <= 1:
        return int(start_length)
    p = min(1.0, max(0.0, step / (total_steps - 1)))
    return int(round(start_length + p * (max_length - start_length)))


def dropout_masks(batch: int, p: float, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(keep_pose, keep_appearance), each (B,) bool, each False with probability ``p``."""
    if p <= 0:
        ones = torch.ones(batch, dtype=torch.bool, device=device)
        return ones, ones.clone()
    u = torch.rand(2, batch, generator=generator,
                   device=generator.device if generator is not None else "cpu")
    keep = (u >= p).to(device)
    return keep[0], keep[1]
