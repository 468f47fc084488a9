"""``dwm train``: one stage (stage=A|B|C) or the whole curriculum (stage=all: A -> B -> C).

Each stage writes ``<output_dir>/stage_X/`` (checkpoints, logs, validation, final/). B and C start
from ``init=`` or else the latest earlier stage's ``final/``. With stage=all the last stage's
``final/`` is copied to ``<output_dir>/final/`` (what ``dwm generate`` loads by default).
With ``resume=latest`` and stage=all, stages whose ``final/`` already exists are not re-run.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from dwm.shared.errors import UserFacingError
from dwm.shared.config import TrainConfig, build_train_config

from .engine import StageResult, run_stage, stage_dir_of
from .stages import get_stage

log = logging.getLogger(__name__)
ORDER = ("A", "B", "C")


def init_for(stage: str, cfg: TrainConfig) -> str | None:
    """Where stage ``stage`` starts from: ``init=``, else the latest earlier stage's final/."""
    if cfg.init:
        if not Path(cfg.init).is_dir():
            raise UserFacingError(f"init={cfg.init}: no such folder")
        return cfg.init
    for earlier in reversed(ORDER[: ORDER.index(stage)]):
        final = stage_dir_of(cfg, earlier) / "final"
        if (final / "model_index.json").is_file():
            return str(final)
    return None


def _copy_final(src: Path, out_dir: Path) -> Path:
    dst = out_dir / "final"
    tmp = out_dir / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return dst


def run(cfg: TrainConfig) -> dict[str, StageResult]:
    stages = ORDER if cfg.training_stage == "all" else (cfg.training_stage,)
    results: dict[str, StageResult] = {}
    last_final: Path | None = None
    for name in stages:
        scfg = cfg if cfg.training_stage != "all" else _stage_config(cfg, name)
        final = stage_dir_of(scfg, name) / "final"
        if cfg.training_stage == "all" and cfg.resume and (final / "model_index.json").is_file():
            print(f"stage {name}: {final} exists, skipped (resume)", flush=True)
            last_final = final
            continue
        init = init_for(name, scfg) if name != "A" or scfg.init else None
        stage = get_stage(name)(scfg)
        results[name] = run_stage(stage, scfg, init)
        last_final = results[name].final_dir or last_final
        scfg.init = ""  # the next stage starts from this one's final/
        cfg.init = ""
    if cfg.training_stage == "all" and last_final is not None:
        dst = _copy_final(last_final, Path(cfg.output_dir))
        print(f"final model: {dst}", flush=True)
    return results


def _stage_config(cfg: TrainConfig, name: str) -> TrainConfig:
    """A copy of the run's config for one stage of stage=all (the stage files only name the
    stage; everything else is shared by the three stages)."""
    import dataclasses

    return dataclasses.replace(cfg, training_stage=name)


def main(cfg: TrainConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    results = run(cfg)
    summary = {k: v.to_json() for k, v in results.items()}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return 0


__all__ = ["main", "run", "init_for", "build_train_config"]
