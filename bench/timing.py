"""Repetitions, medians and profiles.

``timed(fn, repeats)`` runs ``fn`` ``repeats`` times and returns the wall times; callers that
compare two things interleave them (a, b, a, b, ...) with :func:`side_by_side` so that a change
of machine load hits both alike. ``profile_top`` runs ``fn`` once under cProfile and keeps the
functions with the most own time: what the report shows where a goal is missed.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    out = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def side_by_side(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Wall times of each function, run in turn within every repetition."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(1, repeats)):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return times


# The project's own files are named relative to the folder holding its packages (the checkout
# for an editable install, site-packages/dwm for a wheel), wherever that lies on this machine.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _short(path: str) -> str:
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    try:
        return str(Path(path).resolve().relative_to(PROJECT_ROOT))
    except (OSError, ValueError):  # outside the project (the standard library, "<string>")
        return "/".join(Path(path).parts[-2:]) if os.path.isabs(path) else path


def profile_top(fn: Callable[[], Any], n: int = 14, sort: str = "tottime") -> list[str]:
    """Run ``fn`` once under cProfile; the ``n`` functions with the most own time (one line each:
    own s, cumulative s, calls, where)."""
    prof = cProfile.Profile()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
    return format_profile(prof, n, sort)


def format_profile(prof: cProfile.Profile, n: int = 14, sort: str = "tottime") -> list[str]:
    """The ``n`` functions of a finished profile with the most own (or cumulative) time."""
    table = pstats.Stats(prof, stream=io.StringIO()).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in table.values())
    col = 2 if sort == "tottime" else 3
    rows = sorted(table.items(), key=lambda kv: kv[1][col], reverse=True)[:n]
    lines = [f"total {total:.3f} s   own s   cum s    calls  function"]
    for (path, line, func), (cc, nc, tt, ct, _callers) in rows:
        where = f"{_short(path)}:{line}({func})" if line else func
        lines.append(f"{'':14}{tt:6.3f}  {ct:6.3f} {nc:8d}  {where}")
    return lines
