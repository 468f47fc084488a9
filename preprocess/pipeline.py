"""One video through every extractor, into the cache. Runs in a worker process (or in-process).

Order of work for a video (each step looks in the cache first, so an unchanged input is never
decoded again):

1. probe (content: is it a video? fps, size, rotation, audio?) -> the decode plan (segments);
2. pose on the uncropped, aspect-kept frames -> the main dancer's track -> one crop per segment
   centred on the dancer (centre crop when pose is off or finds nobody; the report says so);
   with ``pose.backend=file`` the keypoints come from the video's sidecar file (nothing decoded),
   and the file's content hash is part of the pose key;
3. audio features from the audio track (no frames needed);
4. one more sequential decode for the frame extractors that are missing (face, latents, clip,
   thumbs), on the cropped frames, segment by segment.

The keys of 4 depend on the crop boxes' *values* (and face's on the values of the pose's head
joints and face points), so a pose change that leaves the crops alone does not recompute the
latents.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

from dwm.shared.config import PreprocessConfig, config_hash

from . import extractors as X
from .cache import EntryWriter, FeatureCache, array_digest, entry_key
from .decode import DecodeError, Plan, SegmentReader, centre_crop_box, crop, make_plan
from .extractors.audio import AudioBatch
from .extractors.face import HEAD_JOINTS
from .extractors.keypoints_file import KeypointsFileError
from .extractors.pose import choose_crop, keep_inside, pose_arrays, render_heatmaps, to_crop
from .probe import PROBE_VERSION, NotAVideo, ProbeInfo, probe_file


@dataclass
class VideoTask:
    path: str  # absolute path
    rel: str  # path relative to the input folder (report, sample "source")
    video_hash: str


def sha256_file(path: str, chunk: int = 4 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def cache_root(cfg: PreprocessConfig) -> str:
    return cfg.cache_dir or os.path.join(cfg.out, "cache")


class VideoProcessor:
    """Holds the extractors (and their models) of one process; :meth:`process` does one video."""

    def __init__(self, cfg: PreprocessConfig, device: str | None = None):
        self.cfg = cfg
        self.device = device or cfg.device
        self.cache = FeatureCache(cache_root(cfg))
        self.extractors = X.build(cfg, self.device)
        self.decoded_frames = 0

    # -- keys -------------------------------------------------------------------------------
    def decode_hash(self) -> str:
        return config_hash(self.cfg.decode)

    def key(self, name: str, inputs: dict[str, Any]) -> str:
        ext = self.extractors[name]
        return entry_key(name, ext.version, ext.config(), inputs)

    def counters(self) -> dict[str, int]:
        return {n: e.calls for n, e in self.extractors.items()}

    # -- one video --------------------------------------------------------------------------
    def process(self, task: VideoTask) -> dict[str, Any]:
        t_start = time.perf_counter()
        calls0, dec0 = self.counters(), self.decoded_frames
        row: dict[str, Any] = {"path": task.rel, "hash": task.video_hash, "status": "ok",
                               "reason": None, "notes": [], "timings": {}}
        try:
            self._process(task, row)
        except NotAVideo as e:
            row.update(status=e.status, reason=e.reason)
        except KeypointsFileError as e:  # pose.backend=file: this video's sidecar (named)
            row.update(status="failed", reason=str(e))
        except DecodeError as e:
            row.update(status="failed",
                       reason=str(e) if task.path in str(e) else f"{task.path}: {e}")
        except Exception as e:  # never stop the run for one video; say what happened
            tb = traceback.format_exc(limit=3).strip().splitlines()[-1]
            row.update(status="failed", reason=f"{task.path}: {type(e).__name__}: {e} ({tb})")
        calls1 = self.counters()
        row["extractor_calls"] = {n: calls1[n] - calls0.get(n, 0) for n in calls1}
        row["decoded_frames"] = self.decoded_frames - dec0
        row["timings"]["total"] = round(time.perf_counter() - t_start, 4)
        return row

    def _timed(self, row: dict, name: str, t0: float) -> None:
        row["timings"][name] = round(row["timings"].get(name, 0.0) + time.perf_counter() - t0, 4)

    def _process(self, task: VideoTask, row: dict) -> None:
        cfg, cache, vh = self.cfg, self.cache, task.video_hash
        # 1. probe (cached by content)
        t0 = time.perf_counter()
        probe_key = entry_key("probe", PROBE_VERSION, {}, {"video": vh})
        if cache.has(vh, "probe", probe_key):
            probe = ProbeInfo.from_dict(dict(cache.open(vh, "probe", probe_key).attrs)["probe"])
        else:
            probe = probe_file(task.path)
            w = cache.writer(vh, "probe", probe_key, {"name": "probe", "version": PROBE_VERSION})
            w.commit(probe=probe.to_dict(), source=task.rel)
        cache.add_source(vh, task.rel)
        self._timed(row, "probe", t0)
        row.update(probe.to_dict())
        try:
            plan = make_plan(probe, cfg.decode)
        except ValueError as e:
            raise NotAVideo(f"{task.path}: {e}") from None
        row.update(frames=plan.num_frames, segments=len(plan.segments), has_audio=probe.has_audio)
        if plan.dropped_tail:
            row["notes"].append(f"dropped a {plan.dropped_tail}-frame tail segment")
        dhash = self.decode_hash()
        base_inputs = {"video": vh, "decode": dhash}
        keys: dict[str, str] = {}

        # 2. pose -> crops
        t0 = time.perf_counter()
        if "pose" in self.extractors:
            pose_inputs = {**base_inputs, **self.extractors["pose"].file_inputs(task.path)}
            keys["pose"] = self.key("pose", pose_inputs)
            if not cache.has(vh, "pose", keys["pose"]):
                self._run_pose(task, probe, plan, keys["pose"], pose_inputs, row)
            attrs = dict(cache.open(vh, "pose", keys["pose"]).attrs)
            crops = [tuple(c) for c in attrs["crop_boxes"]]
            frac = float(attrs["person_fraction"])
            row["person_fraction"] = round(frac, 4)
            if frac < cfg.pose.min_person_fraction:
                raise NotAVideo(
                    f"{task.path}: no person: the pose finds the dancer in only {frac:.0%} of "
                    f"frames (need {cfg.pose.min_person_fraction:.0%})")
            if attrs["centre_fallback"]:
                row["notes"].append(
                    f"centre crop for segment(s) {attrs['centre_fallback']}: pose found nobody")
            face_pts_digest = attrs["face_points_digest"]
        else:
            x0, y0 = centre_crop_box(plan)
            crops = [(x0, y0, x0 + plan.width, y0 + plan.height)] * len(plan.segments)
            row["notes"].append("centre crop: pose is off")
            face_pts_digest = "none"
        self._timed(row, "pose", t0)
        crop_digest = array_digest(np.asarray(crops, np.int64))
        row["crop_boxes"] = [list(map(int, c)) for c in crops]

        # 3. audio, in a background thread while step 4 decodes the frames (ffmpeg is a
        # subprocess and librosa's FFTs release the GIL), joined before the video is done. It
        # runs at a lower CPU priority: it has slack (it ends long before the frames do) and
        # the decoder is the critical path, so the audio fills the decoder's idle moments
        # instead of taking its core (the bench's 2-core figure, paired runs: 0.79 -> 0.84 on one
        # machine; 0.825 -> 0.852 on another, faster in 11 of 15 pairs)
        audio_job = None
        if "audio" in self.extractors and probe.has_audio:
            keys["audio"] = self.key("audio", {"video": vh, "fps": plan.fps,
                                               "frames": plan.num_frames})
            if not cache.has(vh, "audio", keys["audio"]):
                audio_job = _Job(self._run_audio, task, plan, keys["audio"],
                                 nice=AUDIO_THREAD_NICE)
        try:
            # 4. frame extractors on the cropped frames
            t0 = time.perf_counter()
            missing = []
            for name in X.FRAME_ORDER:
                if name not in self.extractors:
                    continue
                inputs = {**base_inputs, "crop": crop_digest}
                if name == "face":
                    inputs["pose_points"] = face_pts_digest
                keys[name] = self.key(name, inputs)
                if not cache.has(vh, name, keys[name]):
                    missing.append((name, inputs))
            if missing:
                self._run_frames(task, probe, plan, crops, missing, keys, row)
            self._timed(row, "features", t0)
        finally:  # never leave the audio thread running (also when the frames failed)
            audio_error = audio_job.join() if audio_job is not None else None
        row["timings"]["audio"] = round(audio_job.seconds, 4) if audio_job is not None else 0.0
        if audio_job is not None:
            if audio_error is not None:
                # a broken audio track: keep the video, without audio, and remember that (an
                # entry without arrays) so a re-run does not retry
                w = self._writer(vh, "audio", keys["audio"], {"video": vh})
                w.commit(error=f"{type(audio_error).__name__}: {str(audio_error)[:300]}")
        if "audio" in keys:
            error = self.cache.open(vh, "audio", keys["audio"]).attrs.get("error")
            if error:
                row["has_audio"] = False
                row["notes"].append(f"audio track unreadable, kept without audio: {error}")
                keys.pop("audio")
        row["keys"] = keys

    # -- pose pass --------------------------------------------------------------------------
    def _writer(self, vh: str, name: str, key: str, inputs: dict) -> EntryWriter:
        ext = self.extractors[name]
        return self.cache.writer(vh, name, key, {"name": name, "version": ext.version,
                                                 "config": ext.config(), "inputs": inputs,
                                                 "key": key})

    def _create_arrays(self, w: EntryWriter, specs: dict[str, X.ArraySpec], n: int,
                       seg: int) -> None:
        for an, s in specs.items():
            if s.per_frame:
                w.create(an, (n, *s.tail), s.dtype, (seg, *s.tail), s.doc)
            else:
                w.create(an, (0, *s.tail), s.dtype, (s.chunk or 4096, *s.tail), s.doc)

    def _run_pose(self, task: VideoTask, probe: ProbeInfo, plan: Plan, key: str,
                  inputs: dict, row: dict) -> None:
        cfg, ext = self.cfg, self.extractors["pose"]
        ds = cfg.pose.heatmap_downsample
        h, w = plan.height // ds, plan.width // ds
        ctx = X.VideoContext(task.video_hash, task.path, plan.num_frames, plan.fps,
                             plan.decode_width, plan.decode_height, probe.duration,
                             source_frames=probe.num_frames, source_fps=probe.orig_fps)
        ext.reset(ctx)
        writer = self._writer(task.video_hash, "pose", key, inputs)
        try:
            self._create_arrays(writer, pose_arrays(len(plan.segments), h, w), plan.num_frames,
                                cfg.decode.segment_frames)
            reader = SegmentReader(task.path, probe, plan) if ext.needs_frames else None
            crops, centre_fallback, found_total = [], [], 0
            digest = hashlib.sha256()
            bs = max(1, ext.batch_size)
            segments = (reader.segments(prefetch=True) if reader is not None
                        else _frameless_segments(plan))
            for si, start, length, frames in segments:
                parts = []
                for b in range(0, length, bs):
                    idx = np.arange(start + b, start + min(b + bs, length))
                    parts.append(ext(X.FrameBatch(frames[b : b + bs], idx, idx - start, si)))
                res = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
                x0, y0, used = choose_crop(res["body"], res["found"], plan.decode_width,
                                           plan.decode_height, plan.width, plan.height,
                                           cfg.pose.min_score)
                if not used:
                    centre_fallback.append(si)
                crops.append((x0, y0, x0 + plan.width, y0 + plan.height))
                out = {k: keep_inside(to_crop(res[k], x0, y0, plan.width, plan.height))
                       for k in ("body", "hands", "face")}
                out["heatmap"] = render_heatmaps(out["body"], h, w, cfg.pose.heatmap_sigma,
                                                 cfg.pose.min_score)
                out["found"] = res["found"]
                found_total += int(res["found"].sum())
                for k, v in out.items():
                    writer.arrays[k][start : start + length] = v
                # what the face extractor reads of the pose: head joints and face points (so a
                # change of the arms or legs does not recompute the faces)
                digest.update(np.ascontiguousarray(out["body"][:, list(HEAD_JOINTS)]).tobytes()
                              + out["face"].tobytes())
            if reader is not None:
                reader.close()  # decord's decoder thread busy-waits while its reader is open
                self.decoded_frames += reader.frames_decoded
                row["timings"]["decode"] = round(row["timings"].get("decode", 0) + reader.seconds,
                                                 4)
            crops_arr = np.asarray(crops, np.int32)
            writer.put("crop_boxes", crops_arr, "per segment [x0, y0, x1, y1] in decode pixels")
            writer.put("crop_boxes_orig", crops_arr / plan.scale,
                       "per segment [x0, y0, x1, y1] in original pixels")
            writer.commit(crop_boxes=crops_arr.tolist(),
                          person_fraction=found_total / max(1, plan.num_frames),
                          centre_fallback=centre_fallback,
                          face_points_digest=digest.hexdigest()[:16],
                          plan=plan.to_dict())
        except BaseException:
            writer.abort()
            raise

    # -- audio ------------------------------------------------------------------------------
    def _run_audio(self, task: VideoTask, plan: Plan, key: str) -> None:
        ext = self.extractors["audio"]
        ctx = X.VideoContext(task.video_hash, task.path, plan.num_frames, plan.fps, plan.width,
                             plan.height)
        ext.reset(ctx)
        res = ext(AudioBatch(task.path))
        attrs = res.pop("_attrs")
        writer = self._writer(task.video_hash, "audio", key,
                              {"video": task.video_hash, "fps": plan.fps, "frames": plan.num_frames})
        try:
            specs = ext.arrays(ctx)
            for an, arr in res.items():
                writer.put(an, arr, specs[an].doc, chunks=(self.cfg.decode.segment_frames,
                                                           *arr.shape[1:]))
            writer.commit(**attrs)
        except BaseException:
            writer.abort()
            raise

    # -- frame extractors -------------------------------------------------------------------
    def _run_frames(self, task: VideoTask, probe: ProbeInfo, plan: Plan, crops: list,
                    missing: list[tuple[str, dict]], keys: dict[str, str], row: dict) -> None:
        cfg, vh = self.cfg, task.video_hash
        ctx = X.VideoContext(vh, task.path, plan.num_frames, plan.fps, plan.width, plan.height,
                             probe.duration)
        writers: dict[str, EntryWriter] = {}
        specs: dict[str, dict[str, X.ArraySpec]] = {}
        pose_group = None
        if "pose" in keys:
            pose_group = self.cache.open(vh, "pose", keys["pose"])
        try:
            for name, inputs in missing:
                ext = self.extractors[name]
                ext.reset(ctx)
                specs[name] = ext.arrays(ctx)
                writers[name] = self._writer(vh, name, keys[name], inputs)
                self._create_arrays(writers[name], specs[name], plan.num_frames,
                                    cfg.decode.segment_frames)
            appenders = {(name, an): _Appender(writers[name].arrays[an])
                         for name, _ in missing for an, s in specs[name].items() if not s.per_frame}
            reader = SegmentReader(task.path, probe, plan)
            for si, start, length, frames in reader.segments(prefetch=True):
                x0, y0 = int(crops[si][0]), int(crops[si][1])
                frames = crop(frames, x0, y0, plan.width, plan.height)
                extras = {}
                if pose_group is not None:
                    extras = {"pose_body": pose_group["body"][start : start + length],
                              "pose_face": pose_group["face"][start : start + length]}
                for name, _ in missing:
                    ext = self.extractors[name]
                    bs = max(1, ext.batch_size)
                    parts = []
                    t_ext = time.perf_counter()
                    for b in range(0, length, bs):
                        idx = np.arange(start + b, start + min(b + bs, length))
                        ex = {k: v[b : b + bs] for k, v in extras.items()}
                        parts.append(ext(X.FrameBatch(frames[b : b + bs], idx, idx - start, si, ex)))
                    self._timed(row, name, t_ext)
                    w = writers[name]
                    for an, s in specs[name].items():
                        data = np.concatenate([np.asarray(p[an]) for p in parts]).astype(s.dtype)
                        if s.per_frame:
                            w.arrays[an][start : start + length] = data
                        else:
                            appenders[(name, an)].add(data)
                del frames
            reader.close()  # decord's decoder thread busy-waits while its reader is open
            for app in appenders.values():
                app.flush()
            self.decoded_frames += reader.frames_decoded
            row["timings"]["decode"] = round(row["timings"].get("decode", 0) + reader.seconds, 4)
            for name, _ in missing:
                arrays, attrs = self.extractors[name].finish()
                for an, arr in arrays.items():
                    writers[name].put(an, arr, f"{name} video-level result")
                writers[name].commit(**attrs)
        except BaseException:
            for w in writers.values():
                w.abort()
            raise


def _frameless_segments(plan: Plan):
    """The plan's segments with no pixels (frames of shape (T, 0, 0, 3)), for a pose read from a
    file: the indices are what it needs."""
    for si, (start, length) in enumerate(plan.segments):
        yield si, start, length, np.zeros((length, 0, 0, 3), np.uint8)


AUDIO_THREAD_NICE = 10  # how much lower the audio thread's CPU priority is (0: the same)


class _Job:
    """``fn(*args)`` in a background thread; :meth:`join` returns its exception (or None).

    ``nice``: raise the thread's nice value by this much (Linux: a thread has its own, and the
    subprocesses it starts, such as ffmpeg, inherit it); elsewhere it is left as it is."""

    def __init__(self, fn, *args, nice: int = 0):
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.nice = int(nice)
        self.thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True,
                                       name="dwm-audio")
        self.thread.start()

    def _run(self, fn, *args) -> None:
        if self.nice:
            with contextlib.suppress(AttributeError, OSError):
                tid = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid)
                               + self.nice)
        t0 = time.perf_counter()
        try:
            fn(*args)
        except BaseException as e:  # handed to the caller by join()
            self.error = e
        self.seconds = time.perf_counter() - t0

    def join(self) -> BaseException | None:
        self.thread.join()
        return self.error


class _Appender:
    """Rows for a growable cache array, written a whole chunk at a time (and the rest at the
    end): zarr's ``append`` rewrites (decompresses and recompresses) the array's last chunk on
    every call, which for the thumbnails' 1 MiB chunks cost more than encoding them."""

    def __init__(self, array):
        self.array = array
        self.rows = max(1, int(array.chunks[0]))
        self.parts: list[np.ndarray] = []
        self.pending = 0

    def add(self, data: np.ndarray) -> None:
        if len(data):
            self.parts.append(data)
            self.pending += len(data)
        if self.pending >= self.rows:
            self.flush(whole_chunks=True)

    def flush(self, whole_chunks: bool = False) -> None:
        if not self.parts:
            return
        data = np.concatenate(self.parts) if len(self.parts) > 1 else self.parts[0]
        n = len(data) // self.rows * self.rows if whole_chunks else len(data)
        if n:
            self.array.append(data[:n], axis=0)
        rest = data[n:]
        self.parts = [rest] if len(rest) else []
        self.pending = len(rest)
