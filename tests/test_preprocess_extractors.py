"""Extractors one by one: real TAESD latents and real decode on the sample video, tempo of the real
music, the DWpose / insightface code paths on the tiny profile's stand-in ONNX files, the main-dancer
tracker, and the bad inputs the fault corpus does not cover (no person, too few frames,
cover art only)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess

import cv2
import numpy as np
import pytest

from dwm.shared import contract
from dwm.shared.config import build_preprocess_config


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


@pytest.fixture(scope="module")
def few_frames(dance_video):
    """The first 4 frames of the real video at 256x448, through the project's decode path."""
    from dwm.preprocess.decode import SegmentReader, centre_crop_box, crop, make_plan
    from dwm.preprocess.probe import probe_file

    cfg = build_preprocess_config(["profile=tiny", "decode.width=256", "decode.height=448",
                                   "decode.segment_frames=4", "decode.min_frames=4",
                                   "decode.max_seconds=0.17"])
    probe = probe_file(str(dance_video))
    plan = make_plan(probe, cfg.decode)
    frames = SegmentReader(str(dance_video), probe, plan).read(0, 4)
    x0, y0 = centre_crop_box(plan)
    return probe, plan, frames, crop(frames, x0, y0, 256, 448)


def test_decode_keeps_aspect_ratio(few_frames, dance_video):
    probe, plan, frames, cropped = few_frames
    assert (probe.orig_width, probe.orig_height, probe.orig_fps) == (1080, 1920, 24.0)
    assert probe.has_audio and probe.rotation == 0
    dh = plan.decode_height
    assert dh in (455, 456)  # 1920 * 256 / 1080 = 455.1: aspect kept, then a 448-row crop
    assert frames.shape == (4, dh, 256, 3) and cropped.shape == (4, 448, 256, 3)
    # the same frame resized by OpenCV with the aspect kept, then centre-cropped
    cap = cv2.VideoCapture(str(dance_video))
    ok, bgr = cap.read()
    assert ok
    y0 = (dh - 448) // 2
    ref = cv2.resize(bgr[:, :, ::-1], (256, dh), interpolation=cv2.INTER_AREA)[y0 : y0 + 448]
    assert _psnr(cropped[0], ref) > 28
    stretched = cv2.resize(bgr[:, :, ::-1], (256, 448), interpolation=cv2.INTER_AREA)
    assert _psnr(cropped[0], stretched) < _psnr(cropped[0], ref) - 3


def test_taesd_latents_decode_back(few_frames, taesd_dir):
    """Real TAESD through the latents extractor: its latents decode back to the frames."""
    from dwm.preprocess.extractors import FrameBatch, VideoContext
    from dwm.preprocess.extractors.latents import LatentExtractor
    from dwm.shared import vae

    *_, cropped = few_frames
    cfg = build_preprocess_config(["profile=full", f"models.vae={taesd_dir}"])
    ext = LatentExtractor(cfg, "cpu")
    ext.reset(VideoContext("x", "x", 4, 24.0, 256, 448))
    idx = np.arange(3)
    out = ext(FrameBatch(cropped[:3], idx, idx, 0))
    assert out["mean"].shape == (3, 4, 56, 32) and out["mean"].dtype == np.float16
    _, attrs = ext.finish()
    assert attrs["vae_class"] == "AutoencoderTiny" and attrs["scaling_factor"] == 1.0
    import torch

    img = vae.decode_latents(ext.vae, torch.from_numpy(out["mean"].astype(np.float32)))
    rec = (img.permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    psnrs = [_psnr(r, c) for r, c in zip(rec, cropped[:3])]
    assert min(psnrs) >= 25, psnrs


def test_tempo_and_audio_features_of_the_real_music(dance_video):
    from dwm.preprocess.extractors import VideoContext
    from dwm.preprocess.extractors.audio import AudioBatch, AudioExtractor

    cfg = build_preprocess_config(["profile=tiny"])
    ext = AudioExtractor(cfg)
    ext.reset(VideoContext("x", str(dance_video), 288, 24.0, 256, 448))
    out = ext(AudioBatch(str(dance_video)))
    attrs = out["_attrs"]
    assert abs(attrs["tempo"] - 117) <= 4, attrs["tempo"]
    assert out["mel"].shape == (288, 80) and out["baseline"].shape == (288, 35)
    assert np.isfinite(out["mel"].astype(np.float32)).all()
    beats = out["baseline"][:, 34].astype(np.float32)
    assert set(np.unique(beats)) <= {0.0, 1.0}
    assert abs(beats.sum() - 12 * 117 / 60) <= 4  # about one beat per 0.51 s
    assert np.flatnonzero(beats).tolist() == attrs["beat_frames"]
    # beat frames are about one beat period apart (24 fps * 60 / 117 = 12.3 frames)
    gaps = np.diff(attrs["beat_frames"])
    assert abs(np.median(gaps) - 24 * 60 / 117) <= 1.5


def test_dwpose_path_on_stand_in_onnx(few_frames, tiny_models_cfg):
    from dwm.preprocess.extractors import FrameBatch, VideoContext
    from dwm.preprocess.extractors.pose import PoseExtractor

    _, plan, frames, _ = few_frames
    cfg = build_preprocess_config(["profile=tiny", "pose.backend=dwpose"])
    cfg.models = dataclasses.replace(tiny_models_cfg)
    ext = PoseExtractor(cfg, "cpu")
    ext.reset(VideoContext("x", "x", 4, 24.0, plan.decode_width, plan.decode_height))
    idx = np.arange(4)
    out = ext(FrameBatch(frames, idx, idx, 0))
    assert out["body"].shape == (4, 18, 3) and out["hands"].shape == (4, 42, 3)
    assert out["face"].shape == (4, 68, 3) and out["found"].shape == (4,)
    assert np.isfinite(out["body"]).all() and ext.calls == 1


def test_wholebody_and_blazepose_mapping():
    from dwm.preprocess.extractors.pose import blaze_to_person, wholebody_to_person

    k = np.zeros((133, 2), np.float32)
    k[:, 0] = np.arange(133)
    s = np.ones(133, np.float32)
    k[5], k[6] = (10, 20), (30, 40)  # left / right shoulder
    p = wholebody_to_person(k, s)
    assert p["body"][1, :2].tolist() == [20, 30]  # neck = mean of shoulders
    assert p["body"][2, 0] == k[6, 0] and p["body"][5, 0] == k[5, 0]  # r/l shoulders
    assert p["body"][0, 0] == 0 and p["body"][14, 0] == 2 and p["body"][17, 0] == 3
    assert p["face"][0, 0] == 23 and p["hands"][0, 0] == 91 and p["hands"][21, 0] == 112
    lm = np.zeros((33, 4), np.float32)
    lm[:, 0] = np.arange(33) / 100
    lm[:, 3] = 1
    b = blaze_to_person(lm, 100, 100)
    assert round(float(b["body"][2, 0])) == 12 and round(float(b["body"][11, 0])) == 23
    assert round(float(b["body"][1, 0])) == round((11 + 12) / 2)
    assert (b["face"][:, 2] > 0).sum() == 7 and (b["hands"][:, 2] > 0).sum() == 8


def test_tracker_picks_and_follows_the_main_dancer():
    from dwm.preprocess.extractors.pose import MainDancerTracker

    def person(x0, y0, x1, y1):
        body = np.zeros((18, 3), np.float32)
        body[:, 0] = np.linspace(x0, x1, 18)
        body[:, 1] = np.linspace(y0, y1, 18)
        body[:, 2] = 1
        return {"body": body, "hands": np.zeros((42, 3)), "face": np.zeros((68, 3)),
                "box": np.array([x0, y0, x1, y1], np.float32)}

    tr = MainDancerTracker(200, 400, 24.0, 0.3)
    small_side = person(0, 0, 30, 80)
    big_centre = person(60, 80, 140, 380)
    assert tr.update([small_side, big_centre]) is big_centre
    # the dancer moves a little; a bigger person appears far away: keep following the dancer
    moved = person(70, 80, 150, 380)
    intruder = person(0, 0, 60, 399)
    intruder["box"] = np.array([0, 0, 60, 399], np.float32)
    assert tr.update([intruder, moved]) is moved
    assert tr.update([]) is None


def test_insightface_path_on_stand_in_onnx(few_frames, tiny_models_cfg):
    from dwm.preprocess.extractors import FrameBatch, VideoContext
    from dwm.preprocess.extractors.face import FaceExtractor

    *_, cropped = few_frames
    cfg = build_preprocess_config(["profile=tiny"])
    cfg.models = dataclasses.replace(tiny_models_cfg)
    ctx = VideoContext("x", "x", 4, 24.0, 256, 448)
    ext = FaceExtractor(cfg, "cpu")
    ext.reset(ctx)
    idx = np.arange(4)
    out = ext(FrameBatch(cropped, idx, idx, 0))
    assert out["mask"].shape == (4, 56, 32) and out["mask_full"].shape == (4, 448, 256)
    assert out["crop"].shape == (4, 112, 112, 3) and out["embed"].shape == (4, 512)
    for i in range(4):
        assert not (out["mask"][i] == 255).all() and not (out["mask_full"][i] == 255).all()
        assert (out["mask"][i].max() > 0) == bool(out["present"][i])
        if out["detected"][i]:
            assert abs(np.linalg.norm(out["embed"][i].astype(np.float32)) - 1) < 1e-2
        else:
            assert not out["embed"][i].any() and not out["crop"][i].any()
    ref, _ = ext.finish()
    assert ref["ref_embed"].shape == (512,)

    # detector off (threshold above 1): the mask comes from the pose face points, else nothing
    cfg.face.det_threshold = 1.01
    ext = FaceExtractor(cfg, "cpu")
    ext.reset(ctx)
    body = np.zeros((4, 18, 3), np.float32)
    face = np.zeros((4, 68, 3), np.float32)
    face[:2, 30] = (0.5, 0.2, 0.9)  # nose tip, eye corners, mouth corners on frames 0 and 1
    face[:2, 36], face[:2, 45] = (0.45, 0.18, 0.9), (0.55, 0.18, 0.9)
    face[:2, 48], face[:2, 54] = (0.47, 0.24, 0.9), (0.53, 0.24, 0.9)
    out = ext(FrameBatch(cropped, idx, idx, 0, {"pose_body": body, "pose_face": face}))
    assert out["present"].tolist() == [True, True, False, False]
    assert not out["detected"].any() and not out["embed"].any()
    m = out["mask"][0].astype(np.float32) / 255
    ys, xs = np.nonzero(m > 0.5)
    assert abs(xs.mean() / 32 - 0.5) < 0.1 and abs(ys.mean() / 56 - 0.21) < 0.1
    assert not out["mask"][2:].any() and not out["mask_full"][2:].any()
    ref, _ = ext.finish()
    assert not ref["ref_embed"].any()


def _clip(src, dst, *args):
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args, "-i", str(src), "-t", "1",
                    "-vf", "scale=144:256", "-c:v", "libx264", "-preset", "ultrafast",
                    "-threads", "1", "-c:a", "aac", str(dst)], check=True)


def test_inputs_without_a_dancer_or_frames(tmp_path, dance_video, music_ogg, tiny_models_cfg):
    """no person (mediapipe finds nobody), too few frames, an .ogg with cover art named like a
    video: each skipped with its reason; the good clip completes."""
    from dwm.preprocess.run import main

    vids = tmp_path / "videos"
    vids.mkdir()
    _clip(dance_video, vids / "good.mp4")
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    "color=c=gray:s=144x256:r=24:d=1", "-c:v", "libx264", "-preset", "ultrafast",
                    str(vids / "empty_stage.mp4")], check=True)
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(dance_video), "-t", "0.2",
                    "-c:v", "libx264", "-preset", "ultrafast", "-vf", "scale=144:256",
                    str(vids / "blink.mp4")], check=True)
    shutil.copy(music_ogg, vids / "song_with_cover.mkv")
    # landscape, the dancer in the left third: a centre crop would miss her
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(dance_video), "-t", "1",
                    "-vf", "scale=-2:360,pad=640:360:0:0", "-c:v", "libx264", "-preset",
                    "ultrafast", "-an", str(vids / "offcentre.mp4")], check=True)
    out = tmp_path / "out"
    cfg = build_preprocess_config([
        f"input_dir={vids}", f"out={out}", "profile=tiny", "pose.backend=mediapipe",
        "decode.width=128", "decode.height=224", "decode.segment_frames=24", "decode.min_frames=8",
        "extractors=pose,thumbs"])
    cfg.models = dataclasses.replace(tiny_models_cfg)
    assert main(cfg) == 0
    rows = {r["path"]: r for r in json.loads((out / "report.json").read_text())["videos"]}
    assert rows["good.mp4"]["status"] == "ok"
    assert rows["empty_stage.mp4"]["status"] == "skipped"
    assert "empty_stage.mp4" in rows["empty_stage.mp4"]["reason"]
    assert "no person" in rows["empty_stage.mp4"]["reason"]
    assert rows["blink.mp4"]["status"] == "skipped"
    assert "too few frames" in rows["blink.mp4"]["reason"] and "blink.mp4" in rows["blink.mp4"]["reason"]
    r = rows["song_with_cover.mkv"]
    assert r["status"] == "skipped" and "cover art" in r["reason"] and "song_with_cover" in r["reason"]
    # the crop follows the dancer: decoded at 398x224, she is in x 0..126; centre would be 135
    off = rows["offcentre.mp4"]
    assert off["status"] == "ok" and off["has_audio"] is False
    assert (off["orig_width"], off["orig_height"]) == (640, 360)
    assert off["crop_boxes"][0][0] < 30 and not any("centre crop" in n for n in off["notes"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 2 and manifest["counts"]["videos_ok"] == 2
    assert set(manifest["splits"]) == {rows["good.mp4"]["hash"], off["hash"]}
    assert contract.SHARD_FORMAT_VERSION == manifest["format_version"]
