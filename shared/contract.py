"""The contract between preprocessing and training: feature names, shapes, dtypes, versions.

Both sides import these names; neither hard-codes a string or a shape of its own. A shard sample
is one clip segment of one video (at most ``DecodeConfig.segment_frames`` frames). Its members are
``<key>.<name>.npy`` arrays plus ``<key>.json`` metadata (no pickle anywhere).

Symbols in shapes: T frames in the segment, K body joints, h x w latent grid (image / 8),
H x W image size after crop, R CLIP reference-candidate frames, D CLIP embedding size.
Coordinates are normalised to [0, 1] of the cropped frame (x to width, y to height).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Bump when the on-disk layout of shards or the cache changes in a way readers must know about.
SHARD_FORMAT_VERSION = 2  # 2: members compressed per their declared encoding
CACHE_FORMAT_VERSION = 1

# ---- body layout: 18 keypoints in OpenPose (COCO-18) order ----------------------------------
BODY_JOINTS = (
    "nose", "neck",
    "r_shoulder", "r_elbow", "r_wrist",
    "l_shoulder", "l_elbow", "l_wrist",
    "r_hip", "r_knee", "r_ankle",
    "l_hip", "l_knee", "l_ankle",
    "r_eye", "l_eye", "r_ear", "l_ear",
)  # fmt: skip
NUM_BODY_JOINTS = len(BODY_JOINTS)  # K = 18
NUM_HAND_JOINTS = 21  # per hand; hands stored as (left 21, right 21)
NUM_FACE_POINTS = 68
# pose.backend=file reads a video's keypoints from "<video stem>" + this, beside it (README)
KEYPOINTS_SIDECAR_SUFFIX = ".keypoints.json"
# OpenPose limb pairs, used for drawing skeletons.
BODY_LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
# Torso size for PCK normalisation: neck to mid-hip distance.
NECK, R_HIP, L_HIP = 1, 8, 11

FACE_EMBED_DIM = 512  # ArcFace
FACE_CROP_SIZE = 112  # aligned ArcFace crop
AUDIO_BASELINE_DIM = 35  # FACT/EDGE: 1 onset env + 20 MFCC + 12 chroma_cens + 1 peak + 1 beat
LATENT_CHANNELS = 4
LATENT_DOWNSAMPLE = 8
HEATMAP_QUANT_SCALE = 255.0  # heatmaps are stored as uint8 = round(value * 255), value in [0, 1]


# Member encodings (name -> member suffix). A reader refuses any other.
ENCODINGS = {"npy": "npy", "npy.zst": "npy.zst"}
# How an ``npy.zst`` member is cut into zstd frames (each one decompressed on its own):
CHUNK_WHOLE = "whole"  # one frame: small arrays, always read whole
CHUNK_FRAMES = "frames"  # every ShardConfig.chunk_frames rows: a window reads only its chunks
CHUNK_ROW = "row"  # one frame per row: rows read one at a time (face crops)


@dataclass(frozen=True)
class FeatureSpec:
    """One array member of a shard sample."""

    name: str  # member name: "<key>.<name>.<encoding suffix>"
    shape: tuple[str, ...]  # symbolic shape
    dtype: str  # numpy dtype name
    extractor: str  # which extractor writes it
    doc: str
    per_frame: bool = True  # first axis is T
    # "npy.zst" wherever zstd saves bytes (measured at 512x896 on the sample video: heatmaps
    # 129 KB -> 1.1 KB a frame, masks 7.2 KB -> 44 B, thumbnails 6.9 -> 4.1 KB); "npy" where
    # it does not (the latents, ArcFace embeddings) or the array is read in place
    encoding: str = "npy.zst"
    chunk: str = CHUNK_WHOLE  # for npy.zst: CHUNK_WHOLE, CHUNK_FRAMES or CHUNK_ROW


FEATURES: tuple[FeatureSpec, ...] = (
    # audio (absent when the video has no audio track; the sample is then unusable for stage A)
    FeatureSpec("audio_mel", ("T", "n_mels"), "float16", "audio", "log-mel (dB) per video frame"),
    FeatureSpec("audio_baseline", ("T", "35"), "float16", "audio",
                "FACT/EDGE set: onset env, 20 MFCC, 12 chroma_cens, onset peak, beat one-hots"),
    # pose (from the pose track of the main dancer, in crop coordinates)
    FeatureSpec("pose_body", ("T", "18", "3"), "float32", "pose", "x, y in [0,1], score"),
    FeatureSpec("pose_hands", ("T", "42", "3"), "float32", "pose", "left 21 then right 21"),
    FeatureSpec("pose_face", ("T", "68", "3"), "float32", "pose", "68 face points"),
    FeatureSpec("pose_heatmap", ("T", "18", "h", "w"), "uint8", "pose",
                "Gaussian heatmaps at latent resolution, value*255", chunk=CHUNK_FRAMES),
    # face
    FeatureSpec("face_present", ("T",), "bool", "face",
                "explicit flag: a face was found (detector, or pose face points)"),
    FeatureSpec("face_box", ("T", "4"), "float32", "face", "x0, y0, x1, y1 in [0,1]; 0 if none"),
    FeatureSpec("face_landmarks", ("T", "5", "2"), "float32", "face", "5 points in [0,1]"),
    FeatureSpec("face_score", ("T",), "float32", "face", "detection score; 0 if none"),
    FeatureSpec("face_embed", ("T", "512"), "float16", "face",
                "L2-normalised ArcFace embedding; 0 where no detection", encoding="npy"),
    FeatureSpec("face_mask", ("T", "h", "w"), "uint8", "face",
                "soft face mask at latent resolution, value*255; all zeros without a face",
                chunk=CHUNK_FRAMES),
    # face crops of the reference-candidate frames only: in every ShardConfig.face_crop_every
    # frames of the segment, the one with the best-scored face (none where no frame has a face)
    FeatureSpec("face_crop", ("F", "112", "112", "3"), "uint8", "face",
                "aligned RGB face crop (M2PEncoder input) of each face_crop_frames entry",
                per_frame=False, chunk=CHUNK_ROW),
    FeatureSpec("face_crop_frames", ("F",), "int32", "face",
                "segment-frame index of each face_crop row (ascending; face_present there)",
                per_frame=False),
    FeatureSpec("face_ref_embed", ("512",), "float32", "face",
                "reference embedding: the video's best frontal face", per_frame=False),
    # latents
    FeatureSpec("latents", ("T", "4", "h", "w"), "float16", "latents",
                "VAE latent mean, unscaled; multiply by meta.latent_scaling_factor",
                encoding="npy"),
    # clip (reference-candidate frames only)
    FeatureSpec("clip_frames", ("R",), "int32", "clip", "segment-frame indices embedded",
                per_frame=False),
    FeatureSpec("clip_embed", ("R", "D"), "float16", "clip", "CLIPVisionModelWithProjection image_embeds",
                per_frame=False, encoding="npy"),
    # thumbnails: JPEG bytes of every frame, concatenated, with offsets (len T+1)
    FeatureSpec("thumbs_jpeg", ("N",), "uint8", "thumbs", "concatenated JPEG files", per_frame=False),
    FeatureSpec("thumbs_offsets", ("T+1",), "int64", "thumbs", "byte offsets into thumbs_jpeg",
                per_frame=False),
)  # fmt: skip
FEATURE_BY_NAME = {f.name: f for f in FEATURES}

# Keys of the per-sample ``.json`` (all present; values may be null):
SAMPLE_META_KEYS = (
    "key",  # "<video_hash[:16]>_<segment:04d>", the WebDataset __key__
    "video_hash",  # sha256 of the video file's bytes (the cache key)
    "source",  # path of the first file seen with this content (informational)
    "segment",  # segment index within the video
    "start_frame",  # first frame of the segment, in resampled frames
    "num_frames",  # T
    "fps",  # resampled fps
    "orig_fps", "orig_width", "orig_height", "rotation",
    "width", "height",  # W, H after crop
    "crop_box",  # [x0, y0, x1, y1] in original pixels
    "has_audio",  # false: stage A skips this sample
    "tempo",  # BPM, null without audio
    "beat_frames",  # beat positions, frame indices within the segment
    "latent_scaling_factor",
    "split",  # "train" or "val" (decided per video, so no leakage)
    "features",  # names of the arrays present
    "chunks",  # name -> {offsets, rows, shape, dtype} of each npy.zst member (the shard writer's)
)  # fmt: skip


def member_name(name: str, encoding: str | None = None) -> str:
    """``<name>.<suffix>`` of a feature's member (without the sample key)."""
    spec = FEATURE_BY_NAME.get(name)
    enc = encoding or (spec.encoding if spec is not None else "npy")
    return f"{name}.{ENCODINGS[enc]}"


def heatmap_to_float(hm_uint8: np.ndarray) -> np.ndarray:
    return hm_uint8.astype(np.float32) / HEATMAP_QUANT_SCALE


def decode_thumbs(jpeg: np.ndarray, offsets: np.ndarray) -> list[bytes]:
    return [jpeg[offsets[i] : offsets[i + 1]].tobytes() for i in range(len(offsets) - 1)]


# How a feature is normalised for the models: training views and generation both use this, so the
# M2PEncoder sees the same numbers from a shard and from a song.
class Normaliser:
    """(x - mean) / std per feature dimension, from the manifest's ``stats``."""

    def __init__(self, stats: dict[str, Any] | None, name: str, dim: int):
        s = (stats or {}).get(name) or {}
        mean = np.asarray(s.get("mean", 0.0), np.float32).reshape(-1)
        std = np.asarray(s.get("std", 1.0), np.float32).reshape(-1)
        ok = mean.size in (1, dim) and std.size in (1, dim)
        self.mean = np.broadcast_to(mean, (dim,)).copy() if ok else np.zeros(dim, np.float32)
        std = np.broadcast_to(std, (dim,)).copy() if ok else np.ones(dim, np.float32)
        self.std = np.where(np.isfinite(std) & (std > 1e-6), std, 1.0).astype(np.float32)
        self.present = bool(s)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((x.astype(np.float32) - self.mean) / self.std).astype(np.float32)
