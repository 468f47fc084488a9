"""Progress in logs: outside a terminal, plain lines at most every N seconds, no redraws.

The helper (dwm.shared.progress) is checked with a fake clock, then through a real command: a
stage-A run whose stderr is a pipe, as under nohup, CI or SLURM.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from test_datasets import write_synthetic_dataset

from dwm.shared import progress as P
from dwm.shared.errors import ConfigError


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_at_most_every_interval_and_one_at_the_end():
    clock, out = FakeClock(), io.StringIO()
    bar = P.PlainProgress(total=100, desc="stage A", unit="step", file=out, every=30, clock=clock)
    for _ in range(100):  # one step per second
        clock.now += 1.0
        bar.set_postfix(loss="0.5")
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    # at 30, 60 and 90 s, then the last one at 100 s
    assert [line.split(",")[0] for line in lines] == [
        "stage A: 30/100 step (30%)", "stage A: 60/100 step (60%)", "stage A: 90/100 step (90%)",
        "stage A: 100/100 step (100%)"]
    assert "1 step/s" in lines[0] and "00:30 elapsed" in lines[0] and "01:10 left" in lines[0]
    assert lines[-1].endswith("loss=0.5")
    bar.close()  # closing twice prints nothing more
    assert len(out.getvalue().splitlines()) == 4


def test_short_inner_loop_stays_silent_and_iteration_counts():
    clock, out = FakeClock(), io.StringIO()
    items = list(P.PlainProgress(range(5), desc="hashing", leave=False, file=out, every=30,
                                 clock=clock))
    assert items == [0, 1, 2, 3, 4] and out.getvalue() == ""  # leave=False, under 30 s
    bar = P.PlainProgress(range(3), desc="x", file=out, every=30, clock=clock, disable=True)
    assert list(bar) == [0, 1, 2] and out.getvalue() == ""  # disabled: nothing at all


def test_progress_picks_the_bar_by_the_stream(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert isinstance(P.progress(total=3, file=io.StringIO()), P.PlainProgress)
    bar = P.progress(total=3, file=Tty())
    assert not isinstance(bar, P.PlainProgress)  # a terminal keeps tqdm's bar
    bar.close()
    monkeypatch.setenv("DWM_PROGRESS", "0")
    assert P.progress(total=3, file=io.StringIO()).disable
    monkeypatch.setenv("DWM_PROGRESS_SECONDS", "soon")
    with pytest.raises(ConfigError, match="DWM_PROGRESS_SECONDS"):
        P.interval_seconds()


def test_training_log_outside_a_terminal_has_plain_lines(tmp_path):
    """A real ``dwm train`` with stderr to a pipe: progress as whole lines, no carriage return,
    and (with an interval of 0 s) one line per step."""
    data = write_synthetic_dataset(tmp_path / "data", n_train=2, n_val=1, T=16, per_shard=1)
    # DWM_PROGRESS=1: other fixtures of the session turn progress off in os.environ
    env = {**os.environ, "DWM_PROGRESS": "1", "DWM_PROGRESS_SECONDS": "0",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "dwm.shared.cli", "train", "stage=A", "profile=tiny",
         f"data={data}", f"output_dir={tmp_path / 'out'}", "stage_a_steps=3", "audio_window=8",
         "train_batch_size=1", "validation_steps=0", "checkpointing_steps=0"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stderr
    steps = [line for line in proc.stderr.splitlines() if line.startswith("stage A: ")]
    assert [line.split(",")[0] for line in steps] == [
        "stage A: 1/3 step (33%)", "stage A: 2/3 step (67%)", "stage A: 3/3 step (100%)"], steps
    assert all("loss=" in line for line in steps)
