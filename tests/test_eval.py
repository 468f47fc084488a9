"""``dwm eval``: every metric of stages A and B/C on real tiny shards; eval.json, eval.md, plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dwm.shared import config as C
from dwm.generate import evaluate as E
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
    cfg = C.EvalConfig(max_samples=4, steps=2, video_samples=1, video_frames=4,
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
    for key in E.BASELINE_KEYS:
        assert _is_number(a["model"][key]), f"model {key} = {a['model'][key]}"
        assert _is_number(a["baseline"][key]), f"baseline {key} = {a['baseline'][key]}"
    for key in ("bas_ground_truth", "bas_random_beats", "pose_diversity_ground_truth"):
        assert _is_number(a[key]), f"{key} = {a[key]}"
    assert 0 <= a["model"]["pck@0.1"] <= a["model"]["pck@0.2"] <= 1
    assert 0 <= a["bas_ground_truth"] <= 1 and 0 <= a["model"]["bas"] <= 1
    assert a["model"]["mean_joint_error"] >= 0 and a["clips"] >= 1
    assert len(a["per_joint_pck@0.1"]["model"]) == 18
    v = report["video"]
    for key in E.VIDEO_KEYS:
        assert _is_number(v[key]), f"video {key} = {v[key]}"
    assert 0 <= v["ssim"] <= 1 and v["psnr"] > 0 and v["temporal_consistency"] >= 0
    assert -1 <= v["id_similarity"] <= 1
    assert 0 <= v["pose_accuracy@0.1"] <= v["pose_accuracy@0.2"] <= 1
    assert "Bailando" in report["definitions"]["bas"]


def test_eval_markdown_and_plots(full_eval, capsys):
    md = (full_eval / "eval.md").read_text()
    assert "| PCK@0.1" in md and "Beat Align Score" in md and "PSNR" in md
    assert "mean-pose baseline" in md
    report = json.loads((full_eval / "eval.json").read_text())
    for name in ("loss_curves", "bas_histogram", "per_joint_pck"):
        png = Path(report["plots"][name])
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_stage_a_checkpoint_has_no_video_section(tiny_models_cfg, manifest_path, tmp_path, capsys):
    ckpt = build_tiny_final(tiny_models_cfg, tmp_path / "final", video=False)
    out = tmp_path / "eval"
    assert E.main(_cfg(tiny_models_cfg, ckpt=ckpt, data=manifest_path, out=out,
                       max_samples=2)) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["video"] is None
    assert set(report["stage_a"]["model"]) >= set(E.BASELINE_KEYS)
    printed = capsys.readouterr().out
    assert "| PCK@0.1" in printed and "no video model" in printed  # the table is printed too


def test_bad_manifest_is_a_clear_error(tiny_models_cfg, run_dir, tmp_path):
    from dwm.shared.errors import UserFacingError

    with pytest.raises(UserFacingError, match="manifest"):
        E.main(_cfg(tiny_models_cfg, ckpt=run_dir / "final", data=tmp_path / "manifest.json",
                    out=tmp_path / "e"))
