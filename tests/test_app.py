"""``dwm app``: the real server on a loopback port, driven through ``gradio_client`` as the page
drives it, and the page itself loaded in a real headless Chromium. Tiny random-init models of
the real classes (a tiny ``final/`` built as test_generate builds it), real sample song and
photo."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

try:
    from gradio_client import Client, handle_file
except ModuleNotFoundError:  # the app extra; `just test` installs it, CI must have it
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise
    pytest.skip("the app extra is not installed (bash scripts/setup.sh app; just test does it)",
                allow_module_level=True)

from dwm.generate import app as A
from dwm.generate.pipeline import DanceSettings
from dwm.shared import config as C
from dwm.shared import media
from dwm.shared.errors import UserFacingError
from chromium import Chromium
from test_generate import build_tiny_final

FPS = 24.0
SECONDS = 0.5  # 12 frames: one denoising window
BEAT = A.BEAT_TRACKS[1][0]


def app_config(ckpt: Path, models: C.ModelsConfig) -> C.AppConfig:
    return C.AppConfig(ckpt=str(ckpt), port=0, seed=42, fps=FPS, resolution="64x128", steps=1,
                       window=12, overlap=4, max_seconds=SECONDS, models=models)


@pytest.fixture(scope="module")
def video_app(tiny_models_cfg, tmp_path_factory):
    ckpt = build_tiny_final(tiny_models_cfg, tmp_path_factory.mktemp("app_ckpt") / "final")
    running = A.start(app_config(ckpt, tiny_models_cfg))
    yield running
    running.close()


@pytest.fixture(scope="module")
def stage_a_app(tiny_models_cfg, tmp_path_factory):
    ckpt = build_tiny_final(tiny_models_cfg, tmp_path_factory.mktemp("app_ckpt_a") / "final",
                            video=False)
    running = A.start(app_config(ckpt, tiny_models_cfg))
    yield running
    running.close()


def client_for(running: A.RunningApp, tmp_path: Path) -> Client:
    return Client(running.url, download_files=str(tmp_path), verbose=False)


def dance(client: Client, photo, song=None, beat=BEAT, seed=7, seconds=SECONDS):
    """The page's Dance button: (preview, poses, video, message) after each step."""
    job = client.submit(handle_file(str(photo)), handle_file(str(song)) if song else None, beat,
                        seed, 25, seconds, True, api_name="/dance")
    job.result(timeout=300)
    return job.outputs()


def streams(path: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {"video": [], "audio": []}
    for s in media.probe(path)["streams"]:
        out.setdefault(s["codec_type"], []).append(s)
    return out


def video_path(value) -> str | None:
    """gradio_client gives a Video output as a path, or as {"video": path, ...}."""
    return value.get("video") if isinstance(value, dict) else value


def cli_sentence(running: A.RunningApp, music, photo) -> str:
    """What ``dwm generate`` prints for these files (after ``dwm generate: error:``)."""
    with pytest.raises(UserFacingError) as e:
        running.app.pipe(str(music), str(photo), dataclasses.replace(running.app.base))
    return str(e.value)


# ---------------------------------------------------------------------------------------------
def test_page_controls_become_pipeline_settings():
    base = DanceSettings(resolution="64x128", steps=3)
    s = A.dance_settings(base, A.Controls(seed=9, pose_steps=5, max_seconds=2.5,
                                          start_from_photo=False))
    assert (s.seed, s.max_seconds, s.resolution, s.steps) == (9, 2.5, "64x128", 3)
    fields = DanceSettings.__dataclass_fields__
    # a control whose setting the pipeline lacks is not passed (and shows greyed out)
    for control, field in A.CONTROL_FIELDS.items():
        assert A.control_is_used(control) == (field in fields)
    if "pose_steps" in fields:
        assert s.pose_steps == 5
    if "start_from_reference" in fields:
        assert s.start_from_reference is False


def test_run_shows_the_preview_first_then_the_video(video_app, dance_face, music_ogg,
                                                    tmp_path):
    assert video_app.url.startswith("http://127.0.0.1:")  # this machine only, by default
    outputs = dance(client_for(video_app, tmp_path), dance_face, music_ogg)
    assert len(outputs) == 2
    (preview, poses, video, message), last = outputs
    assert video is None and message.startswith("Preview after")
    s = streams(video_path(preview))  # the skeleton over the photo, with the song
    assert len(s["video"]) == 1 and len(s["audio"]) == 1
    assert (s["video"][0]["width"], s["video"][0]["height"]) == (64, 128)
    doc = json.loads(Path(poses).read_text())
    assert doc["layout"] == "openpose_18" and doc["num_frames"] == int(SECONDS * FPS)
    assert doc["seed"] == 7 and len(doc["frames"][0]) == 18
    # the files as the person named them, not the server's upload folders
    assert (doc["reference_image"], doc["music"]) == (dance_face.name, music_ogg.name)
    assert last[3].startswith("Done: 12 frames")
    s = streams(video_path(last[2]))
    assert len(s["video"]) == 1 and len(s["audio"]) == 1
    assert s["video"][0]["num_frames"] == int(SECONDS * FPS)


def test_bad_input_shows_the_cli_sentence_and_the_next_request_works(
        stage_a_app, dance_face, music_ogg, tmp_path):
    client = client_for(stage_a_app, tmp_path)
    wall = tmp_path / "wall.png"
    media.write_image(wall, np.full((300, 200, 3), 128, np.uint8))
    cases = [  # (photo, song): a photo without a person, a song as the photo, a photo as song
        (wall, music_ogg), (music_ogg, music_ogg), (dance_face, wall)]
    for photo, song in cases:
        outputs = dance(client, photo, song)
        assert len(outputs) == 1
        preview, poses, video, message = outputs[0]
        assert preview is None and poses is None and video is None
        # the CLI's sentence, with the upload's name where the CLI names the path
        expected = cli_sentence(stage_a_app, song, photo)
        for path in (photo, song):
            expected = expected.replace(str(path), Path(path).name)
        assert message == f"Error: {expected}" and "\n" not in message
    assert "no person found" in cli_sentence(stage_a_app, music_ogg, wall)
    # uploads land in the server's temporary folder (deleted when it stops)
    assert list(stage_a_app.upload_dir.rglob("wall.png"))

    # the server goes on serving: a stage-A checkpoint gives the preview and the poses
    outputs = dance(client, dance_face, None, seed=3)
    preview, poses, video, message = outputs[-1]
    assert video is None and "needs stages B and C" in message
    assert streams(video_path(preview))["video"]
    assert json.loads(Path(poses).read_text())["seed"] == 3


def test_server_stops_and_deletes_its_temporary_folder(tiny_models_cfg, tmp_path):
    ckpt = build_tiny_final(tiny_models_cfg, tmp_path / "final", video=False)
    running = A.start(app_config(ckpt, tiny_models_cfg))
    assert (running.work_dir / "beats").is_dir()
    assert running.work_dir.parent == running.upload_dir  # results are served from there
    running.close()
    assert not running.work_dir.exists()
    with pytest.raises(Exception):
        Client(running.url, verbose=False)


def test_the_last_server_to_stop_deletes_the_uploads():
    uploads = A.UploadFolder()  # what the servers of one process share
    before = os.environ.get("GRADIO_TEMP_DIR")
    folder = uploads.acquire()
    assert uploads.acquire() == folder and os.environ["GRADIO_TEMP_DIR"] == str(folder)
    (folder / "photo.png").write_bytes(b"an upload")
    uploads.release()
    assert folder.is_dir()  # one server still runs
    uploads.release()
    assert not folder.exists() and os.environ.get("GRADIO_TEMP_DIR") == before


# ---------------------------------------------------------------------------------------------
# the page in a real browser
# ---------------------------------------------------------------------------------------------
def text_of(selector: str) -> str:
    return f"(document.querySelector({json.dumps(selector)}) || {{innerText: ''}}).innerText"


def test_page_in_headless_chromium_uploads_dances_and_shows_both_videos(
        video_app, dance_face, music_ogg, tmp_path):
    browser = Chromium(tmp_path / "profile")
    try:
        browser.open(video_app.url)
        # the upload widgets (the photo's and the song's file inputs) and the buttons
        browser.wait_for("document.querySelectorAll('input[type=file]').length == 2 && "
                         "!!document.querySelector('#dance') && "
                         "!!document.querySelector('#another-seed')")
        page = browser.wait_for("document.body.innerText.includes('Another seed') && "
                                "document.body.innerText")
        for text in ("Photo of the dancer", "Song (wav", "bundled beat track", "Seed",
                     "Pose steps", "Length (seconds)", "Start from the photo", "Dance"):
            assert text in page, text
        browser.upload("#photo input[type=file]", dance_face)
        browser.upload("#song input[type=file]", music_ogg)
        browser.wait_for(f"{text_of('#song')}.includes('{music_ogg.name}')")
        browser.js("document.querySelector('#dance').click()")
        status = browser.wait_for(f"{text_of('#status')}.includes('Preview') && "
                                  f"{text_of('#status')}", timeout=120)
        assert "Rendering the video" in status
        status = browser.wait_for(f"{text_of('#status')}.includes('Done') && "
                                  f"{text_of('#status')}", timeout=240)
        assert status.startswith("Done: 12 frames")
        assert browser.js("document.querySelectorAll('video').length") == 2
        assert browser.js("document.querySelector('#poses').innerHTML.includes('dance_poses')")
        # "Another seed": the next seed, the same photo and song
        browser.js("document.querySelector('#another-seed').click()")
        status = browser.wait_for(f"{text_of('#status')}.includes('seed 43') && "
                                  f"{text_of('#status')}", timeout=240)
        assert status.startswith("Done: 12 frames")
        time.sleep(1.0)  # the videos' first frames
        shot = browser.screenshot(tmp_path / "app_screenshot.png")
    finally:
        browser.close()
    image = media.read_image(shot)
    assert image.shape[2] == 3 and image.shape[1] >= 1200 and image.std() > 5
    print(f"screenshot: {shot}")  # kept with pytest's temporary folders
    # the README's screenshot: DWM_APP_SCREENSHOT=docs/app_screenshot.png pytest -k chromium
    if os.environ.get("DWM_APP_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["DWM_APP_SCREENSHOT"])
