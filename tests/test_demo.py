"""``dwm demo``: the whole chain (generated clips -> preprocess -> A -> B -> C -> generate -> eval)
as a user runs it, in a subprocess, with a few training steps per stage (quick=true)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dwm.shared import media


def _printed_paths(stdout: str) -> dict[str, Path]:
    """The 'Where things are' lines: '  label:  /a/path  (optional note)'."""
    lines = stdout.split("Where things are:", 1)[1].strip().splitlines()
    out = {}
    for line in lines:
        label, _, rest = line.partition(":")
        out[label.strip()] = Path(rest.split()[0])
    return out


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DWM_PROGRESS": "0"}
    res = subprocess.run([sys.executable, "-m", "dwm.shared.cli", "demo", f"out={out}",
                          "seconds=2", "clips=2", "steps=2", "quick=true",
                          "generate_seconds=1"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    paths = _printed_paths(res.stdout)
    for label in ("shards + manifest", "checkpoints", "final model", "TensorBoard logs",
                  "generated video", "skeleton preview", "eval table", "eval metrics"):
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
    assert abs(info["duration"] - 1.0) <= 1 / 24 + 1e-6
    report = json.loads(paths["eval metrics"].read_text())
    assert report["video"] is not None and report["stage_a"]["clips"] >= 1
    # the eval table was printed, not only written
    assert "| PCK@0.1" in res.stdout and "| PSNR" in res.stdout
