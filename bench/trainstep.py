"""Section 5: the train step of each stage (tiny models), split into data-wait / forward /
backward / optimiser by the engine itself.

Each stage runs once through the real :func:`dwm.training.engine.run_stage` on the shards of the
whole preprocessing run (section 2), with the TrainConfig's default loader settings (workers,
prefetch, shuffle buffer, pinning) and ``log_steps=1``: the engine then logs its per-step timing
split (``perf/*``) to TensorBoard, which is read back here. The first steps (worker start, first
batches, lazy set-up) are warm-up and left out; each figure is the mean over the timed steps (so
the four parts add up to the step; the per-step values are kept as the figure's samples).
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import json
import shutil
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dwm.datasets import TrainLoader, batch_to_device, make_view
from dwm.shared.config import TrainConfig, build_train_config
from dwm.shared.shards import load_manifest
from dwm.training.engine import run_stage
from dwm.training.stages import get_stage

from .common import Bench
from .loader import loader_seconds
from .report import Figure, Goal, Reference, Section
from .timing import format_profile

PARTS = ("data", "forward", "backward", "optimizer")
STEPS_KEY = {"A": "stage_a_steps", "B": "stage_b_steps", "C": "stage_c_steps"}


def read_perf(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """``perf/<name>`` scalars of a run: name -> [(step, value)] in step order."""
    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    ea.Reload()
    out = {}
    for tag in ea.Tags().get("scalars", []):
        if tag.startswith("perf/"):
            out[tag[5:]] = sorted((e.step, e.value) for e in ea.Scalars(tag))
    return out


def train_config(bench: Bench, stage: str, out: Path, steps: int, workers: int | None = None,
                 ) -> TrainConfig:
    d = TrainConfig()
    base = build_train_config(["model_size=tiny"], stage=stage)
    total = max(int(getattr(base, STEPS_KEY[stage])), steps)
    ov = {"model_size": "tiny", "data": str(bench.full_run / "manifest.json"),
          "output_dir": str(out), "models.models_dir": str(bench.models_dir),
          "validation_steps": 0, "checkpointing_steps": 0, "log_steps": 1,
          # the default loader settings (the tiny profile turns workers off for tests)
          "num_workers": d.num_workers if workers is None else workers,
          "prefetch_factor": d.prefetch_factor, "pin_memory": d.pin_memory,
          "shuffle_buffer": d.shuffle_buffer,
          "epoch_samples": 10**5,  # one long epoch (the loader itself keeps its workers across epochs)
          STEPS_KEY[stage]: total,
          # one sample per batch and a fixed T: the tiny models are slow enough on a CPU
          "train_batch_size": 1, "max_sequence_length": base.sequence_length}
    return build_train_config([f"{k}={v}" for k, v in ov.items()], stage=stage)


def run_steps(bench: Bench, stage: str, out: Path, steps: int, workers: int | None = None):
    shutil.rmtree(out, ignore_errors=True)
    cfg = train_config(bench, stage, out, steps, workers)
    return cfg, run_config(cfg, stage, steps)


def run_config(cfg: TrainConfig, stage: str, steps: int):
    """``steps`` steps of ``stage`` through the engine (quietly); its StageResult."""
    with contextlib.redirect_stdout(io.StringIO()):
        return run_stage(get_stage(stage)(cfg), cfg, None, max_steps=steps, save_final=False)


def step_values(logdir: Path, warm: int) -> dict[str, list[float]]:
    """Per-step ms of data/forward/backward/optimizer/step and samples/s, for the steps after
    ``warm`` (from the engine's ``perf/*`` TensorBoard scalars, written with ``log_steps=1``)."""
    perf = read_perf(logdir)
    out = {}
    for k in (*PARTS, "step", "samples_per_s"):
        name = k if k == "samples_per_s" else f"{k}_ms"
        out[k] = [v for s, v in perf.get(name, []) if s > warm]
        if not out[k]:
            raise RuntimeError(f"{logdir}: the engine logged no {name} after step {warm}")
    return out


def step_means(logdir: Path, warm: int) -> dict[str, float]:
    """Means over the steps after ``warm`` of :func:`step_values` (the parts add up to the step)."""
    return {k: sum(v) / len(v) for k, v in step_values(logdir, warm).items()}


def section_train(bench: Bench, sec: Section) -> None:
    if bench.full_run is None:
        raise RuntimeError("needs the shards of the whole-pipeline run (section 2)")
    warm = 0 if bench.quick else 2  # quick: one step, first-step costs included
    steps = 1 if bench.quick else max(3, bench.cfg.train_steps)
    workers = TrainConfig().num_workers if bench.cfg.workers < 0 else bench.cfg.workers
    for stage in ("A", "B", "C"):
        out = bench.out / "work" / "train" / stage
        cfg, _res = run_steps(bench, stage, out, warm + steps, workers)
        vals = step_values(out / f"stage_{stage}" / "logs", warm)
        mean = {k: sum(v) / len(v) for k, v in vals.items()}
        inputs = {"model": "tiny", "data": f"{bench.video.name} shards (section 2, tiny profile)",
                  "res": res_of(bench), "batch": cfg.train_batch_size, "workers": workers,
                  "prefetch": cfg.prefetch_factor, "timed_steps": steps, "warmup_steps": warm,
                  "stat": "mean of the timed steps", "threads": bench.threads}
        if stage == "A":
            inputs["W"] = cfg.audio_window
        if stage == "C":
            inputs["T"] = cfg.sequence_length
        for part in PARTS:
            label = {"data": "data-wait", "optimizer": "optimiser"}.get(part, part)
            fig = sec.add(Figure(f"stage {stage}: {label}", mean[part], "ms/step",
                                 Reference("whole step", mean["step"], "ms/step"),
                                 Goal("<=", 0.02) if part == "data" else None, inputs,
                                 vals[part], vals["step"]))
            if part == "data" and fig.met is False and bench.cfg.cprofile:
                # what the main process does while the engine's data clock runs: receive a
                # batch from the workers and batch_to_device it (the engine's data clock)
                sec.profiles[fig.name] = profile_receive(stage_loader(cfg, stage, workers),
                                                         warm + steps, mean["step"] / 1000)
        dt, n = loader_seconds(stage_loader(cfg, stage, 0), max(2, steps))
        per_batch = 1000 * dt / max(1, n // cfg.train_batch_size)
        sec.notes.append(f"stage {stage}: {mean['samples_per_s']:.2f} samples/s, step "
                         f"{mean['step']:.0f} ms (engine StepStats, mean of {steps} step(s)). Its "
                         f"loader alone, in-process (no workers): {per_batch:.0f} ms per batch "
                         f"of {cfg.train_batch_size}.")
    sec.notes.append("Section 5 runs each stage once (2 warm-up steps, then the timed steps); "
                     "the per-step values are in bench.json (samples).")


def res_of(bench: Bench) -> str:
    """Frame size of the section-2 shards (from that run's report.json)."""
    d = json.loads((bench.full_run / "report.json").read_text())["config"]["decode"]
    return f"{d['width']}x{d['height']}"


def profile_receive(loader, batches: int, step_s: float) -> list[str]:
    """cProfile of the engine's data clock alone, ``batch_to_device(next(it))``, in the main
    process; between batches it sleeps for a step (the workers prefetch as in training)."""
    prof = cProfile.Profile()
    it = iter(loader)
    try:
        next(it)  # worker start, outside the profile
        for _ in range(max(1, batches)):
            time.sleep(step_s)
            prof.enable()
            batch_to_device(next(it), "cpu")
            prof.disable()
    finally:
        it.close()
    return format_profile(prof)


def stage_loader(cfg: TrainConfig, stage: str, workers: int):
    """The stage's TrainLoader as the engine builds it, with ``workers`` workers."""
    st = get_stage(stage)(cfg)
    manifest = load_manifest(cfg.data)
    view = make_view(st.view, manifest.get("stats"), cfg, **st.view_options())
    return TrainLoader(manifest, view, cfg.train_batch_size, split="train", seed=cfg.seed,
                       num_workers=workers, pin_memory=False, prefetch_factor=cfg.prefetch_factor,
                       epoch_samples=cfg.epoch_samples, shuffle_buffer=cfg.shuffle_buffer,
                       float_images=True)  # as the engine builds it on a CPU
