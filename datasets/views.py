"""Stage views: cut training items out of clip samples, on the fly and deterministically.

A shard sample is one clip segment (``contract.FEATURES``). Each view turns a decoded sample into
one item, using a ``numpy`` generator it is given (seeded by the pipeline from seed, epoch, worker
and item index, so the same position always gives the same item). Items are collated into
batches of tensors; one batch has one length (T or W).

Batch keys (B = batch size; K = 18 joints; h x w latent grid; D = CLIP size). ``uint8`` image-like
tensors listed in :data:`UINT8_TO_FLOAT` leave the workers as uint8 (4x less to copy) and become
float32 in [0, 1] in :func:`batch_to_device`, so stages always see floats.

View A (stage A, the M2PEncoder). Samples with ``has_audio=false`` are skipped.
    audio_mel       (B, W, n_mels) float32, normalised with the manifest's stats
    audio_baseline  (B, W, 35)     float32, normalised
    frame_mask      (B, W)         float32, 1 = real frame, 0 = padding (segment shorter than W)
    heatmap         (B, W, K, h, w) float32 [0, 1] (from uint8)
    coords          (B, W, K, 2)   float32, pose_body x, y in [0, 1]
    conf            (B, W, K)      float32, pose_body score (0 on padding)
    face_crop       (B, 3, 112, 112) float32 [0, 1]: the reference face, from ANOTHER frame of the
                    video with ``face_present`` (outside the window when possible)
    face_embed      (B, 512)       float32: ArcFace embedding of that frame (face_ref_embed when
                    the frame has none)
    face_valid      (B,)           float32, 0 when the video has no usable face at all
    ref_pose        (B, K, 3)      float32, pose_body of the reference frame (x, y in [0, 1],
                    score): the face crop's frame when its neck is visible, else another frame
                    of the video with a visible neck, outside the window when possible (the
                    M2PEncoder dances relative to it, as generation does to the photo's body)
    meta            list of dicts: key, source, fps, width, height, segment_start (frame of the
                    video), window_start (frame of the segment), length (real frames), ref_frame,
                    ref_pose_frame
    thumbs          (only with ``with_thumbs=True``) list of lists of JPEG bytes, one per frame

View B (stage B, single frames).
    ref_latent      (B, 4, h, w)   float32, latents * latent_scaling_factor
    target_latent   (B, 4, h, w)   float32, >= min_ref_gap frames from the reference (the gap is
                    clamped to T-1 for short segments)
    heatmap         (B, K, h, w)   float32 [0, 1], pose heatmap of the target frame
    coords, conf    (B, K, 2), (B, K) of the target frame
    face_mask       (B, h, w)      float32 [0, 1], of the target frame
    face_embed      (B, 512)       float32, face_ref_embed; face_valid (B,) as in A
    ref_face_crop   (B, 3, 112, 112) float32 [0, 1], a face crop of the video (for the M2PEncoder)
    ref_pose        (B, K, 3)      float32, pose_body of the reference frame (for the M2PEncoder)
    clip_embed      (B, D)         float32, the clip_frames entry nearest the reference frame
    audio_mel, audio_baseline, frame_mask   (B, W, ...) as view A, the W-window around the target
    audio_target    (B,)           int64, index of the target frame inside that window
    window_coords, window_conf (B, W, K, 2), (B, W, K): pose_body over that window (0 on
                    padding): the ground-truth dance the M2PEncoder denoises for scheduled sampling
    audio_valid     (B,)           float32, 0 when the sample has no audio (features are zeros)
    ref_index, target_index  (B,)  int64, frame indices within the segment
    meta            list of dicts (key, source, fps, segment_start, ...)

View C (stage C, clips of T frames; T per batch from the curriculum).
    latents         (B, T, 4, h, w) float32, scaled
    heatmap         (B, T, K, h, w) float32 [0, 1]; coords (B, T, K, 2); conf (B, T, K)
    face_mask       (B, T, h, w)   float32 [0, 1]
    frame_mask      (B, T)         float32 (segments shorter than T are padded, mask 0)
    audio_mel, audio_baseline (B, T, ...) normalised, for the clip's frames; audio_valid (B,)
    ref_latent      (B, 4, h, w)   from a frame outside the clip when the segment has one
                    (preferring frames with a face), else the clip's first frame
    ref_face_crop, ref_pose, face_embed, face_valid, clip_embed  as view B (clip_embed and
                    ref_pose of the reference frame)
    ref_index, clip_start (B,) int64; seq_len: int (T of the batch); meta list of dicts
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from dwm.shared import contract
from dwm.shared.errors import UserFacingError
from dwm.shared.shards import ManifestError, check_member_name, decode_npy

UINT8_TO_FLOAT = ("heatmap", "face_mask", "face_crop", "ref_face_crop")
_NON_TENSOR = ("meta", "thumbs")


class SampleError(UserFacingError, ValueError):
    """A sample that cannot be used (missing member, wrong shape); names the shard and key."""


# ---------------------------------------------------------------------------------------------
# decoding: only .npy (no pickle) and .json; anything else is refused
# ---------------------------------------------------------------------------------------------
def decode_member(name: str, data: bytes, where: str) -> Any:
    check_member_name(name, where)
    if name == "json":
        return json.loads(data)
    if name.endswith(".npy"):
        return decode_npy(data)  # a read-only view of the shard's bytes: no copy
    raise ManifestError(f"{where}: member {name!r} is neither .npy nor .json; not decoded")


def sample_meta(raw: dict[str, Any]) -> dict[str, Any]:
    where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
    if "json" not in raw:
        raise SampleError(f"{where}: sample has no .json metadata")
    meta = raw["json"]
    return decode_member("json", meta, where) if isinstance(meta, bytes) else meta


def decode_features(raw: dict[str, Any], names: tuple[str, ...],
                    optional: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Decode the ``.npy`` members ``names`` (must exist) and ``optional`` (may be absent)."""
    where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
    out = {}
    for name in (*names, *optional):
        member = f"{name}.npy"
        if member not in raw:
            if name in optional:
                continue
            raise SampleError(f"{where}: sample has no member {name}.npy (needed by this view)")
        arr = decode_member(member, raw[member], where)
        spec = contract.FEATURE_BY_NAME.get(name)
        if spec is not None and arr.dtype != np.dtype(spec.dtype):
            raise SampleError(f"{where}: {name} has dtype {arr.dtype}, contract says {spec.dtype}")
        out[name] = arr
    return out


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
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


def window(arr: np.ndarray, start: int, length: int) -> np.ndarray:
    """``arr[start:start+length]`` zero-padded at the end to ``length`` frames."""
    part = arr[start : start + length]
    if len(part) == length:
        return np.ascontiguousarray(part)
    out = np.zeros((length, *arr.shape[1:]), arr.dtype)
    out[: len(part)] = part
    return out


def scaled(latents: np.ndarray, scale: float) -> np.ndarray:
    """float32(latents) * scale, the same values as ``astype(float32) * scale``. torch's
    vectorised float16 conversion is about 2.5x numpy's; the copy first makes the (read-only,
    memory-mapped) window a writable array that torch accepts."""
    return torch.from_numpy(np.array(latents)).float().mul_(float(scale)).numpy()


def crop_chw(crop_hwc: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(crop_hwc, (2, 0, 1)))


def pick_face_frame(face_present: np.ndarray, rng: np.random.Generator,
                    avoid: tuple[int, int] | None = None, prefer: int | None = None) -> int | None:
    """A frame index with a face: ``prefer`` if it has one, else outside ``avoid`` [a, b) when
    possible, else any; None when no frame has a face."""
    idx = np.flatnonzero(face_present)
    if len(idx) == 0:
        return None
    if prefer is not None and face_present[prefer]:
        return int(prefer)
    if avoid is not None:
        outside = idx[(idx < avoid[0]) | (idx >= avoid[1])]
        if len(outside):
            idx = outside
    return int(rng.choice(idx))


def pick_pose_frame(body: np.ndarray, rng: np.random.Generator,
                    avoid: tuple[int, int] | None = None, prefer: int | None = None,
                    min_conf: float = 0.3) -> int:
    """A frame whose pose has a visible neck (the reference body's origin): ``prefer`` if it
    has one, else outside ``avoid`` [a, b) when possible, else any; the most confident frame
    when none has a visible neck."""
    ok = body[:, contract.NECK, 2] >= min_conf
    if prefer is not None and ok[prefer]:
        return int(prefer)
    idx = np.flatnonzero(ok)
    if len(idx) == 0:
        return int(np.argmax(body[..., 2].sum(-1)))
    if avoid is not None:
        outside = idx[(idx < avoid[0]) | (idx >= avoid[1])]
        if len(outside):
            idx = outside
    return int(rng.choice(idx))


def face_crop_of(feats: dict[str, np.ndarray], frame: int | None) -> np.ndarray:
    size = contract.FACE_CROP_SIZE
    return feats["face_crop"][frame] if frame is not None else np.zeros((size, size, 3), np.uint8)


def face_target(feats: dict[str, np.ndarray], frame: int | None) -> tuple[np.ndarray, float]:
    """ArcFace embedding of ``frame`` (face_ref_embed when that frame has none) and validity."""
    ref = feats["face_ref_embed"].astype(np.float32)
    emb = feats["face_embed"][frame].astype(np.float32) if frame is not None else ref
    if not np.isfinite(emb).all() or np.linalg.norm(emb) < 1e-3:
        emb = ref
    ok = bool(np.isfinite(emb).all() and np.linalg.norm(emb) > 1e-3)
    return (emb if ok else np.zeros_like(emb)).astype(np.float32), float(ok)


def nearest_clip(feats: dict[str, np.ndarray], frame: int,
                 dim_hint: int = 0) -> tuple[np.ndarray, float]:
    frames = feats.get("clip_frames")
    emb = feats.get("clip_embed")
    if frames is None or emb is None or len(frames) == 0:
        return np.zeros(dim_hint or 1, np.float32), 0.0
    i = int(np.argmin(np.abs(frames.astype(np.int64) - frame)))
    return emb[i].astype(np.float32), 1.0


def base_meta(meta: dict[str, Any]) -> dict[str, Any]:
    return {"key": meta.get("key"), "source": meta.get("source"), "fps": meta.get("fps"),
            "segment_start": meta.get("start_frame"), "video_hash": meta.get("video_hash"),
            "width": meta.get("width"), "height": meta.get("height"),
            "latent_scaling_factor": meta.get("latent_scaling_factor")}


# ---------------------------------------------------------------------------------------------
# views
# ---------------------------------------------------------------------------------------------
class View:
    """Turns decoded samples into items. Subclasses set ``needed``/``optional`` features."""

    name = ""
    needed: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()

    def __init__(self, stats: dict[str, Any] | None = None, n_mels: int = 80):
        self.stats = stats or {}
        self.n_mels = n_mels
        self.norm_mel = Normaliser(self.stats, "audio_mel", n_mels)
        self.norm_base = Normaliser(self.stats, "audio_baseline", contract.AUDIO_BASELINE_DIM)

    def accepts(self, meta: dict[str, Any]) -> bool:
        """Cheap check on the metadata alone (used when skipping on resume: no decoding)."""
        return int(meta.get("num_frames") or 0) > 0

    def make_item(self, raw: dict[str, Any], rng: np.random.Generator,
                  length: int | None = None) -> dict[str, Any]:
        meta = sample_meta(raw)
        feats = decode_features(raw, self.needed, self.optional)
        return self.build(meta, feats, rng, length)

    def build(self, meta, feats, rng, length):  # pragma: no cover - abstract
        raise NotImplementedError

    def audio(self, feats: dict[str, np.ndarray], start: int, length: int, has_audio: bool):
        if has_audio and "audio_mel" in feats and "audio_baseline" in feats:
            mel = window(self.norm_mel(feats["audio_mel"]), start, length)
            base = window(self.norm_base(feats["audio_baseline"]), start, length)
            return mel, base, 1.0
        return (np.zeros((length, self.n_mels), np.float32),
                np.zeros((length, contract.AUDIO_BASELINE_DIM), np.float32), 0.0)


class ViewA(View):
    name = "A"
    needed = ("audio_mel", "audio_baseline", "pose_body", "pose_heatmap", "face_present",
              "face_crop", "face_embed", "face_ref_embed")

    def __init__(self, stats=None, n_mels: int = 80, audio_window: int = 120,
                 with_thumbs: bool = False):
        super().__init__(stats, n_mels)
        self.audio_window = int(audio_window)
        self.with_thumbs = with_thumbs
        if with_thumbs:
            self.needed = (*self.needed, "thumbs_jpeg", "thumbs_offsets")

    def accepts(self, meta):
        return super().accepts(meta) and bool(meta.get("has_audio"))

    def build(self, meta, feats, rng, length=None):
        W = self.audio_window
        T = int(feats["pose_body"].shape[0])
        # Short segments: take them whole and pad to W with frame_mask 0 (the loss ignores padding),
        # so a batch always has one W and no sample is dropped.
        start = int(rng.integers(0, T - W + 1)) if T >= W else 0
        n = min(W, T)
        mel, base, _ = self.audio(feats, start, W, True)
        mask = np.zeros(W, np.float32)
        mask[:n] = 1.0
        body = window(feats["pose_body"].astype(np.float32), start, W)
        ref = pick_face_frame(feats["face_present"].astype(bool), rng, avoid=(start, start + n))
        crop = face_crop_of(feats, ref)
        emb, ok = face_target(feats, ref)
        all_body = feats["pose_body"]
        pose_ref = pick_pose_frame(all_body, rng, avoid=(start, start + n), prefer=ref)
        item = {
            "audio_mel": mel, "audio_baseline": base, "frame_mask": mask,
            "heatmap": window(feats["pose_heatmap"], start, W),
            "coords": np.ascontiguousarray(body[..., :2]),
            "conf": (body[..., 2] * mask[:, None]).astype(np.float32),
            "face_crop": crop_chw(crop), "face_embed": emb, "face_valid": np.float32(ok),
            "ref_pose": all_body[pose_ref].astype(np.float32),
            "meta": {**base_meta(meta), "window_start": start, "length": n,
                     "ref_frame": -1 if ref is None else ref, "ref_pose_frame": pose_ref},
        }
        if self.with_thumbs:
            thumbs = contract.decode_thumbs(feats["thumbs_jpeg"], feats["thumbs_offsets"])
            item["thumbs"] = thumbs[start : start + n]
        return item


class ViewB(View):
    name = "B"
    needed = ("latents", "pose_body", "pose_heatmap", "face_present", "face_mask", "face_crop",
              "face_embed", "face_ref_embed")
    optional = ("audio_mel", "audio_baseline", "clip_frames", "clip_embed")

    def __init__(self, stats=None, n_mels: int = 80, audio_window: int = 120,
                 min_ref_gap: int = 12):
        super().__init__(stats, n_mels)
        self.audio_window = int(audio_window)
        self.min_ref_gap = int(min_ref_gap)

    def build(self, meta, feats, rng, length=None):
        T = int(feats["latents"].shape[0])
        scale = float(meta.get("latent_scaling_factor") or 1.0)
        gap = max(0, min(self.min_ref_gap, T - 1))  # clamp for short segments
        idx = np.arange(T)
        # reference: prefer frames with a face that still have a target far enough away
        has_target = (idx >= gap) | (idx <= T - 1 - gap)
        faces = feats["face_present"].astype(bool)
        cand = idx[has_target & faces] if (has_target & faces).any() else idx[has_target]
        r = int(rng.choice(cand))
        targets = idx[np.abs(idx - r) >= gap] if gap > 0 else idx[idx != r] if T > 1 else idx
        t = int(rng.choice(targets))
        W = self.audio_window
        a_start = max(0, min(t - W // 2, T - W)) if T >= W else 0
        mel, base, a_ok = self.audio(feats, a_start, W, bool(meta.get("has_audio")))
        mask = np.zeros(W, np.float32)
        mask[: min(W, T)] = 1.0
        face_frame = pick_face_frame(faces, rng, prefer=r)
        crop = face_crop_of(feats, face_frame)
        emb, ok = face_target(feats, None)  # the video's reference embedding
        clip, clip_ok = nearest_clip(feats, r)
        body = feats["pose_body"][t].astype(np.float32)
        around = window(feats["pose_body"].astype(np.float32), a_start, W)
        return {
            "ref_latent": scaled(feats["latents"][r], scale),
            "target_latent": scaled(feats["latents"][t], scale),
            "heatmap": np.ascontiguousarray(feats["pose_heatmap"][t]),
            "coords": np.ascontiguousarray(body[:, :2]), "conf": np.ascontiguousarray(body[:, 2]),
            "face_mask": np.ascontiguousarray(feats["face_mask"][t]),
            "face_embed": emb, "face_valid": np.float32(ok),
            "ref_face_crop": crop_chw(crop),
            "ref_pose": feats["pose_body"][r].astype(np.float32),
            "clip_embed": clip, "clip_valid": np.float32(clip_ok),
            "audio_mel": mel, "audio_baseline": base, "frame_mask": mask,
            "audio_target": np.int64(t - a_start), "audio_valid": np.float32(a_ok),
            "window_coords": np.ascontiguousarray(around[..., :2]),
            "window_conf": np.ascontiguousarray(around[..., 2]),
            "ref_index": np.int64(r), "target_index": np.int64(t),
            "meta": {**base_meta(meta), "ref_frame": r, "target_frame": t},
        }


class ViewC(View):
    name = "C"
    needed = ViewB.needed
    optional = ViewB.optional

    def __init__(self, stats=None, n_mels: int = 80, sequence_length: int = 24):
        super().__init__(stats, n_mels)
        self.sequence_length = int(sequence_length)

    def build(self, meta, feats, rng, length=None):
        L = int(length or self.sequence_length)
        T = int(feats["latents"].shape[0])
        scale = float(meta.get("latent_scaling_factor") or 1.0)
        start = int(rng.integers(0, T - L + 1)) if T >= L else 0
        n = min(L, T)
        faces = feats["face_present"].astype(bool)
        outside = np.r_[0:start, start + n : T]
        if len(outside):
            with_face = outside[faces[outside]]
            r = int(rng.choice(with_face if len(with_face) else outside))
        else:
            r = start
        mask = np.zeros(L, np.float32)
        mask[:n] = 1.0
        mel, base, a_ok = self.audio(feats, start, L, bool(meta.get("has_audio")))
        body = window(feats["pose_body"].astype(np.float32), start, L)
        face_frame = pick_face_frame(faces, rng, prefer=r)
        crop = face_crop_of(feats, face_frame)
        emb, ok = face_target(feats, None)
        clip, clip_ok = nearest_clip(feats, r)
        return {
            "latents": scaled(window(feats["latents"], start, L), scale),
            "heatmap": window(feats["pose_heatmap"], start, L),
            "coords": np.ascontiguousarray(body[..., :2]),
            "conf": (body[..., 2] * mask[:, None]).astype(np.float32),
            "face_mask": window(feats["face_mask"], start, L),
            "frame_mask": mask,
            "audio_mel": mel, "audio_baseline": base, "audio_valid": np.float32(a_ok),
            "ref_latent": scaled(feats["latents"][r], scale),
            "ref_face_crop": crop_chw(crop), "face_embed": emb, "face_valid": np.float32(ok),
            "ref_pose": feats["pose_body"][r].astype(np.float32),
            "clip_embed": clip, "clip_valid": np.float32(clip_ok),
            "ref_index": np.int64(r), "clip_start": np.int64(start),
            "meta": {**base_meta(meta), "ref_frame": r, "clip_start": start, "length": n},
        }


def make_view(name: str, stats: dict[str, Any] | None, cfg: Any = None, **overrides: Any) -> View:
    """The view of a stage, with its options from a TrainConfig (``overrides`` win)."""
    n_mels = int(overrides.pop("n_mels", _n_mels_from_stats(stats)))
    if name == "A":
        opts = {"audio_window": getattr(cfg, "audio_window", 120)}
        return ViewA(stats, n_mels, **{**opts, **overrides})
    if name == "B":
        opts = {"audio_window": getattr(cfg, "audio_window", 120),
                "min_ref_gap": getattr(cfg, "min_ref_gap", 12)}
        return ViewB(stats, n_mels, **{**opts, **overrides})
    if name == "C":
        opts = {"sequence_length": getattr(cfg, "sequence_length", 24)}
        return ViewC(stats, n_mels, **{**opts, **overrides})
    raise ValueError(f"unknown dataset view {name!r} (A, B or C)")


def _n_mels_from_stats(stats: dict[str, Any] | None) -> int:
    mean = ((stats or {}).get("audio_mel") or {}).get("mean")
    if isinstance(mean, (list, tuple)) and len(mean) > 1:
        return len(mean)
    return 80


# ---------------------------------------------------------------------------------------------
# collation and device transfer
# ---------------------------------------------------------------------------------------------
def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack arrays into tensors; keep ``meta``/``thumbs`` (and anything else) as lists. The
    tensors are views of one buffer (:func:`collate_packed`, as the training loader sends)."""
    return unpack_batch(collate_packed(items))


def collate_packed(items: list[dict[str, Any]], float_images: bool = False,
                   pool: Any = None) -> dict[str, Any]:
    """:func:`collate` into ONE contiguous uint8 tensor (``__packed__``) plus its layout.

    A DataLoader worker hands each tensor to the main process as its own shared-memory block
    (a file descriptor sent, received and mapped per tensor); packed, a batch costs one, and a
    pinned batch one host-to-device copy. ``float_images``: :data:`UINT8_TO_FLOAT` tensors are
    converted to float32 here, in the worker (the same values as :func:`batch_to_device`)."""
    if not items:
        raise ValueError("collate: no items")
    layout, rest, fills, total = [], {}, [], 0
    for k in items[0]:
        vals = [it[k] for it in items]
        if k in _NON_TENSOR or not all(isinstance(v, (np.ndarray, np.generic)) for v in vals):
            rest[k] = vals
            continue
        arrs = [np.asarray(v) for v in vals]
        if any(a.shape != arrs[0].shape for a in arrs):
            raise ValueError(f"collate: {k} has shapes {[a.shape for a in arrs]} in one batch")
        convert = float_images and k in UINT8_TO_FLOAT and arrs[0].dtype == np.uint8
        dtype = np.dtype(np.float32) if convert else arrs[0].dtype
        shape = (len(arrs), *arrs[0].shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        layout.append((k, dtype.str, shape, total, nbytes))
        fills.append((arrs, convert))
        total += -(-nbytes // 64) * 64  # 64-byte aligned, so every slice can be viewed as any dtype
    extra: dict[str, Any] = {}
    if pool is not None:  # a recycled shared-memory block (see dwm.datasets.pipeline.BlockPool)
        extra["__block__"], block = pool.take(max(total, 1))
        buf = block[: max(total, 1)]
    elif get_worker_info() is not None:  # in a worker: build it in shared memory (as torch's
        # default_collate does), or sending it to the main process copies it once more
        buf = torch.empty(0, dtype=torch.uint8).set_(
            torch.UntypedStorage._new_shared(max(total, 1)), 0, (max(total, 1),))
    else:
        buf = torch.empty(max(total, 1), dtype=torch.uint8)
    flat = buf.numpy()
    for (_, dstr, shape, off, nbytes), (arrs, convert) in zip(layout, fills, strict=True):
        dst = flat[off : off + nbytes].view(np.dtype(dstr)).reshape(shape)
        for i, a in enumerate(arrs):
            if convert:  # float32(x) / 255 in float32, exactly as batch_to_device computes it
                np.divide(a, np.float32(255.0), out=dst[i], dtype=np.float32)
            else:
                dst[i] = a
    return {"__packed__": buf, "__layout__": layout, **extra, **rest}


def unpack_batch(packed: dict[str, Any]) -> dict[str, Any]:
    """The batch of :func:`collate_packed`: tensors are views of the one buffer (no copy)."""
    if "__packed__" not in packed:
        return packed
    buf = packed["__packed__"]
    out: dict[str, Any] = {}
    for k, dstr, shape, off, nbytes in packed["__layout__"]:
        out[k] = buf[off : off + nbytes].view(_TORCH_DTYPE[dstr]).view(shape)
    out.update({k: v for k, v in packed.items() if k not in ("__packed__", "__layout__",
                                                             "__block__")})
    return out


_TORCH_DTYPE = {np.dtype(d).str: torch.from_numpy(np.zeros(1, d)).dtype
                for d in ("uint8", "int8", "int16", "int32", "int64", "float16", "float32",
                          "float64", "bool")}


def batch_to_device(batch: dict[str, Any], device: torch.device | str,
                    dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Move tensors to ``device``; uint8 image-like tensors become float in [0, 1] there.

    A tensor already on ``device`` is passed through without a call into torch: every ``.to``
    releases the GIL, and in the training loop each release lets the loader's receiver thread
    (woken by this very batch leaving its queue) take the interpreter for up to a switch
    interval (5 ms), which landed in the step's data wait (tiny stage A on 2 cores, 40 steps:
    1.66 ms of a 69 ms step before, 0.05 ms after)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # tensors carry their index
        device = torch.device("cuda", torch.cuda.current_device())
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            if v.device != device:
                v = v.to(device, non_blocking=True)
            if k in UINT8_TO_FLOAT and v.dtype == torch.uint8:
                v = v.to(dtype) / 255.0
        out[k] = v
    return out


def batch_size_of(batch: dict[str, Any]) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor):
            return int(v.shape[0])
    return len(next(iter(batch.values())))

