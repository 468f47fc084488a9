"""One typed config system: dataclasses, YAML files per stage and per preprocessing profile,
and ``key=value`` command-line overrides.

Resolution order (later wins): dataclass defaults -> YAML file(s) -> ``key=value`` overrides.
Keys may be dotted (``decode.fps=30``) or a unique leaf name (``fps=30``); a few aliases
(``stage=C``) keep the command line short. Unknown keys and values of the wrong type fail with
a :class:`ConfigError` that names the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from .errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"


# ----------------------------------------------------------------------------------------------
# Pretrained weights (which component comes from where; resolved by dwm.shared.weights)
# ----------------------------------------------------------------------------------------------
@dataclass
class ModelsConfig:
    # "full": real weights (Hugging Face id or local path). "tiny": random-init models of the same
    # classes, plus generated stand-in ONNX files, built on first use under models_dir/tiny.
    profile: Literal["full", "tiny"] = "full"
    models_dir: str = "models"
    # SVD img2vid-xt carries the VAE, the CLIP image encoder and the UNet as subfolders.
    svd: str = "stabilityai/stable-video-diffusion-img2vid-xt"
    # VAE used by preprocessing (latents) and generation (decode). Empty: the SVD repo's "vae".
    # A local AutoencoderTiny (TAESD) folder works too.
    vae: str = ""
    clip: str = ""  # empty: the SVD repo's "image_encoder"
    unet: str = ""  # empty: the SVD repo's "unet"
    # DWpose ONNX files (HF repo yzd-v/DWPose); relative paths live under models_dir.
    dwpose_det: str = "dwpose/yolox_l.onnx"
    dwpose_pose: str = "dwpose/dw-ll_ucoco_384.onnx"
    # insightface looks for <models_dir>/insightface/models/<pack>/*.onnx
    insightface_pack: Literal["antelopev2", "buffalo_l"] = "antelopev2"


# ----------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------
@dataclass
class DecodeConfig:
    fps: float = 24.0
    width: int = 512  # portrait by default: dance video is mostly portrait
    height: int = 896
    segment_frames: int = 150  # one shard sample per clip segment of at most this many frames
    min_frames: int = 24  # shorter videos / tail segments are dropped with a reason
    max_seconds: float = 0.0  # use only the first max_seconds of each video (0 = whole video)


@dataclass
class AudioConfig:
    sample_rate: int = 22050
    n_mels: int = 80


@dataclass
class PoseConfig:
    # "file": no model; keypoints from <video stem>.keypoints.json beside each video (README)
    backend: Literal["dwpose", "mediapipe", "file"] = "dwpose"
    heatmap_downsample: int = 8  # heatmaps at latent resolution (image / 8)
    heatmap_sigma: float = 1.5  # Gaussian sigma, in heatmap pixels
    min_score: float = 0.3  # keypoints below this score count as missing
    batch_size: int = 16
    # a video whose main dancer is found in fewer frames than this is skipped ("no person")
    min_person_fraction: float = 0.5


@dataclass
class FaceConfig:
    det_size: int = 640
    det_threshold: float = 0.5
    mask_dilate: float = 1.3  # face box is grown by this factor before the soft mask is drawn
    batch_size: int = 16


@dataclass
class LatentConfig:
    store_std: bool = False
    batch_size: int = 1  # 1 is fastest on CPU (measured: batch 4 is 3x slower per frame); raise on cuda


@dataclass
class ClipConfig:
    every_n_frames: int = 24  # CLIP embeddings of reference-candidate frames only
    batch_size: int = 8


@dataclass
class ThumbConfig:
    width: int = 128
    quality: int = 85


@dataclass
class ShardConfig:
    target_shard_mb: float = 256.0
    holdout_fraction: float = 0.1  # fraction of videos (by content hash) held out for validation
    # npy.zst members (contract encodings): per-frame arrays are cut into zstd frames of this
    # many frames, so a window decompresses only its own (stage C: 3-4 chunks of a 150-frame
    # segment); smaller chunks compress a little worse (heatmaps 1.1 KB/frame at 8, 0.9 at 48)
    chunk_frames: int = 8
    zstd_level: int = 19  # written once, read many times: level 19 costs ~1 ms a frame
    # face crops only on reference-candidate frames: the best-scored face of every this many
    # frames (a crop is 37.6 KB raw, ~24 KB compressed: on every frame it was 16% of a shard)
    face_crop_every: int = 8


@dataclass
class PreprocessConfig:
    input_dir: str = "videos"
    out: str = "data"
    profile: Literal["full", "tiny"] = "full"
    workers: int = 1
    device: Literal["cpu", "cuda"] = "cpu"
    # extractors to run; the others are skipped (the bench turns model extractors off this way)
    extractors: list[str] = field(
        default_factory=lambda: ["audio", "pose", "face", "latents", "clip", "thumbs"]
    )
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    pose: PoseConfig = field(default_factory=PoseConfig)
    face: FaceConfig = field(default_factory=FaceConfig)
    latents: LatentConfig = field(default_factory=LatentConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    thumbs: ThumbConfig = field(default_factory=ThumbConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    # feature cache (Zarr); empty: <out>/cache. Point two datasets at one cache to share work.
    cache_dir: str = ""
    # scale-out: this process handles videos i with i % world_size == rank (-1: from the env,
    # RANK/WORLD_SIZE or SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, else 0 of 1)
    rank: int = -1
    world_size: int = -1
    # "run": process + shards + manifest; "merge": only combine the per-rank manifests in out
    mode: Literal["run", "merge"] = "run"


# ----------------------------------------------------------------------------------------------
# Training (all three stages share one config; each stage file only sets what differs)
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    # The one size knob: which train_<profile>.yaml applies (steps, windows, loader settings);
    # model_size and models.profile follow it unless set. model_size=X alone picks profile X.
    profile: Literal["full", "tiny"] = "full"
    # -- stages and steps (README, "Training: the three-stage curriculum")
    training_stage: Literal["A", "B", "C", "all"] = "all"
    stage_a_steps: int = 5000
    stage_b_steps: int = 10000
    stage_c_steps: int = 15000
    # -- learning rates
    stage_a_lr: float = 1e-4
    stage_b_lr: float = 1e-4
    stage_c_lr: float = 5e-5
    m2p_lr_stage_b: float = 1e-5
    m2p_unfreeze_fraction_b: float = 0.5  # M2PEncoder trains at m2p_lr_stage_b after this point of B
    m2p_lr_stage_c: float = 0.0  # optional small LR for the M2PEncoder in C (0 = frozen)
    learning_rate: float = 1e-4  # base LR for groups without a stage-specific one
    # -- loss weights
    diffusion_loss_weight: float = 1.0
    pose_loss_weight: float = 0.5
    face_loss_weight: float = 0.1
    id_loss_weight: float = 0.1
    temporal_loss_weight: float = 0.1
    face_loss: Literal["cosine", "l2"] = "cosine"
    coord_loss_weight: float = 10.0  # stage A: L1 of soft-argmax coords (in [0,1]) beside heatmap CE
    # -- the M2PEncoder's pose denoiser (stage A; sigmas are in torso lengths of the reference)
    pose_denoise_loss_weight: float = 1.0  # MSE of x0 in the reference's units (EDGE's loss)
    velocity_loss_weight: float = 1.0  # L1 of x0's frame-to-frame motion vs the target's (EDGE)
    heatmap_loss_frames: int = 8  # stage A: frames per window that get L_heat (0 = all)
    music_dropout: float = 0.1  # music dropped per sample: classifier-free guidance on music
    pose_known_start_prob: float = 0.5  # the window's first frame given (generation: the photo)
    pose_known_prefix_prob: float = 0.3  # its first 1..W/2 frames given (a window's overlap)
    pose_sigma_data: float = 0.5  # EDM sigma_data: scales the noisy input (saved in the model)
    pose_sigma_min: float = 0.002  # sampling range of the pose denoiser (saved in the model)
    pose_sigma_max: float = 20.0
    pose_p_mean: float = -1.0  # log-normal training sigmas of the pose denoiser (EDM's)
    pose_p_std: float = 1.4
    pose_steps: int = 16  # stage-A validation: Heun steps per sampled dance (1 = one-step)
    music_guidance_scale: float = 1.0  # stage-A validation: CFG on music (1 = off)
    # stages B/C: the M2P guidance is its denoising of the ground-truth poses at a sigma drawn
    # log-uniformly in [pose_sigma_min, this] per sample (not a free-running sample)
    scheduled_sampling_sigma: float = 1.0
    # -- batching and optimisation
    train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    lr_warmup_steps: int = 100
    gradient_clip_norm: float = 1.0
    adam_weight_decay: float = 1e-2
    use_8bit_adam: bool = False
    max_nonfinite_steps: int = 5  # consecutive NaN/Inf losses tolerated before the run stops
    # -- conditioning and sequence
    guidance_scale: float = 1.0
    sequence_length: int = 24  # stage C starting T; the curriculum grows it to max_sequence_length
    max_sequence_length: int = 150
    audio_window: int = 120  # stage A window W (5 s at 24 fps)
    min_ref_gap: int = 12  # stage B: reference and target frames at least this many frames apart
    condition_dropout: float = 0.1
    scheduled_sampling_fraction: float = 0.2  # last 20% of stage B moves gt pose -> M2P pose
    # -- video model (stages B and C)
    face_tokens: int = 4  # ID adapter: face tokens appended to the CLIP token
    face_mask_weight: float = 3.0  # L_id (latent form): error weight inside the face mask
    id_loss_form: Literal["latent", "arcface"] = "latent"  # arcface: needs arcface_weights + VAE
    arcface_weights: str = ""  # safetensors of the torch ArcFace (id_loss_form=arcface)
    arcface_max_sigma: float = 1.0  # ArcFace L_id only on samples at or below this noise level
    edm_p_mean: float = 0.7  # log-normal training sigmas (SVD fine-tuning values)
    edm_p_std: float = 1.6
    svd_fps: int = 7  # SVD micro-conditioning (added_time_ids); generation must use the same
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    stage_c_m2p_mix: float = 1.0  # stage C pose/face guidance: 1 = M2PEncoder, 0 = ground truth
    # -- data loading
    data: str = "data/manifest.json"
    num_workers: int = 2
    pin_memory: bool = True
    prefetch_factor: int = 2
    resampled: bool = False
    epoch_samples: int = 0  # fixed epoch length in samples (0 = one pass over the shards)
    shuffle_buffer: int = 64
    # -- speed and memory
    gradient_checkpointing: bool = False
    use_xformers: bool = False  # attention only on flash / memory-efficient kernels (engine.attention_kernels)
    # -- model size and outputs
    model_size: Literal["tiny", "full"] = "full"  # follows profile unless set
    output_dir: str = "champ_2stage_output"
    init: str = ""  # explicit checkpoint/final folder to start the stage from
    resume: str = ""  # "latest" or a checkpoint path
    checkpointing_steps: int = 500
    checkpoints_total_limit: int = 3
    validation_steps: int = 500
    validation_batches: int = 4  # val batches per validation pass (0 = the whole val split)
    log_steps: int = 10
    seed: int = 42
    models: ModelsConfig = field(default_factory=ModelsConfig)


# ----------------------------------------------------------------------------------------------
# Generation and evaluation
# ----------------------------------------------------------------------------------------------
@dataclass
class GenerateConfig:
    # models.profile follows it unless set; "": the profile the checkpoint was trained with
    profile: Literal["", "full", "tiny"] = ""
    music: str = ""
    ref: str = ""
    out: str = "dance.mp4"
    ckpt: str = "champ_2stage_output/final"
    steps: int = 25
    seed: int = 42
    fps: float = 24.0
    resolution: str = "512x896"  # WxH
    max_seconds: float = 10.0
    device: str = "cpu"
    guidance_scale: float = 2.5
    pose_guidance_scale: float = 1.0
    window: int = 24  # frames per denoising window
    overlap: int = 6  # frames shared by neighbouring windows, blended
    pose_window: int = 0  # M2PEncoder window in frames (0: the training run's audio_window)
    pose_overlap: int = 0  # frames each pose window continues (inpaints) from the last (0: window/4)
    pose_steps: int = 16  # Heun steps of the pose denoiser (1 = the deterministic one-step)
    music_guidance_scale: float = 1.0  # classifier-free guidance on the music (1 = off)
    start_from_reference: bool = True  # frame 0 of the dance = the photo's pose
    # locating the person ("": the training data's); "file": <photo stem>.keypoints.json beside it
    pose_backend: Literal["", "dwpose", "mediapipe", "file"] = ""
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 on cuda, fp32 on cpu
    quiet: bool = False  # no progress bars
    models: ModelsConfig = field(default_factory=ModelsConfig)


@dataclass
class AppConfig:
    """``dwm app``: the local web page over the generation pipeline."""

    ckpt: str = "champ_2stage_output/final"
    host: str = "127.0.0.1"  # listen address: only this machine unless set (0.0.0.0: the network)
    port: int = 7860  # first port tried (the next free one is taken when it is busy)
    device: str = "cpu"
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    pose_backend: Literal["", "dwpose", "mediapipe"] = ""
    # the page's starting values (each can be changed on the page)
    seed: int = 42
    max_seconds: float = 10.0  # the length slider starts here
    longest_seconds: float = 60.0  # the length slider's end
    pose_steps: int = 16  # Heun steps of the pose denoiser (1: the deterministic one-step)
    # fixed for the session: generation settings as `dwm generate` names them
    steps: int = 25
    fps: float = 24.0
    resolution: str = "512x896"  # WxH
    window: int = 24
    overlap: int = 6
    max_upload_mb: int = 200  # larger uploads are refused by the server
    models: ModelsConfig = field(default_factory=ModelsConfig)


@dataclass
class EvalConfig:
    profile: Literal["", "full", "tiny"] = ""  # as GenerateConfig.profile
    ckpt: str = "champ_2stage_output/final"
    data: str = "data/manifest.json"
    out: str = "eval"
    split: Literal["val", "train", "all"] = "val"
    max_samples: int = 16
    steps: int = 10
    device: str = "cpu"
    seed: int = 0
    audio_window: int = 0  # M2PEncoder window in frames (0: the training run's audio_window)
    diversity_frames: int = 48  # FID_k and Div_k are measured over sub-clips of this many frames
    seeds: int = 4  # samples per clip with different seeds, for the seed diversity (< 2: skip)
    video_samples: int = 2  # clips the video model renders (stages B/C metrics); 0: skip them
    video_frames: int = 16  # frames per rendered clip
    guidance_scale: float = 2.5  # as GenerateConfig
    pose_guidance_scale: float = 1.0
    quiet: bool = False  # no progress bars
    models: ModelsConfig = field(default_factory=ModelsConfig)


@dataclass
class BenchConfig:
    quick: bool = False  # every section tiny (few frames, 1 repeat): for tests
    out: str = "bench_out"
    video: str = ""  # default: ../shared/samples/dance_music.mp4
    repeats: int = 3
    threads: int = 2
    # -- added by the bench (dwm.bench)
    taesd: str = ""  # TAESD folder for the latents extractor; default ../shared/samples/weights/taesd
    seconds: float = 2.0  # seconds of the video for runs with model extractors (0 = all of it)
    pose_backend: Literal["dwpose", "mediapipe"] = "mediapipe"  # pose extractor of section 2
    loader_samples: int = 8  # synthetic 512x896 shard samples (150 frames each) for section 4
    loader_batches: int = 24  # batches timed per loader repetition
    train_steps: int = 3  # timed train steps per stage (after 2 warm-up steps)
    workers: int = -1  # data-loader workers of sections 4-5 (-1: the TrainConfig default)
    # a full-size stage-C step (512x896, T=24, batch 1) measured on a GPU (bench/gpu.py's G1),
    # in ms: the loader's goal is against what it consumes; 0: bench/gpu.py's estimate
    gpu_step_ms: float = 0.0
    sections: list[str] = field(default_factory=lambda: ["1", "2", "3", "4", "5", "6"])
    cprofile: bool = True  # run each figure that misses its goal once more under cProfile
    # -- the GPU bench (bench/gpu.py, sections G1-G4): `dwm bench gpu=true`
    gpu: bool = False  # run the GPU sections instead of 1-6; writes <out>/bench_gpu.{md,json}
    dry_run: bool = False  # with gpu=true: the same code on the CPU, tiny models and sizes (CI)
    estimate_memory: bool = False  # no GPU needed: print the estimated step memory, then stop
    estimate_step: bool = False  # no GPU needed: print the estimated full-size stage-C step time
    gpu_steps: int = 0  # timed train steps of G1/G2 (0: 5; a dry run times 1)
    batch_c: int = 1  # stage-C batch of G1 (clips of T frames)
    batch_b: int = 4  # stage-B batch of G2 (frames)
    models_dir: str = "models"  # where `dwm models` put the weights (G1-G3)
    peak_tflops: float = 0.0  # the GPU's dense bf16 peak, when it is not in gpu.py's table


@dataclass
class DemoConfig:
    videos: str = ""  # empty: generate the known-answer corpus (choreography clips + keypoints)
    out: str = "demo_out"
    seconds: float = 6.0  # length of each generated clip
    clips: int = 8  # generated clips (when videos is empty), on beat tracks of several tempos
    width: int = 128  # preprocessing (and generation) frame size: small, for 2 CPU cores
    height: int = 256  # sides multiples of 64: the tiny M2PEncoder upsamples its heatmaps x8
    steps: int = 4  # sampling steps of the video (generate and eval)
    generate_seconds: float = 8.0  # length of the new beat track and of the generated dance
    seeds: int = 4  # dances sampled per model for the known-answer table (seed diversity)
    # stage A: the budget of issue 14's known answer (~800 tiny steps); B and C only run the
    # chain: with the tiny profile's random-init VAE no number of steps makes frames show the figure
    stage_a_steps: int = 800
    stage_b_steps: int = 8
    stage_c_steps: int = 4
    quick: bool = False  # stages B and C 2 steps each (tests); stage A keeps stage_a_steps


# Short names accepted on the command line.
ALIASES = {"stage": "training_stage"}


# ----------------------------------------------------------------------------------------------
# Machinery
# ----------------------------------------------------------------------------------------------
def _leaf_paths(cls: type, prefix: str = "") -> dict[str, tuple[str, Any]]:
    """Dotted path -> (path, type) for every leaf field of a dataclass type."""
    out: dict[str, tuple[str, Any]] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out.update(_leaf_paths(tp, path + "."))
        else:
            out[path] = (path, tp)
    return out


def resolve_key(cls: type, key: str) -> tuple[str, Any]:
    key = ALIASES.get(key, key)
    leaves = _leaf_paths(cls)
    if key in leaves:
        return leaves[key]
    matches = [p for p in leaves if p.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return leaves[matches[0]]
    if len(matches) > 1:
        raise ConfigError(f"ambiguous config key '{key}': use one of {', '.join(sorted(matches))}")
    raise ConfigError(f"unknown config key '{key}' for {cls.__name__}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (a string from the command line, or a YAML scalar) to ``tp``."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices and str(value) not in [str(c) for c in choices]:
            raise ConfigError(f"bad value for {key}: {value!r} is not one of {list(choices)}")
        return next(c for c in choices if str(c) == str(value))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(key, value, args[0])
    if origin is list:
        (item_tp,) = get_args(tp) or (str,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"bad value for {key}: expected a list, got {value!r}")
        return [_coerce(key, v, item_tp) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        s = str(value).lower()
        if s in ("true", "1", "yes", "on"):
            return True
        if s in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"bad value for {key}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"bad value for {key}: expected {tp.__name__}, got {value!r}")
        try:
            if tp is int:
                f = float(value)
                if not f.is_integer():
                    raise ValueError
                return int(f)
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"bad value for {key}: expected {tp.__name__}, got {value!r}"
            ) from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"bad value for {key}: expected a string, got {value!r}")
        return str(value)
    return value


def _set_path(cfg: Any, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    obj = cfg
    for p in parents:
        obj = getattr(obj, p)
    setattr(obj, leaf, value)


def _as_pairs(overrides: dict[str, Any] | list[str]) -> dict[str, Any]:
    if not isinstance(overrides, list):
        return dict(overrides)
    pairs = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got '{item}'")
        k, v = item.split("=", 1)
        pairs[k.strip()] = v
    return pairs


def keys_set(cls: type, overrides: dict[str, Any] | list[str] | None) -> set[str]:
    """The dotted fields of ``cls`` that ``overrides`` set (aliases and leaf names resolved)."""
    return {resolve_key(cls, k)[0] for k in _as_pairs(overrides or [])}


def apply_overrides(cfg: Any, overrides: dict[str, Any] | list[str]) -> Any:
    """Apply ``key=value`` overrides (strings) or a mapping to a config in place; returns it."""
    overrides = _as_pairs(overrides)
    for key, value in overrides.items():
        path, tp = resolve_key(type(cfg), key)
        label = key if path == key else f"{key} ({path})"  # name what was typed and the field
        _set_path(cfg, path, _coerce(label, value, tp))
    return cfg


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"dotted.key": value} (YAML files, saved configs)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_yaml(cfg: Any, path: str | Path) -> Any:
    """Apply a YAML file (nested or dotted keys) to a config; unknown keys fail naming the file."""
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    try:
        return apply_overrides(cfg, flatten(data))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def config_file(name: str) -> Path:
    """A config file shipped with the package, e.g. ``config_file('stage_A')``."""
    return CONFIG_DIR / f"{name}.yaml"


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_hash(obj: Any) -> str:
    """Stable short hash of a config (dataclass or plain data), for cache keys."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def describe(cls: type) -> list[tuple[str, str, Any]]:
    """(dotted key, type name, default) for every leaf: the CLI's --help lists these."""
    default = cls()
    rows = []
    for path, (_, tp) in _leaf_paths(cls).items():
        obj = default
        for p in path.split("."):
            obj = getattr(obj, p)
        if get_origin(tp) is Literal:
            name = "|".join(str(a) for a in get_args(tp))
        else:
            name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        rows.append((path, name, obj))
    return rows


def build_preprocess_config(overrides: list[str] | dict | None = None) -> PreprocessConfig:
    """Defaults -> profile file (``preprocess_<profile>.yaml``) -> overrides."""
    overrides = overrides or []
    cfg = PreprocessConfig()
    probe = apply_overrides(PreprocessConfig(), overrides)  # to learn the profile asked for
    load_yaml(cfg, config_file(f"preprocess_{probe.profile}"))
    return apply_overrides(cfg, overrides)


def build_train_config(
    overrides: list[str] | dict | None = None, stage: str | None = None
) -> TrainConfig:
    """Defaults -> ``train_<profile>.yaml`` -> ``stage_<X>.yaml`` -> overrides; then
    ``model_size`` and ``models.profile`` follow ``profile`` where the overrides leave them."""
    overrides = overrides or []
    given = keys_set(TrainConfig, overrides)
    probe = apply_overrides(TrainConfig(), overrides)
    profile = probe.profile
    if "profile" not in given and "model_size" in given:
        profile = probe.model_size  # the older spelling: model_size=tiny picks the tiny profile
    cfg = TrainConfig()
    load_yaml(cfg, config_file(f"train_{profile}"))
    st = stage or probe.training_stage
    if st in ("A", "B", "C"):
        load_yaml(cfg, config_file(f"stage_{st}"))
    apply_overrides(cfg, overrides)
    cfg.profile = profile  # type: ignore[assignment]
    if "model_size" not in given:
        cfg.model_size = profile  # type: ignore[assignment]
    if "models.profile" not in given:
        cfg.models.profile = profile  # type: ignore[assignment]
    if stage:
        cfg.training_stage = stage  # type: ignore[assignment]
    return cfg


def checkpoint_profile(ckpt: str | Path) -> str | None:
    """The ``models.profile`` a checkpoint folder was trained with (its training_info.json), or
    None when it does not say."""
    try:
        info = json.loads((Path(ckpt) / "training_info.json").read_text())
        profile = info["config"]["models"]["profile"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return profile if profile in ("full", "tiny") else None


def build_run_config(cls: type, overrides: list[str] | dict | None = None):
    """GenerateConfig / EvalConfig from overrides; ``models.profile`` follows ``profile``, and
    with neither given, the profile the checkpoint was trained with (else full)."""
    overrides = overrides or []
    cfg = apply_overrides(cls(), overrides)
    if "models.profile" not in keys_set(cls, overrides):
        cfg.models.profile = cfg.profile or checkpoint_profile(cfg.ckpt) or "full"
    return cfg
