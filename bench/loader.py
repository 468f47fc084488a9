"""Section 4: the shard loader against raw reads of the same bytes and against decode + VAE +
render per step.

Shards at the stage-C size (512x896 -> 4x112x64 latents) are *synthesised* with the contract's
names, shapes and dtypes and written by :class:`dwm.shared.shards.ShardWriter` (preprocessing
real 512x896 latents would take TAESD ~2 s a frame on this CPU): pose from the generated dancer
(:mod:`dwm.shared.synthetic`) with heatmaps drawn by the pose extractor's own renderer, random
latents / face crops / embeddings, JPEG thumbnails. Shard members are stored uncompressed, so
read and decode costs depend on sizes, not on values.

The loader is :class:`dwm.datasets.TrainLoader` with the TrainConfig defaults (workers,
prefetch, shuffle buffer) and a long fixed epoch.
Decode + VAE + render per step is what a loader without a feature cache does for every item (as
CHAMP's and StableAnimator's datasets do): open the mp4, decode the window, VAE-encode it (TAESD
here) and render the pose images.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import decord
import numpy as np

from dwm.datasets import TrainLoader, batch_size_of, make_view
from dwm.preprocess.decode import crop, decode_size
from dwm.preprocess.extractors.pose import render_heatmaps
from dwm.preprocess.probe import probe_file
from dwm.shared import contract, vae
from dwm.shared.config import ModelsConfig, ShardConfig, TrainConfig
from dwm.shared.media import draw_skeleton
from dwm.shared.shards import ShardWriter, load_manifest, write_manifest
from dwm.shared.synthetic import dancer_pose, render_frame

from .common import Bench
from .memory import estimate_step
from .report import Figure, Goal, Reference, Section, median
from .synthetic import ShardSet, synth_shards
from .timing import profile_top

# Items per second the loader must deliver on 2 CPU cores (stage C at T=24, 512x896).
NEEDED = {"A": 100.0, "B": 100.0, "C": 20.0}
# The loader against one GPU's consumption: at least this many times faster (room for shard
# opening, a shuffle buffer refill, a slower shard on a network file system).
LOADER_HEADROOM = 2.0


def gpu_step(bench: Bench) -> tuple[float, str]:
    """(seconds, where the figure comes from) of one full-size stage-C step at batch 1:
    ``gpu_step_ms=`` when a GPU measured it (bench/gpu.py's G1), else bench/gpu.py's estimate
    (quick: the same estimate on the tiny model at the quick size, a check of the code only)."""
    if bench.cfg.gpu_step_ms > 0:
        return bench.cfg.gpu_step_ms / 1000.0, f"measured on a GPU: {bench.cfg.gpu_step_ms:g} ms"
    if bench.quick:
        est = estimate_step("C", 128, 256, 4, model_size="tiny")
        return float(est["seconds"]), "quick: " + str(est["source"]) + ", tiny model 128x256"
    est = estimate_step("C")
    return float(est["seconds"]), "bench/gpu.py " + str(est["source"])


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------
def make_loader(shards: ShardSet, view_name: str, workers: int, batch_size: int = 1,
                seq_len: int = 24, **view_kw: Any):
    d = TrainConfig()
    manifest = load_manifest(shards.manifest)
    opts = {"sequence_length": seq_len} if view_name == "C" else {}
    view = make_view(view_name, manifest.get("stats"), d, **{**opts, **view_kw})
    return TrainLoader(manifest, view, batch_size, split="train", seed=d.seed, num_workers=workers,
                       pin_memory=d.pin_memory, prefetch_factor=d.prefetch_factor,
                       shuffle_buffer=d.shuffle_buffer, epoch_samples=10**6)


def loader_seconds(loader, batches: int) -> tuple[float, int]:
    """(seconds, samples) for ``batches`` batches after a first, untimed one (worker start)."""
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


class DecodeEncodeRenderItem:
    """Decode + VAE + render per step, for one T-frame item: open the mp4, decode a random
    window (aspect-kept, cropped), VAE-encode it, render the pose images."""

    def __init__(self, video: str, taesd: str, T: int, width: int, height: int, seed: int = 0):
        self.video, self.T, self.width, self.height = video, T, width, height
        self.probe = probe_file(video)
        self.dw, self.dh, _ = decode_size(self.probe.orig_width, self.probe.orig_height, width,
                                          height)
        self.vae, self.scale = vae.load_vae(ModelsConfig(vae=taesd), device="cpu")
        self.rng = np.random.default_rng(seed)
        self.poses = [np.concatenate([dancer_pose(t / 24, 120.0, width, height) / [width, height],
                                      np.full((18, 1), 0.9)], axis=1) for t in range(T)]

    def warm(self) -> None:
        """Model, allocator and decoder warm-up, at the cost of one frame."""
        frames = np.zeros((1, self.height, self.width, 3), np.uint8)
        vae.encode_latents(self.vae, frames, batch_size=1)

    def __call__(self) -> dict[str, Any]:
        vr = decord.VideoReader(self.video, width=self.dw, height=self.dh)
        start = int(self.rng.integers(0, max(1, len(vr) - self.T)))
        frames = vr.get_batch(list(range(start, start + self.T))).asnumpy()
        x0, y0 = (self.dw - self.width) // 2, (self.dh - self.height) // 2
        frames = crop(frames, x0, y0, self.width, self.height)
        latents = vae.encode_latents(self.vae, frames, batch_size=4) * self.scale
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
    # what one GPU's full-size stage-C step consumes: measured (gpu_step_ms=) or estimated
    step_s, step_source = gpu_step(bench)
    figC = sec.add(Figure("stage-C samples/s from shards vs a full-size GPU step",
                          median(rate["C"]), "samples/s",
                          Reference(f"one GPU's consumption, batch 1 ({step_source})",
                                    1.0 / step_s, "samples/s"), Goal(">=", LOADER_HEADROOM),
                          {**common, "T": T, "batches": batches, "step_s": round(step_s, 4)},
                          rate["C"]))
    sec.add(Figure("stage-C samples/s from shards", median(rate["C"]), "samples/s",
                   Reference("required on 2 cores", NEEDED["C"], "samples/s"), Goal(">=", 1.0),
                   {**common, "T": T, "batches": batches}, rate["C"]))
    sec.add(Figure("stage-C samples/s vs raw read of the shard bytes", median(rate["C"]),
                   "samples/s", Reference("raw read (cat > /dev/null)", raw, "samples/s"), None,
                   {**common, "T": T, "batches": batches}, rate["C"], rate["raw"]))

    # without a feature cache: decode + VAE-encode + render pose for every item
    per_step = DecodeEncodeRenderItem(str(bench.video), str(bench.taesd), T, width, height)
    per_step.warm()
    at = []
    for _ in range(bench.repeats):
        t = time.perf_counter()
        per_step()
        at.append(1.0 / (time.perf_counter() - t))
    figB = sec.add(Figure("stage-C samples/s from shards vs decode + VAE + render per step",
                          median(rate["C"]),
                          "samples/s",
                          Reference("decode mp4 window + TAESD encode + render pose per item",
                                    median(at), "samples/s"), Goal(">=", 20.0),
                          {**common, "T": T, "video": bench.video.name, "vae": "TAESD fp32",
                           "vae_batch": 4}, rate["C"], at))
    sec.add(Figure("stage-A windows/s from shards", median(rate["A"]), "windows/s",
                   Reference("required on 2 cores", NEEDED["A"], "windows/s"), Goal(">=", 1.0),
                   {**common, "W": TrainConfig().audio_window, "batches": batches}, rate["A"]))
    sec.add(Figure("stage-B pairs/s from shards", median(rate["B"]), "pairs/s",
                   Reference("required on 2 cores", NEEDED["B"], "pairs/s"), Goal(">=", 1.0),
                   {**common, "min_ref_gap": TrainConfig().min_ref_gap, "batches": batches},
                   rate["B"]))
    sec.notes.append(
        f"Shards: {samples} synthetic samples of {frames} frames at {width}x{height} "
        f"({shards.bytes / samples / 1e6:.1f} MB each, contract dtypes and encodings), written "
        "by ShardWriter (synthesised, not preprocessed: TAESD at 512x896 costs ~2 s a frame "
        "here; random latents and face crops do not compress, real ones barely do). Shards are "
        "memory-mapped; latents are decoded as views and the zstd members chunk by chunk, so "
        "an item reads the tar headers and only the frames of its window (the raw read, `cat`, "
        "reads every byte). "
        "The loader is timed after an untimed first batch; each shard's sha256 is checked "
        "once per run, by whichever worker opens it first, and any of that falling in the "
        "timed batches is counted. Batches leave the workers as uint8 images, as for a GPU "
        f"step. GPU consumption: {step_source}.")
    if bench.cfg.cprofile and figC.met is False:
        # in-process (workers=0) so that cProfile sees the work
        sec.profiles[figC.name] = profile_top(
            lambda: loader_seconds(make_loader(shards, "C", 0, seq_len=T), batches))
    if bench.cfg.cprofile and figB.met is False:
        sec.profiles[figB.name] = profile_top(lambda: loader_seconds(
            make_loader(shards, "C", 0, seq_len=T), batches))
