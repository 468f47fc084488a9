"""Fault tests of training: SIGKILL mid-stage then resume=latest, half-written checkpoints,
non-finite losses and weights.

* ``dwm train stage=A`` (tiny) is SIGKILLed at a seeded random file commit after a checkpoint
  exists (right after a checkpoint's rename, or right before a later one's: tests/killpoint.py);
  a half-written checkpoint (temp dir) and an incomplete one (no trainer_state.json) are planted;
  ``resume=latest`` continues from the newest complete checkpoint and its losses and final
  weights match an uninterrupted run within float tolerance.
* NaN/Inf losses are skipped with a warning; N in a row stop the run with one clear line; a
  checkpoint or final/ never holds non-finite weights (an exploding learning rate included).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from killpoint import Renames
from safetensors.torch import load_file
from test_datasets import write_synthetic_dataset

from dwm.shared.config import build_train_config
from dwm.training import checkpoint as ckpt

STEPS = 10
TRAIN_ARGS = ("model_size=tiny", "audio_window=16", "train_batch_size=2", "num_workers=0",
              "validation_steps=0", "lr_warmup_steps=2", "stage_a_lr=1e-3", "log_steps=1",
              "shuffle_buffer=4", "checkpoints_total_limit=0")


KILLPOINT = Path(__file__).with_name("killpoint.py")


def killed_cmd(at: int, when: str, *args: str) -> list[str]:
    """``dwm ARGS``, SIGKILLed by itself right ``when`` (before/after) its rename number ``at``."""
    return [sys.executable, str(KILLPOINT), str(at), when, os.devnull, "--", *args]


def run_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> str:
    return write_synthetic_dataset(tmp_path_factory.mktemp("faults_train_data"), n_train=5,
                                   n_val=2, T=24)


def train_args(data: str, out: Path, *extra: str) -> list[str]:
    return ["train", "stage=A", f"data={data}", f"output_dir={out}", f"stage_a_steps={STEPS}",
            "checkpointing_steps=2", *TRAIN_ARGS, *extra]


def dwm_main(*args: str) -> int:
    """``dwm ARGS`` in this process: the console script's entry point. One thread, like the
    subprocesses (OMP_NUM_THREADS=1): the same reduction order gives the same floats."""
    from dwm.shared import cli

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli.main(list(args))
    finally:
        torch.set_num_threads(threads)


def summary_losses(out: Path) -> dict[int, float]:
    s = json.loads((out / "train_summary.json").read_text())
    return {int(step): float(loss) for step, loss in s["A"]["losses"]}


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    files = sorted((out / "stage_A" / "final").rglob("*.safetensors"))
    assert files
    return {f"{f.parent.name}/{k}": v for f in files for k, v in load_file(str(f)).items()}


# ---------------------------------------------------------------------------------------------
# 1. SIGKILL mid-stage, resume=latest
# ---------------------------------------------------------------------------------------------
def test_kill_training_then_resume_matches_an_uninterrupted_run(synth, tmp_path):
    ref = tmp_path / "ref"
    with Renames() as renames:  # the uninterrupted run, and every file commit it makes
        assert dwm_main(*train_args(synth, ref)) == 0
    want = summary_losses(ref)
    assert sorted(want) == list(range(1, STEPS + 1))
    commits = {Path(t).name: i for i, t in enumerate(renames.targets, 1)}
    assert {f"checkpoint-{s}" for s in range(2, STEPS, 2)} <= set(commits), renames.targets

    # a seeded point after a checkpoint is complete: right after the rename of checkpoint-2,
    # -4 or -6, or right before that of checkpoint-6 (written in full, not yet renamed)
    rng = random.Random(7)
    when, name = rng.choice([("after", "checkpoint-2"), ("after", "checkpoint-4"),
                             ("after", "checkpoint-6"), ("before", "checkpoint-6")])
    out = tmp_path / "killed"
    sdir = out / "stage_A"
    proc = subprocess.run(killed_cmd(commits[name], when, *train_args(synth, out)),
                          env=run_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (sdir / "final").exists()
    done = ckpt.list_checkpoints(sdir)
    assert done, "no complete checkpoint to resume from"
    resume_step = done[-1][0]
    last_complete = int(name.split("-")[1]) - (2 if when == "before" else 0)
    assert resume_step == last_complete, (when, name, done)
    print(f"killed {when} the rename of {name}; resuming from {resume_step}")

    # a crash while writing a later checkpoint, and a foreign/incomplete one: never loaded
    half = sdir / f"{ckpt.TMP_PREFIX}{STEPS - 2}"
    shutil.copytree(done[-1][1], half)
    (half / "optimizer.safetensors").write_bytes(b"\0" * 10)
    incomplete = sdir / f"checkpoint-{STEPS - 1}"
    shutil.copytree(done[-1][1] / "model", incomplete / "model")
    assert ckpt.latest_checkpoint(sdir) == done[-1][1]

    assert dwm_main(*train_args(synth, out, "resume=latest")) == 0
    got = summary_losses(out)
    assert sorted(got) == list(range(resume_step + 1, STEPS + 1))  # from the last complete one
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], rel=1e-4, abs=1e-6), step
    assert not half.exists()  # the half-written temp dir was cleaned up
    a, b = final_weights(ref), final_weights(out)
    assert a.keys() == b.keys()
    for k in a:
        err = float((a[k] - b[k]).abs().max())
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), f"{k}: max abs diff {err:.3g}"


# ---------------------------------------------------------------------------------------------
# 2. non-finite losses and weights
# ---------------------------------------------------------------------------------------------
def _cfg(data: str, out: Path, *extra: str):
    return build_train_config(["stage=A", f"data={data}", f"output_dir={out}", *TRAIN_ARGS,
                               *extra])


def all_saved_weights_finite(sdir: Path) -> int:
    """Checks every safetensors file under checkpoints and final/; returns how many."""
    n = 0
    for f in sdir.rglob("*.safetensors"):
        if f.name.startswith("rng_"):
            continue
        for k, t in load_file(str(f)).items():
            if t.is_floating_point():
                assert torch.isfinite(t).all(), f"{f}:{k} holds non-finite values"
        n += 1
    return n


def _poison(monkeypatch, steps: set[int] | None, value: float):
    from dwm.training.stages.stage_a import StageA

    real = StageA.compute_loss

    def compute_loss(self, model, batch, step, total_steps):
        loss, terms = real(self, model, batch, step, total_steps)
        if steps is None or step in steps:
            loss = loss * value
        return loss, terms

    monkeypatch.setattr(StageA, "compute_loss", compute_loss)


def test_nonfinite_loss_is_skipped_with_a_warning(synth, tmp_path, monkeypatch, caplog):
    from dwm.training.engine import run_stage
    from dwm.training.stages.stage_a import StageA

    _poison(monkeypatch, {1, 3}, float("inf"))
    cfg = _cfg(synth, tmp_path, "stage_a_steps=5", "checkpointing_steps=1")
    with caplog.at_level(logging.WARNING):
        res = run_stage(StageA(cfg), cfg)
    assert res.skipped_steps == 2 and [s for s, _ in res.losses] == [1, 3, 5]
    assert all(math.isfinite(v) for _, v in res.losses)
    warned = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warned) == 2 and "update skipped" in warned[0]
    assert all_saved_weights_finite(tmp_path / "stage_A") >= 5


def test_nonfinite_losses_in_a_row_stop_the_run_with_one_clear_line(synth, tmp_path,
                                                                     monkeypatch, capsys,
                                                                     caplog):
    from dwm.shared import cli

    _poison(monkeypatch, None, float("nan"))
    out = tmp_path / "out"
    rc = cli.main(["train", "stage=A", f"data={synth}", f"output_dir={out}", *TRAIN_ARGS,
                   "stage_a_steps=20", "checkpointing_steps=1", "max_nonfinite_steps=3"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    # the progress lines come first; the error is the one last line, whole (a message that
    # went on over more lines would end the output), and nothing before it is an error
    *before, err = lines
    assert err.startswith("dwm train: error: stage A stopped"), lines
    assert "3 non-finite losses in a row" in err and "max_nonfinite_steps" in err, err
    assert all(line.startswith("stage A") for line in before), before
    skipped = [r for r in caplog.records if "update skipped" in r.getMessage()]
    assert len(skipped) == 3  # the warnings, logged (pytest holds the log handler)
    assert not (out / "stage_A" / "final").exists()
    all_saved_weights_finite(out / "stage_A")  # skipped steps never touched the weights


def test_exploding_weights_never_reach_a_checkpoint_or_final(synth, tmp_path, monkeypatch):
    from dwm.training.engine import run_stage
    from dwm.training.stages.stage_a import StageA

    # a finite loss whose gradient is not finite (d sqrt(x)/dx at 0), with clipping off: the
    # first update turns every weight NaN; the next losses are NaN and skipped, and the run
    # ends before max_nonfinite_steps. Neither a checkpoint nor final/ may take those weights.
    real = StageA.compute_loss

    def compute_loss(self, model, batch, step, total_steps):
        loss, terms = real(self, model, batch, step, total_steps)
        zero = sum((p * 0).sum() for p in model.parameters() if p.requires_grad)
        return loss + torch.sqrt(zero), terms

    monkeypatch.setattr(StageA, "compute_loss", compute_loss)
    for every in (1, 0):  # a checkpoint after the bad update / only the final save
        out = tmp_path / f"every{every}"
        cfg = _cfg(synth, out, "stage_a_steps=3", "gradient_clip_norm=0",
                   f"checkpointing_steps={every}", "max_nonfinite_steps=10")
        with pytest.raises(ckpt.CheckpointError, match="non-finite"):
            run_stage(StageA(cfg), cfg)
        assert not (out / "stage_A" / "final").exists()
        assert ckpt.list_checkpoints(out / "stage_A") == []
        all_saved_weights_finite(out / "stage_A")
