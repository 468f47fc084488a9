"""Sections 1, 2, 3 and 6: decoding, preprocessing, cache reuse and storage.

Everything here calls the real code: :mod:`dwm.preprocess.decode` for the decode limit,
:func:`dwm.preprocess.run.main` for every preprocessing figure (a fresh output folder per
repetition, so nothing is cached unless the figure is about the cache).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from dwm.datasets import iter_tar_samples
from dwm.preprocess import run as preprocess_run
from dwm.preprocess.decode import SegmentReader, centre_crop_box, crop, make_plan
from dwm.preprocess.probe import probe_file
from dwm.shared import contract
from dwm.shared.config import DecodeConfig, PreprocessConfig
from dwm.shared.shards import decode_sample, load_manifest

from .common import Bench
from .report import Figure, Goal, Reference, Section, median
from .timing import profile_top, side_by_side, timed

# Extractors measured one by one in section 2 (pose first: it is the one that needs a person).
EXTRACTORS = ("audio", "pose", "face", "latents", "clip", "thumbs")
FAST = ["audio", "thumbs"]  # the model extractors off: the pipeline's own overhead
WHOLE = list(EXTRACTORS)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def decode_frames(video: str, dcfg: DecodeConfig, probe=None) -> Callable[[], int]:
    """A function that decodes the video as the pipeline does (aspect-kept decode + centre crop,
    sequential, segment by segment) and returns the number of frames."""
    probe = probe or probe_file(video)
    plan = make_plan(probe, dcfg)

    def run() -> int:
        reader = SegmentReader(video, probe, plan)
        x0, y0 = centre_crop_box(plan)
        n = 0
        for _si, _start, _length, frames in reader.segments():
            n += len(crop(frames, x0, y0, plan.width, plan.height))
        reader.close()
        return n

    run.frames = plan.num_frames  # type: ignore[attr-defined]
    run.probe = probe  # type: ignore[attr-defined]
    return run


def run_preprocess(pcfg: PreprocessConfig, fresh: bool = True) -> tuple[float, dict[str, Any]]:
    """(wall seconds, report.json) of one ``dwm preprocess`` run, in-process."""
    if fresh:
        shutil.rmtree(pcfg.out, ignore_errors=True)
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        preprocess_run.main(pcfg)
    dt = time.perf_counter() - t
    report = json.loads((Path(pcfg.out) / "report.json").read_text())
    bad = [v for v in report["videos"] if v["status"] != "ok"]
    if bad:
        raise RuntimeError(f"preprocess of the bench video failed: {bad[0]['reason']}")
    return dt, report


def frames_of(report: dict[str, Any]) -> int:
    return int(sum(v.get("frames") or 0 for v in report["videos"] if v["status"] == "ok"))


def work_done(report: dict[str, Any]) -> dict[str, int]:
    """Extractor calls and decoded frames of a run (both 0: everything came from the cache)."""
    return {"extractor_calls": int(sum(report.get("extractor_calls", {}).values())),
            "decoded_frames": int(report.get("decoded_frames", 0))}


def _maybe_profile(bench: Bench, sec: Section, fig: Figure, fn: Callable[[], Any]) -> None:
    if bench.cfg.cprofile and fig.met is False:
        sec.profiles[fig.name] = profile_top(fn)


# ---------------------------------------------------------------------------------------------
# 1. decode limit
# ---------------------------------------------------------------------------------------------
def section_decode(bench: Bench, sec: Section) -> None:
    probe = probe_file(str(bench.video))
    fps_src = float(probe.orig_fps)
    realtime = Reference("real time (video fps)", fps_src, "frames/s")
    lengths = [("decode alone", bench.decode_seconds)]
    if bench.seconds != bench.decode_seconds:
        lengths.append(("decode alone, model-extractor length", bench.seconds))
    for label, seconds in lengths:
        pcfg = bench.preprocess_config(bench.out / "unused", **{"decode.max_seconds": seconds})
        dec = decode_frames(str(bench.video), pcfg.decode, probe)
        dec()  # warm the page cache and decord
        n = dec.frames  # type: ignore[attr-defined]
        fps = [n / t for t in timed(dec, bench.repeats)]
        inputs = bench.base_inputs(pcfg, frames=n, decoder="decord", decord_threads="auto",
                                   order="sequential")
        sec.add(Figure(f"{label} ({pcfg.decode.width}x{pcfg.decode.height})", median(fps),
                       "frames/s", realtime, None, inputs, fps))
        if seconds == bench.seconds:  # the reference of the model-extractor figures
            bench.decode_fps, bench.decode_inputs = median(fps), inputs

    # the stage-C resolution (what decode + VAE + render per step decodes, section 4)
    pcfg = bench.preprocess_config(bench.out / "unused",
                                   **{"decode.max_seconds": bench.decode_seconds})
    big = DecodeConfig(fps=pcfg.decode.fps, width=512, height=896, segment_frames=150,
                       min_frames=8, max_seconds=pcfg.decode.max_seconds)
    dec_big = decode_frames(str(bench.video), big, probe)
    nb = dec_big.frames  # type: ignore[attr-defined]
    fps = [nb / t for t in timed(dec_big, bench.repeats)]
    sec.add(Figure("decode alone (512x896)", median(fps), "frames/s", realtime, None,
                   {**bench.base_inputs(frames=nb), "res": "512x896", "fps": big.fps,
                    "seconds": big.max_seconds or "all", "order": "sequential"}, fps))
    sec.notes.append(f"{bench.video.name}: {probe.orig_width}x{probe.orig_height} "
                     f"{probe.orig_fps:g} fps, {probe.num_frames} frames, codec "
                     f"{probe.video_codec}; decoded by dwm.preprocess.decode (decord into an "
                     "aspect-kept size, then the crop), sequentially, segment by segment.")


# ---------------------------------------------------------------------------------------------
# 2 + 3. preprocessing and cache reuse
# ---------------------------------------------------------------------------------------------
def warm_up(bench: Bench) -> None:
    """One short whole-pipeline run, untimed: imports, numba's first compile (librosa), model
    files (tiny stand-ins are built here), the page cache."""
    pcfg = bench.preprocess_config(bench.out / "work" / "warmup", WHOLE,
                                   **{"decode.max_seconds": 0.5})
    run_preprocess(pcfg)


def section_preprocess(bench: Bench, sec2: Section | None, sec3: Section | None) -> None:
    work = bench.out / "work"
    if bench.decode_fps is None:  # section 1 was not asked for: measure the reference anyway
        section_decode(bench, Section("1", "decode limit"))
    if not bench.quick:
        warm_up(bench)
    pcfg_fast = bench.preprocess_config(work / "fast", FAST,
                                        **{"decode.max_seconds": bench.decode_seconds})
    dec = decode_frames(str(bench.video), pcfg_fast.decode)
    reports: dict[str, dict] = {}

    # the goal figure: decode alone and the fast pipeline, interleaved
    def fast_first() -> None:
        reports["fast1"] = run_preprocess(pcfg_fast)[1]

    def fast_second() -> None:
        reports["fast2"] = run_preprocess(pcfg_fast, fresh=False)[1]

    times = side_by_side({"decode": dec, "fast": fast_first, "fast_again": fast_second},
                         bench.repeats)
    n = frames_of(reports["fast1"])
    dec_fps = [dec.frames / t for t in times["decode"]]  # type: ignore[attr-defined]
    fast_fps = [n / t for t in times["fast"]]
    fast_inputs = bench.base_inputs(pcfg_fast, frames=n, extractors=FAST, workers=1,
                                    profile="tiny")
    if sec2 is not None:
        fig = sec2.add(Figure("pipeline, model extractors off (audio+thumbs)", median(fast_fps),
                              "frames/s", Reference("decode alone, same run", median(dec_fps),
                                                    "frames/s"),
                              Goal(">=", 0.8), fast_inputs, fast_fps, dec_fps))
        _maybe_profile(bench, sec2, fig, fast_first)
        rt = reports["fast1"]["videos"][0].get("timings", {})
        sec2.notes.append("fast pipeline time split (report.json timings, s): "
                          + ", ".join(f"{k} {v:.2f}" for k, v in rt.items()))
    if sec3 is not None:
        done = work_done(reports["fast2"])
        sec3.add(Figure("second run, audio+thumbs", median(times["fast_again"]), "s",
                        Reference("first run", median(times["fast"]), "s"), None,
                        {**fast_inputs, **done}, times["fast_again"], times["fast"]))

    # each extractor alone (the others off), end to end through the pipeline
    if sec2 is not None:
        ref = bench.decode_fps
        for name in EXTRACTORS:
            pcfg = bench.preprocess_config(work / f"only-{name}", [name])
            runs = [run_preprocess(pcfg) for _ in range(bench.repeats)]
            fps = [frames_of(r) / t for t, r in runs]
            vae = "TAESD" if pcfg.models.vae else "tiny VAE"
            label = {"pose": f"pose ({pcfg.pose.backend})", "latents": f"latents ({vae})",
                     "face": "face (tiny stand-in ONNX)",
                     "clip": "clip (tiny CLIP)"}.get(name, name)
            timings = runs[-1][1]["videos"][0].get("timings", {})
            sec2.add(Figure(f"{label} alone, end to end", median(fps), "frames/s",
                            Reference("decode alone, same length (section 1)", ref, "frames/s"),
                            None,
                            bench.base_inputs(pcfg, frames=frames_of(runs[0][1]), extractors=[name],
                                              workers=1, profile="tiny"), fps,
                            note="timings " + json.dumps(timings)))
            shutil.rmtree(pcfg.out, ignore_errors=True)

    # the whole pipeline; its second run on the same folder is the cache figure
    pcfg = bench.preprocess_config(work / "whole", WHOLE)
    first, second, again = [], [], None
    for _ in range(bench.repeats if (sec2 is not None or sec3 is not None) else 1):
        t1, r1 = run_preprocess(pcfg)
        t2, again = run_preprocess(pcfg, fresh=False)
        first.append((t1, r1))
        second.append(t2)
    n = frames_of(first[0][1])
    bench.full_run, bench.full_frames = Path(pcfg.out), n
    whole_inputs = bench.base_inputs(pcfg, frames=n, extractors=WHOLE, workers=1, profile="tiny",
                                     pose=pcfg.pose.backend,
                                     vae="TAESD" if pcfg.models.vae else "tiny VAE")
    if sec2 is not None:
        fps = [n / t for t, _ in first]
        sec2.add(Figure("whole pipeline (all six extractors)", median(fps), "frames/s",
                        Reference("decode alone, same length (section 1)", bench.decode_fps,
                                  "frames/s"), None,
                        whole_inputs, fps))
        rt = first[-1][1]["videos"][0].get("timings", {})
        sec2.notes.append("whole pipeline time split (report.json timings, s): "
                          + ", ".join(f"{k} {v:.2f}" for k, v in rt.items())
                          + ". With pose on, the video is decoded twice (uncropped for the pose "
                            "track that places the crop, then cropped for the frame extractors).")
    if sec3 is not None:
        assert again is not None
        done = work_done(again)
        fig = sec3.add(Figure("second run on unchanged input (whole pipeline)", median(second), "s",
                              Reference("first run", median([t for t, _ in first]), "s"),
                              Goal("<=", 0.02), {**whole_inputs, **done}, second,
                              [t for t, _ in first]))
        if done["extractor_calls"] or done["decoded_frames"]:
            sec3.notes.append(f"the second run was not a pure cache hit: {done}")
        else:
            sec3.notes.append("the second run decoded no frame and called no extractor "
                              "(report.json counters); its time is hashing, cache look-ups, "
                              "shard and manifest writing.")
        rt = again["videos"][0].get("timings", {})
        sec3.notes.append("second run time split (report.json timings, s): "
                          + ", ".join(f"{k} {v:.3f}" for k, v in rt.items()))
        _maybe_profile(bench, sec3, fig, lambda: run_preprocess(pcfg, fresh=False))


# ---------------------------------------------------------------------------------------------
# 6. storage
# ---------------------------------------------------------------------------------------------
def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def raw_f32_bytes(shape: tuple[int, ...]) -> int:
    """Bytes of the same array saved as float32 .npy (128-byte header)."""
    return int(np.prod(shape, dtype=np.int64)) * 4 + 128


def shard_member_bytes(manifest: dict[str, Any]) -> dict[str, list[int]]:
    """feature -> [stored member bytes, bytes of the same array as plain .npy], over every
    shard of the manifest (the members as the tar holds them; .json and tar headers apart)."""
    out: dict[str, list[int]] = {}
    for s in manifest["shards"]:
        for raw in iter_tar_samples(s["url"]):
            arrays = decode_sample(raw)
            for member, data in raw.items():
                if member.startswith("__") or member == "json":
                    continue
                name = member.split(".", 1)[0]
                acc = out.setdefault(name, [0, 0])
                acc[0] += len(data)
                acc[1] += int(np.asarray(arrays[name]).nbytes) + 128
    return out


def storage_run(bench: Bench) -> Path:
    """A whole-pipeline run at the stage-C size, 512x896 (quick: the quick size), for the
    bytes-per-frame goal: the tiny profile's models (the tiny VAE's latents have the same shape
    and dtype as TAESD's, and are stored raw), mediapipe pose, the bench's seconds."""
    if bench.quick:
        assert bench.full_run is not None
        return bench.full_run
    pcfg = bench.preprocess_config(bench.out / "work" / "storage_512x896", WHOLE,
                                   **{"decode.width": 512, "decode.height": 896, "models.vae": ""})
    run_preprocess(pcfg)
    return Path(pcfg.out)


def section_storage(bench: Bench, sec: Section) -> None:
    if bench.full_run is None:
        raise RuntimeError("needs the whole-pipeline run of section 2")

    # the goal: shard bytes per frame at the stage-C size against the fp16 latents' own bytes
    big = storage_run(bench)
    big_report = json.loads((big / "report.json").read_text())
    big_frames = frames_of(big_report)
    probe_frames = int(big_report["videos"][0].get("num_frames") or 0)
    mp4_per_frame = bench.video.stat().st_size / max(1, probe_frames)
    bcfg = big_report["config"]
    w, h = bcfg["decode"]["width"], bcfg["decode"]["height"]
    big_inputs = {"video": bench.video.name, "res": f"{w}x{h}", "frames": big_frames,
                  "profile": "tiny", "pose": bcfg["pose"]["backend"], "extractors": WHOLE,
                  "segment_frames": bcfg["decode"]["segment_frames"],
                  "chunk_frames": bcfg["shards"]["chunk_frames"],
                  "zstd_level": bcfg["shards"]["zstd_level"],
                  "face_crop_every": bcfg["shards"]["face_crop_every"]}
    latent_bytes = contract.LATENT_CHANNELS * (h // 8) * (w // 8) * 2  # fp16, one frame
    big_manifest = load_manifest(str(big / "manifest.json"))
    shard_bytes = sum(int(s["bytes"]) for s in big_manifest["shards"])
    sec.add(Figure(f"shards at {w}x{h}, all members (tar)", shard_bytes / big_frames, "B/frame",
                   Reference("fp16 latents of a frame (4 x h x w x 2 B)", latent_bytes,
                             "B/frame"), Goal("<=", 1.25),
                   {**big_inputs, "shards": len(big_manifest["shards"])}))
    sec.add(Figure(f"shards at {w}x{h} vs the source mp4", shard_bytes / big_frames, "B/frame",
                   Reference("source mp4", mp4_per_frame, "B/frame"), None, big_inputs))
    big_cache = dir_bytes(Path(big_report.get("cache_dir") or big / "cache"))
    sec.add(Figure(f"shards + cache at {w}x{h}", (shard_bytes + big_cache) / big_frames,
                   "B/frame", Reference("source mp4", mp4_per_frame, "B/frame"), None,
                   big_inputs))
    for feat, (stored, raw) in sorted(shard_member_bytes(big_manifest).items(),
                                      key=lambda kv: -kv[1][0]):
        enc = contract.member_name(feat).split(".", 1)[1]
        sec.add(Figure(f"shard at {w}x{h}: {feat} (.{enc})", stored / big_frames, "B/frame",
                       Reference("same array as plain .npy", raw / big_frames, "B/frame"), None,
                       big_inputs))

    # the bench's whole-pipeline run (section 2's size): shards per feature, and the cache
    run = bench.full_run
    frames = bench.full_frames
    report = json.loads((run / "report.json").read_text())
    pcfg = report["config"]
    res = f"{pcfg['decode']['width']}x{pcfg['decode']['height']}"
    inputs = {"video": bench.video.name, "res": res,
              "frames": frames, "profile": "tiny", "extractors": WHOLE}
    manifest = load_manifest(str(run / "manifest.json"))
    for feat, (stored, raw) in sorted(shard_member_bytes(manifest).items()):
        sec.add(Figure(f"shard: {feat}", stored / frames, "B/frame",
                       Reference("same array as plain .npy", raw / frames, "B/frame"), None,
                       inputs))
    shard_total = sum(int(s["bytes"]) for s in manifest["shards"])
    sec.add(Figure("shards, all features (tar)", shard_total / frames, "B/frame",
                   Reference("source mp4", mp4_per_frame, "B/frame"), None,
                   {**inputs, "shards": len(manifest["shards"])}))

    # cache: on-disk bytes of each extractor entry (Zarr, zstd) per frame
    cache_root = Path(report.get("cache_dir") or run / "cache")
    cache_total = dir_bytes(cache_root)
    for video_dir in sorted(p for p in cache_root.iterdir() if p.is_dir()):
        for entry in sorted(p for p in video_dir.iterdir() if p.is_dir()):
            name = entry.name.rsplit("-", 1)[0]
            if name == "probe":
                continue
            g = zarr.open_group(str(entry), mode="r")
            raw = sum(raw_f32_bytes(a.shape) for _, a in g.arrays())
            sec.add(Figure(f"cache: {name} entry", dir_bytes(entry) / frames, "B/frame",
                           Reference("same arrays as float32 .npy", raw / frames, "B/frame"), None,
                           {**inputs, "arrays": sorted(k for k, _ in g.arrays())}))
    sec.add(Figure("cache, all entries (Zarr + zstd)", cache_total / frames, "B/frame",
                   Reference("source mp4", mp4_per_frame, "B/frame"), None, inputs))
    sec.notes.append(
        f"source mp4: {bench.video.stat().st_size:,} bytes / {probe_frames} frames. Shard "
        "members are stored as the contract declares (shared/contract.py): latents and ArcFace "
        "embeddings raw .npy (memory-mapped), the rest zstd-compressed .npy chunks (per-frame "
        "arrays every chunk_frames frames, face crops one per reference-candidate frame); the "
        "cache stores every array zstd-compressed in Zarr, face crops on every frame.")
