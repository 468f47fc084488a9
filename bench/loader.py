"""Section 4: the shard loader against raw reads of the same bytes and against the anchors' way.

Shards at the stage-C size (512x896 -> 4x112x64 latents) are *synthesised* with the contract's
names, shapes and dtypes and written by :class:`dwm.shared.shards.ShardWriter` (preprocessing
real 512x896 latents would take TAESD ~2 s a frame on this CPU): pose from the generated dancer
(:mod:`dwm.shared.synthetic`) with heatmaps drawn by the pose extractor's own renderer, random
latents / face crops / embeddings, JPEG thumbnails. Shard members are stored uncompressed, so
read and decode costs depend on sizes, not on values.

The loader is :class:`dwm.datasets.TrainLoader` with the TrainConfig defaults (workers,
prefetch, shuffle buffer) and a long fixed epoch.
The anchors' way (CHAMP / StableAnimator datasets) does per item: open the mp4, decode the
window, VAE-encode it (TAESD here) and render the pose images.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dwm.shared import contract
from dwm.shared.config import TrainConfig

from .common import Bench
from .report import Figure, Goal, Reference, Section, median
from .timing import profile_top

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
    import cv2

    from dwm.preprocess.extractors.pose import render_heatmaps
    from dwm.shared.synthetic import dancer_pose, render_frame

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
        "face_crop": rng.integers(0, 256, (T, contract.FACE_CROP_SIZE, contract.FACE_CROP_SIZE, 3)),
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
    }
    assert set(meta) == set(contract.SAMPLE_META_KEYS)
    sample["json"] = meta
    return sample


def synth_shards(out: Path, samples: int, frames: int, width: int, height: int,
                 shards: int, seed: int = 0) -> ShardSet:
    """Write ``samples`` synthetic samples into about ``shards`` tars + a manifest."""
    from dwm.shared.shards import ShardWriter, load_manifest, write_manifest

    rng = np.random.default_rng(seed)
    first = synth_sample(0, frames, width, height, rng)
    size = sum(np.asarray(v).nbytes for k, v in first.items() if k not in ("__key__", "json"))
    per_shard = max(1, -(-samples // max(1, shards)))
    writer = ShardWriter(str(out), prefix="train", target_bytes=int(size * per_shard + size // 2))
    writer.write(first)
    for i in range(1, samples):
        writer.write(synth_sample(i, frames, width, height, rng))
    infos = writer.close()
    feats = {f.name: {"shape": list(f.shape), "dtype": f.dtype, "extractor": f.extractor,
                      "version": "synthetic"} for f in contract.FEATURES}
    stats = {"audio_mel": {"mean": [0.0] * N_MELS, "std": [1.0] * N_MELS},
             "audio_baseline": {"mean": [0.0] * contract.AUDIO_BASELINE_DIM,
                                "std": [1.0] * contract.AUDIO_BASELINE_DIM}}
    path = write_manifest(str(out), infos, feats, stats, synthetic=True)
    man = load_manifest(path)
    return ShardSet(path, [s["url"] for s in man["shards"]], samples, frames,
                    sum(s.bytes for s in infos), width, height)


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------
def make_loader(shards: ShardSet, view_name: str, workers: int, batch_size: int = 1,
                seq_len: int = 24, **view_kw: Any):
    from dwm.datasets import TrainLoader, make_view
    from dwm.shared.shards import load_manifest

    d = TrainConfig()
    manifest = load_manifest(shards.manifest)
    opts = {"sequence_length": seq_len} if view_name == "C" else {}
    view = make_view(view_name, manifest.get("stats"), d, **{**opts, **view_kw})
    return TrainLoader(manifest, view, batch_size, split="train", seed=d.seed, num_workers=workers,
                       pin_memory=d.pin_memory, prefetch_factor=d.prefetch_factor,
                       shuffle_buffer=d.shuffle_buffer, epoch_samples=10**6)


def loader_seconds(loader, batches: int) -> tuple[float, int]:
    """(seconds, samples) for ``batches`` batches after a first, untimed one (worker start)."""
    from dwm.datasets import batch_size_of

    it = iter(loader)
    try:
        next(it)
        n = 0
        t = time.perf_counter()
        for _ in range(batches):
            n += batch_size_of(next(it))
        return time.perf_counter() - t, n
    finally:
        it.close()  # ends the DataLoader and its workers


def raw_read_seconds(urls: list[str]) -> float:
    """``cat`` of the shard files to /dev/null: the bytes alone, no parsing."""
    t = time.perf_counter()
    subprocess.run(["cat", *urls], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


class AnchorItem:
    """The anchors' per-step data work for one T-frame item: open the mp4, decode a random
    window (aspect-kept, cropped), VAE-encode it, render the pose images."""

    def __init__(self, video: str, taesd: str, T: int, width: int, height: int, seed: int = 0):
        from dwm.preprocess.decode import decode_size
        from dwm.preprocess.probe import probe_file
        from dwm.shared import registry
        from dwm.shared.config import ModelsConfig

        self.video, self.T, self.width, self.height = video, T, width, height
        self.probe = probe_file(video)
        self.dw, self.dh, _ = decode_size(self.probe.orig_width, self.probe.orig_height, width,
                                          height)
        self.vae, self.scale = registry.load_vae(ModelsConfig(vae=taesd), device="cpu")
        self.rng = np.random.default_rng(seed)
        from dwm.shared.synthetic import dancer_pose

        self.poses = [np.concatenate([dancer_pose(t / 24, 120.0, width, height) / [width, height],
                                      np.full((18, 1), 0.9)], axis=1) for t in range(T)]

    def warm(self) -> None:
        """Model, allocator and decoder warm-up, at the cost of one frame."""
        from dwm.shared import registry

        frames = np.zeros((1, self.height, self.width, 3), np.uint8)
        registry.encode_latents(self.vae, frames, batch_size=1)

    def __call__(self) -> dict[str, Any]:
        import decord

        from dwm.preprocess.decode import crop
        from dwm.shared import registry
        from dwm.shared.media import draw_skeleton

        vr = decord.VideoReader(self.video, width=self.dw, height=self.dh)
        start = int(self.rng.integers(0, max(1, len(vr) - self.T)))
        frames = vr.get_batch(list(range(start, start + self.T))).asnumpy()
        x0, y0 = (self.dw - self.width) // 2, (self.dh - self.height) // 2
        frames = crop(frames, x0, y0, self.width, self.height)
        latents = registry.encode_latents(self.vae, frames, batch_size=4) * self.scale
        size = (self.width, self.height)
        poses = np.stack([draw_skeleton(None, p, size=size) for p in self.poses])
        return {"latents": latents, "pose_images": poses, "start": start}


# ---------------------------------------------------------------------------------------------
# the section
# ---------------------------------------------------------------------------------------------
def section_loader(bench: Bench, sec: Section) -> None:
    q = bench.quick
    width, height = (128, 256) if q else (512, 896)
    frames = 16 if q else 150  # per sample: one clip segment (DecodeConfig.segment_frames)
    T = 4 if q else 24
    samples = 2 if q else max(2, bench.cfg.loader_samples)
    batches = 2 if q else max(4, bench.cfg.loader_batches)
    workers = TrainConfig().num_workers if bench.cfg.workers < 0 else bench.cfg.workers
    n_shards = max(2, 2 * workers) if not q else 2
    shards = synth_shards(bench.out / "work" / "loader_shards", samples, frames, width, height,
                          n_shards)
    lat = f"{contract.LATENT_CHANNELS}x{height // 8}x{width // 8}"
    common = {"shards": f"synthetic ({len(shards.urls)} tars via ShardWriter)",
              "samples": samples, "frames_per_sample": frames,
              "sample_MB": round(shards.bytes / samples / 1e6, 1), "res": f"{width}x{height}",
              "latents": lat, "workers": workers, "batch": 1, "threads": bench.threads,
              "repeats": bench.repeats}

    raw_fn = lambda: raw_read_seconds(shards.urls)  # noqa: E731
    raw_fn()  # page cache: both sides read warm files
    rate = {"C": [], "A": [], "B": [], "raw": []}
    loaders = {"C": lambda: make_loader(shards, "C", workers, seq_len=T),
               "A": lambda: make_loader(shards, "A", workers),
               "B": lambda: make_loader(shards, "B", workers)}
    for _ in range(bench.repeats):
        rate["raw"].append(samples / raw_fn())
        for k, mk in loaders.items():
            dt, n = loader_seconds(mk(), batches)
            rate[k].append(n / dt)
    raw = median(rate["raw"])
    figC = sec.add(Figure("stage-C samples/s from shards", median(rate["C"]), "samples/s",
                          Reference("raw read of the shard bytes (cat > /dev/null)", raw,
                                    "samples/s"), Goal(">=", 0.8),
                          {**common, "T": T, "batches": batches}, rate["C"], rate["raw"]))

    # the anchors: decode + VAE-encode + render pose for every item
    anchor = AnchorItem(str(bench.video), str(bench.taesd), T, width, height)
    anchor.warm()
    at = []
    for _ in range(bench.repeats):
        t = time.perf_counter()
        anchor()
        at.append(1.0 / (time.perf_counter() - t))
    figB = sec.add(Figure("stage-C samples/s from shards vs the anchors' way", median(rate["C"]),
                          "samples/s",
                          Reference("decode mp4 window + TAESD encode + render pose per item",
                                    median(at), "samples/s"), Goal(">=", 20.0),
                          {**common, "T": T, "video": bench.video.name, "vae": "TAESD fp32",
                           "vae_batch": 4}, rate["C"], at))
    sec.add(Figure("stage-A windows/s from shards", median(rate["A"]), "windows/s",
                   Reference("raw read of the shard bytes", raw, "samples/s"), None,
                   {**common, "W": TrainConfig().audio_window, "batches": batches}, rate["A"]))
    sec.add(Figure("stage-B pairs/s from shards", median(rate["B"]), "pairs/s",
                   Reference("raw read of the shard bytes", raw, "samples/s"), None,
                   {**common, "min_ref_gap": TrainConfig().min_ref_gap, "batches": batches},
                   rate["B"]))
    sec.notes.append(
        f"Shards: {samples} synthetic samples of {frames} frames at {width}x{height} "
        f"({shards.bytes / samples / 1e6:.1f} MB each, contract dtypes), written by ShardWriter "
        "(synthesised, not preprocessed: TAESD at 512x896 costs ~2 s a frame here). Shards "
        "are memory-mapped and array members decoded as views, so an item reads the tar "
        "headers and only the frames of its window (the raw read, `cat`, reads every byte). "
        "The loader is timed after an untimed first batch; each shard's sha256 is checked "
        "once per run, by whichever worker opens it first, and any of that falling in the "
        "timed batches is counted. Batches leave the workers as uint8 images, as for a GPU "
        "step.")
    if bench.cfg.cprofile and figC.met is False:
        # in-process (workers=0) so that cProfile sees the work
        sec.profiles[figC.name] = profile_top(
            lambda: loader_seconds(make_loader(shards, "C", 0, seq_len=T), batches))
    if bench.cfg.cprofile and figB.met is False:
        sec.profiles[figB.name] = profile_top(lambda: loader_seconds(
            make_loader(shards, "C", 0, seq_len=T), batches))
