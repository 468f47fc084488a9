"""``dwm eval``: every metric of stages A and B/C on real tiny shards; eval.json, eval.md, plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from dwm.shared import config as C
from dwm.generate import evaluate as E
from dwm.training import metrics as M
from test_generate import build_tiny_final


@pytest.fixture(scope="module")
def manifest_path(sample_dataset) -> str:
    data = Path(getattr(sample_dataset, "manifest", sample_dataset))
    return str(data / "manifest.json" if data.is_dir() else data)


@pytest.fixture(scope="module")
def run_dir(tiny_models_cfg, tmp_path_factory) -> Path:
    """A training output folder: final/ (full DanceModel) and a stage_A/logs TensorBoard log."""
    from torch.utils.tensorboard import SummaryWriter

    root = tmp_path_factory.mktemp("run")
    build_tiny_final(tiny_models_cfg, root / "final")
    for stage in ("A", "C"):
        writer = SummaryWriter(str(root / f"stage_{stage}" / "logs"))
        for step in range(1, 6):
            writer.add_scalar("train/loss", 1.0 / step, step)
        writer.close()
    return root


def _cfg(tiny_models_cfg, **kw) -> C.EvalConfig:
    # seeds=2: the least that measures seed diversity (each seed is a model call)
    cfg = C.EvalConfig(max_samples=4, steps=2, video_samples=1, video_frames=4, seeds=2,
                       guidance_scale=1.0, quiet=True, models=tiny_models_cfg)
    return C.apply_overrides(cfg, {k: str(v) for k, v in kw.items()})


@pytest.fixture(scope="module")
def full_eval(run_dir, manifest_path, tiny_models_cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    assert E.main(_cfg(tiny_models_cfg, ckpt=run_dir / "final", data=manifest_path, out=out)) == 0
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def test_eval_json_is_complete_and_finite(full_eval):
    report = json.loads((full_eval / "eval.json").read_text())
    a = report["stage_a"]
    assert a["predictors"] == list(E.PREDICTORS)
    for name in E.PREDICTORS:
        assert set(a[name]) == set(E.STAGE_A_METRICS), name
    for key in E.STAGE_A_METRICS:  # the model's column has every figure
        assert _is_number(a["model"][key]), f"model {key} = {a['model'][key]}"
    assert _is_number(a["bas_random_beats"]) and a["clips"] >= 2
    assert 0 <= a["model"]["pck@0.1"] <= a["model"]["pck@0.2"] <= 1
    assert 0 <= a["model"]["beat_f1"] <= 1 and 0 <= a["model"]["bas"] <= 1
    assert len(a["per_joint_pck@0.1"]["model"]) == 18
    v = report["video"]
    for key in E.VIDEO_KEYS:
        assert _is_number(v[key]), f"video {key} = {v[key]}"
    assert 0 <= v["ssim"] <= 1 and v["psnr"] > 0 and v["temporal_consistency"] >= 0
    assert -1 <= v["id_similarity"] <= 1
    assert 0 <= v["pose_accuracy@0.1"] <= v["pose_accuracy@0.2"] <= 1
    assert "Bailando" in report["definitions"]["bas"]


def _direct_beat_scores(report, manifest_path, max_samples=4):
    """The beat figures of the eval's clips computed here straight from the shards."""
    from dwm.shared.shards import load_manifest

    clips = E.load_clips(load_manifest(manifest_path), report["split"], max_samples,
                         E.STAGE_A_FEATURES, need_audio=True)
    rows = [M.beat_scores(c.feats["pose_body"], c.meta["beat_frames"], c.fps, min_conf=E.MIN_CONF)
            for c in clips if c.meta["beat_frames"]]
    assert rows, "the sample clips have music beats"
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def test_eval_scores_the_ground_truth_as_perfect(full_eval, manifest_path):
    a = json.loads((full_eval / "eval.json").read_text())["stage_a"]
    gt = a["ground_truth"]
    assert gt["pck@0.1"] == 1.0 and gt["pck@0.2"] == 1.0 and gt["mean_joint_error"] == 0.0
    assert gt["face_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert gt["fid_k"] == pytest.approx(0.0, abs=1e-6)
    assert gt["speed_ratio"] == 1.0 and gt["accel_ratio"] == 1.0
    assert gt["frame0_distance"] == 0.0  # the reference is the clip's frame 0
    assert gt["seed_diversity"] is None  # seeds do not apply to a recording
    # the beat figures are the metrics' own on the shards, and real dance does have beats
    direct = _direct_beat_scores(json.loads((full_eval / "eval.json").read_text()), manifest_path)
    assert {k: gt[k] for k in direct} == pytest.approx(direct)
    assert gt["beat_f1"] > 0 and gt["bas"] > 0
    # the mean pose never moves: no speed, no beat, no diversity, whatever the seed
    mp = a["mean_pose"]
    assert mp["speed_ratio"] == 0.0 and mp["accel_ratio"] == 0.0
    assert mp["beat_f1"] == 0.0 and mp["bas"] == 0.0 and mp["div_k"] == 0.0
    assert mp["seed_diversity"] == 0.0 and mp["fid_k"] > gt["fid_k"]
    # another clip's real dance: real motion, but not this clip's poses
    assert a["other_clip"]["pck@0.1"] < 1.0 and a["other_clip"]["speed_ratio"] > 0.2


def test_eval_markdown_and_plots(full_eval, capsys):
    md = (full_eval / "eval.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| metric | model"))
    assert header == ("| metric | model | one-step | ground truth | mean pose | another clip |")
    for row in ("| PCK@0.1", "| beat F1", "| beat precision", "| Beat Align Score", "| FID_k",
                "| Div_k", "| speed ratio", "| bone-length error", "| frame-0 distance",
                "| joints in frame", "| seed diversity (2 seeds", "| PSNR"):
        assert row in md, row
    report = json.loads((full_eval / "eval.json").read_text())
    for name in ("loss_curves", "bas_histogram", "per_joint_pck", "beat_alignment"):
        png = Path(report["plots"][name])
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.fixture(scope="module")
def stage_a_ckpt(tiny_models_cfg, tmp_path_factory) -> Path:
    return build_tiny_final(tiny_models_cfg, tmp_path_factory.mktemp("ckpt_a") / "final",
                            video=False)


def _eval_with_poses(monkeypatch, poses_of, tiny_models_cfg, stage_a_ckpt, manifest_path, out):
    """``dwm eval`` with the model's poses replaced by ``poses_of(clip, reference_pose)`` and its
    face branch by the cached ArcFace embedding: what the model column says about them."""
    from dwm.datasets.views import face_target

    monkeypatch.setattr(E, "predict_poses_for",
                        lambda pipe, clip, ref, *a, **k: poses_of(clip, ref.body))
    monkeypatch.setattr(E, "predict_face_for",
                        lambda pipe, clip, frame: face_target(clip.feats, frame)[0])
    assert E.main(_cfg(tiny_models_cfg, ckpt=stage_a_ckpt, data=manifest_path, out=out)) == 0
    return json.loads((out / "eval.json").read_text())["stage_a"]


def test_eval_of_predictions_that_are_the_ground_truth(monkeypatch, tiny_models_cfg,
                                                       stage_a_ckpt, manifest_path, tmp_path):
    a = _eval_with_poses(monkeypatch, lambda clip, ref: clip.feats["pose_body"].astype(np.float32),
                         tiny_models_cfg, stage_a_ckpt, manifest_path, tmp_path)
    m, gt = a["model"], a["ground_truth"]
    assert m["pck@0.1"] == 1.0 and m["face_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert m["bas"] == gt["bas"] and m["beat_f1"] == gt["beat_f1"] > 0
    assert {k: m[k] for k in E.STAGE_A_METRICS if k != "seed_diversity"} == pytest.approx(
        {k: gt[k] for k in E.STAGE_A_METRICS if k != "seed_diversity"})
    assert m["seed_diversity"] == 0.0  # the same dance for every seed


def test_eval_of_a_frozen_pose(monkeypatch, tiny_models_cfg, stage_a_ckpt, manifest_path,
                               tmp_path):
    # a model that holds the photo's pose: perfect reference consistency, and no dance at all
    a = _eval_with_poses(monkeypatch,
                         lambda clip, ref: np.broadcast_to(ref, clip.feats["pose_body"].shape),
                         tiny_models_cfg, stage_a_ckpt, manifest_path, tmp_path)
    m = a["model"]
    assert m["speed_ratio"] == 0.0 and m["accel_ratio"] == 0.0
    assert m["beat_f1"] == 0.0 and m["beat_precision"] == 0.0 and m["bas"] == 0.0
    assert m["div_k"] == 0.0 and m["fid_k"] > a["other_clip"]["fid_k"]
    assert m["frame0_distance"] == 0.0 and m["bone_length_error"] == 0.0


def test_stage_a_checkpoint_has_no_video_section(tiny_models_cfg, manifest_path, tmp_path, capsys):
    ckpt = build_tiny_final(tiny_models_cfg, tmp_path / "final", video=False)
    out = tmp_path / "eval"
    assert E.main(_cfg(tiny_models_cfg, ckpt=ckpt, data=manifest_path, out=out,
                       max_samples=2, seeds=1)) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["video"] is None
    assert set(report["stage_a"]["model"]) == set(E.STAGE_A_METRICS)
    assert report["stage_a"]["model"]["seed_diversity"] is None  # seeds=1: not measured
    printed = capsys.readouterr().out
    assert "| PCK@0.1" in printed and "no video model" in printed  # the table is printed too


def test_bad_manifest_is_a_clear_error(tiny_models_cfg, run_dir, tmp_path):
    from dwm.shared.errors import UserFacingError

    with pytest.raises(UserFacingError, match="manifest"):
        E.main(_cfg(tiny_models_cfg, ckpt=run_dir / "final", data=tmp_path / "manifest.json",
                    out=tmp_path / "e"))
