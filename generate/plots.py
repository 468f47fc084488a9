"""PNG plots a researcher opens after a run: loss curves, the BAS histogram, per-joint PCK, beat
alignment over time.

Each ``plot_*`` function writes one PNG (atomically) and returns its path. Matplotlib is used
through its object API with the Agg canvas, so importing this module never changes the global
backend and needs no display.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dwm.shared import contract, storage
from dwm.training import metrics

__all__ = ["read_scalars", "plot_loss_curves", "plot_bas_histogram", "plot_per_joint_pck",
           "plot_beat_alignment"]

STAGES = ("A", "B", "C")


def _save(fig: Figure, out_path: str | os.PathLike) -> str:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    storage.atomic_write_bytes(out_path, buf.getvalue())
    return str(out_path)


def read_scalars(log_dir: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """All scalar series of the TensorBoard event files under ``log_dir`` (recursively):
    ``{tag: (steps, values)}`` sorted by step. Files in a sub-folder (SummaryWriter.add_scalars
    writes those) get the folder's relative path as a tag prefix. Empty dict if there is none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        return {}
    run_dirs = sorted({p.parent for p in log_dir.rglob("*tfevents*") if p.is_file()})
    series: dict[str, tuple[list, list]] = {}
    for run in run_dirs:
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0})  # 0 = keep every point
        acc.Reload()
        prefix = "" if run == log_dir else f"{run.relative_to(log_dir).as_posix()}/"
        for tag in acc.Tags().get("scalars", []):
            steps, values = series.setdefault(prefix + tag, ([], []))
            for ev in acc.Scalars(tag):
                steps.append(ev.step)
                values.append(ev.value)
    out = {}
    for tag, (steps, values) in series.items():
        order = np.argsort(steps, kind="stable")
        out[tag] = (np.asarray(steps)[order], np.asarray(values, np.float64)[order])
    return out


def _ema(values: np.ndarray, weight: float) -> np.ndarray:
    out, last = np.empty_like(values), values[0]
    for i, v in enumerate(values):
        last = weight * last + (1 - weight) * v if np.isfinite(v) else last
        out[i] = last
    return out


def plot_loss_curves(
    output_dir: str | os.PathLike,
    out_path: str | os.PathLike | None = None,
    stages: Sequence[str] = STAGES,
    tag_pattern: str = r"loss",
    smoothing: float = 0.6,
    log_y: bool = True,
) -> str:
    """Loss curves of every stage, one panel per stage that has logs, read from
    ``<output_dir>/stage_<X>/logs``. Plots each scalar tag matching ``tag_pattern``
    (regex, case-insensitive; train and val alike): the raw series faint, an EMA with weight
    ``smoothing`` on top. Default output: ``<output_dir>/plots/loss_curves.png``.
    Raises FileNotFoundError naming the folders searched when no stage has a matching scalar."""
    output_dir = Path(output_dir)
    out_path = out_path or output_dir / "plots" / "loss_curves.png"
    pattern = re.compile(tag_pattern, re.IGNORECASE)
    panels = []
    for stage in stages:
        scalars = read_scalars(output_dir / f"stage_{stage}" / "logs")
        chosen = {t: s for t, s in sorted(scalars.items()) if pattern.search(t) and len(s[0])}
        if chosen:
            panels.append((stage, chosen))
    if not panels:
        searched = ", ".join(str(output_dir / f"stage_{s}" / "logs") for s in stages)
        raise FileNotFoundError(f"no scalar matching /{tag_pattern}/ in the logs: {searched}")

    fig = Figure(figsize=(5.5 * len(panels), 4.0))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (stage, chosen) in zip(axes, panels):
        for i, (tag, (steps, values)) in enumerate(chosen.items()):
            color = f"C{i % 10}"
            positive = bool(np.all(values[np.isfinite(values)] > 0))
            if len(steps) < 20:  # sparse (e.g. validation): smoothing would only add lag
                ax.plot(steps, values, color=color, label=tag, marker="o", markersize=3)
            else:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(steps, _ema(values, smoothing), color=color, label=tag)
            if log_y and positive:
                ax.set_yscale("log")
        ax.set_title(f"stage {stage}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out_path)


def plot_bas_histogram(
    scores: Sequence[float] | np.ndarray,
    out_path: str | os.PathLike,
    references: Mapping[str, float] | None = None,
    title: str = "Beat Align Score per clip",
    bins: int = 20,
) -> str:
    """Histogram of per-clip Beat Align Scores in [0, 1] with the mean marked, plus optional
    reference lines, e.g. ``{"ground truth": 0.36, "random beats": 0.18, "mean pose": 0.0}``.
    NaN scores (clips with no music beat) are left out and counted in the title."""
    s = np.asarray(scores, np.float64).ravel()
    n_nan = int((~np.isfinite(s)).sum())
    s = s[np.isfinite(s)]
    fig = Figure(figsize=(6.5, 4.0))
    ax = fig.subplots()
    if s.size:
        ax.hist(s, bins=bins, range=(0.0, 1.0), color="C0", alpha=0.8, label=f"clips (n={s.size})")
        ax.axvline(s.mean(), color="C0", linestyle="-", linewidth=2, label=f"mean {s.mean():.3f}")
    else:
        ax.text(0.5, 0.5, "no finite score", ha="center", va="center", transform=ax.transAxes)
    for i, (name, value) in enumerate((references or {}).items()):
        if value is not None and math.isfinite(value):
            ax.axvline(value, color=f"C{i + 1}", linestyle="--", label=f"{name} {value:.3f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("BAS (Bailando definition, fps-scaled smoothing)")
    ax.set_ylabel("clips")
    ax.set_title(title + (f" ({n_nan} without beats)" if n_nan else ""))
    if ax.get_legend_handles_labels()[0]:  # no finite score and no reference: nothing to name
        ax.legend(fontsize=8)
    return _save(fig, out_path)


def plot_per_joint_pck(
    per_joint: np.ndarray | Mapping[str, np.ndarray],
    out_path: str | os.PathLike,
    threshold: float | None = None,
    joint_names: Sequence[str] = contract.BODY_JOINTS,
    title: str = "PCK per joint",
) -> str:
    """Bar chart of per-joint PCK (the ``per_joint@t`` arrays of ``metrics.pck``): one array, or
    ``{"model": arr, "mean-pose baseline": arr}`` for grouped bars. NaN (never evaluated)
    joints are drawn as empty with an "n/a" mark."""
    series = dict(per_joint) if isinstance(per_joint, Mapping) else {"PCK": per_joint}
    series = {k: np.asarray(v, np.float64).ravel() for k, v in series.items()}
    k = len(joint_names)
    for name, v in series.items():
        if v.shape != (k,):
            raise ValueError(f"plot_per_joint_pck: {name!r} has {v.shape[0]} values, {k} joints")
    fig = Figure(figsize=(max(7.0, 0.5 * k), 4.2))
    ax = fig.subplots()
    width = 0.8 / len(series)
    x = np.arange(k)
    for i, (name, v) in enumerate(series.items()):
        pos = x - 0.4 + width * (i + 0.5)
        mean = np.nanmean(v) if np.isfinite(v).any() else float("nan")
        ax.bar(pos, np.nan_to_num(v), width, label=f"{name} (mean {mean:.3f})", color=f"C{i}")
        for p in pos[~np.isfinite(v)]:
            ax.text(p, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=6)
    ax.set_xticks(x)
    ax.set_xticklabels(joint_names, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("PCK" + (f"@{threshold:g} torso" if threshold is not None else ""))
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_path)


def plot_beat_alignment(
    poses: Mapping[str, np.ndarray],
    music_beats: Sequence[int] | np.ndarray,
    fps: float,
    out_path: str | os.PathLike,
    min_conf: float = 0.3,
    title: str = "Beat alignment",
) -> str:
    """One panel per pose sequence (e.g. ``{"ground truth": gt, "model": pred}``, each
    (T, K, 2|3) of the same clip): the smoothed joint-speed curve that motion beats are read from
    (:func:`dwm.training.metrics.motion_speed`), the music beats as dashed lines, and the motion
    beats as dots, filled where they fall on a music beat (within the beat-F1 tolerance) and
    hollow where they do not. Each panel's title gives its beat F1 and BAS."""
    if not poses:
        raise ValueError("plot_beat_alignment: no pose sequence to plot")
    beats = np.asarray(music_beats, np.float64).ravel()
    tol = max(metrics.BEAT_TOLERANCE_SECONDS * fps, 0.5)
    fig = Figure(figsize=(9.0, 1.9 * len(poses) + 0.6))
    axes = np.atleast_1d(fig.subplots(len(poses), 1, sharex=True))
    for i, (ax, (name, seq)) in enumerate(zip(axes, poses.items())):
        speed = metrics.motion_speed(seq, fps, min_conf=min_conf)
        t = np.arange(len(speed)) / fps
        mb = metrics.motion_beats(seq, fps, min_conf=min_conf)
        scores = metrics.beat_scores(seq, beats, fps, min_conf=min_conf)
        ax.plot(t, speed, color=f"C{i}", linewidth=1.2)
        for b in beats[(beats >= 0) & (beats < len(speed))]:
            ax.axvline(b / fps, color="0.5", linestyle="--", linewidth=0.8)
        on = np.array([np.abs(beats - m).min() <= tol if beats.size else False for m in mb], bool)
        ax.plot(mb[on] / fps, speed[mb[on]], "o", color=f"C{i}",
                label="motion beat on a music beat")
        ax.plot(mb[~on] / fps, speed[mb[~on]], "o", mfc="none", color=f"C{i}",
                label="motion beat off the music")
        ax.set_title(f"{name}: beat F1 {scores['beat_f1']:.2f}, BAS {scores['bas']:.2f}",
                     fontsize=9)
        ax.set_ylabel("speed (frame / s)", fontsize=8)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("time (s); dashed: music beats")
    fig.suptitle(title, fontsize=10)
    return _save(fig, out_path)

