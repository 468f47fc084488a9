"""``dwm app``: a local web page over :class:`DancePipeline`. A person drops a photo and a song
(or picks a bundled beat track), sets the seed, the pose steps, the length and whether the dance
starts from the photo's pose, and sees first the skeleton dancing over the photo (seconds), then
the video with the song; the poses JSON can be downloaded.

The page is a thin layer over the pipeline: every file it receives goes to the pipeline's own
checks, so bad input shows the sentence ``dwm generate`` prints (upload paths replaced by the
file's name), and the server goes on serving. Nothing the page accepts is executed or
unpickled: photos are decoded by OpenCV, songs by ffmpeg. Uploads and results live in one
temporary folder, deleted when the server stops. The server listens on ``host`` (this machine
unless told otherwise) and phones nowhere.

Gradio is an optional extra (``pip install -e .[app]``; ``just app`` installs it).
"""

from __future__ import annotations

import contextvars
import dataclasses
import importlib
import itertools
import json
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from dwm.generate.pipeline import (DanceOutput, DancePipeline, DanceSettings, poses_path,
                                   skeleton_path, write_outputs)
from dwm.shared import config as C
from dwm.shared import media
from dwm.shared.errors import UserFacingError
from dwm.shared.synthetic import AUDIO_SR, beat_track

# Set before gradio is imported and before the server starts: the page works with the network
# closed and reports on nobody (gradio's usage analytics and version check, Hugging Face
# telemetry, onnxruntime's telemetry (read when its first session is made), a public share
# tunnel, the MCP and node servers are all off).
OFFLINE_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "ORT_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_OFFLINE": "1",
    "GRADIO_SHARE": "False",
    "GRADIO_MCP_SERVER": "False",
    "GRADIO_SSR_MODE": "False",
    "GRADIO_RUN_HISTORY": "False",
}

# Bundled beat tracks, written at start (no audio file ships with the code): (label, bpm).
BEAT_TRACKS = (("beat track, 96 bpm", 96.0), ("beat track, 120 bpm", 120.0),
               ("beat track, 140 bpm", 140.0))
BEAT_SECONDS = 30.0
RUNS_KEPT = 8  # result folders kept on disk (older ones are deleted as new runs finish)

STAGE_A_NOTE = ("This checkpoint has only the pose model (stage A): the page shows the skeleton "
                "preview and the poses JSON. The video needs stages B and C (`just train`).")


def require_gradio() -> Any:
    """The ``gradio`` module, imported here rather than at the top: it is an optional extra, and
    the environment above must be in place before it loads."""
    os.environ.update(OFFLINE_ENV)
    try:
        return importlib.import_module("gradio")
    except ModuleNotFoundError:
        raise UserFacingError("the app needs gradio, an optional extra: run `just app` (it "
                              "installs it) or `pip install -e .[app] -c constraints.txt`") \
            from None


# ---------------------------------------------------------------------------------------------
# the page's controls -> pipeline settings (the one place they meet)
# ---------------------------------------------------------------------------------------------
@dataclass
class Controls:
    """What a person sets on the page for one dance."""

    seed: int = 42
    pose_steps: int = 25
    max_seconds: float = 10.0
    start_from_photo: bool = True


# control -> the DanceSettings field it sets. A field the pipeline does not have yet is left
# out (and its control greyed out): pose steps and starting from the photo's pose come with the
# reference-aware pose model.
CONTROL_FIELDS = {"seed": "seed", "pose_steps": "pose_steps", "max_seconds": "max_seconds",
                  "start_from_photo": "start_from_reference"}


def control_is_used(control: str) -> bool:
    return CONTROL_FIELDS[control] in DanceSettings.__dataclass_fields__


def dance_settings(base: DanceSettings, controls: Controls) -> DanceSettings:
    """``base`` with the page's controls applied, for the settings this pipeline has."""
    values = {"seed": int(controls.seed), "pose_steps": int(controls.pose_steps),
              "max_seconds": float(controls.max_seconds),
              "start_from_photo": bool(controls.start_from_photo)}
    return dataclasses.replace(base, **{CONTROL_FIELDS[k]: v for k, v in values.items()
                                        if control_is_used(k)})


def base_settings(cfg: C.AppConfig) -> DanceSettings:
    """The settings fixed for the session, named as ``dwm generate`` names them."""
    return DanceSettings(seed=cfg.seed, fps=cfg.fps, resolution=cfg.resolution,
                         max_seconds=cfg.max_seconds, steps=cfg.steps, window=cfg.window,
                         overlap=cfg.overlap)


def write_beat_tracks(folder: Path) -> dict[str, Path]:
    """The bundled beat tracks as WAV files in ``folder``: {label: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    tracks = {}
    for i, (label, bpm) in enumerate(BEAT_TRACKS):
        path = folder / f"beat_{int(bpm)}bpm.wav"
        sf.write(path, beat_track(BEAT_SECONDS, bpm, seed=i), AUDIO_SR)
        tracks[label] = path
    return tracks


# ---------------------------------------------------------------------------------------------
# one dance: preview first, then the video
# ---------------------------------------------------------------------------------------------
@dataclass
class PageUpdate:
    """What the page shows after each step of a run (``None``: nothing there yet)."""

    preview: str | None = None  # skeleton over the photo, with the song (mp4)
    poses: str | None = None  # the poses JSON
    video: str | None = None  # the dance with the song (mp4)
    message: str = ""  # one line: progress, the result, or the error sentence


class DanceApp:
    """A loaded pipeline with the page's session state: the base settings, the bundled beat
    tracks and the folder results are written to."""

    def __init__(self, pipe: DancePipeline, cfg: C.AppConfig, work_dir: str | Path):
        self.pipe, self.cfg = pipe, cfg
        self.work_dir = Path(work_dir)
        self.base = base_settings(cfg)
        self.beats = write_beat_tracks(self.work_dir / "beats")
        self.runs_dir = self.work_dir / "runs"
        self._run_ids = itertools.count()
        self._lock = threading.Lock()  # one dance at a time on the model

    def music_for(self, song: str | None, beat: str | None) -> str:
        """An uploaded song wins; else the bundled beat track picked (else none)."""
        if song:
            return str(song)
        return str(self.beats[beat]) if beat in self.beats else ""

    def dance(self, photo: str | None, song: str | None, beat: str | None, controls: Controls,
              progress: Callable[[float | None, str], None] | None = None
              ) -> Iterator[PageUpdate]:
        """Yield the page's state: once the poses exist (preview + poses JSON), then with the
        video (a video model only). A bad input yields its one-line sentence and stops."""
        progress = progress or (lambda fraction, desc: None)
        started = time.perf_counter()
        photo, music = str(photo or ""), self.music_for(song, beat)
        names = {p: Path(p).name for p in (photo, music) if p}  # upload paths -> file names
        settings = dance_settings(self.base, controls)
        out = self._new_run_dir() / "dance.mp4"
        events: queue.Queue[tuple[str, Any]] = queue.Queue()

        def work() -> None:
            try:
                with self._lock:
                    # a shallow copy: the pipeline goes on filling in the latents and frames
                    result = self.pipe(music, photo, settings,
                                       on_poses=lambda o: events.put(("poses",
                                                                      dataclasses.replace(o))))
                events.put(("done", result))
            except Exception as e:  # any failure is shown on the page; the server goes on
                events.put(("error", e))

        progress(0.0, "finding the dancer and reading the song")
        # the page's progress tracker lives in context variables: the worker runs in a copy
        worker = threading.Thread(target=contextvars.copy_context().run, args=(work,),
                                  name="dwm-app-dance", daemon=True)
        worker.start()
        update = PageUpdate()
        try:
            while True:
                kind, value = events.get()
                if kind == "error":
                    raise value
                if kind == "poses":
                    update = self._preview(value, out, music, photo, settings.seed, names)
                    update.message = (f"Preview after {time.perf_counter() - started:.1f} s. " + (
                        "Rendering the video..." if self.pipe.has_video else STAGE_A_NOTE))
                    yield update  # the pipeline's own progress bars show on the page from here
                    continue
                result: DanceOutput = value
                if result.frames is None:
                    return
                media.write_video(out, result.frames, result.song.fps, audio=music)
                update = dataclasses.replace(update, video=str(out), message=(
                    f"Done: {result.song.num_frames} frames "
                    f"({result.song.num_frames / result.song.fps:.1f} s) at "
                    f"{result.size[0]}x{result.size[1]}, seed {settings.seed}, in "
                    f"{time.perf_counter() - started:.1f} s."))
                yield update
                return
        except UserFacingError as e:
            yield dataclasses.replace(update, message=f"Error: {readable(str(e), names)}")
        except Exception as e:  # a bug, not the input: the page says so, the console has details
            traceback.print_exception(e)
            yield dataclasses.replace(update, message=f"Error: {type(e).__name__}: "
                                      f"{readable(str(e), names)} (details on the server console)")
        finally:
            self._prune_runs()

    def _preview(self, poses: DanceOutput, out: Path, music: str, photo: str, seed: int,
                 names: dict[str, str]) -> PageUpdate:
        """The skeleton over the photo and the poses JSON, which names the files as the person
        chose them (not the server's upload folders)."""
        write_outputs(dataclasses.replace(poses, frames=None), out, music, photo, seed)
        doc_path = poses_path(out)
        doc = json.loads(doc_path.read_text())
        doc["music"], doc["reference_image"] = names.get(music, ""), names.get(photo, "")
        tmp = doc_path.with_name(doc_path.name + ".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(doc_path)
        return PageUpdate(preview=str(skeleton_path(out)), poses=str(doc_path))

    def _new_run_dir(self) -> Path:
        path = self.runs_dir / f"run-{next(self._run_ids):05d}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _prune_runs(self) -> None:
        runs = sorted(self.runs_dir.glob("run-*"))
        for old in runs[:-RUNS_KEPT]:
            shutil.rmtree(old, ignore_errors=True)


def readable(message: str, names: dict[str, str]) -> str:
    """The error sentence with upload paths (temporary folders) replaced by the file names."""
    for path, name in sorted(names.items(), key=lambda kv: -len(kv[0])):
        message = message.replace(path, name)
    return " ".join(message.split())  # one line


def photo_for_display(photo: str | None) -> tuple[np.ndarray | None, str]:
    """The uploaded photo as an RGB array for the page, or the reason it cannot be read."""
    if not photo:
        return None, ""
    try:
        return media.read_image(photo), ""
    except UserFacingError as e:
        return None, f"Error: {readable(str(e), {str(photo): Path(photo).name})}"


# ---------------------------------------------------------------------------------------------
# the page
# ---------------------------------------------------------------------------------------------
INTRO = ("Drop a photo of a person and a song (or pick a bundled beat track). The skeleton "
         "dancing over the photo appears first, in seconds; the video with the song follows.")


def build_page(app: DanceApp) -> Any:
    """The Gradio Blocks of the page over ``app``."""
    gr = require_gradio()
    cfg = app.cfg
    not_yet = "used once the pose model supports it"
    with gr.Blocks(title="dance-with-music", delete_cache=(1800, 3600)) as page:
        gr.Markdown("# dance-with-music\n" + INTRO)
        if not app.pipe.has_video:
            gr.Markdown(f"**{STAGE_A_NOTE}**", elem_id="stage-a-note")
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Row():
                    photo = gr.File(label="Photo of the dancer", type="filepath", height=180,
                                    elem_id="photo", scale=3)
                    photo_view = gr.Image(label="The photo", interactive=False, height=180,
                                          show_label=False, container=False, scale=2)
                song = gr.File(label="Song (wav, mp3, ogg, m4a, or a video)", type="filepath",
                               height=150, elem_id="song")
                beat = gr.Dropdown(choices=list(app.beats), value=next(iter(app.beats)),
                                   label="...or a bundled beat track (when no song is uploaded)")
                with gr.Row():
                    seed = gr.Number(value=cfg.seed, precision=0, label="Seed")
                    seconds = gr.Slider(0.5, max(cfg.longest_seconds, cfg.max_seconds),
                                        value=cfg.max_seconds, step=0.5,
                                        label="Length (seconds)")
                with gr.Row():
                    pose_steps = gr.Slider(1, 100, value=cfg.pose_steps, step=1,
                                           label="Pose steps",
                                           interactive=control_is_used("pose_steps"),
                                           info=None if control_is_used("pose_steps")
                                           else not_yet)
                    from_photo = gr.Checkbox(
                        value=True, label="Start from the photo's pose",
                        interactive=control_is_used("start_from_photo"),
                        info=None if control_is_used("start_from_photo") else not_yet)
                with gr.Row():
                    run = gr.Button("Dance", variant="primary", elem_id="dance")
                    another = gr.Button("Another seed", elem_id="another-seed")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="status")
                with gr.Row():
                    preview = gr.Video(label="Skeleton over the photo (preview)", autoplay=True,
                                       interactive=False, height=420)
                    video = gr.Video(label="The dance, with the song", autoplay=True,
                                     interactive=False, height=420)
                poses = gr.File(label="Poses (JSON: OpenPose-18 keypoints per frame)",
                                interactive=False, height=110, elem_id="poses")

        def dance(photo_path, song_path, beat_label, seed_value, steps_value, seconds_value,
                  from_photo_value, progress=gr.Progress(track_tqdm=True)):
            controls = Controls(seed=int(seed_value if seed_value is not None else cfg.seed),
                                pose_steps=int(steps_value), max_seconds=float(seconds_value),
                                start_from_photo=bool(from_photo_value))
            report = (lambda fraction, desc: progress(fraction, desc=desc))
            for update in app.dance(photo_path, song_path, beat_label, controls, report):
                yield update.preview, update.poses, update.video, update.message

        inputs = [photo, song, beat, seed, pose_steps, seconds, from_photo]
        outputs = [preview, poses, video, status]
        photo.change(photo_for_display, photo, [photo_view, status], api_name=False)
        run.click(dance, inputs, outputs, api_name="dance", concurrency_id="dance",
                  show_progress_on=[video])
        another.click(lambda s: int(s or 0) + 1, seed, seed, api_name=False).then(
            dance, inputs, outputs, api_name=False, concurrency_id="dance",
            show_progress_on=[video])
    return page


# ---------------------------------------------------------------------------------------------
# serving
# ---------------------------------------------------------------------------------------------
class UploadFolder:
    """Gradio's upload folder (``GRADIO_TEMP_DIR``), where uploads land and from which it
    serves files. Gradio reads it from the environment whenever it checks a file, so every
    server of a process shares one (``UPLOADS``): the first server creates it, the last one to
    stop deletes it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._path: Path | None = None
        self._users = 0
        self._previous: str | None = None

    def acquire(self) -> Path:
        with self._lock:
            if self._path is None:
                self._path = Path(tempfile.mkdtemp(prefix="dwm-app-"))
                self._previous = os.environ.get("GRADIO_TEMP_DIR")
                os.environ["GRADIO_TEMP_DIR"] = str(self._path)
            self._users += 1
            return self._path

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users > 0 or self._path is None:
                return
            shutil.rmtree(self._path, ignore_errors=True)
            self._path = None
            if self._previous is None:
                os.environ.pop("GRADIO_TEMP_DIR", None)
            else:
                os.environ["GRADIO_TEMP_DIR"] = self._previous


UPLOADS = UploadFolder()


@dataclass
class RunningApp:
    """A started server: its URL, and ``close()`` to stop it and delete its temporary folder
    (results, beat tracks; the uploads with the process's last server)."""

    url: str
    page: Any
    app: DanceApp | None
    work_dir: Path  # this server's results and beat tracks
    upload_dir: Path  # the uploads (shared by the servers of this process)

    def close(self) -> None:
        try:
            if self.page is not None:
                self.page.close()
        finally:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            UPLOADS.release()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start(cfg: C.AppConfig, pipe: DancePipeline | None = None) -> RunningApp:
    """Load the pipeline (unless given), start the server in the background, return at once."""
    gr = require_gradio()
    pipe = pipe or DancePipeline.from_pretrained(cfg.ckpt, models=cfg.models,
                                                 pose_backend=cfg.pose_backend,
                                                 device=cfg.device, dtype=cfg.dtype,
                                                 show_progress=True)
    upload_dir = UPLOADS.acquire()
    # inside the upload folder: gradio serves the results from there without copying them
    work_dir = Path(tempfile.mkdtemp(prefix="server-", dir=upload_dir))
    running = RunningApp("", None, None, work_dir, upload_dir)
    try:
        running.app = DanceApp(pipe, cfg, work_dir)
        running.page = build_page(running.app)
        running.page.queue(default_concurrency_limit=1)
        _, url, _ = running.page.launch(
            server_name=cfg.host, server_port=cfg.port or free_port(cfg.host), share=False,
            inbrowser=False, prevent_thread_lock=True, quiet=True, show_error=False,
            ssr_mode=False, mcp_server=False, enable_monitoring=False, pwa=False,
            max_file_size=f"{int(cfg.max_upload_mb)}mb", footer_links=["api", "settings"],
            theme=gr.themes.Default())
    except BaseException:
        running.close()
        raise
    running.url = str(url)
    return running


def main(cfg: C.AppConfig) -> int:
    running = start(cfg)
    # a service manager's or `kill`'s stop is a clean exit too: the temporary folder goes
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        kind = "poses and video" if running.app.pipe.has_video else \
            "poses only (a stage-A checkpoint)"
        print(f"dwm app: {running.url} ({kind}; ckpt {cfg.ckpt}); Ctrl-C stops it", flush=True)
        running.page.block_thread()
    finally:
        running.close()
    return 0
