"""Synthetic shards with every feature of the contract, at any size: what the loader and memory
benches read when the point is the data path's speed, not the content."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from dwm.preprocess.extractors.pose import render_heatmaps
from dwm.shared import contract
from dwm.shared.config import ShardConfig
from dwm.shared.shards import ShardWriter, load_manifest, write_manifest
from dwm.shared.synthetic import dancer_pose, render_frame

CLIP_DIM = 1024  # SVD's CLIPVisionModelWithProjection image_embeds
N_MELS = 80


@dataclass
class ShardSet:
    manifest: str
    urls: list[str]
    samples: int
    frames: int  # per sample
    bytes: int  # all shards
    width: int
    height: int


def synth_sample(i: int, frames: int, width: int, height: int, rng: np.random.Generator,
                 fps: float = 24.0) -> dict[str, Any]:
    """One shard sample with every contract feature, at ``width`` x ``height``."""
    h, w = height // contract.LATENT_DOWNSAMPLE, width // contract.LATENT_DOWNSAMPLE
    T = frames
    body = np.zeros((T, contract.NUM_BODY_JOINTS, 3), np.float32)
    for t in range(T):
        body[t, :, :2] = dancer_pose(t / fps, 120.0, width, height, phase=i) / [width, height]
    body[..., 2] = 0.9
    thumbs = []
    for t in range(T):  # 128-wide JPEG thumbnails of a drawn frame, like the thumbs extractor
        img = render_frame(body[t, :, :2] * [128, 224], 128, 224, hue=i * 20)
        ok, jpg = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 85])
        thumbs.append(jpg.ravel())
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in thumbs])]).astype(np.int64)
    emb = rng.standard_normal((T, contract.FACE_EMBED_DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    mask = np.zeros((T, h, w), np.uint8)
    mask[:, h // 10 : h // 5, w // 3 : 2 * w // 3] = 255
    clip_frames = np.arange(0, T, 24, dtype=np.int32)
    crop_frames = np.arange(0, T, ShardConfig().face_crop_every, dtype=np.int32)
    key = f"{i:016x}_0000"
    sample = {
        "__key__": key,
        "audio_mel": rng.standard_normal((T, N_MELS)),
        "audio_baseline": rng.standard_normal((T, contract.AUDIO_BASELINE_DIM)),
        "pose_body": body,
        "pose_hands": np.zeros((T, 2 * contract.NUM_HAND_JOINTS, 3)),
        "pose_face": np.zeros((T, contract.NUM_FACE_POINTS, 3)),
        "pose_heatmap": render_heatmaps(body, h, w, 1.5, 0.3),
        "face_present": np.ones(T, bool),
        "face_box": np.tile([0.35, 0.08, 0.65, 0.25], (T, 1)),
        "face_landmarks": np.full((T, 5, 2), 0.5),
        "face_score": np.full(T, 0.9),
        "face_embed": emb,
        "face_mask": mask,
        "face_crop": rng.integers(0, 256, (len(crop_frames), contract.FACE_CROP_SIZE,
                                           contract.FACE_CROP_SIZE, 3)),
        "face_crop_frames": crop_frames,
        "face_ref_embed": emb[0],
        "latents": rng.standard_normal((T, contract.LATENT_CHANNELS, h, w)),
        "clip_frames": clip_frames,
        "clip_embed": rng.standard_normal((len(clip_frames), CLIP_DIM)),
        "thumbs_jpeg": np.concatenate(thumbs),
        "thumbs_offsets": offsets,
    }
    for name, spec in contract.FEATURE_BY_NAME.items():
        sample[name] = np.ascontiguousarray(np.asarray(sample[name]).astype(spec.dtype))
    meta = {
        "key": key, "video_hash": f"{i:064x}", "source": f"synthetic_{i}.mp4", "segment": 0,
        "start_frame": 0, "num_frames": T, "fps": fps, "orig_fps": fps, "orig_width": width,
        "orig_height": height, "rotation": 0, "width": width, "height": height,
        "crop_box": [0, 0, width, height], "has_audio": True, "tempo": 120.0,
        "beat_frames": list(range(0, T, 12)), "latent_scaling_factor": 0.18215, "split": "train",
        "features": sorted(k for k in sample if k != "__key__"),
        "chunks": {},  # filled by the shard writer
    }
    assert set(meta) == set(contract.SAMPLE_META_KEYS)
    sample["json"] = meta
    return sample


def synth_shards(out: Path, samples: int, frames: int, width: int, height: int,
                 shards: int, seed: int = 0) -> ShardSet:
    """Write ``samples`` synthetic samples into about ``shards`` tars + a manifest."""
    rng = np.random.default_rng(seed)
    first = synth_sample(0, frames, width, height, rng)
    per_shard = max(1, -(-samples // max(1, shards)))
    writer = ShardWriter(str(out), prefix="train", target_bytes=1 << 40)
    for i in range(samples):  # per_shard samples per tar
        writer.write(first if i == 0 else synth_sample(i, frames, width, height, rng))
        if (i + 1) % per_shard == 0:
            writer.flush()
    infos = writer.close()
    feats = {f.name: {"shape": list(f.shape), "dtype": f.dtype, "extractor": f.extractor,
                      "version": "synthetic", "encoding": f.encoding} for f in contract.FEATURES}
    stats = {"audio_mel": {"mean": [0.0] * N_MELS, "std": [1.0] * N_MELS},
             "audio_baseline": {"mean": [0.0] * contract.AUDIO_BASELINE_DIM,
                                "std": [1.0] * contract.AUDIO_BASELINE_DIM}}
    path = write_manifest(str(out), infos, feats, stats, synthetic=True)
    man = load_manifest(path)
    return ShardSet(path, [s["url"] for s in man["shards"]], samples, frames,
                    sum(s.bytes for s in infos), width, height)
