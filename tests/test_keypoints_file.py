"""``pose.backend=file``: keypoints from ``<video stem>.keypoints.json`` through the real
``dwm preprocess`` command (tiny profile, 64x112): good sidecars (OpenPose-18 at the video's
frame rate, COCO-WholeBody-133 at another) land in the shards as written (mapped, scaled to the
decode size, resampled by time); broken ones fail their video with a one-line reason and the
others go on; editing a sidecar recomputes the pose only."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dwm.datasets import iter_tar_samples
from dwm.generate.pipeline import locate_reference
from dwm.preprocess.extractors import keypoints_file as K
from dwm.preprocess.extractors.pose import COCO_TO_OPENPOSE
from dwm.shared import media
from dwm.shared.config import build_preprocess_config
from dwm.shared.errors import UserFacingError
from dwm.shared.shards import decode_sample, load_manifest
from dwm.shared.synthetic import (AUDIO_SR, beat_track, choreography, make_demo_reference,
                                  render_frame)

W, H, FPS, SECONDS = 128, 224, 24.0, 2.0  # decode 64x112 = exactly half: the crop is the frame
N = int(SECONDS * FPS)
ARGS = ["profile=tiny", "pose.backend=file", "decode.width=64", "decode.height=112",
        "decode.segment_frames=24", "decode.min_frames=8", "workers=1",
        "extractors=audio,pose,face,thumbs"]


def _pixels(fps: float, seed: int) -> np.ndarray:
    """(T, 18, 3) choreography keypoints in pixels of the W x H video."""
    c = choreography(SECONDS, bpm=120, fps=fps, width=W, height=H, centre=(0.5, 0.5),
                     scale=0.55, seed=seed)
    return c.keypoints * np.array([W, H, 1.0], np.float32)


def _video(path: Path, seed: int) -> None:
    body = _pixels(FPS, seed)
    wav = path.with_suffix(".wav")
    sf.write(wav, beat_track(SECONDS, 120, seed=seed), AUDIO_SR)
    media.write_video(path, (render_frame(b[:, :2], W, H) for b in body), FPS, audio=wav,
                      preset="ultrafast")
    wav.unlink()


def _doc(layout: str, fps: float, frames) -> dict:
    return {"layout": layout, "fps": fps, "width": W, "height": H, "frames": frames}


def _wholebody(body18: np.ndarray) -> np.ndarray:
    """(T, 18, 3) -> (T, 133, 3) COCO-WholeBody: the body where COCO has it, face and hand
    points on a line below the nose (so the face mapping is checked too)."""
    t = len(body18)
    wb = np.zeros((t, 133, 3), np.float32)
    for j, c in enumerate(COCO_TO_OPENPOSE):
        if c >= 0:
            wb[:, c] = body18[:, j]
    wb[:, 23:133, 0] = body18[:, :1, 0] + np.linspace(-8, 8, 110)[None]
    wb[:, 23:133, 1] = body18[:, :1, 1] + 4
    wb[:, 23:133, 2] = 0.9
    return wb


def _write(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("kp_videos")
    for i, name in enumerate(("good18", "good133", "missing", "short", "layout")):
        _video(d / f"{name}.mp4", seed=i)
    _write(d / "good18.keypoints.json", _doc("openpose_18", FPS, _pixels(FPS, 0).tolist()))
    body30 = _pixels(30.0, 1)  # the same dance sampled at 30 fps: the file's own frame rate
    frames = _wholebody(body30).tolist()
    frames[5] = None  # nobody in keypoint frame 5
    _write(d / "good133.keypoints.json", _doc("coco_wholebody_133", 30.0, frames))
    _write(d / "short.keypoints.json", _doc("openpose_18", FPS, _pixels(FPS, 3)[:20].tolist()))
    _write(d / "layout.keypoints.json", _doc("openpose_25", FPS, _pixels(FPS, 4).tolist()))
    return d


def _preprocess(videos: Path, out: Path, models_dir: str) -> dict:
    env = {**os.environ, "DWM_PROGRESS": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "dwm.shared.cli", "preprocess", str(videos),
                          f"out={out}", f"models.models_dir={models_dir}", *ARGS],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


def _poses(out: Path) -> dict[str, dict[str, np.ndarray]]:
    """source -> {body, face, heatmap} over the whole video (segments in order)."""
    parts: dict[str, list] = {}
    for s in load_manifest(str(out / "manifest.json"))["shards"]:
        for raw in iter_tar_samples(s["url"]):
            arrays = decode_sample(raw)  # members as the contract encodes them
            meta = arrays["json"]
            parts.setdefault(meta["source"], []).append(
                (meta["start_frame"], {k: arrays[f"pose_{k}"] for k in ("body", "face", "heatmap")}))
    return {src: {k: np.concatenate([p[k] for _, p in sorted(v, key=lambda e: e[0])])
                  for k in ("body", "face", "heatmap")} for src, v in parts.items()}


@pytest.fixture(scope="module")
def first_run(corpus, tiny_models_cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("kp_out")
    return out, _preprocess(corpus, out, tiny_models_cfg.models_dir)


def test_broken_sidecars_fail_their_video_with_one_line(first_run):
    _, report = first_run
    rows = {r["path"]: r for r in report["videos"]}
    assert set(rows) == {f"{n}.mp4" for n in ("good18", "good133", "missing", "short", "layout")}
    assert report["counts"] == {"ok": 2, "skipped": 0, "failed": 3}
    expect = {"missing.mp4": ("missing.keypoints.json", "keypoints file missing"),
              "short.mp4": ("short.keypoints.json", "wrong frame count"),
              "layout.mp4": ("layout.keypoints.json", "layout openpose_25 has 25")}
    for video, (file, words) in expect.items():
        r = rows[video]
        assert r["status"] == "failed", r
        assert file in r["reason"] and words in r["reason"], r["reason"]
        assert "\n" not in r["reason"] and "Traceback" not in r["reason"]
    assert "20 frames at 24 fps" in rows["short.mp4"]["reason"]
    for video in ("good18.mp4", "good133.mp4"):
        assert rows[video]["status"] == "ok" and rows[video]["person_fraction"] > 0.9
    # the pose read the files: nothing was decoded for it (the frame pass decodes once)
    assert report["decoded_frames"] == 2 * N


def test_shard_poses_equal_the_files(first_run):
    out, _ = first_run
    poses = _poses(out)
    assert set(poses) == {"good18.mp4", "good133.mp4"}
    scale = np.array([1 / W, 1 / H], np.float32)  # pixels of W x H -> [0, 1] of the 64x112 crop

    got = poses["good18.mp4"]["body"]
    want = _pixels(FPS, 0)
    assert got.shape == (N, 18, 3)
    np.testing.assert_allclose(got[..., :2], want[..., :2] * scale, atol=1e-4)
    np.testing.assert_allclose(got[..., 2], want[..., 2], atol=1e-6)
    # heatmaps rendered at the joints (latent grid 8 x 14)
    hm = poses["good18.mp4"]["heatmap"]
    f, j = 10, 4
    y, x = np.unravel_index(np.argmax(hm[f, j]), hm[f, j].shape)
    assert hm[f, j].max() > 100
    assert abs((x + 0.5) / 8 - got[f, j, 0]) <= 1 / 8 and abs((y + 0.5) / 14 - got[f, j, 1]) <= 1 / 14

    # 30 fps WholeBody file, 24 fps decode: frame i shows keypoint frame floor(i * 30 / 24)
    got = poses["good133.mp4"]
    wb = _wholebody(_pixels(30.0, 1))
    k = np.floor(np.arange(N) * 30 / 24 + 1e-6).astype(int)
    src = wb[k]
    want = np.zeros((N, 18, 3), np.float32)
    for j, c in enumerate(COCO_TO_OPENPOSE):
        if c >= 0:
            want[:, j] = src[:, c]
    want[:, 1, :2] = (src[:, 5, :2] + src[:, 6, :2]) / 2  # neck = mean of the shoulders
    want[:, 1, 2] = np.minimum(src[:, 5, 2], src[:, 6, 2])
    none = k == 5  # keypoint frame 5 is null: nobody
    want[none] = 0
    np.testing.assert_allclose(got["body"][..., :2], want[..., :2] * scale, atol=1e-4)
    np.testing.assert_allclose(got["body"][..., 2], want[..., 2], atol=1e-6)
    face = src[:, 23:91].copy()
    face[none] = 0
    np.testing.assert_allclose(got["face"][..., :2], face[..., :2] * scale, atol=1e-4)
    assert none.any() and (got["heatmap"][none] == 0).all()


def test_editing_a_sidecar_recomputes_only_its_pose(corpus, first_run, tiny_models_cfg,
                                                    tmp_path_factory):
    out, report1 = first_run
    edited = tmp_path_factory.mktemp("kp_edited")
    for p in corpus.iterdir():
        os.link(p, edited / p.name)
    (edited / "good18.keypoints.json").unlink()
    body = _pixels(FPS, 0)
    body[:, 4, 0] += 3.0  # the right wrist 3 px to the right in every frame
    _write(edited / "good18.keypoints.json", _doc("openpose_18", FPS, body.tolist()))

    report2 = _preprocess(edited, out, tiny_models_cfg.models_dir)  # same out, same cache
    rows = {r["path"]: r for r in report2["videos"]}
    assert report2["counts"] == report1["counts"]
    calls = rows["good18.mp4"]["extractor_calls"]
    assert calls["pose"] > 0 and calls["audio"] == calls["face"] == calls["thumbs"] == 0, calls
    assert all(n == 0 for n in rows["good133.mp4"]["extractor_calls"].values())
    assert report2["decoded_frames"] == 0  # the crop did not move: no frame extractor ran
    old = {r["path"]: r for r in report1["videos"]}
    assert rows["good18.mp4"]["keys"]["pose"] != old["good18.mp4"]["keys"]["pose"]
    for name in ("audio", "face", "thumbs"):
        assert rows["good18.mp4"]["keys"][name] == old["good18.mp4"]["keys"][name]
    got = _poses(out)["good18.mp4"]["body"]
    np.testing.assert_allclose(got[:, 4, 0], body[:, 4, 0] / W, atol=1e-4)


def test_sidecar_forms_and_one_line_errors(tmp_path):
    """The accepted forms (triples, OpenPose's flat list, null, score 0 / NaN = missing) and the
    reasons of bad files, each naming the file."""
    path = tmp_path / "v.keypoints.json"
    body = _pixels(FPS, 0)[:3]
    flat = body[1].reshape(-1).tolist()
    flat[0] = float("nan")  # json writes NaN; a non-finite point is missing
    _write(path, _doc("openpose_18", FPS, [body[0].tolist(), flat, None]))
    kp = K.load(path)
    assert kp.points.shape == (3, 18, 3) and kp.present.tolist() == [True, True, False]
    np.testing.assert_allclose(kp.points[0], body[0], atol=1e-4)
    assert (kp.points[1, 0] == 0).all() and kp.points[1, 1, 2] > 0
    K.check_fits(kp, 3, FPS, 64, 112)  # same aspect at another size is fine
    K.check_fits(kp, 4, FPS, 64, 112)  # one frame short: container round-off
    bad = {
        "not json": ("{", "not valid JSON"),
        "layout": (_doc("body_17", FPS, [body[0].tolist()]), "layout 'body_17' is not one of"),
        "fps": (_doc("openpose_18", 0, [body[0].tolist()]), "'fps' must be a positive number"),
        "pairs": (_doc("openpose_18", FPS, [body[0, :, :2].tolist()]), "must be [x, y, score]"),
        "strings": (_doc("openpose_18", FPS, [["a"] * 18]), "frame 0 is not a list"),
        "no frames": (_doc("openpose_18", FPS, []), "'frames' must be a non-empty list"),
        "wholebody": (_doc("coco_wholebody_133", FPS, [body[0].tolist()]),
                      "frame 0 has 18 points; layout coco_wholebody_133 has 133"),
    }
    for what, (doc, words) in bad.items():
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        with pytest.raises(K.KeypointsFileError) as e:
            K.load(path)
        assert str(path) in str(e.value) and words in str(e.value), (what, str(e.value))
        assert "\n" not in str(e.value)
    _write(path, _doc("openpose_18", FPS, [body[0].tolist()] * 3))
    with pytest.raises(K.KeypointsFileError, match="another aspect ratio"):
        K.check_fits(K.load(path), 3, FPS, 112, 64)
    with pytest.raises(K.KeypointsFileError, match="missing"):
        K.file_digest(tmp_path / "nothing.keypoints.json")


def test_generate_locates_the_photo_from_its_sidecar(tmp_path, tiny_models_cfg):
    """A model trained on keypoints files finds the person in the photo the same way: from
    ``<photo stem>.keypoints.json``; without one, one line says what to do."""
    photo, pose = make_demo_reference(tmp_path / "me.png", 128, 256)
    pcfg = build_preprocess_config(["profile=tiny", "pose.backend=file"])
    pcfg.models = dataclasses.replace(tiny_models_cfg)
    ref = locate_reference(str(photo), 128, 256, pcfg)
    assert ref.crop_box == (0, 0, 128, 256)
    np.testing.assert_allclose(ref.body[:, :2], pose[:, :2], atol=1e-3)
    (tmp_path / "me.keypoints.json").unlink()
    with pytest.raises(UserFacingError, match="me.keypoints.json: keypoints file missing"):
        locate_reference(str(photo), 128, 256, pcfg)
