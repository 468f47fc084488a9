"""``DancePipeline``: a song and one photo -> the poses of a dance and the video of that person
dancing it. ``dwm generate music=SONG ref=PHOTO`` is a thin command over it.

The pipeline's named steps, in the order ``__call__`` runs them (each through the same code the
rest of the project uses, so generation sees what training saw):

1. ``check_inputs``: files exist, settings make sense (one-line errors, before any work).
2. ``encode_music``: audio features by the preprocessing audio extractor, at the video's fps.
3. ``encode_reference``: the person in the photo is located and cropped as preprocessing crops
   a video (pose backend, main-dancer pick, crop centred on the dancer); with a video model also
   the ArcFace, CLIP and VAE embeddings of the crop (the preprocessing extractors).
4. ``predict_poses``: the M2PEncoder's pose denoiser samples the dance for the photo's body from
   the music (normalised with the training data's statistics, saved beside the checkpoint), in
   windows that continue each other; frame 0 is the photo's pose.
5. ``prepare_latents``: the initial noise of the video, drawn on the CPU from ``seed``.
6. ``denoise_latents``: EDM Euler steps of the video model, classifier-free guidance on the
   appearance, in overlapping windows whose denoised estimates are cross-faded at every step (no
   seams).
7. ``decode_latents``: the VAE decodes the frames, a chunk at a time.

A stage-A checkpoint (the M2PEncoder alone) stops after step 4: the poses, no video.
Same seed and inputs -> the same output bytes.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import decord
import numpy as np
import torch

from dwm.preprocess.decode import decode_size
from dwm.preprocess.extractors.audio import AudioBatch, AudioExtractor
from dwm.preprocess.extractors.base import FrameBatch, VideoContext
from dwm.preprocess.extractors.clip import ClipExtractor
from dwm.preprocess.extractors.face import FaceExtractor
from dwm.preprocess.extractors.latents import LatentExtractor
from dwm.preprocess.extractors.pose import PoseExtractor, choose_crop, keep_inside, to_crop
from dwm.preprocess.probe import NotAVideo, probe_file
from dwm.shared import config as C
from dwm.shared import contract, media, weights
from dwm.shared.contract import Normaliser
from dwm.shared.errors import UserFacingError
from dwm.shared.progress import progress
from dwm.shared.shards import ManifestError, load_manifest
from dwm.shared.vae import decode_latents, load_vae
from dwm.training import edm
from dwm.training.checkpoint import check_model_folder
from dwm.training.models.animator import (VIDEO_COMPONENTS, Conditioning, conditioning_latent,
                                          denoise, load_dance_model)
from dwm.training.pose_sampling import dance_heatmaps, sample_dance, window_starts

# What the training engine writes into every final/ folder (stage, steps, the TrainConfig, ...).
TRAINING_INFO = "training_info.json"


# ---------------------------------------------------------------------------------------------
# windows and blending
# ---------------------------------------------------------------------------------------------
def window_weights(total: int, window: int, starts: list[int]) -> np.ndarray:
    """(len(starts), min(window, total)) blending weights: each window ramps linearly up over the
    frames it shares with the previous window and down over those it shares with the next, and
    the weights of all windows covering a frame sum to 1 (a linear cross-fade)."""
    length = min(window, total)
    w = np.ones((len(starts), length), np.float64)
    for i, s in enumerate(starts):
        if i > 0:
            shared = starts[i - 1] + length - s
            if shared > 0:
                w[i, :shared] *= np.arange(1, shared + 1) / (shared + 1)
        if i + 1 < len(starts):
            shared = s + length - starts[i + 1]
            if shared > 0:
                w[i, length - shared:] *= np.arange(shared, 0, -1) / (shared + 1)
    cover = np.zeros(total, np.float64)
    for i, s in enumerate(starts):
        cover[s : s + length] += w[i]
    for i, s in enumerate(starts):
        w[i] /= cover[s : s + length]
    return w.astype(np.float32)


def blend_windows(parts: list[torch.Tensor], starts: list[int], weights: np.ndarray,
                  total: int, dim: int = 0) -> torch.Tensor:
    """Cross-fade per-window tensors (frames on axis ``dim``) into one sequence of ``total``."""
    first = parts[0]
    shape = list(first.shape)
    shape[dim] = total
    out = torch.zeros(shape, dtype=first.dtype, device=first.device)
    for part, s, w in zip(parts, starts, weights):
        view = [1] * part.ndim
        view[dim] = part.shape[dim]
        wt = torch.as_tensor(w[: part.shape[dim]], dtype=part.dtype, device=part.device).view(view)
        out.narrow(dim, s, part.shape[dim]).add_(part * wt)
    return out


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def parse_resolution(text: str) -> tuple[int, int]:
    """'512x896' -> (512, 896) = (width, height)."""
    try:
        w, h = (int(v) for v in str(text).lower().replace(" ", "").split("x"))
    except ValueError:
        raise C.ConfigError(f"bad value for resolution: {text!r} (expected WIDTHxHEIGHT, "
                            "e.g. 512x896)") from None
    if w <= 0 or h <= 0 or w % contract.LATENT_DOWNSAMPLE or h % contract.LATENT_DOWNSAMPLE:
        raise C.ConfigError(f"bad value for resolution: {text!r} (both sides must be positive "
                            f"multiples of {contract.LATENT_DOWNSAMPLE})")
    return w, h


def torch_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def training_meta(ckpt: str | Path) -> dict[str, Any]:
    """What generation must share with training, from ``<ckpt>/training_info.json``:
    ``{"config": TrainConfig fields (empty: defaults), "norm_stats": the feature normalisation
    statistics of the training data or None, "preprocess": the preprocessing config of the
    training data or None}``. Statistics come from the info file (``data_stats``) when the
    engine stored them, else from the training manifest it names (when that is still there)."""
    info = _read_json(Path(ckpt) / TRAINING_INFO)
    config = info.get("config") if isinstance(info.get("config"), dict) else {}
    stats = info.get("data_stats") or info.get("norm_stats")
    preprocess = None
    if config.get("data"):
        try:
            manifest = load_manifest(str(config["data"]))
            stats = stats or manifest.get("stats")
            preprocess = manifest.get("config")
        except (ManifestError, OSError, ValueError):
            pass
    return {"config": config, "norm_stats": stats or None, "preprocess": preprocess,
            "stage": info.get("stage")}


def train_setting(meta: dict[str, Any], key: str) -> Any:
    cfg = meta.get("config") or {}
    return cfg.get(key, getattr(C.TrainConfig(), key))


def preprocess_config(models: C.ModelsConfig, pose_backend: str = "",
                      recorded: dict[str, Any] | None = None) -> C.PreprocessConfig:
    """The preprocessing settings the extractors run with here: those ``recorded`` in a
    manifest (``manifest["config"]``: pose backend, face detector size, audio settings) when
    known, else the profile's defaults; always with ``models`` (this machine's weights)."""
    pcfg = C.build_preprocess_config([f"profile={models.profile}"])
    for key, value in C.flatten(recorded or {}).items():
        if key.startswith("models.") or key == "extractors":
            continue
        try:
            C.apply_overrides(pcfg, {key: value})
        except C.ConfigError:
            pass  # a field of an older or newer preprocessing version: its default stands
    pcfg.models = models
    if pose_backend:
        pcfg.pose.backend = pose_backend  # type: ignore[assignment]
    return pcfg


# ---------------------------------------------------------------------------------------------
# step 1: audio features (the preprocessing audio extractor)
# ---------------------------------------------------------------------------------------------
@dataclass
class SongFeatures:
    mel: np.ndarray  # (T, n_mels) float32, unnormalised log-mel
    baseline: np.ndarray  # (T, 35) float32
    beat_frames: list[int]
    tempo: float
    num_frames: int
    fps: float


def song_features(music: str, fps: float, num_frames: int, pcfg: C.PreprocessConfig,
                  device: str = "cpu") -> SongFeatures:
    ext = AudioExtractor(pcfg, device)
    ext.reset(VideoContext(video_hash="song", path=str(music), num_frames=num_frames, fps=fps,
                           width=0, height=0, duration=num_frames / fps))
    res = ext(AudioBatch(str(music)))  # a song ffmpeg cannot decode: a one-line MediaError
    attrs = res.pop("_attrs")
    return SongFeatures(mel=res["mel"].astype(np.float32),
                        baseline=res["baseline"].astype(np.float32),
                        beat_frames=list(attrs.get("beat_frames", [])),
                        tempo=float(attrs.get("tempo") or 0.0), num_frames=num_frames, fps=fps)


def song_frames(music: str, fps: float, max_seconds: float) -> int:
    """Frames to generate: the song's length (or ``max_seconds``, if shorter) at ``fps``."""
    info = media.probe(music)
    if not info["has_audio"]:
        raise UserFacingError(f"music={music}: has no audio stream")
    duration = info["duration"]
    audio = [s for s in info["streams"] if s["codec_type"] == "audio"]
    if audio and audio[0]["duration"]:
        duration = audio[0]["duration"]
    if not duration or duration <= 0:
        raise UserFacingError(f"music={music}: cannot tell its duration (ffprobe)")
    seconds = min(duration, max_seconds) if max_seconds and max_seconds > 0 else duration
    n = int(math.floor(seconds * fps + 1e-6))
    if n < 2:
        raise UserFacingError(f"music={music}: {seconds:.2f} s is too short to dance to")
    return n


# ---------------------------------------------------------------------------------------------
# step 2: poses from the music (M2PEncoder over windows)
# ---------------------------------------------------------------------------------------------
@dataclass
class PredictedPoses:
    coords: np.ndarray  # (T, K, 2) x, y in [0, 1] of the frame (a joint may leave it)
    scores: np.ndarray  # (T, K) 1 for joints inside the frame, 0 outside

    def bodies(self) -> np.ndarray:
        """(T, K, 3): coordinates and scores, the layout of ``pose_body`` (drawing, metrics)."""
        return np.concatenate([self.coords, self.scores[..., None]], -1).astype(np.float32)


def predict_poses(m2p: torch.nn.Module, mel: np.ndarray, baseline: np.ndarray,
                  stats: dict[str, Any] | None, reference_body: np.ndarray | None, *,
                  window: int, overlap: int, steps: int, seed: int,
                  music_guidance_scale: float = 1.0, start_from_reference: bool = True,
                  show_progress: bool = True) -> PredictedPoses:
    """A whole song's dance for ``reference_body`` (K, 3 in [0, 1] of the frame): the music
    normalised as training normalised it, then :func:`sample_dance` (each window continues the
    last by inpainting the frames they share; ``steps=1`` is the deterministic one-step
    prediction)."""
    n_mels = int(m2p.config.n_mels)
    if mel.shape[1] != n_mels:
        raise UserFacingError(f"the checkpoint's M2PEncoder expects {n_mels} mel bands, the audio "
                              f"features have {mel.shape[1]}")
    feats = np.concatenate([Normaliser(stats, "audio_mel", n_mels)(mel),
                            Normaliser(stats, "audio_baseline", contract.AUDIO_BASELINE_DIM)(
                                baseline)], axis=1)
    window = max(2, min(int(window), feats.shape[0]))
    overlap = min(max(1, int(overlap)), window - 1)
    bar = progress(total=len(window_starts(feats.shape[0], window, overlap)),
                   desc="poses from music", unit="window", disable=not show_progress,
                   leave=False)
    try:
        dance = sample_dance(m2p, feats, reference_body, window=window, overlap=overlap,
                             steps=steps, generator=torch.Generator().manual_seed(int(seed)),
                             music_guidance_scale=music_guidance_scale,
                             start_from_reference=start_from_reference,
                             progress=lambda done, total: bar.update(1))
    finally:
        bar.close()
    return PredictedPoses(coords=dance.coords, scores=dance.scores)


# ---------------------------------------------------------------------------------------------
# step 3: the reference photo (located, cropped and embedded like preprocessing)
# ---------------------------------------------------------------------------------------------
@dataclass
class Reference:
    image: np.ndarray  # (H, W, 3) uint8 RGB crop at the generation size
    body: np.ndarray  # (18, 3) in [0, 1] of the crop
    crop_box: tuple[int, int, int, int]  # in pixels of the aspect-kept resize of the photo
    face_detected: bool
    face_embed: np.ndarray  # (512,) float32 ArcFace, zeros without a face
    face_crop: np.ndarray  # (112, 112, 3) uint8, zeros without a face
    clip_embed: np.ndarray | None = None  # (D,) float32
    latent: np.ndarray | None = None  # (4, h, w) float32, UNSCALED (as the extractor returns)
    scaling_factor: float = 1.0


def _resize_cover(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Aspect-kept resize to the smallest size covering (width, height), as decoding does."""
    h0, w0 = image.shape[:2]
    dw, dh, scale = decode_size(w0, h0, width, height)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return cv2.resize(image, (dw, dh), interpolation=interp)


def frame_batch(frames: np.ndarray, extras: dict[str, np.ndarray] | None = None):
    idx = np.arange(len(frames))
    return FrameBatch(frames=frames, index=idx, seg_offset=idx, segment=0, extras=extras or {})


def locate_reference(photo: str, width: int, height: int, pcfg: C.PreprocessConfig,
                     device: str = "cpu", fps: float = 24.0) -> Reference:
    """Find the person in ``photo`` and crop them like preprocessing crops a video; faces too.

    Raises :class:`UserFacingError` when the photo cannot be read or shows no person."""
    image = media.read_image(photo)
    resized = _resize_cover(image, width, height)
    dh, dw = resized.shape[:2]
    pose = PoseExtractor(pcfg, device)
    pose.reset(VideoContext("reference", str(photo), 1, fps, dw, dh))
    res = pose(frame_batch(resized[None]))
    if not bool(res["found"][0]):
        raise UserFacingError(f"ref={photo}: no person found in the photo; use a photo that shows "
                              "the dancer's body")
    x0, y0, _ = choose_crop(res["body"], res["found"], dw, dh, width, height,
                            pcfg.pose.min_score)
    crop = np.ascontiguousarray(resized[y0 : y0 + height, x0 : x0 + width])
    body = keep_inside(to_crop(res["body"], x0, y0, width, height))
    face_pts = keep_inside(to_crop(res["face"], x0, y0, width, height))

    faces = FaceExtractor(pcfg, device)
    faces.reset(VideoContext("reference", str(photo), 1, fps, width, height))
    fo = faces(frame_batch(crop[None], {"pose_body": body, "pose_face": face_pts}))
    detected = bool(fo["detected"][0])
    return Reference(image=crop, body=body[0], crop_box=(x0, y0, x0 + width, y0 + height),
                     face_detected=detected,
                     face_embed=fo["embed"][0].astype(np.float32) if detected
                     else np.zeros(contract.FACE_EMBED_DIM, np.float32),
                     face_crop=fo["crop"][0] if detected
                     else np.zeros((contract.FACE_CROP_SIZE,) * 2 + (3,), np.uint8))


def embed_reference(ref: Reference, pcfg: C.PreprocessConfig, device: str = "cpu") -> Reference:
    """CLIP image embedding and VAE latent of the cropped reference (preprocessing extractors)."""
    clip = ClipExtractor(pcfg, device)
    ref.clip_embed = clip(frame_batch(ref.image[None]))["embed"][0].astype(np.float32)
    lat = LatentExtractor(pcfg, device)
    ref.latent = lat(frame_batch(ref.image[None]))["mean"][0].astype(np.float32)
    ref.scaling_factor = float(lat.scaling_factor)
    return ref


def reference_from_video(video: str | Path, out_png: str | Path, at: float = 0.5) -> Path:
    """Save one frame of ``video`` (at fraction ``at`` of its length, in display orientation)
    as a PNG reference photo."""
    try:
        rotation = probe_file(str(video)).rotation  # clockwise, as preprocessing turns frames
        vr = decord.VideoReader(str(video))
    except NotAVideo as e:
        raise UserFacingError(f"{video}: {e.reason}") from None
    except Exception as e:  # decord raises its own error types
        reason = str(e).strip()[:160]
        raise UserFacingError(f"{video}: cannot read it as a video ({reason})") from None
    if len(vr) == 0:
        raise UserFacingError(f"{video}: has no frames")
    frame = vr[min(len(vr) - 1, int(len(vr) * at))].asnumpy()
    frame = np.rot90(frame, k={90: -1, 180: 2, 270: 1}.get(rotation, 0))
    media.write_image(out_png, np.ascontiguousarray(frame))
    return Path(out_png)


# ---------------------------------------------------------------------------------------------
# steps 4-5: sampling in overlapping windows
# ---------------------------------------------------------------------------------------------
@dataclass
class SamplingSettings:
    steps: int = 25
    guidance_scale: float = 2.5  # classifier-free guidance on the appearance condition
    pose_scale: float = 1.0  # multiplies the pose guider's residual
    window: int = 24
    overlap: int = 6
    svd_fps: int = 7
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02


def initial_noise(num_frames: int, grid: tuple[int, int],
                  generator: torch.Generator) -> torch.Tensor:
    """(1, T, 4, h, w) unit Gaussian noise (the sampler scales it to sigma_max), drawn on the CPU
    so that a seed gives the same video on every device."""
    return torch.randn((1, num_frames, contract.LATENT_CHANNELS, *grid), generator=generator,
                       dtype=torch.float32)


@torch.no_grad()
def sample_latents(model: Any, pose: torch.Tensor, ref_latent: torch.Tensor,
                   clip_embed: torch.Tensor, face_embed: torch.Tensor | None, face_valid: bool,
                   scaling_factor: float, settings: SamplingSettings,
                   generator: torch.Generator, show_progress: bool = True,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """Sample (T, 4, h, w) scaled latents for the poses (T, K, h, w).

    ref_latent (4, h, w) scaled; clip_embed (D,); face_embed (512,) or None. Every Euler step
    denoises each window and cross-fades the estimates (no seams); guidance contrasts the full
    condition with the appearance dropped (SVD's unconditional input), the pose kept."""
    p = next(model.unet.parameters())
    device, dtype = p.device, p.dtype
    total = int(pose.shape[0])
    h, w = ref_latent.shape[-2:]
    starts = window_starts(total, settings.window, settings.overlap)
    weights = window_weights(total, settings.window, starts)
    length = min(settings.window, total)
    cfg_on = settings.guidance_scale != 1.0
    b = 2 if cfg_on else 1

    ref = ref_latent.to(device, dtype)[None]
    concat = conditioning_latent(ref.float().cpu(), scaling_factor, settings.noise_aug_strength,
                                 generator).to(device, dtype)
    face = face_embed.to(device, dtype)[None] if face_embed is not None else None
    rep = (lambda x: x.expand(b, *x.shape[1:])) if b > 1 else (lambda x: x)
    keep_app = torch.tensor([True, False][:b], device=device)
    pose = pose.to(device, dtype)
    time_ids = edm.added_time_ids(b, settings.svd_fps, settings.motion_bucket_id,
                                  settings.noise_aug_strength, device=device, dtype=dtype)

    def cond_for(s: int) -> Conditioning:
        return Conditioning(
            ref_latent=rep(ref), clip_embed=rep(clip_embed.to(device, dtype)[None]),
            face_embed=rep(face) if face is not None else None,
            pose=rep(pose[None, s : s + length]), pose_scale=settings.pose_scale,
            keep_appearance=keep_app,
            keep_face=torch.full((b,), bool(face_valid), device=device),
            concat_latent=rep(concat), scaling_factor=scaling_factor, added_time_ids=time_ids)

    bar = progress(total=settings.steps * len(starts), desc="sampling", unit="window",
               disable=not show_progress, leave=False)

    def denoise_all(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        parts = []
        for s in starts:
            xs = x[:, s : s + length].to(dtype)
            d = denoise(model, rep(xs), sigma.to(device, dtype).expand(b), cond_for(s)).float()
            if cfg_on:  # uncond + g * (cond - uncond)
                d = d[1:] + settings.guidance_scale * (d[:1] - d[1:])
            parts.append(d[0])
            bar.update(1)
        return blend_windows(parts, starts, weights, total)[None]

    if noise is None:
        noise = initial_noise(total, (h, w), generator)
    noise = noise.to(device)
    sigmas = edm.karras_sigmas(settings.steps).to(device)
    try:
        latents = edm.euler_sample(denoise_all, noise, sigmas)
    finally:
        bar.close()
    return latents[0]


@torch.no_grad()
def iter_decoded_frames(vae: Any, latents: torch.Tensor, scaling_factor: float,
                        batch_size: int = 8, show_progress: bool = True):
    """Scaled latents (T, 4, h, w) -> uint8 RGB frames (H, W, 3), one at a time, decoded in
    chunks of ``batch_size`` (a long song never holds all its frames in memory)."""
    for a in progress(range(0, latents.shape[0], batch_size), desc="decoding", unit="chunk",
                  disable=not show_progress, leave=False):
        z = latents[a : a + batch_size].float() / scaling_factor
        img = decode_latents(vae, z, num_frames=z.shape[0])
        yield from (img.permute(0, 2, 3, 1).cpu().numpy() * 255.0).round().astype(np.uint8)


def decode_frames(vae: Any, latents: torch.Tensor, scaling_factor: float,
                  batch_size: int = 8, show_progress: bool = True) -> np.ndarray:
    """Scaled latents (T, 4, h, w) -> uint8 RGB frames (T, H, W, 3)."""
    return np.stack(list(iter_decoded_frames(vae, latents, scaling_factor, batch_size,
                                             show_progress)))


# ---------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------
@dataclass
class DanceOutput:
    """What ``DancePipeline.__call__`` returns. ``frames`` is lazy: the VAE decodes a chunk at a
    time while it is iterated, so a long song never holds all its frames in memory
    (``np.stack(list(out.frames))`` for an array). ``None`` for a stage-A checkpoint."""

    poses: PredictedPoses
    reference: Reference
    song: SongFeatures
    size: tuple[int, int]  # (width, height) of the video
    latents: torch.Tensor | None = None  # (T, 4, h, w), scaled
    frames: Iterator[np.ndarray] | None = None  # (H, W, 3) uint8 RGB each


@dataclass
class DanceSettings:
    """The knobs of one call; ``dwm generate``'s keys of the same names."""

    seed: int = 42
    fps: float = 24.0
    resolution: str = "512x896"
    max_seconds: float = 10.0
    steps: int = 25
    guidance_scale: float = 2.5
    pose_guidance_scale: float = 1.0
    window: int = 24
    overlap: int = 6
    pose_window: int = 0  # frames per pose window (0: the training run's audio_window)
    pose_overlap: int = 0  # frames each pose window continues from the last (0: window / 4)
    pose_steps: int = 16  # Heun steps of the pose denoiser (1: the deterministic one-step)
    music_guidance_scale: float = 1.0  # classifier-free guidance on the music (1: off)
    start_from_reference: bool = True  # frame 0 of the dance = the photo's pose

    @classmethod
    def from_config(cls, cfg: C.GenerateConfig) -> DanceSettings:
        return cls(**{f: getattr(cfg, f) for f in cls.__dataclass_fields__})


def check_files(music: str | Path, reference_image: str | Path) -> None:
    """The song and the photo are given and exist (before a model is loaded)."""
    for key, value in (("music", music), ("ref", reference_image)):
        if not str(value or ""):
            raise UserFacingError(f"{key}= is required (" + (
                "a song: wav, mp3, ogg, m4a, or a video" if key == "music"
                else "a photo of the person") + ")")
        if not Path(value).is_file():
            raise UserFacingError(f"{key}={value}: no such file")


def check_settings(settings: DanceSettings) -> tuple[int, int]:
    """Settings that cannot work fail in one line naming the key; returns (width, height)."""
    if settings.fps <= 0:
        raise UserFacingError(f"fps={settings.fps}: must be > 0")
    if settings.steps < 1:
        raise UserFacingError(f"steps={settings.steps}: must be >= 1")
    if settings.window < 1 or not 0 <= settings.overlap < settings.window:
        raise C.ConfigError(f"window={settings.window}, overlap={settings.overlap}: need "
                            "window >= 1 and 0 <= overlap < window")
    if settings.pose_steps < 1:
        raise C.ConfigError(f"pose_steps={settings.pose_steps}: must be >= 1")
    if settings.pose_window < 0 or settings.pose_overlap < 0:
        raise C.ConfigError(f"pose_window={settings.pose_window}, pose_overlap="
                            f"{settings.pose_overlap}: must be >= 0 (0: the training run's "
                            "audio_window, and a quarter of it)")
    return parse_resolution(settings.resolution)


class DancePipeline:
    """A trained DanceModel (``final/``) with everything generation needs beside it: the training
    run's settings and feature statistics, and the preprocessing extractors that embed the song
    and the photo."""

    def __init__(self, model: Any, meta: dict[str, Any], models: C.ModelsConfig,
                 pose_backend: str = "", device: str = "cpu", show_progress: bool = True):
        if model.m2p is None:
            raise UserFacingError("the checkpoint has no M2PEncoder (m2p); it is not a dance "
                                  "model")
        self.model, self.meta, self.models = model, meta, models
        self.device, self.show_progress = device, show_progress
        self.pcfg = preprocess_config(models, pose_backend, meta.get("preprocess"))
        self.pcfg.audio.n_mels = int(model.m2p.config.n_mels)

    @classmethod
    def from_pretrained(cls, ckpt: str | Path, *, models: C.ModelsConfig | None = None,
                        pose_backend: str = "", device: str = "cpu", dtype: str = "auto",
                        show_progress: bool = True) -> DancePipeline:
        """Load ``ckpt`` (a ``final/`` folder) and check, before any work, that every weight the
        pipeline will need is on this machine."""
        if not (Path(ckpt) / "model_index.json").is_file():
            raise UserFacingError(f"ckpt={ckpt}: not a trained model folder (no "
                                  "model_index.json); train first (`just train`) or point ckpt= "
                                  "at a final/ folder")
        check_model_folder(ckpt)  # a damaged folder fails in one line, not in a loader
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise UserFacingError(f"device={device}: CUDA is not available on this machine")
        models = models or C.ModelsConfig()
        model = load_dance_model(ckpt, device=device, dtype=torch_dtype(dtype, device))
        pipe = cls(model, training_meta(ckpt), models, pose_backend, device, show_progress)
        components = ["dwpose"] if pipe.pcfg.pose.backend == "dwpose" else []
        if pipe.has_video:
            components += ["insightface", "clip", "vae"]
        weights.ensure_available(models, components)
        return pipe

    @property
    def has_video(self) -> bool:
        """False for a stage-A checkpoint: poses only."""
        return all(getattr(self.model, c) is not None for c in VIDEO_COMPONENTS)

    # -- 1 ------------------------------------------------------------------------------------
    def check_inputs(self, music: str | Path, reference_image: str | Path,
                     settings: DanceSettings) -> tuple[int, int]:
        """One-line errors for what cannot work; returns the video size (width, height)."""
        check_files(music, reference_image)
        width, height = check_settings(settings)
        if self.has_video:
            factor = 2 ** (len(self.model.unet.config.block_out_channels) - 1)
            if (height // contract.LATENT_DOWNSAMPLE) % factor or \
                    (width // contract.LATENT_DOWNSAMPLE) % factor:
                raise UserFacingError(f"resolution={settings.resolution}: both sides must be "
                                      f"multiples of {contract.LATENT_DOWNSAMPLE * factor} for "
                                      "this UNet")
        return width, height

    # -- 2 ------------------------------------------------------------------------------------
    def encode_music(self, music: str | Path, fps: float, max_seconds: float) -> SongFeatures:
        num_frames = song_frames(str(music), fps, max_seconds)
        return song_features(str(music), fps, num_frames, self.pcfg, self.device)

    # -- 3 ------------------------------------------------------------------------------------
    def encode_reference(self, reference_image: str | Path, width: int, height: int,
                         fps: float = 24.0) -> Reference:
        """The person in the photo, cropped like training crops; embedded for the video model
        when there is one."""
        ref = locate_reference(str(reference_image), width, height, self.pcfg, self.device, fps)
        if self.has_video:
            ref = embed_reference(ref, self.pcfg, self.device)
        return ref

    # -- 4 ------------------------------------------------------------------------------------
    def predict_poses(self, song: SongFeatures, reference: Reference, *, seed: int = 42,
                      pose_steps: int = 16, window: int = 0, overlap: int = 0,
                      music_guidance_scale: float = 1.0,
                      start_from_reference: bool = True) -> PredictedPoses:
        """The dance: a pose per frame of the song, from the music, in the proportions and the
        place of the person in the photo (the M2PEncoder works in the reference body's units).
        A different ``seed`` gives a different dance; ``pose_steps=1`` the one-step prediction."""
        window = int(window or train_setting(self.meta, "audio_window"))
        return predict_poses(self.model.m2p, song.mel, song.baseline, self.meta["norm_stats"],
                             reference.body, window=window, overlap=int(overlap or window // 4),
                             steps=int(pose_steps), seed=seed,
                             music_guidance_scale=music_guidance_scale,
                             start_from_reference=start_from_reference,
                             show_progress=self.show_progress)

    # -- 5 ------------------------------------------------------------------------------------
    def prepare_latents(self, num_frames: int, size: tuple[int, int],
                        generator: torch.Generator) -> torch.Tensor:
        grid = (size[1] // contract.LATENT_DOWNSAMPLE, size[0] // contract.LATENT_DOWNSAMPLE)
        return initial_noise(num_frames, grid, generator)

    # -- 6 ------------------------------------------------------------------------------------
    def sampling_settings(self, settings: DanceSettings) -> SamplingSettings:
        return SamplingSettings(
            steps=settings.steps, guidance_scale=settings.guidance_scale,
            pose_scale=settings.pose_guidance_scale, window=settings.window,
            overlap=settings.overlap, svd_fps=int(train_setting(self.meta, "svd_fps")),
            motion_bucket_id=int(train_setting(self.meta, "motion_bucket_id")),
            noise_aug_strength=float(train_setting(self.meta, "noise_aug_strength")))

    def denoise_latents(self, noise: torch.Tensor, poses: PredictedPoses, reference: Reference,
                        settings: SamplingSettings, generator: torch.Generator) -> torch.Tensor:
        """The video's latents for the poses and the reference, from ``noise``."""
        model = self.model
        grid = tuple(noise.shape[-2:])
        clip_embed = torch.from_numpy(reference.clip_embed)
        clip_dim = model.unet.config.cross_attention_dim
        clip_dim = clip_dim if isinstance(clip_dim, int) else int(clip_dim[0])
        if clip_embed.shape[-1] != clip_dim:
            raise UserFacingError(f"the CLIP encoder gives {clip_embed.shape[-1]}-d embeddings but "
                                  f"the checkpoint's UNet expects {clip_dim}; use the models it "
                                  "was trained with (models.profile / models.clip)")
        sf = reference.scaling_factor
        return sample_latents(model, dance_heatmaps(model.m2p, poses.coords, grid),
                              torch.from_numpy(reference.latent) * sf, clip_embed,
                              torch.from_numpy(reference.face_embed), reference.face_detected,
                              sf, settings, generator, self.show_progress, noise=noise)

    # -- 7 ------------------------------------------------------------------------------------
    def decode_latents(self, latents: torch.Tensor, scaling_factor: float,
                       batch_size: int = 8) -> Iterator[np.ndarray]:
        vae, _ = load_vae(self.models, device=self.device)
        return iter_decoded_frames(vae, latents, scaling_factor, batch_size, self.show_progress)

    # -----------------------------------------------------------------------------------------
    def __call__(self, music: str | Path, reference_image: str | Path,
                 settings: DanceSettings | None = None, *, poses_only: bool = False,
                 on_poses: Any = None, **overrides: Any) -> DanceOutput:
        """Song + photo -> :class:`DanceOutput`. ``settings`` fields may also be given as
        keywords (``seed=7``); ``poses_only`` stops after the poses (a stage-A checkpoint always
        does); ``on_poses(output)`` is called as soon as the poses exist, before the long video
        work (a preview can be shown then)."""
        settings = settings or DanceSettings()
        for key, value in overrides.items():
            if key not in DanceSettings.__dataclass_fields__:
                raise TypeError(f"DancePipeline: unknown setting {key!r}")
            setattr(settings, key, value)
        size = self.check_inputs(music, reference_image, settings)
        # the photo before the song: a photo without a person fails before the long work
        reference = self.encode_reference(reference_image, *size, fps=settings.fps)
        song = self.encode_music(music, settings.fps, settings.max_seconds)
        poses = self.predict_poses(song, reference, seed=settings.seed,
                                   pose_steps=settings.pose_steps, window=settings.pose_window,
                                   overlap=settings.pose_overlap,
                                   music_guidance_scale=settings.music_guidance_scale,
                                   start_from_reference=settings.start_from_reference)
        out = DanceOutput(poses=poses, reference=reference, song=song, size=size)
        if on_poses is not None:
            on_poses(out)
        if poses_only or not self.has_video:
            return out
        generator = torch.Generator().manual_seed(settings.seed)
        noise = self.prepare_latents(song.num_frames, size, generator)
        out.latents = self.denoise_latents(noise, poses, reference,
                                           self.sampling_settings(settings), generator)
        out.frames = self.decode_latents(out.latents, reference.scaling_factor)
        return out


# ---------------------------------------------------------------------------------------------
# outputs on disk
# ---------------------------------------------------------------------------------------------
def skeleton_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}_skeleton.mp4")


def poses_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}_poses.json")


def poses_document(output: DanceOutput, music: str | Path = "",
                   reference_image: str | Path = "", seed: int | None = None) -> dict[str, Any]:
    """The dance as data: OpenPose-18 keypoints per frame in pixels of the output video, in the
    keypoints-file schema that ``pose.backend=file`` reads (README, "Keypoints from files"),
    with the reference body found in the photo, for ControlNet-style tools and ``dwm eval``."""
    width, height = output.size
    scale = np.array([width, height, 1.0], np.float32)

    def pixels(body: np.ndarray) -> list[list[float]]:
        return np.round(np.asarray(body, np.float32) * scale, 2).tolist()

    ref = output.reference
    return {
        "layout": "openpose_18", "fps": float(output.song.fps), "width": width,
        "height": height, "frames": [pixels(body) for body in output.poses.bodies()],
        "joints": list(contract.BODY_JOINTS), "num_frames": int(output.poses.coords.shape[0]),
        "reference": pixels(ref.body), "reference_crop_box": list(ref.crop_box),
        "reference_face_detected": bool(ref.face_detected),
        "music": str(music), "reference_image": str(reference_image), "seed": seed,
    }


def write_outputs(output: DanceOutput, out: str | Path, music: str | Path,
                  reference_image: str | Path, seed: int) -> dict[str, Path]:
    """``<out>_poses.json``, ``<out>_skeleton.mp4`` (the poses over the reference photo, with
    the song) and, with a video model, ``<out>`` (the video with the song)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = {"poses": poses_path(out), "skeleton": skeleton_path(out)}
    doc = poses_document(output, music, reference_image, seed)
    tmp = paths["poses"].with_name(paths["poses"].name + ".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(paths["poses"])
    n = output.poses.coords.shape[0]
    background = (output.reference.image for _ in range(n))
    media.skeleton_video(paths["skeleton"], output.poses.bodies(), output.song.fps,
                         size=output.size, audio=music, background_frames=background)
    if output.frames is not None:
        media.write_video(out, output.frames, output.song.fps, audio=music)
        paths["video"] = out
    return paths


def main(cfg: C.GenerateConfig) -> int:
    settings = DanceSettings.from_config(cfg)
    check_files(cfg.music, cfg.ref)
    check_settings(settings)  # before a model is loaded
    pipe = DancePipeline.from_pretrained(cfg.ckpt, models=cfg.models,
                                         pose_backend=cfg.pose_backend, device=cfg.device,
                                         dtype=cfg.dtype, show_progress=not cfg.quiet)
    if pipe.meta["norm_stats"] is None:
        print(f"note: {cfg.ckpt}/{TRAINING_INFO} names no training data statistics; the audio "
              "features go to the M2PEncoder unnormalised")
    torch.manual_seed(cfg.seed)
    output = pipe(cfg.music, cfg.ref, settings)
    print(f"generate: {output.song.num_frames} frames "
          f"({output.song.num_frames / settings.fps:.2f} s at {settings.fps:g} fps), "
          f"{output.size[0]}x{output.size[1]}, ckpt {cfg.ckpt}", flush=True)
    if pipe.has_video and not output.reference.face_detected:
        print("note: no face found in the reference photo; generating without face tokens")
    paths = write_outputs(output, cfg.out, cfg.music, cfg.ref, cfg.seed)
    print(f"poses: {paths['poses']}", flush=True)
    print(f"skeleton preview: {paths['skeleton']}", flush=True)
    if "video" in paths:
        print(f"video: {paths['video']}", flush=True)
    else:
        print(f"ckpt={cfg.ckpt} has only the M2PEncoder (a stage-A model): wrote the poses and "
              f"the skeleton preview; train stages B and C for the video ({cfg.out} not written)")
    return 0
