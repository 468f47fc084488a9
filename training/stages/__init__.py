"""Training stages, registered by name; B and C are imported only when asked for."""

from __future__ import annotations

import importlib

from .base import Stage

# name -> "module:class"; imported lazily so stage A never imports the video model's code.
STAGES: dict[str, str] = {
    "A": "dwm.training.stages.stage_a:StageA",
    "B": "dwm.training.stages.stage_b:StageB",
    "C": "dwm.training.stages.stage_c:StageC",
}


def get_stage(name: str) -> type[Stage]:
    if name not in STAGES:
        raise KeyError(f"unknown training stage {name!r} (one of {', '.join(STAGES)})")
    module, cls = STAGES[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["STAGES", "Stage", "get_stage"]
