"""shared/media.py: drawing, deterministic mp4 writing with audio, probing, audio loading."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from dwm.shared import contract, media


def _body(score: float = 1.0) -> np.ndarray:
    """A plausible standing body in [0, 1]."""
    xy = np.array([
        [0.50, 0.10], [0.50, 0.20], [0.40, 0.20], [0.35, 0.35], [0.33, 0.50],
        [0.60, 0.20], [0.65, 0.35], [0.67, 0.50], [0.45, 0.50], [0.45, 0.70],
        [0.45, 0.90], [0.55, 0.50], [0.55, 0.70], [0.55, 0.90], [0.48, 0.08],
        [0.52, 0.08], [0.46, 0.09], [0.54, 0.09],
    ], np.float32)  # fmt: skip
    return np.concatenate([xy, np.full((18, 1), score, np.float32)], axis=1)


def _frames(n: int, w: int, h: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # smooth moving gradient + a little noise: compressible like real video
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for t in range(n):
        base = np.stack([(xx + 3 * t) % 256, (yy + 2 * t) % 256, (xx + yy) % 256], -1)
        out.append(np.clip(base + rng.integers(0, 8, base.shape), 0, 255).astype(np.uint8))
    return out


def _md5(path) -> str:
    return hashlib.md5(open(path, "rb").read()).hexdigest()


# ---- drawing ---------------------------------------------------------------------------------
def test_draw_skeleton_on_black_and_on_image():
    pic = media.draw_skeleton(None, _body(), size=(128, 224))
    assert pic.shape == (224, 128, 3) and pic.dtype == np.uint8
    assert (pic > 0).any(axis=2).mean() > 0.02  # something was drawn
    # the neck joint's pixel carries the neck's OpenPose colour (red channel dominant at j=1)
    x, y = int(0.5 * 128), int(0.2 * 224)
    assert pic[y, x].sum() > 0
    # on an image: the input is not modified, the size follows the image
    img = np.full((100, 60, 3), 40, np.uint8)
    out = media.draw_skeleton(img, _body())
    assert out.shape == img.shape and (img == 40).all() and (out != 40).any()
    # resize to a requested size
    assert media.draw_skeleton(img, _body(), size=(30, 50)).shape == (50, 30, 3)


def test_draw_skeleton_respects_scores_and_colour():
    assert not media.draw_skeleton(None, _body(score=0.1), size=(64, 64), min_score=0.3).any()
    body = _body()
    body[:, 2] = 0.0
    body[1, 2] = body[2, 2] = 1.0  # just the neck -> r_shoulder limb
    pic = media.draw_skeleton(None, body, size=(200, 200), color=(0, 255, 0))
    drawn = pic.any(axis=2)
    assert drawn.any()
    assert (pic[drawn][:, [0, 2]] == 0).all()  # single colour: only green
    ys, xs = np.nonzero(drawn)
    assert xs.min() >= 0.40 * 200 - 6 and xs.max() <= 0.50 * 200 + 6  # only that limb region
    with pytest.raises(ValueError):
        media.draw_skeleton(None, np.zeros((17, 3)), size=(10, 10))
    with pytest.raises(ValueError):
        media.draw_skeleton(None, _body())  # neither image nor size


def test_side_by_side_and_grid():
    pred = _body()
    pred[:, 0] += 0.05
    pic = media.side_by_side(pred, _body(), size=(96, 160))
    assert pic.shape == (160, 3 * 96, 3)
    assert pic[:, :96].any() and pic[:, 96:192].any() and pic[:, 192:].any()
    img = np.full((80, 40, 3), 100, np.uint8)
    assert media.side_by_side(pred, _body(), image=img).shape == (80, 120, 3)

    a = np.full((10, 20, 3), 255, np.uint8)
    b = np.full((14, 8), 128, np.uint8)  # grey, different size
    grid = media.image_grid([a, b, a], cols=2, pad=2)
    assert grid.shape == (14 * 2 + 2, 20 * 2 + 2, 3)
    assert (grid[:10, :20] == 255).all() and (grid[:14, 22:30] == 128).all()
    assert (grid[16:26, :20] == 255).all() and (grid[16:, 22:] == 0).all()
    with pytest.raises(ValueError):
        media.image_grid([], cols=2)


def test_limb_colours_match_contract():
    assert len(media.LIMB_COLORS) == len(contract.BODY_LIMBS)


# ---- video -----------------------------------------------------------------------------------
def test_write_video_deterministic_even_size_and_atomic(tmp_path):
    frames = _frames(12, 63, 101)  # odd size: padded to 64x102
    a = media.write_video(tmp_path / "a.mp4", frames, fps=24)
    b = media.write_video(tmp_path / "b.mp4", iter(frames), fps=24)  # a generator works too
    assert _md5(a) == _md5(b)
    info = media.probe(a)
    assert info["has_video"] and not info["has_audio"]
    assert (info["width"], info["height"]) == (64, 102)
    assert info["fps"] == pytest.approx(24.0)
    assert info["num_frames"] == 12
    assert info["streams"][0]["codec_name"] == "h264"
    # different content -> different bytes (the check above is not vacuous)
    c = media.write_video(tmp_path / "c.mp4", _frames(12, 63, 101, seed=1), fps=24)
    assert _md5(c) != _md5(a)
    # no temporaries left behind
    assert sorted(os.listdir(tmp_path)) == ["a.mp4", "b.mp4", "c.mp4"]


def test_write_video_bad_input_leaves_nothing(tmp_path):
    frames = _frames(3, 32, 32) + [np.zeros((16, 16, 3), np.uint8)]
    with pytest.raises(ValueError, match="frame 3"):
        media.write_video(tmp_path / "bad.mp4", frames, fps=24)
    with pytest.raises(ValueError, match="no frames"):
        media.write_video(tmp_path / "empty.mp4", [], fps=24)
    assert os.listdir(tmp_path) == []
    with pytest.raises(media.MediaError, match="no such file"):
        media.write_video(tmp_path / "x.mp4", _frames(2, 16, 16), fps=24, audio=tmp_path / "no.ogg")


def test_write_video_with_cover_art_ogg_audio(tmp_path, music_ogg):
    frames = _frames(30, 64, 96)
    a = media.write_video(tmp_path / "a.mp4", frames, fps=24, audio=music_ogg, audio_start=10.0)
    b = media.write_video(tmp_path / "b.mp4", frames, fps=24, audio=music_ogg, audio_start=10.0)
    assert _md5(a) == _md5(b)  # deterministic with audio too
    info = media.probe(a)
    kinds = [s["codec_type"] for s in info["streams"]]
    assert kinds == ["video", "audio"]  # the cover art was not copied
    audio_stream = info["streams"][1]
    assert audio_stream["duration"] == pytest.approx(30 / 24, abs=0.05)  # matches the video
    # the audio is the song's, from the offset: loudness matches the source window
    got, sr = media.load_audio(a, sr=16000)
    ref, _ = media.load_audio(music_ogg, sr=16000, start=10.0, duration=30 / 24)
    assert len(got) == pytest.approx(len(ref), abs=0.05 * sr)
    rms = lambda x: float(np.sqrt(np.mean(x**2)))  # noqa: E731
    assert rms(got) == pytest.approx(rms(ref), rel=0.2) and rms(ref) > 0.01


def test_write_video_audio_shorter_than_video_is_padded(tmp_path, music_ogg):
    dur = media.probe(music_ogg)["duration"]
    out = media.write_video(tmp_path / "p.mp4", _frames(24, 32, 32), fps=24, audio=music_ogg,
                            audio_start=dur - 0.5)  # fmt: skip
    info = media.probe(out)
    assert info["streams"][1]["duration"] == pytest.approx(1.0, abs=0.05)
    samples, sr = media.load_audio(out, sr=8000)
    assert np.abs(samples[-sr // 4 :]).max() < 1e-3  # the tail is silence


def test_skeleton_video_with_background(tmp_path):
    poses = np.repeat(_body()[None], 10, axis=0)
    poses[:, :, 0] += np.linspace(0, 0.1, 10)[:, None]
    bgs = _frames(6, 50, 80)  # shorter than the poses: the video stops at 6 frames
    out = media.skeleton_video(tmp_path / "s.mp4", poses, fps=12, size=(64, 96),
                               background_frames=bgs)  # fmt: skip
    info = media.probe(out)
    assert (info["width"], info["height"], info["num_frames"]) == (64, 96, 6)
    assert info["fps"] == pytest.approx(12.0)


# ---- probe / audio ---------------------------------------------------------------------------
def test_probe_and_load_audio_real_files(dance_video, music_ogg):
    v = media.probe(dance_video)
    assert v["has_video"] and v["has_audio"]
    assert (v["width"], v["height"]) == (1080, 1920)
    assert v["fps"] == pytest.approx(24.0) and v["duration"] == pytest.approx(12.0, abs=0.1)
    m = media.probe(music_ogg)
    assert m["has_audio"] and not m["has_video"]  # cover art is not video
    assert any(s["attached_pic"] for s in m["streams"])

    y, sr = media.load_audio(dance_video, sr=16000)  # a video's audio track
    assert sr == 16000 and y.dtype == np.float32 and y.ndim == 1
    assert len(y) == pytest.approx(12.0 * sr, rel=0.02) and np.abs(y).max() > 0.05
    y2, _ = media.load_audio(music_ogg, sr=8000, start=5.0, duration=2.0)
    assert len(y2) == pytest.approx(2.0 * 8000, abs=50) and np.abs(y2).max() > 0.01


def test_errors_name_the_file(tmp_path):
    silent = media.write_video(tmp_path / "silent.mp4", _frames(2, 16, 16), fps=24)
    with pytest.raises(media.MediaError, match="silent.mp4: has no audio stream"):
        media.load_audio(silent)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all")
    with pytest.raises(media.MediaError, match="junk.mp4"):
        media.probe(junk)
    with pytest.raises(media.MediaError, match="no such file"):
        media.load_audio(tmp_path / "missing.wav")


def test_missing_ffmpeg_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no ffmpeg there
    with pytest.raises(media.MediaError, match="ffmpeg was not found"):
        media.write_video(tmp_path / "a.mp4", _frames(2, 16, 16), fps=24)
    with pytest.raises(media.MediaError, match="ffprobe was not found"):
        (tmp_path / "f.mp4").write_bytes(b"x")
        media.probe(tmp_path / "f.mp4")


def test_image_round_trip(tmp_path):
    img = _frames(1, 20, 10)[0]
    p = media.write_image(tmp_path / "x.png", img)
    assert (media.read_image(p) == img).all()
    with pytest.raises(media.MediaError, match="not a readable image"):
        media.read_image(tmp_path / "nope.png")


def test_audio_duration_cuts_the_audio_not_the_video(tmp_path, music_ogg):
    out = media.write_video(tmp_path / "d.mp4", _frames(24, 32, 32), fps=24, audio=music_ogg,
                            audio_start=20.0, audio_duration=0.5)  # fmt: skip
    info = media.probe(out)
    assert info["num_frames"] == 24
    assert info["streams"][1]["duration"] == pytest.approx(1.0, abs=0.05)
    samples, sr = media.load_audio(out, sr=8000)
    assert np.abs(samples[: sr // 3]).max() > 0.01  # music first ...
    assert np.abs(samples[-sr // 3 :]).max() < 1e-3  # ... then silence
