"""WebDataset shards + manifest, written from the cache at the end of a run.

Deterministic: samples in (video hash, segment) order, train/val decided by the video hash, tars
written by :class:`dwm.shared.shards.ShardWriter` (sorted members, zero mtimes). So a run that was
killed and resumed writes the same bytes as one that never stopped. ``manifest.json`` comes last.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import numpy as np
from tqdm import tqdm

from dwm.shared import progress as P
from dwm.shared import storage
from dwm.shared.config import PreprocessConfig, config_hash, to_dict
from dwm.shared.errors import UserFacingError
from dwm.shared.contract import (AUDIO_BASELINE_DIM, FEATURE_BY_NAME, LATENT_CHANNELS,
                                 SAMPLE_META_KEYS, member_name)
from dwm.shared.errors import UserFacingError
from dwm.shared.shards import MANIFEST_NAME, ShardInfo, ShardWriter, chunk_rows, write_manifest

from . import extractors as X
from .cache import FeatureCache
from .decode import make_plan
from .probe import ProbeInfo

# Config fields that say where/how fast a run happened, not what it produced: left out of the
# manifest so that the same data gives the same manifest bytes.
RUN_ONLY_FIELDS = ("input_dir", "out", "cache_dir", "workers", "rank", "world_size", "mode")


def content_config(cfg: PreprocessConfig) -> dict[str, Any]:
    d = to_dict(cfg)
    for k in RUN_ONLY_FIELDS:
        d.pop(k, None)
    return d


def split_of(hashes: list[str], holdout_fraction: float) -> dict[str, str]:
    """Per-video split from the content hash; with >= 2 videos at least one of each, and a
    single video is always train."""
    u = {h: int(h[:12], 16) / float(16**12) for h in hashes}
    val = {h for h in hashes if u[h] < holdout_fraction}
    if len(hashes) >= 2 and not val and holdout_fraction > 0:
        val = {min(hashes, key=lambda h: (u[h], h))}
    if hashes and len(val) == len(hashes):
        val.discard(max(hashes, key=lambda h: (u[h], h)))
    return {h: ("val" if h in val else "train") for h in hashes}


class _Moments:
    """Per-dimension running mean/std (float64, deterministic order)."""

    def __init__(self, dim: int):
        self.n = 0
        self.s = np.zeros(dim, np.float64)
        self.ss = np.zeros(dim, np.float64)

    def add(self, x: np.ndarray) -> None:  # x: (N, dim)
        x = x.astype(np.float64)
        self.n += x.shape[0]
        self.s += x.sum(axis=0)
        self.ss += (x * x).sum(axis=0)

    def result(self) -> dict[str, Any] | None:
        if self.n == 0:
            return None
        mean = self.s / self.n
        var = np.maximum(self.ss / self.n - mean * mean, 0.0)
        return {"mean": [round(float(v), 6) for v in mean],
                "std": [round(float(v), 6) for v in np.sqrt(var)], "count": int(self.n)}


def _segment_sample(cache: FeatureCache, row: dict, si: int, start: int, length: int,
                    split: str, cfg: PreprocessConfig, plan, groups: dict) -> dict[str, Any]:
    end = start + length
    vh = row["hash"]
    sample: dict[str, Any] = {"__key__": f"{vh[:16]}_{si:04d}"}
    a = groups.get("audio")
    if a is not None:
        sample["audio_mel"] = a["mel"][start:end]
        sample["audio_baseline"] = a["baseline"][start:end]
    p = groups.get("pose")
    if p is not None:
        sample["pose_body"] = p["body"][start:end]
        sample["pose_hands"] = p["hands"][start:end]
        sample["pose_face"] = p["face"][start:end]
        sample["pose_heatmap"] = p["heatmap"][start:end]
    f = groups.get("face")
    if f is not None:
        sample["face_present"] = f["present"][start:end]
        sample["face_box"] = f["box"][start:end]
        sample["face_landmarks"] = f["landmarks"][start:end]
        sample["face_score"] = f["score"][start:end]
        sample["face_embed"] = f["embed"][start:end]
        sample["face_mask"] = f["mask"][start:end]
        sel = reference_face_frames(sample["face_present"], sample["face_score"],
                                    cfg.shards.face_crop_every)
        sample["face_crop"] = np.asarray(f["crop"][start:end])[sel]
        sample["face_crop_frames"] = sel
        sample["face_ref_embed"] = f["ref_embed"][:]
    lat = groups.get("latents")
    if lat is not None:
        sample["latents"] = lat["mean"][start:end]
        if "std" in lat:
            sample["latents_std"] = lat["std"][start:end]
    c = groups.get("clip")
    if c is not None:
        frames = c["frames"][:]
        rows = np.flatnonzero((frames >= start) & (frames < end))
        sample["clip_frames"] = (frames[rows] - start).astype(np.int32)
        sample["clip_embed"] = c["embed"][:][rows] if len(rows) else np.zeros(
            (0, c["embed"].shape[1]), np.float16)
    t = groups.get("thumbs")
    if t is not None:
        sizes = groups["_thumb_offsets"]
        o0, o1 = int(sizes[start]), int(sizes[end])
        sample["thumbs_jpeg"] = t["jpeg"][o0:o1]
        sample["thumbs_offsets"] = (sizes[start : end + 1] - o0).astype(np.int64)
    for name, spec in FEATURE_BY_NAME.items():  # dtypes exactly as the contract says
        if name in sample:
            sample[name] = np.ascontiguousarray(np.asarray(sample[name]).astype(spec.dtype))

    beats = groups.get("_beat_frames", [])
    crop = row["crop_boxes"][si]
    meta = {
        "key": sample["__key__"],
        "video_hash": vh,
        "source": row["source"],
        "segment": si,
        "start_frame": start,
        "num_frames": length,
        "fps": plan.fps,
        "orig_fps": row["orig_fps"],
        "orig_width": row["orig_width"],
        "orig_height": row["orig_height"],
        "rotation": row["rotation"],
        "width": plan.width,
        "height": plan.height,
        "crop_box": [round(v / plan.scale, 2) for v in crop],
        "has_audio": a is not None,
        "tempo": groups.get("_tempo"),
        "beat_frames": [int(b) - start for b in beats if start <= b < end],
        "latent_scaling_factor": groups.get("_scaling_factor"),
        "split": split,
        "features": sorted(k for k in sample if k != "__key__"),
    }
    meta["chunks"] = {}  # filled by the shard writer (the npy.zst members' offsets)
    assert set(meta) == set(SAMPLE_META_KEYS), set(meta) ^ set(SAMPLE_META_KEYS)
    sample["json"] = meta
    return sample


def reference_face_frames(present: np.ndarray, score: np.ndarray, every: int) -> np.ndarray:
    """Segment frames that keep a face crop: in each run of ``every`` frames, the present face
    with the best detection score (the first on ties); none where no frame of the run has one."""
    present = np.asarray(present, bool)
    score = np.where(present, np.asarray(score, np.float32), -np.inf)
    every = max(1, int(every))
    picks = [a + int(np.argmax(score[a : a + every])) for a in range(0, len(present), every)
             if present[a : a + every].any()]
    return np.asarray(picks, np.int32)


class _Entry:
    """One cache entry's arrays, for the shard writer: each array is opened once per video, and
    one of at most ``RESIDENT_BYTES`` (audio, thumbnails, clip rows, ...) is read whole once, as
    every segment slices it (each zarr read is an event-loop round trip plus a chunk
    decompression; the thumbnails' 1 MiB chunk was decompressed once per segment). Larger arrays
    (latents, heatmaps of a long video) are still read segment by segment."""

    RESIDENT_BYTES = 32 << 20

    def __init__(self, group: Any):
        self.group = group
        self.attrs = group.attrs
        self._arrays: dict[str, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._arrays or name in self.group

    def __getitem__(self, name: str) -> Any:
        arr = self._arrays.get(name)
        if arr is None:
            arr = self.group[name]
            if arr.nbytes <= self.RESIDENT_BYTES:
                arr = arr[...]
            self._arrays[name] = arr
        return arr


def _open_groups(cache: FeatureCache, row: dict) -> dict[str, Any]:
    groups: dict[str, Any] = {}
    for name, key in row.get("keys", {}).items():
        g = _Entry(cache.open(row["hash"], name, key))
        groups[name] = g
        if name == "audio":
            groups["_tempo"] = g.attrs.get("tempo")
            groups["_beat_frames"] = list(g.attrs.get("beat_frames", []))
        elif name == "latents":
            groups["_scaling_factor"] = g.attrs.get("scaling_factor")
        elif name == "clip":
            row["clip_dim"] = int(g["embed"].shape[1])
        elif name == "thumbs":
            sizes = g["sizes"][:]
            groups["_thumb_offsets"] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return groups


def feature_table(cfg: PreprocessConfig, rows: list[dict]) -> dict[str, Any]:
    """name -> {shape, dtype, extractor, version, config_hash} for the features present."""
    exts = X.build(cfg, "cpu")
    present: set[str] = set()
    for r in rows:
        present.update(r.get("keys", {}))
    ds = cfg.pose.heatmap_downsample
    sym = {"T": "T", "n_mels": cfg.audio.n_mels, "h": cfg.decode.height // ds,
           "w": cfg.decode.width // ds}
    table = {}
    for f in FEATURE_BY_NAME.values():
        if f.extractor not in present:
            continue
        ext = exts[f.extractor]
        shape = [sym.get(s, int(s) if s.isdigit() else s) for s in f.shape]
        table[f.name] = {"shape": shape, "dtype": f.dtype, "extractor": f.extractor,
                         "version": ext.version, "config_hash": config_hash(ext.config()),
                         "doc": f.doc, "per_frame": f.per_frame, "encoding": f.encoding,
                         "member": f"<key>.{member_name(f.name)}"}
        if f.encoding == "npy.zst":
            table[f.name]["chunk_rows"] = chunk_rows(f.name, cfg.shards.chunk_frames) or "all"
    if "latents" in present and cfg.latents.store_std:
        table["latents_std"] = {**table["latents"], "doc": "VAE latent std, unscaled"}
    if "clip_embed" in table:
        dims = {r.get("clip_dim") for r in rows if r.get("clip_dim")}
        if dims:
            table["clip_embed"]["shape"] = ["R", int(sorted(dims)[0])]
    return table


def shard_prefix(cfg: PreprocessConfig, split: str, rank: int, world_size: int) -> str:
    return split if world_size <= 1 else f"r{rank:04d}-{split}"


def write_dataset(cfg: PreprocessConfig, rows: list[dict], cache: FeatureCache, *,
                  rank: int = 0, world_size: int = 1, progress: bool = True,
                  split_candidates: list[str] | None = None) -> str:
    """Shards of every usable video (status ok) + manifest; returns the manifest path.

    ``split_candidates``: the content hashes of every input file of the whole run (all ranks).
    The train/val split is decided over them, so it does not depend on how the videos were
    sliced between ranks (1 rank and N ranks + merge give the same dataset)."""
    out = cfg.out
    storage.makedirs(out)
    usable = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["hash"])
    candidates = sorted(set(split_candidates or []) | {r["hash"] for r in usable})
    splits = split_of(candidates, cfg.shards.holdout_fraction)
    target = int(cfg.shards.target_shard_mb * (1 << 20))
    writers = {s: ShardWriter(out, prefix=shard_prefix(cfg, s, rank, world_size),
                              target_bytes=target, split=s, chunk_frames=cfg.shards.chunk_frames,
                              zstd_level=cfg.shards.zstd_level) for s in ("train", "val")}
    mel_m = _Moments(cfg.audio.n_mels)
    base_m = _Moments(AUDIO_BASELINE_DIM)
    lat_m = _Moments(LATENT_CHANNELS)
    counts = {"train": {"videos": 0, "samples": 0, "frames": 0},
              "val": {"videos": 0, "samples": 0, "frames": 0}}
    total_segments = sum(r["segments"] for r in usable)
    bar = _bar(total_segments, "shards", progress)
    for row in usable:
        split = splits[row["hash"]]
        counts[split]["videos"] += 1
        probe = ProbeInfo.from_dict(row)
        plan = make_plan(probe, cfg.decode)
        groups = _open_groups(cache, row)
        for si, (start, length) in enumerate(plan.segments):
            sample = _segment_sample(cache, row, si, start, length, split, cfg, plan, groups)
            if split == "train":
                if "audio_mel" in sample:
                    mel_m.add(sample["audio_mel"])
                    base_m.add(sample["audio_baseline"])
                if "latents" in sample:
                    lat = sample["latents"].astype(np.float64)
                    lat_m.add(lat.transpose(0, 2, 3, 1).reshape(-1, LATENT_CHANNELS))
            writers[split].write(sample)
            counts[split]["samples"] += 1
            counts[split]["frames"] += length
            bar.update(1)
    bar.close()
    shards: list[ShardInfo] = []
    for w in writers.values():
        shards.extend(w.close())
    _remove_stale_shards(out, {s.name for s in shards}, rank, world_size)
    stats = {"audio_mel": mel_m.result(), "audio_baseline": base_m.result(),
             "latents": lat_m.result()}
    stats = {k: v for k, v in stats.items() if v is not None}
    statuses = [r["status"] for r in rows]
    extra = {
        "config": content_config(cfg),
        "counts": {**counts,
                   "videos_seen": len(rows),
                   "videos_ok": statuses.count("ok"),
                   "videos_skipped": statuses.count("skipped"),
                   "videos_failed": statuses.count("failed")},
        "splits": {r["hash"]: splits[r["hash"]] for r in usable},
        "moments": {"audio_mel": asdict_m(mel_m), "audio_baseline": asdict_m(base_m),
                    "latents": asdict_m(lat_m)},
    }
    if world_size > 1:
        extra["rank"], extra["world_size"] = rank, world_size
        return _write_rank_manifest(out, shards, feature_table(cfg, usable), stats, rank, extra)
    return write_manifest(out, shards, feature_table(cfg, usable), stats, **extra)


def asdict_m(m: _Moments) -> dict[str, Any]:
    """Raw sums, so per-rank manifests can be merged exactly."""
    return {"n": m.n, "sum": m.s.tolist(), "sumsq": m.ss.tolist()}


def _write_rank_manifest(out: str, shards, features, stats, rank: int, extra) -> str:
    path = storage.join(out, f"manifest-r{rank:04d}.json")
    body = {"shards": [asdict(s) for s in sorted(shards, key=lambda s: s.name)],
            "features": features, "stats": stats, **extra}
    storage.atomic_write_text(path, json.dumps(body, indent=1, sort_keys=True))
    return path


def _remove_stale_shards(out: str, keep: set[str], rank: int, world_size: int) -> None:
    """Shards of an earlier run that this run did not write again (fewer videos, new sizes)."""
    prefixes = (("train-", "val-") if world_size <= 1
                else (f"r{rank:04d}-train-", f"r{rank:04d}-val-"))
    fs, root = storage.fs_and_path(out)  # a local folder or an fsspec URL
    for path in fs.ls(root, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(".tar") and name.startswith(prefixes) and name not in keep:
            fs.rm(path)


def merge_manifests(cfg: PreprocessConfig) -> str:
    """Combine ``manifest-r*.json`` of all ranks in ``cfg.out`` into one ``manifest.json``.

    Splits were decided per video by hash over the files of the whole run (every rank saw every
    hash), so they are the same as with one rank. Stats are recomputed exactly from the ranks'
    raw sums."""
    out = cfg.out
    fs, root = storage.fs_and_path(out)  # a local folder or an fsspec URL
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)] \
        if fs.isdir(root) else []
    parts = sorted(n for n in names if n.startswith("manifest-r") and n.endswith(".json"))
    if not parts:
        raise UserFacingError(f"out={out}: no manifest-r*.json to merge (run each rank first)")
    shards, features, counts, splits = [], {}, {}, {}
    moments: dict[str, _Moments] = {}
    config = None
    for name in parts:
        m = json.loads(storage.read_text(storage.join(out, name)))
        shards += [ShardInfo(**s) for s in m["shards"]]
        features.update(m["features"])
        config = config or m["config"]
        splits.update(m.get("splits", {}))
        for k, v in m["counts"].items():
            if isinstance(v, dict):
                counts.setdefault(k, {})
                for kk, vv in v.items():
                    counts[k][kk] = counts[k].get(kk, 0) + vv
            else:
                counts[k] = counts.get(k, 0) + v
        for k, raw in m["moments"].items():
            mm = moments.setdefault(k, _Moments(len(raw["sum"])))
            mm.n += raw["n"]
            mm.s += np.asarray(raw["sum"])
            mm.ss += np.asarray(raw["sumsq"])
    stats = {k: v.result() for k, v in moments.items() if v.result() is not None}
    return write_manifest(out, shards, features, stats, config=config, counts=counts,
                          splits=dict(sorted(splits.items())), ranks=len(parts),
                          moments={k: asdict_m(v) for k, v in moments.items()})


def _bar(total: int, desc: str, enabled: bool):
    return P.progress(total=total, desc=desc, unit="sample", disable=not enabled, leave=False)


__all__ = ["write_dataset", "merge_manifests", "split_of", "content_config", "MANIFEST_NAME"]
