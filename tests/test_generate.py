"""``dwm generate``: song + photo -> mp4 with the song, on tiny random-init models of the real
classes (a tiny ``final/`` built here with ``save_pretrained``), real sample song and photo."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dwm.shared import cli, contract, media
from dwm.shared.errors import UserFacingError
from dwm.shared import config as C
from dwm.generate import pipeline as G
from dwm.training import metrics
from fixtures_known_answer import choreo_sample

FPS = 24.0
BONE_ERROR_MAX = 0.5  # mean limb-length error, in units of the photo's mean limb length
SECONDS = 1.0
RESOLUTION = "64x128"  # latent 8x16: the tiny UNet's one downsampling needs even sides


def build_tiny_final(models_cfg: C.ModelsConfig, out: Path, video: bool = True) -> Path:
    """A DanceModel folder like training's final/: tiny M2PEncoder (+ the video model)."""
    from dwm.shared import pretrained
    from dwm.training.models.animator import build_video_components
    from dwm.training.models.dance_model import DanceModel
    from dwm.training.models.m2p import M2PEncoder

    torch.manual_seed(0)
    parts = {"m2p": M2PEncoder.from_size("tiny")}
    if video:
        parts.update(build_video_components(pretrained.load_unet(models_cfg), "tiny"))
        # a fresh pose guider outputs zeros; give it weights so the pose path is exercised
        torch.nn.init.normal_(parts["pose_guider"].proj_out.weight, std=0.02)
    DanceModel(**parts).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_final(tiny_models_cfg, tmp_path_factory) -> Path:
    return build_tiny_final(tiny_models_cfg, tmp_path_factory.mktemp("ckpt") / "final")


@pytest.fixture(scope="session")
def tiny_final_stage_a(tiny_models_cfg, tmp_path_factory) -> Path:
    return build_tiny_final(tiny_models_cfg, tmp_path_factory.mktemp("ckpt_a") / "final",
                            video=False)


@pytest.fixture(scope="session")
def offcentre_dancer(dance_video, tmp_path_factory) -> Path:
    """A photo of the sample dancer's whole body, shrunk to 55% and placed low on the left of a
    plain background: somewhere and at a size no training clip has them."""
    import cv2

    tmp = tmp_path_factory.mktemp("offcentre")
    frame = media.read_image(G.reference_from_video(dance_video, tmp / "frame.png", at=0.3))
    h, w = frame.shape[:2]
    small = cv2.resize(frame, (int(w * 0.55), int(h * 0.55)), interpolation=cv2.INTER_AREA)
    photo = np.full_like(frame, 235)
    y0, x0 = h - small.shape[0] - int(0.05 * h), int(0.04 * w)
    photo[y0 : y0 + small.shape[0], x0 : x0 + small.shape[1]] = small
    return Path(media.write_image(tmp / "offcentre.png", photo))


def _cfg(tiny_models_cfg, **kw) -> C.GenerateConfig:
    cfg = C.GenerateConfig(fps=FPS, max_seconds=SECONDS, resolution=RESOLUTION, steps=2,
                           window=12, overlap=4, quiet=True, models=tiny_models_cfg)
    return C.apply_overrides(cfg, {k: str(v) for k, v in kw.items()})


def _streams(path: Path) -> dict[str, list[dict]]:
    info = media.probe(path)
    out: dict[str, list[dict]] = {"video": [], "audio": []}
    for s in info["streams"]:
        out.setdefault(s["codec_type"], []).append(s)
    return out


# ---------------------------------------------------------------------------------------------
# windows and blending (pure functions)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("total,window,overlap", [(24, 12, 4), (50, 24, 6), (7, 12, 4),
                                                  (100, 10, 9), (31, 8, 0)])
def test_windows_cover_and_crossfade(total, window, overlap):
    starts = G.window_starts(total, window, overlap)
    length = min(window, total)
    assert starts[0] == 0 and starts[-1] + length == total
    w = G.window_weights(total, window, starts)
    cover = np.zeros(total)
    for s, wi in zip(starts, w):
        cover[s : s + length] += wi
    np.testing.assert_allclose(cover, 1.0, atol=1e-6)
    assert (w > 0).all()  # every frame of a window contributes (no hard cut)
    # blending windows that agree reproduces the sequence exactly (no seam artefact)
    seq = torch.arange(total, dtype=torch.float32)[:, None].repeat(1, 3)
    parts = [seq[s : s + length] for s in starts]
    torch.testing.assert_close(G.blend_windows(parts, starts, w, total), seq)


def test_crossfade_is_linear_over_the_shared_frames():
    starts = G.window_starts(20, 12, 4)
    assert starts == [0, 8]
    w = G.window_weights(20, 12, starts)
    np.testing.assert_allclose(w[0, 8:], [0.8, 0.6, 0.4, 0.2], atol=1e-6)
    np.testing.assert_allclose(w[1, :4], [0.2, 0.4, 0.6, 0.8], atol=1e-6)
    np.testing.assert_allclose(w[0, :8], 1.0)


def test_bad_resolution_is_a_config_error():
    with pytest.raises(C.ConfigError, match="resolution"):
        G.parse_resolution("500x900")  # not multiples of 8
    with pytest.raises(C.ConfigError, match="resolution"):
        G.parse_resolution("big")
    assert G.parse_resolution("512x896") == (512, 896)


# ---------------------------------------------------------------------------------------------
# the command, end to end
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def generated(tiny_final, tiny_models_cfg, music_ogg, dance_face, tmp_path_factory):
    """The same generation twice (same seed), into two folders."""
    outs = []
    for name in ("a", "b"):
        out = tmp_path_factory.mktemp(f"gen_{name}") / "dance.mp4"
        cfg = _cfg(tiny_models_cfg, music=music_ogg, ref=dance_face, out=out, ckpt=tiny_final,
                   seed=7)
        assert G.main(cfg) == 0
        outs.append(out)
    return outs


def test_generate_writes_mp4_with_song_and_skeleton(generated):
    out = generated[0]
    streams = _streams(out)
    assert len(streams["video"]) == 1 and len(streams["audio"]) == 1  # the cover art is dropped
    v = streams["video"][0]
    assert (v["width"], v["height"]) == (64, 128)
    assert v["num_frames"] == int(SECONDS * FPS)
    assert abs(v["duration"] - SECONDS) <= 1.0 / FPS
    assert abs(streams["audio"][0]["duration"] - SECONDS) <= 1.0 / FPS
    skel = G.skeleton_path(out)
    assert skel.name == "dance_skeleton.mp4" and skel.is_file()
    s = _streams(skel)
    assert len(s["video"]) == 1 and len(s["audio"]) == 1
    assert abs(s["video"][0]["duration"] - SECONDS) <= 1.0 / FPS
    # the frames are not blank: the decoder produced an image
    frame = subprocess.run(["ffmpeg", "-v", "error", "-i", str(out), "-frames:v", "1", "-f",
                            "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True).stdout
    assert np.frombuffer(frame, np.uint8).std() > 1.0


def test_same_seed_same_bytes_other_seed_differs(generated, tiny_final, tiny_models_cfg,
                                                 music_ogg, dance_face, tmp_path):
    a, b = generated
    assert a.read_bytes() == b.read_bytes()
    assert G.skeleton_path(a).read_bytes() == G.skeleton_path(b).read_bytes()
    out = tmp_path / "other.mp4"
    cfg = _cfg(tiny_models_cfg, music=music_ogg, ref=dance_face, out=out, ckpt=tiny_final,
               seed=8, guidance_scale=1.0)
    assert G.main(cfg) == 0
    assert out.read_bytes() != a.read_bytes()


def test_stage_a_checkpoint_writes_only_the_skeleton(tiny_final_stage_a, tiny_models_cfg,
                                                     music_ogg, dance_face, tmp_path, capsys):
    out = tmp_path / "dance.mp4"
    cfg = _cfg(tiny_models_cfg, music=music_ogg, ref=dance_face, out=out, ckpt=tiny_final_stage_a)
    assert G.main(cfg) == 0
    assert not out.exists()
    assert G.skeleton_path(out).is_file()
    assert "wrote the poses and the skeleton preview" in capsys.readouterr().out
    doc = json.loads(G.poses_path(out).read_text())
    assert doc["layout"] == "openpose_18" and len(doc["joints"]) == 18
    assert len(doc["frames"]) == doc["num_frames"] > 0
    assert all(len(frame) == 18 and len(frame[0]) == 3 for frame in doc["frames"])
    xs = np.array([[j[0] for j in f] for f in doc["frames"]])
    assert 0 <= xs.min() and xs.max() <= doc["width"]  # pixels of the output video


def test_photo_without_person_is_one_clear_line(tiny_final, tiny_models_cfg, music_ogg, tmp_path,
                                                capsys):
    empty = tmp_path / "wall.png"
    media.write_image(empty, np.full((300, 200, 3), 128, np.uint8))
    argv = ["generate", f"music={music_ogg}", f"ref={empty}", f"out={tmp_path / 'x.mp4'}",
            f"ckpt={tiny_final}", "models.profile=tiny",
            f"models.models_dir={tiny_models_cfg.models_dir}", f"resolution={RESOLUTION}",
            "quiet=true"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no person found" in err[0] and str(empty) in err[0]
    assert not (tmp_path / "x.mp4").exists()


def test_missing_inputs_fail_clearly(tiny_final, tiny_models_cfg, dance_face, tmp_path):
    with pytest.raises(UserFacingError, match="music"):
        G.main(_cfg(tiny_models_cfg, ref=dance_face, ckpt=tiny_final))
    with pytest.raises(UserFacingError, match="no such file"):
        G.main(_cfg(tiny_models_cfg, music=tmp_path / "nope.mp3", ref=dance_face,
                    ckpt=tiny_final))
    with pytest.raises(UserFacingError, match="model_index.json"):
        G.main(_cfg(tiny_models_cfg, music=dance_face, ref=dance_face, ckpt=tmp_path))


def test_training_meta_reads_the_engine_info(tmp_path):
    ckpt = tmp_path / "final"
    ckpt.mkdir()
    (ckpt / G.TRAINING_INFO).write_text(json.dumps({
        "stage": "C", "config": {"audio_window": 48, "svd_fps": 9},
        "data_stats": {"audio_mel": {"mean": [1.0], "std": [2.0]}}}))
    meta = G.training_meta(ckpt)
    assert G.train_setting(meta, "audio_window") == 48
    assert G.train_setting(meta, "svd_fps") == 9
    assert G.train_setting(meta, "motion_bucket_id") == C.TrainConfig().motion_bucket_id
    assert meta["norm_stats"]["audio_mel"]["std"] == [2.0]


def test_reference_from_video_saves_a_display_frame(tmp_path):
    from dwm.shared.synthetic import make_dance_clip

    clip = make_dance_clip(tmp_path / "clip.mp4", seconds=0.5, width=96, height=160, audio=False)
    png = G.reference_from_video(clip, tmp_path / "ref.png")
    img = media.read_image(png)
    assert img.shape == (160, 96, 3) and img.std() > 5  # the dancer, not a blank frame
    with pytest.raises(UserFacingError):
        G.reference_from_video(png, tmp_path / "x.png")  # a picture is not a video


# ---------------------------------------------------------------------------------------------
# the dance fits the person in the photo (a stage A trained on the known-answer corpus)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dances_to_the_photo(known_answer_run, offcentre_dancer, tiny_models_cfg):
    """Two seeds' dances of the known-answer model for the person in a real photo, through the
    pipeline's own steps; the music is a beat track of the kind that model learned (the
    real-song path runs in the tests above)."""
    pipe = G.DancePipeline.from_pretrained(known_answer_run.final_dir, models=tiny_models_cfg,
                                           pose_backend="mediapipe", show_progress=False)
    reference = pipe.encode_reference(offcentre_dancer, 256, 448, fps=FPS)
    track = choreo_sample("songc0ffee0123456_0000", "val", np.random.default_rng(5))
    n = track["json"]["num_frames"]
    song = G.SongFeatures(mel=track["audio_mel"].astype(np.float32),
                          baseline=track["audio_baseline"].astype(np.float32),
                          beat_frames=track["json"]["beat_frames"], tempo=120.0, num_frames=n,
                          fps=FPS)
    return [G.DanceOutput(poses=pipe.predict_poses(song, reference, seed=seed, pose_steps=8),
                          reference=reference, song=song, size=(256, 448)) for seed in (0, 1)]


def test_the_dance_starts_from_and_keeps_the_photos_body(dances_to_the_photo):
    """A real full-body photo, the dancer small and low on the left (where no training dancer
    stood): frame 0 is their pose, the dance stays where they stand, in their proportions."""
    neck = contract.BODY_JOINTS.index("neck")
    ref = dances_to_the_photo[0].reference.body
    seen = ref[:, 2] >= 0.3
    assert seen.sum() >= 12 and ref[neck, 0] < 0.45  # mediapipe found the body, on the left
    for out in dances_to_the_photo:
        dance = out.poses.bodies()
        assert np.abs(dance[0, seen, :2] - ref[seen, :2]).max() < 0.05
        consistency = metrics.reference_consistency(dance, ref)
        assert consistency["frame0_distance"] < 0.05
        assert consistency["bone_length_error"] < BONE_ERROR_MAX, consistency
        assert consistency["in_frame"] > 0.95
        assert np.abs(dance[:, neck, :2].mean(0) - ref[neck, :2]).max() < 0.1
        # the training dancers stood near the middle: this dance stays on the photo's left
        assert dance[:, seen, 0].mean() < 0.45
        wrists = [contract.BODY_JOINTS.index(j) for j in ("r_wrist", "l_wrist")]
        assert dance[:, wrists, :2].std(0).mean() > 0.01  # and it dances (not a frozen pose)


def test_two_seeds_dance_two_dances(dances_to_the_photo):
    a, b = (out.poses.coords for out in dances_to_the_photo)
    assert np.abs(a - b).mean() > 0.005
    np.testing.assert_allclose(a[0], b[0])  # both start from the photo's pose
