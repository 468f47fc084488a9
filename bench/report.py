"""Figures, sections and the report: one Markdown table (``bench.md``) and ``bench.json``.

Every figure is a measured value next to the reference it is compared with, their ratio, the
goal the ratio should reach (or none: an informational figure), whether it is met, and the inputs
that reproduce it (video, resolution, T, workers, threads, repeats). Values that were timed keep
their repetitions (``samples``); the figure's value is their median.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

FIGURE_KEYS = ("name", "value", "unit", "reference", "ratio", "goal", "met", "inputs")


@dataclass
class Goal:
    op: str  # ">=" or "<="
    target: float

    def met(self, ratio: float | None) -> bool | None:
        if ratio is None or not math.isfinite(ratio):
            return None
        return ratio >= self.target if self.op == ">=" else ratio <= self.target

    @property
    def text(self) -> str:
        return f"{self.op} {self.target:g}"


@dataclass
class Reference:
    name: str
    value: float | None
    unit: str


@dataclass
class Figure:
    name: str
    value: float | None
    unit: str
    reference: Reference
    goal: Goal | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    samples: list[float] = field(default_factory=list)  # the repetitions behind ``value``
    ref_samples: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def ratio(self) -> float | None:
        v, r = self.value, self.reference.value
        if v is None or r is None or r == 0:
            return None
        return float(v) / float(r)

    @property
    def met(self) -> bool | None:
        return self.goal.met(self.ratio) if self.goal else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "value": self.value, "unit": self.unit,
            "reference": asdict(self.reference), "ratio": self.ratio,
            "goal": None if self.goal is None else {**asdict(self.goal), "text": self.goal.text},
            "met": self.met, "inputs": self.inputs, "samples": self.samples,
            "ref_samples": self.ref_samples, "note": self.note,
        }


@dataclass
class Section:
    key: str  # "1".."6" (CPU) or "gpu.x"
    title: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    profiles: dict[str, list[str]] = field(default_factory=dict)  # figure name -> top functions
    error: str | None = None  # the section could not run: why
    seconds: float = 0.0

    def add(self, fig: Figure) -> Figure:
        self.figures.append(fig)
        return fig

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "title": self.title,
                "figures": [f.to_dict() for f in self.figures], "notes": self.notes,
                "profiles": self.profiles, "error": self.error, "seconds": round(self.seconds, 2)}


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def fmt(x: float | None, unit: str = "") -> str:
    """Compact number with its unit: 3 significant digits, thousands kept whole."""
    if x is None:
        return "n/a"
    if not math.isfinite(x):
        return str(x)
    a = abs(x)
    if a >= 1000:
        s = f"{x:,.0f}"
    elif a >= 100:
        s = f"{x:.0f}"
    elif a >= 10:
        s = f"{x:.1f}"
    elif a >= 1:
        s = f"{x:.2f}"
    elif a == 0:
        s = "0"
    elif a >= 0.01:
        s = f"{x:.3f}"
    else:
        s = f"{x:.2e}"
    return f"{s} {unit}".strip()


def fmt_inputs(inputs: dict[str, Any]) -> str:
    parts = []
    for k, v in inputs.items():
        if isinstance(v, float):
            v = f"{v:g}"
        elif isinstance(v, (list, tuple)):
            v = "+".join(str(x) for x in v)
        parts.append(f"{k}={v}")
    return ", ".join(parts).replace("|", "/")


def _cell(s: str) -> str:
    return str(s).replace("|", "/").replace("\n", " ")


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpus": os.cpu_count(), "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


@dataclass
class Report:
    title: str
    config: dict[str, Any]
    sections: list[Section] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=machine_info)
    seconds: float = 0.0

    def section(self, key: str, title: str) -> Section:
        s = Section(key, title)
        self.sections.append(s)
        return s

    @property
    def figures(self) -> list[Figure]:
        return [f for s in self.sections for f in s.figures]

    def summary(self) -> dict[str, int]:
        goals = [f for f in self.figures if f.goal is not None]
        return {"figures": len(self.figures), "goals": len(goals),
                "met": sum(1 for f in goals if f.met is True),
                "missed": sum(1 for f in goals if f.met is False),
                "errors": sum(1 for s in self.sections if s.error)}

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "config": self.config, "machine": self.machine,
                "seconds": round(self.seconds, 1), "summary": self.summary(),
                "sections": [s.to_dict() for s in self.sections]}

    def markdown(self) -> str:
        m = self.machine
        lines = [f"# {self.title}", "",
                 f"Machine: {m.get('cpus')} CPUs, {m.get('gpu', 'no GPU')}, torch "
                 f"{m.get('torch')}, Python {m.get('python')}. Total {self.seconds:.0f} s. Every "
                 "value is the median of its repetitions; ratio = value / reference.", "",
                 "| # | figure | value | reference | ratio | goal | met | inputs |",
                 "|---|---|---|---|---|---|---|---|"]
        for s in self.sections:
            if s.error:
                lines.append(f"| {s.key} | **{_cell(s.title)}: not measured** | | | | | | "
                             f"{_cell(s.error)} |")
            for f in s.figures:
                ref = f"{_cell(f.reference.name)}: {fmt(f.reference.value, f.reference.unit)}"
                met = {True: "met", False: "**missed**", None: "—"}[f.met]
                lines.append(
                    f"| {s.key} | {_cell(f.name)} | {fmt(f.value, f.unit)} | {ref} | "
                    f"{fmt(f.ratio)} | {f.goal.text if f.goal else '—'} | {met} | "
                    f"{_cell(fmt_inputs(f.inputs))} |")
        sm = self.summary()
        lines += ["", f"Goals: {sm['met']} met, {sm['missed']} missed of {sm['goals']}; "
                      f"{sm['figures']} figures; {sm['errors']} section error(s).", ""]
        for s in self.sections:
            if not (s.notes or s.profiles or s.error):
                continue
            lines.append(f"## {s.key}. {s.title} ({s.seconds:.0f} s)")
            lines += [f"- {n}" for n in s.notes]
            if s.error:
                lines.append(f"- not measured: {s.error}")
            for name, top in s.profiles.items():
                lines += ["", f"Profile of '{name}' (cProfile, top functions by own time):", "```"]
                lines += top
                lines.append("```")
            lines.append("")
        return "\n".join(lines)

    def write(self, out_dir: str | Path, stem: str = "bench") -> tuple[Path, Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        md, js = out / f"{stem}.md", out / f"{stem}.json"
        md.write_text(self.markdown())
        js.write_text(json.dumps(self.to_dict(), indent=1, default=str))
        return md, js


def check_report(data: dict[str, Any], sections: list[str]) -> list[str]:
    """Problems with a bench.json (an empty list: complete and well formed). The tests use it."""
    problems = []
    by_key = {s["key"]: s for s in data.get("sections", [])}
    for key in sections:
        s = by_key.get(key)
        if s is None:
            problems.append(f"section {key} missing")
            continue
        if s.get("error"):
            problems.append(f"section {key} failed: {s['error']}")
        if not s.get("figures"):
            problems.append(f"section {key} has no figures")
        for f in s.get("figures", []):
            missing = [k for k in FIGURE_KEYS if k not in f]
            if missing:
                problems.append(f"{key}/{f.get('name')}: keys {missing} missing")
                continue
            if not isinstance(f["value"], (int, float)) or not math.isfinite(f["value"]):
                problems.append(f"{key}/{f['name']}: value {f['value']!r} is not a number")
            ref = f["reference"]
            if not (isinstance(ref, dict) and ref.get("name")
                    and isinstance(ref.get("value"), (int, float))):
                problems.append(f"{key}/{f['name']}: reference {ref!r} incomplete")
            if not isinstance(f["ratio"], (int, float)):
                problems.append(f"{key}/{f['name']}: ratio {f['ratio']!r} is not a number")
            if f["goal"] is not None and f["met"] not in (True, False):
                problems.append(f"{key}/{f['name']}: has a goal but met={f['met']!r}")
            if f["goal"] is None and f["met"] is not None:
                problems.append(f"{key}/{f['name']}: no goal but met={f['met']!r}")
            if not f["inputs"]:
                problems.append(f"{key}/{f['name']}: no inputs")
    return problems
