"""``dwm preprocess DIR``: every video under DIR -> feature cache -> WebDataset shards + manifest.

1. clean leftovers of a killed run (temporary files), check the model weights (before any work);
2. walk DIR (every file: content decides what is a video), hash each file (the cache key);
   identical content under two names is processed once;
3. process the videos (``workers`` spawn processes, or in-process for 1) into the cache;
4. write the shards and the manifest from the cache (deterministic), then ``report.json``.

A bad file never stops the run: it gets a status (skipped / failed) and a reason in the report.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import cv2
import torch
from threadpoolctl import threadpool_limits

from dwm.shared import progress as P
from dwm.shared import storage, weights
from dwm.shared.errors import UserFacingError
from dwm.shared.config import ConfigError, PreprocessConfig, apply_overrides, flatten, to_dict
from dwm.shared.contract import LATENT_DOWNSAMPLE

from . import extractors as X
from .cache import FeatureCache
from .extractors.keypoints_file import is_sidecar
from .pipeline import VideoProcessor, VideoTask, cache_root, sha256_file
from .write_shards import merge_manifests, write_dataset

REPORT_NAME = "report.json"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def resolve_rank(cfg: PreprocessConfig) -> tuple[int, int]:
    """(rank, world_size) from the config, else RANK/WORLD_SIZE, else SLURM array variables."""
    env = os.environ
    world = cfg.world_size
    rank = cfg.rank
    if world < 1:
        world = _env_int("WORLD_SIZE", "SLURM_ARRAY_TASK_COUNT", default=1)
    if rank < 0:
        if "RANK" in env:
            rank = _env_int("RANK")
        elif "SLURM_ARRAY_TASK_ID" in env:
            rank = _env_int("SLURM_ARRAY_TASK_ID") - _env_int("SLURM_ARRAY_TASK_MIN", default=0)
        else:
            rank = 0
    if not 0 <= rank < world:
        raise UserFacingError(f"rank {rank} is outside world_size {world}")
    return rank, world


def _env_int(*names: str, default: int = 0) -> int:
    """The first of the environment variables ``names`` that is set, as an int."""
    for name in names:
        raw = os.environ.get(name)
        if raw:
            try:
                return int(raw)
            except ValueError:
                raise UserFacingError(f"environment variable {name}={raw!r}: expected an "
                                      "integer") from None
    return default


def check_config(cfg: PreprocessConfig) -> None:
    """Values no video can be processed with fail here, naming the key."""
    d = cfg.decode
    if not d.fps > 0:
        raise ConfigError(f"decode.fps={d.fps}: must be > 0")
    if d.segment_frames < 1 or d.min_frames < 1:
        raise ConfigError(f"decode.segment_frames={d.segment_frames}, decode.min_frames="
                          f"{d.min_frames}: both must be >= 1")
    if d.min_frames > d.segment_frames:
        raise ConfigError(f"decode.min_frames={d.min_frames} is more than decode.segment_frames="
                          f"{d.segment_frames}: no segment could be kept")
    step = max(LATENT_DOWNSAMPLE, cfg.pose.heatmap_downsample)
    for key in ("width", "height"):
        v = getattr(d, key)
        if v <= 0 or v % step:
            # latents and heatmaps are at image / 8: a side that does not divide is cut off
            raise ConfigError(f"decode.{key}={v}: must be a positive multiple of {step}")


def required_components(cfg: PreprocessConfig) -> list[str]:
    comps = []
    if "pose" in cfg.extractors and cfg.pose.backend == "dwpose":
        comps.append("dwpose")
    if "face" in cfg.extractors:
        comps.append("insightface")
    if "latents" in cfg.extractors:
        comps.append("vae")
    if "clip" in cfg.extractors:
        comps.append("clip")
    return comps


def discover(input_dir: str, exclude: list[str]) -> list[str]:
    """Every regular, non-hidden file under input_dir (sorted); content decides later. Keypoint
    sidecars (``*.keypoints.json``, read with their video by ``pose.backend=file``) are not
    candidates."""
    excl = [os.path.realpath(e) for e in exclude]
    found = []
    for dirpath, dirs, files in os.walk(input_dir, followlinks=False):
        real = os.path.realpath(dirpath)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.realpath(os.path.join(dirpath, d)) not in excl)
        if any(real == e for e in excl):
            continue
        for f in sorted(files):
            if f.startswith(".") or is_sidecar(f):
                continue
            p = os.path.join(dirpath, f)
            if os.path.isfile(p):
                found.append(p)
    return sorted(found, key=lambda p: os.path.relpath(p, input_dir))


def _set_threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)


def single_threaded_blas():
    """numpy's BLAS work in preprocessing is small (mel filter banks, MFCCs): one thread is as
    fast, and OpenBLAS's extra threads spin after every call, taking a core from the decoder
    (the audio features: about 270 -> 140 CPU-ms per 12 s clip, the same wall time). torch's
    own threads are not BLAS's and are left as set. As a context manager it restores the
    limits; called alone it holds for the process."""
    return threadpool_limits(limits=1, user_api="blas")


_WORKER: VideoProcessor | None = None


def _init_worker(cfg_dict: dict, threads: int) -> None:
    global _WORKER
    _set_threads(threads)
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    single_threaded_blas()
    cfg = apply_overrides(PreprocessConfig(), flatten(cfg_dict))
    _WORKER = VideoProcessor(cfg)


def _work(task: tuple[str, str, str]) -> dict:
    assert _WORKER is not None
    return _WORKER.process(VideoTask(*task))


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
class Report:
    def __init__(self, cfg: PreprocessConfig, path: str, rank: int, world: int):
        self.cfg, self.path = cfg, path
        self.rows: dict[str, dict] = {}
        self.t0 = time.perf_counter()
        self.meta: dict[str, Any] = {"rank": rank, "world_size": world}
        self._last_write = 0.0

    def add(self, row: dict) -> None:
        self.rows[row["path"]] = row

    def summary(self) -> dict[str, Any]:
        rows = list(self.rows.values())
        calls: dict[str, int] = {}
        for r in rows:
            for k, v in (r.get("extractor_calls") or {}).items():
                calls[k] = calls.get(k, 0) + v
        elapsed = time.perf_counter() - self.t0
        frames_ok = sum(r.get("frames") or 0 for r in rows if r["status"] == "ok")
        ok = [r for r in rows if r["status"] == "ok"]
        return {
            "counts": {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")},
            "extractor_calls": calls,
            "decoded_frames": sum(r.get("decoded_frames") or 0 for r in rows),
            "elapsed_s": round(elapsed, 3),
            "speed": {"videos_per_s": round(len(ok) / elapsed, 4) if elapsed else None,
                      "frames_per_s": round(frames_ok / elapsed, 3) if elapsed else None},
        }

    def write(self, force: bool = True, **extra: Any) -> None:
        now = time.perf_counter()
        if not force and now - self._last_write < 10:
            return
        self._last_write = now
        self.meta.update(extra)
        body = {
            "input_dir": self.cfg.input_dir,
            "out": self.cfg.out,
            "cache_dir": cache_root(self.cfg),
            **self.meta,
            **self.summary(),
            "videos": [self.rows[k] for k in sorted(self.rows)],
            "config": to_dict(self.cfg),
        }
        storage.atomic_write_text(self.path, json.dumps(body, indent=1, sort_keys=True, default=str))


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def main(cfg: PreprocessConfig) -> int:
    if cfg.mode == "merge":
        path = merge_manifests(cfg)
        print(f"merged manifest: {path}")
        return 0
    # bad input fails here, in one line, before anything is written
    rank, world = resolve_rank(cfg)
    check_config(cfg)
    X.check_names(cfg)
    if not os.path.isdir(cfg.input_dir):
        raise UserFacingError(f"input folder {cfg.input_dir} does not exist (or is not a folder)")
    out = cfg.out
    croot = cache_root(cfg)
    for key, path in (("out", out), ("cache_dir", croot)):
        if not storage.is_url(path) and os.path.exists(path) and not os.path.isdir(path):
            raise UserFacingError(f"{key}={path}: exists and is not a folder")
    files = discover(cfg.input_dir, exclude=[out, croot])
    if not files:
        raise UserFacingError(f"input folder {cfg.input_dir} holds no files (give the folder "
                              "of dance videos)")
    weights.ensure_available(cfg.models, required_components(cfg))  # weights, before any work

    storage.makedirs(out)
    removed = storage.remove_temporaries(out)
    if not os.path.abspath(croot).startswith(os.path.abspath(out) + os.sep):
        removed += storage.remove_temporaries(croot)
    report_path = storage.join(out, REPORT_NAME if world <= 1 else f"report-r{rank:04d}.json")
    report = Report(cfg, report_path, rank, world)
    report.meta["removed_temporaries"] = removed

    by_hash: dict[str, list[str]] = {}
    for i, p in enumerate(P.progress(files, desc="hashing", unit="file", leave=False)):
        rel = os.path.relpath(p, cfg.input_dir)
        mine = i % world == rank  # a file without a hash is reported by one rank only
        if os.path.getsize(p) == 0:
            if mine:
                report.add({"path": rel, "hash": None, "status": "failed",
                            "reason": f"{p}: empty file (0 bytes)"})
            continue
        try:
            h = sha256_file(p)
        except OSError as e:
            if mine:
                report.add({"path": rel, "hash": None, "status": "failed", "reason": f"{p}: {e}"})
            continue
        by_hash.setdefault(h, []).append(p)

    tasks: list[tuple[str, str, str]] = []
    for i, h in enumerate(sorted(by_hash)):
        if i % world != rank:
            continue
        paths = by_hash[h]
        first = paths[0]
        tasks.append((os.path.abspath(first), os.path.relpath(first, cfg.input_dir), h))
        for dup in paths[1:]:
            report.add({"path": os.path.relpath(dup, cfg.input_dir), "hash": h, "status": "skipped",
                        "reason": f"{dup}: same content as {first} (computed once)",
                        "duplicate_of": os.path.relpath(first, cfg.input_dir)})

    bar = P.progress(total=len(tasks), desc="preprocess", unit="video")
    frames_done = 0

    def on_row(row: dict) -> None:
        nonlocal frames_done
        report.add(row)
        if row["status"] != "ok":
            P.write(f"{row['status']}: {row['reason']}", file=sys.stderr)
        if row["status"] == "ok":
            frames_done += row.get("frames") or 0
        el = max(1e-9, time.perf_counter() - report.t0)
        bar.set_postfix(videos_s=f"{(bar.n + 1) / el:.2f}", frames_s=f"{frames_done / el:.1f}")
        bar.update(1)
        report.write(force=False)

    if cfg.workers <= 1 or len(tasks) <= 1:
        proc = VideoProcessor(cfg)
        with single_threaded_blas():
            for t in tasks:
                on_row(proc.process(VideoTask(*t)))
    else:
        _run_pool(cfg, tasks, on_row)
    bar.close()

    for r in report.rows.values():  # the sample's "source": first file with this content
        if r["status"] == "ok":
            r["source"] = r["path"]
    rows = list(report.rows.values())
    cache = FeatureCache(croot)
    # one rank: the split is decided over the usable videos (exactly one val and one train
    # guaranteed); several ranks: over every hashed file, which every rank sees, so the split
    # does not depend on how videos were sliced between ranks
    manifest = write_dataset(cfg, rows, cache, rank=rank, world_size=world,
                             split_candidates=sorted(by_hash) if world > 1 else None)
    frames = sum(r.get("frames") or 0 for r in rows if r["status"] == "ok")
    size = cache.size_bytes()
    report.write(manifest=manifest, cache={"bytes": size, "frames": frames,
                                           "bytes_per_frame": round(size / frames, 1) if frames else None})
    s = report.summary()
    print(f"preprocess: {s['counts']['ok']} ok, {s['counts']['skipped']} skipped, "
          f"{s['counts']['failed']} failed; {frames} frames; manifest {manifest}; report {report_path}")
    if s["counts"]["ok"] == 0:
        raise UserFacingError(f"no usable video in {cfg.input_dir} (reasons in {report_path})")
    return 0


def _run_pool(cfg: PreprocessConfig, tasks: list[tuple[str, str, str]], on_row) -> None:
    """Spawned worker processes, a few tasks in flight each; a crashed worker fails only the
    videos it had, and a fresh pool takes the rest."""
    workers = max(1, min(cfg.workers, len(tasks)))
    threads = max(1, (os.cpu_count() or 1) // workers)
    pending = list(reversed(tasks))
    while pending:
        ex = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                 initializer=_init_worker, initargs=(to_dict(cfg), threads))
        inflight: dict[Any, tuple[str, str, str]] = {}
        try:
            while pending or inflight:
                while pending and len(inflight) < 2 * workers:
                    t = pending.pop()
                    inflight[ex.submit(_work, t)] = t
                done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
                for fut in done:
                    t = inflight.pop(fut)
                    try:
                        on_row(fut.result())
                    except BrokenProcessPool:
                        inflight[fut] = t
                        raise
                    except Exception as e:
                        on_row({"path": t[1], "hash": t[2], "status": "failed",
                                "reason": f"{t[0]}: worker error: {type(e).__name__}: {e}"})
        except BrokenProcessPool:
            for t in inflight.values():
                on_row({"path": t[1], "hash": t[2], "status": "failed",
                        "reason": f"{t[0]}: the worker process died while processing it"})
            ex.shutdown(wait=False, cancel_futures=True)
            continue
        ex.shutdown(wait=True)
