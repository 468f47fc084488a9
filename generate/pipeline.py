"""``dwm generate music=SONG ref=PHOTO``: a song and one photo -> an mp4 of that person dancing.

Steps, in order (each through the same code the rest of the project uses):

1. Audio features of the song by the preprocessing audio extractor
   (:class:`dwm.preprocess.extractors.audio.AudioExtractor`), normalised with the training data's
   statistics saved beside the checkpoint.
2. The reference photo is located and cropped like preprocessing crops a video (pose backend,
   main-dancer pick, crop centred on the dancer); its body is the dance's reference.
3. The M2PEncoder's pose denoiser samples the dance relative to that body (``pose_steps``,
   ``seed``), in windows of ``audio_window`` frames that continue each other (each inpaints the
   frames it shares with the last); then the preprocessing face extractor gives the
   ArcFace embedding, the CLIP extractor the image embedding and the latent extractor the
   reference latent (all through the model registry).
4. The video model samples with EDM Euler steps, classifier-free guidance on the appearance
   (``guidance_scale``) and the pose guidance scaled by ``pose_guidance_scale``.
5. Songs longer than one window are sampled in overlapping windows: at every Euler step each
   window's denoised estimate is computed and the estimates are blended with linear cross-fade
   weights over the shared frames, so neighbouring windows agree and there is no seam.
6. The VAE decodes the latents; 7. the song is muxed into the mp4 (:func:`media.write_video`).

A skeleton preview of the dance over the reference photo, with the song
(``<out stem>_skeleton.mp4``), and the poses as data (``<out stem>_poses.json``, the
keypoints-file schema) are written too; with a stage-A checkpoint (M2PEncoder only) they are the
only outputs. Same seed and inputs ->
same output bytes.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dwm.shared import config as C
from dwm.shared import contract, media
from dwm.shared.errors import UserFacingError

# What the training engine writes into every final/ folder (stage, steps, the TrainConfig, ...).
TRAINING_INFO = "training_info.json"


# ---------------------------------------------------------------------------------------------
# windows and blending
# ---------------------------------------------------------------------------------------------
def window_starts(total: int, window: int, overlap: int) -> list[int]:
    """Start frames of windows of ``window`` frames covering ``total`` frames, neighbours sharing
    at least ``overlap`` frames; the last window ends exactly at ``total``."""
    if total <= 0:
        raise ValueError(f"window_starts: total must be > 0, got {total}")
    window = max(1, int(window))
    if total <= window:
        return [0]
    overlap = min(max(0, int(overlap)), window - 1)
    stride = window - overlap
    starts = list(range(0, total - window + 1, stride))
    if starts[-1] + window < total:
        starts.append(total - window)
    return starts


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
    from dwm.shared.shards import ManifestError, load_manifest

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
    from dwm.preprocess.extractors.audio import AudioBatch, AudioDecodeError, AudioExtractor
    from dwm.preprocess.extractors.base import VideoContext

    ext = AudioExtractor(pcfg, device)
    ext.reset(VideoContext(video_hash="song", path=str(music), num_frames=num_frames, fps=fps,
                           width=0, height=0, duration=num_frames / fps))
    try:
        res = ext(AudioBatch(str(music)))
    except AudioDecodeError as e:
        raise UserFacingError(str(e)) from None
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
    coords: np.ndarray  # (T, K, 2) in [0, 1] of the frame

    def bodies(self) -> np.ndarray:
        """(T, K, 3) with score 1, for drawing and metrics."""
        t, k = self.coords.shape[:2]
        return np.concatenate([self.coords, np.ones((t, k, 1), np.float32)], -1).astype(np.float32)


@torch.no_grad()
def predict_poses(m2p: torch.nn.Module, mel: np.ndarray, baseline: np.ndarray,
                  stats: dict[str, Any] | None, window: int, overlap: int,
                  device: str | torch.device = "cpu", show_progress: bool = True, *,
                  ref_pose: np.ndarray | None = None, steps: int = 1, seed: int = 0,
                  music_guidance_scale: float = 1.0,
                  start_from_reference: bool = True) -> PredictedPoses:
    """The dance of the whole song (:func:`dwm.training.pose_sampling.sample_dance`: windows
    that continue each other), relative to ``ref_pose`` ((K, 3) in [0, 1], the photo's body).
    ``steps=1`` is the deterministic one-step prediction; more steps sample, per ``seed``."""
    from dwm.datasets.views import Normaliser
    from dwm.training.pose_sampling import sample_dance

    n_mels = int(m2p.config.n_mels)
    if mel.shape[1] != n_mels:
        raise UserFacingError(f"the checkpoint's M2PEncoder expects {n_mels} mel bands, the audio "
                              f"features have {mel.shape[1]}")
    mel_n = Normaliser(stats, "audio_mel", n_mels)(mel)
    base_n = Normaliser(stats, "audio_baseline", contract.AUDIO_BASELINE_DIM)(baseline)
    total = mel.shape[0]
    window = max(2, min(int(window), total))
    bar = tqdm(desc="poses from music", unit="window", disable=not show_progress, leave=False)

    def progress(done: int, of: int) -> None:
        bar.total = of
        bar.update(1)

    try:
        dance = sample_dance(m2p, np.concatenate([mel_n, base_n], 1), ref_pose, window=window,
                             overlap=min(max(1, int(overlap)), window - 1), steps=int(steps),
                             generator=int(seed), music_guidance_scale=music_guidance_scale,
                             start_from_reference=start_from_reference, progress=progress)
    finally:
        bar.close()
    return PredictedPoses(coords=np.clip(dance.coords, 0.0, 1.0).astype(np.float32))


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
    import cv2

    from dwm.preprocess.decode import decode_size

    h0, w0 = image.shape[:2]
    dw, dh, scale = decode_size(w0, h0, width, height)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return cv2.resize(image, (dw, dh), interpolation=interp)


def _batch(frames: np.ndarray, extras: dict[str, np.ndarray] | None = None):
    from dwm.preprocess.extractors.base import FrameBatch

    idx = np.arange(len(frames))
    return FrameBatch(frames=frames, index=idx, seg_offset=idx, segment=0, extras=extras or {})


def locate_reference(photo: str, width: int, height: int, pcfg: C.PreprocessConfig,
                     device: str = "cpu", fps: float = 24.0) -> Reference:
    """Find the person in ``photo`` and crop them like preprocessing crops a video; faces too.

    Raises :class:`UserFacingError` when the photo cannot be read or shows no person."""
    from dwm.preprocess.extractors.base import VideoContext
    from dwm.preprocess.extractors.face import FaceExtractor
    from dwm.preprocess.extractors.pose import PoseExtractor, choose_crop, to_crop
    from dwm.preprocess.pipeline import _inside

    image = media.read_image(photo)
    resized = _resize_cover(image, width, height)
    dh, dw = resized.shape[:2]
    pose = PoseExtractor(pcfg, device)
    pose.reset(VideoContext("reference", str(photo), 1, fps, dw, dh))
    res = pose(_batch(resized[None]))
    if not bool(res["found"][0]):
        raise UserFacingError(f"ref={photo}: no person found in the photo; use a photo that shows "
                              "the dancer's body")
    x0, y0, _ = choose_crop(res["body"], res["found"], dw, dh, width, height,
                            pcfg.pose.min_score)
    crop = np.ascontiguousarray(resized[y0 : y0 + height, x0 : x0 + width])
    body = _inside(to_crop(res["body"], x0, y0, width, height))
    face_pts = _inside(to_crop(res["face"], x0, y0, width, height))

    faces = FaceExtractor(pcfg, device)
    faces.reset(VideoContext("reference", str(photo), 1, fps, width, height))
    fo = faces(_batch(crop[None], {"pose_body": body, "pose_face": face_pts}))
    detected = bool(fo["detected"][0])
    return Reference(image=crop, body=body[0], crop_box=(x0, y0, x0 + width, y0 + height),
                     face_detected=detected,
                     face_embed=fo["embed"][0].astype(np.float32) if detected
                     else np.zeros(contract.FACE_EMBED_DIM, np.float32),
                     face_crop=fo["crop"][0] if detected
                     else np.zeros((contract.FACE_CROP_SIZE,) * 2 + (3,), np.uint8))


def embed_reference(ref: Reference, pcfg: C.PreprocessConfig, device: str = "cpu") -> Reference:
    """CLIP image embedding and VAE latent of the cropped reference (preprocessing extractors)."""
    from dwm.preprocess.extractors.clip import ClipExtractor
    from dwm.preprocess.extractors.latents import LatentExtractor

    clip = ClipExtractor(pcfg, device)
    ref.clip_embed = clip(_batch(ref.image[None]))["embed"][0].astype(np.float32)
    lat = LatentExtractor(pcfg, device)
    ref.latent = lat(_batch(ref.image[None]))["mean"][0].astype(np.float32)
    ref.scaling_factor = float(lat.scaling_factor)
    return ref


def reference_from_video(video: str | Path, out_png: str | Path, at: float = 0.5) -> Path:
    """Save one frame of ``video`` (at fraction ``at`` of its length, in display orientation)
    as a PNG reference photo."""
    import decord

    from dwm.preprocess.probe import NotAVideo, probe_file

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


@torch.no_grad()
def sample_latents(model: Any, pose: torch.Tensor, ref_latent: torch.Tensor,
                   clip_embed: torch.Tensor, face_embed: torch.Tensor | None, face_valid: bool,
                   scaling_factor: float, settings: SamplingSettings,
                   generator: torch.Generator, show_progress: bool = True) -> torch.Tensor:
    """Sample (T, 4, h, w) scaled latents for the poses (T, K, h, w).

    ref_latent (4, h, w) scaled; clip_embed (D,); face_embed (512,) or None. Every Euler step
    denoises each window and cross-fades the estimates (no seams); guidance contrasts the full
    condition with the appearance dropped (SVD's unconditional input), the pose kept."""
    from dwm.training import edm
    from dwm.training.models.animator import Conditioning, conditioning_latent, denoise

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

    bar = tqdm(total=settings.steps * len(starts), desc="sampling", unit="window",
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

    noise = torch.randn((1, total, contract.LATENT_CHANNELS, h, w), generator=generator,
                        dtype=torch.float32).to(device)
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
    from dwm.shared.registry import decode_latents

    for a in tqdm(range(0, latents.shape[0], batch_size), desc="decoding", unit="chunk",
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
# the command
# ---------------------------------------------------------------------------------------------
def skeleton_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}_skeleton.mp4")


def poses_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}_poses.json")


def write_poses(path: str | Path, bodies: np.ndarray, fps: float, width: int, height: int,
                reference: np.ndarray | None = None) -> Path:
    """The dance as data: OpenPose-18 keypoints per frame in pixels of the output video, in the
    keypoints-file schema that ``pose.backend=file`` reads (README), plus the reference body
    found in the photo (pixels, or null)."""
    scale = np.array([width, height, 1.0], np.float32)

    def px(body: np.ndarray) -> list:
        return np.round(np.asarray(body, np.float32) * scale, 3).tolist()

    doc = {"layout": "openpose_18", "fps": float(fps), "width": int(width), "height": int(height),
           "frames": [px(b) for b in bodies],
           "reference": px(reference) if reference is not None else None}
    Path(path).write_text(json.dumps(doc))
    return Path(path)


def _check_inputs(cfg: C.GenerateConfig) -> None:
    if not cfg.music:
        raise UserFacingError("music= is required (a song: wav, mp3, ogg, m4a, or a video)")
    if not cfg.ref:
        raise UserFacingError("ref= is required (a photo of the person)")
    for key in ("music", "ref"):
        p = Path(getattr(cfg, key))
        if not p.is_file():
            raise UserFacingError(f"{key}={p}: no such file")
    if not (Path(cfg.ckpt) / "model_index.json").is_file():
        raise UserFacingError(f"ckpt={cfg.ckpt}: not a trained model folder (no model_index.json);"
                              " train first (`just train`) or point ckpt= at a final/ folder")
    if cfg.fps <= 0:
        raise UserFacingError(f"fps={cfg.fps}: must be > 0")
    if cfg.steps < 1:
        raise UserFacingError(f"steps={cfg.steps}: must be >= 1")


def main(cfg: C.GenerateConfig) -> int:
    from dwm.shared import registry
    from dwm.training.models.animator import VIDEO_COMPONENTS, load_dance_model
    from dwm.training.pose_sampling import dance_heatmaps

    _check_inputs(cfg)
    width, height = parse_resolution(cfg.resolution)
    device = cfg.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserFacingError(f"device={device}: CUDA is not available on this machine")
    dtype = torch_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    show = not cfg.quiet

    model = load_dance_model(cfg.ckpt, device=device, dtype=dtype)
    if model.m2p is None:
        raise UserFacingError(f"ckpt={cfg.ckpt}: has no M2PEncoder (m2p); it is not a dance model")
    has_video = all(getattr(model, c) is not None for c in VIDEO_COMPONENTS)
    meta = training_meta(cfg.ckpt)
    pcfg = preprocess_config(cfg.models, cfg.pose_backend, meta.get("preprocess"))
    pcfg.audio.n_mels = int(model.m2p.config.n_mels)
    components = ["dwpose"] if pcfg.pose.backend == "dwpose" else []
    if has_video:
        components += ["insightface", "clip", "vae"]
    registry.ensure_available(cfg.models, components)  # fail before any work

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    num_frames = song_frames(cfg.music, cfg.fps, cfg.max_seconds)
    print(f"generate: {num_frames} frames ({num_frames / cfg.fps:.2f} s at {cfg.fps:g} fps), "
          f"{width}x{height}, ckpt {cfg.ckpt}", flush=True)

    # the photo first (its body is the dance's reference): a photo without a person fails here,
    # before the long work
    ref = locate_reference(cfg.ref, width, height, pcfg, device, cfg.fps)

    # 1-2: music -> poses
    song = song_features(cfg.music, cfg.fps, num_frames, pcfg, device)
    audio_window = int(cfg.pose_window or train_setting(meta, "audio_window"))
    if meta["norm_stats"] is None:
        print(f"note: {cfg.ckpt}/{TRAINING_INFO} names no training data statistics; the audio "
              "features go to the M2PEncoder unnormalised")
    poses = predict_poses(model.m2p, song.mel, song.baseline, meta["norm_stats"], audio_window,
                          cfg.pose_overlap or max(1, audio_window // 4), device, show,
                          ref_pose=ref.body, steps=cfg.pose_steps, seed=cfg.seed,
                          music_guidance_scale=cfg.music_guidance_scale,
                          start_from_reference=cfg.start_from_reference)
    skel = skeleton_path(out)
    # over the reference photo when it was located: one look shows whether the dance fits it
    background = itertools.repeat(ref.image)
    media.skeleton_video(skel, poses.bodies(), cfg.fps, size=(width, height), audio=cfg.music,
                         background_frames=background)
    print(f"skeleton preview: {skel}", flush=True)
    pjson = write_poses(poses_path(out), poses.bodies(), cfg.fps, width, height, ref.body)
    print(f"poses: {pjson}", flush=True)
    if not has_video:
        print(f"ckpt={cfg.ckpt} has only the M2PEncoder (a stage-A model): wrote the skeleton "
              f"preview only; train stages B and C for the video ({out} not written)")
        return 0

    # 3: reference embeddings
    ref = embed_reference(ref, pcfg, device)
    if not ref.face_detected:
        print("note: no face found in the reference photo; generating without face tokens")
    grid = (height // contract.LATENT_DOWNSAMPLE, width // contract.LATENT_DOWNSAMPLE)
    factor = 2 ** (len(model.unet.config.block_out_channels) - 1)
    if grid[0] % factor or grid[1] % factor:
        raise UserFacingError(f"resolution={cfg.resolution}: both sides must be multiples of "
                              f"{contract.LATENT_DOWNSAMPLE * factor} for this UNet")
    sf = ref.scaling_factor
    ref_latent = torch.from_numpy(ref.latent) * sf
    clip_embed = torch.from_numpy(ref.clip_embed)
    clip_dim = model.unet.config.cross_attention_dim
    clip_dim = clip_dim if isinstance(clip_dim, int) else int(clip_dim[0])
    if clip_embed.shape[-1] != clip_dim:
        raise UserFacingError(f"the CLIP encoder gives {clip_embed.shape[-1]}-d embeddings but the "
                              f"checkpoint's UNet expects {clip_dim}; use the models it was "
                              "trained with (models.profile / models.clip)")

    # 4-5: sampling
    settings = SamplingSettings(
        steps=cfg.steps, guidance_scale=cfg.guidance_scale, pose_scale=cfg.pose_guidance_scale,
        window=cfg.window, overlap=cfg.overlap, svd_fps=int(train_setting(meta, "svd_fps")),
        motion_bucket_id=int(train_setting(meta, "motion_bucket_id")),
        noise_aug_strength=float(train_setting(meta, "noise_aug_strength")))
    generator = torch.Generator().manual_seed(cfg.seed)
    pose = dance_heatmaps(model.m2p, poses.coords, grid)
    latents = sample_latents(model, pose, ref_latent, clip_embed,
                             torch.from_numpy(ref.face_embed), ref.face_detected, sf, settings,
                             generator, show)
    del model

    # 6-7: decode, mux the song
    vae, _ = registry.load_vae(cfg.models, device=device)
    frames = iter_decoded_frames(vae, latents, sf, show_progress=show)
    media.write_video(out, frames, cfg.fps, audio=cfg.music)
    print(f"video: {out}", flush=True)
    return 0
