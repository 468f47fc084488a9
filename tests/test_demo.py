"""``dwm demo``: the whole chain (generated clips -> preprocess -> A -> B -> C -> generate -> eval)
as a user runs it, in a subprocess: the known-answer corpus through ``pose.backend=file``, stage A
trained long enough to learn it (B and C a few steps, quick=true), and the demo's own figures in
eval.json: the trained model makes valid moves on the beat, from the reference, differently per
seed; its one-step prediction does not; the ground truth does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dwm.shared import media


def _printed_paths(stdout: str) -> dict[str, Path]:
    """The 'Where things are' lines: '  label:  /a/path  (optional note)'."""
    lines = stdout.split("Where things are:", 1)[1].strip().splitlines()
    out = {}
    for line in lines:
        label, _, rest = line.partition(":")
        out[label.strip()] = Path(rest.split()[0])
    return out


STAGE_A_STEPS = 800  # the demo's own: what learning the choreography takes


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DWM_PROGRESS": "0"}
    res = subprocess.run([sys.executable, "-m", "dwm.shared.cli", "demo", f"out={out}",
                          "steps=2", "quick=true", f"stage_a_steps={STAGE_A_STEPS}",
                          "generate_seconds=4", "seeds=2"],
                         capture_output=True, text=True, env=env, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res, _printed_paths(res.stdout)


def test_demo_runs_end_to_end(demo):
    out, res, paths = demo
    for label in ("shards + manifest", "checkpoints", "final model", "TensorBoard logs",
                  "generated video", "skeleton preview", "poses JSON", "skeleton strip",
                  "eval table", "eval metrics"):
        assert label in paths, f"'{label}' not printed"
        assert paths[label].exists(), f"{label}: {paths[label]} does not exist"
        assert str(paths[label]).startswith(str(out))
    manifest = json.loads(paths["shards + manifest"].read_text())
    assert manifest["num_samples"] > 0
    for stage in ("A", "B", "C"):
        assert (paths["checkpoints"] / f"stage_{stage}" / "final" / "model_index.json").is_file()
    assert any(paths["TensorBoard logs"].glob("events.out.tfevents.*"))
    info = media.probe(paths["generated video"])
    kinds = [s["codec_type"] for s in info["streams"]]
    assert kinds.count("video") == 1 and kinds.count("audio") == 1
    assert abs(info["duration"] - 4.0) <= 1 / 24 + 1e-6
    # the poses were read from the clips' keypoints files, not guessed by a stand-in detector
    pp = json.loads(paths["preprocess report"].read_text())
    assert pp["config"]["pose"]["backend"] == "file" and pp["counts"]["failed"] == 0
    poses = json.loads(paths["poses JSON"].read_text())
    assert len(poses["frames"]) == 96 and poses["layout"] == "openpose_18"
    report = json.loads(paths["eval metrics"].read_text())
    assert report["video"] is not None and report["stage_a"]["clips"] >= 1
    known = report["known_answer"]["table"]
    truth, model, one = known["ground_truth"], known["model"], known["one_step"]
    assert truth["valid_moves"] >= 0.95 and truth["beat_f1"] >= 0.8
    assert truth["frame0_distance"] <= 0.01 and truth["moves_differ"] >= 0.3
    # the dance starts from the reference photo's body; the one-step prediction is deterministic
    assert model["frame0_distance"] <= 0.05, known
    assert one["seed_diversity"] == 0 and one["valid_moves"] < 0.5, known
    assert report["video_note"]["vae_round_trip_psnr"] < report["video_note"]["mean_frame_psnr"]
    # the tables were printed, not only written
    assert "| PCK@0.1" in res.stdout and "| PSNR" in res.stdout
    assert "| trained model |" in res.stdout and "cannot show the figure" in res.stdout


def test_demo_stage_a_learns_the_choreography(demo):
    _, _, paths = demo
    known = json.loads(paths["eval metrics"].read_text())["known_answer"]["table"]
    model = known["model"]
    assert model["valid_moves"] >= 0.8, known
    assert model["beat_f1"] >= 0.6, known
    assert model["moves_differ"] >= 0.3 and model["seed_diversity"] > 0, known
