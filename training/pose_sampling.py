"""A whole song's dance from the M2PEncoder: windows that continue each other.

The denoiser sees ``window`` frames at a time. Each window after the first starts ``window -
overlap`` frames after the previous one, and the frames it shares with what is already generated
are given to it as context (inpainted, the way EDGE makes long dances): the new window continues
the motion instead of starting a second, independent dance. Cross-fading two independent samples
would average two dances into one that neither is (the averaging the denoiser exists to avoid),
and would blur the seam. The first window starts from the reference pose (frame 0 = the photo's
body) unless ``start_from_reference`` is off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .models.m2p import logits_to_heatmaps


@dataclass
class Dance:
    coords: np.ndarray  # (T, K, 2) float32, x, y in [0, 1] of the frame (not clipped)
    scores: np.ndarray  # (T, K) float32: 1 for joints inside the frame, 0 outside
    face_embed: np.ndarray | None = None  # (512,) from the face crop, when one was given

    def bodies(self) -> np.ndarray:
        """(T, K, 3): coordinates and scores, the layout of ``pose_body``."""
        return np.concatenate([self.coords, self.scores[..., None]], -1).astype(np.float32)


def window_starts(total: int, window: int, overlap: int) -> list[int]:
    """First frames of the windows covering ``total`` frames; the last one ends at ``total``."""
    if total <= window:
        return [0]
    hop = max(1, window - overlap)
    starts = list(range(0, total - window + 1, hop))
    if starts[-1] + window < total:
        starts.append(total - window)
    return starts


@torch.no_grad()
def sample_dance(m2p, audio_features: np.ndarray | torch.Tensor,
                 ref_pose: np.ndarray | torch.Tensor | None,
                 ref_face_crop: np.ndarray | torch.Tensor | None = None, *, window: int,
                 overlap: int, steps: int, generator: torch.Generator | int | None = None,
                 music_guidance_scale: float = 1.0, start_from_reference: bool = True,
                 progress=None) -> Dance:
    """The dance of a whole song.

    ``audio_features``: (T, n_mels + 35) float, the log-mel then the baseline set, already
    normalised with the training manifest's stats (as the views do). ``ref_pose``: (K, 3) x, y
    in [0, 1] of the output frame and score (the photo's body), or None (no reference: the frame
    centre, a quarter-height torso). ``ref_face_crop``: (112, 112, 3) uint8 or (3, 112, 112)
    float in [0, 1], for the face embedding, or None. ``window``/``overlap``: frames per
    denoiser call and frames each window continues from the last (0 < overlap < window).
    ``steps``: Heun steps per window (1 = the deterministic one-step prediction, the ablation
    baseline: then ``generator`` does not matter). ``generator``: a torch.Generator or a seed;
    a different seed gives a different dance. ``progress``: an optional callable(done, total)
    after each window. Runs on the device of ``m2p``."""
    param = next(m2p.parameters())
    device, dtype = param.device, param.dtype
    n_mels = int(m2p.config.n_mels)
    feats = torch.as_tensor(np.asarray(audio_features, np.float32))
    if feats.ndim != 2 or feats.shape[1] != n_mels + int(m2p.config.baseline_dim):
        raise ValueError(f"audio_features must be (T, {n_mels + int(m2p.config.baseline_dim)}) "
                         f"(log-mel then baseline), got {tuple(feats.shape)}")
    if window < 2 or not 0 <= overlap < window:
        raise ValueError(f"need window >= 2 and 0 <= overlap < window, got {window}, {overlap}")
    if isinstance(generator, int) or generator is None:
        generator = torch.Generator().manual_seed(int(generator or 0))
    total, k = feats.shape[0], int(m2p.config.num_joints)
    ref = None
    if ref_pose is not None:
        ref = torch.as_tensor(np.asarray(ref_pose, np.float32))[None].to(device)
    coords = torch.zeros(total, k, 2)
    done = 0  # frames generated so far (always a prefix)
    if start_from_reference and ref is not None:
        coords[0] = ref[0, :, :2].cpu()
        done = 1
    starts = window_starts(total, window, overlap)
    for i, s in enumerate(starts):
        length = min(window, total - s)
        audio = feats[s : s + length][None].to(device, dtype)
        given = max(0, min(done - s, length))
        known_mask = (torch.arange(length) < given).float()[None].to(device)
        known = coords[s : s + length][None].to(device)
        out = m2p.sample(audio[..., :n_mels], audio[..., n_mels:], ref_pose=ref,
                         known=known if given else None, known_mask=known_mask if given else None,
                         steps=int(steps), music_guidance_scale=float(music_guidance_scale),
                         generator=generator)
        coords[s : s + length] = out[0].float().cpu()
        done = s + length
        if progress is not None:
            progress(i + 1, len(starts))
    xy = coords.numpy().astype(np.float32)
    inside = ((xy >= 0) & (xy <= 1)).all(-1).astype(np.float32)
    face = None
    if ref_face_crop is not None:
        crop = torch.as_tensor(np.asarray(ref_face_crop))
        if crop.dtype == torch.uint8:
            crop = crop.float().div(255.0)
        if crop.shape[-1] == 3:
            crop = crop.permute(2, 0, 1)
        face = m2p.encode_face(crop[None].to(device, dtype))[0].float().cpu().numpy()
    return Dance(coords=xy, scores=inside, face_embed=face)


@torch.no_grad()
def dance_heatmaps(m2p, coords: np.ndarray | torch.Tensor, grid: tuple[int, int],
                   dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """(T, K, h, w) heatmaps in [0, 1] (peak 1, as the preprocessed ones) of a dance's
    coordinates on the latent ``grid``, drawn with the M2PEncoder's learned joint widths, what
    the video model's pose guider reads. In chunks of 64 frames (a song's worth of float32
    maps would not fit)."""
    xy = torch.as_tensor(np.asarray(coords, np.float32))
    out = torch.empty((*xy.shape[:2], *grid), dtype=dtype)
    dev = next(m2p.parameters()).device
    for a in range(0, xy.shape[0], 64):
        logits = m2p.heatmap_logits(xy[a : a + 64].to(dev), grid)
        out[a : a + 64] = logits_to_heatmaps(logits).to("cpu", dtype)
    return out
