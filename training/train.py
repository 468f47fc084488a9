"""``dwm train``: one stage (stage=A|B|C) or the whole curriculum (stage=all: A -> B -> C).

Each stage writes ``<output_dir>/stage_X/`` (checkpoints, logs, validation, final/). B and C start
from ``init=`` or else the latest earlier stage's ``final/``. With stage=all the last stage's
``final/`` is copied to ``<output_dir>/final/`` (what ``dwm generate`` loads by default).
With ``resume=latest`` and stage=all, stages whose ``final/`` already exists are not re-run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from dwm.datasets import make_view
from dwm.shared.config import TrainConfig, build_train_config
from dwm.shared.contract import FEATURE_BY_NAME
from dwm.shared.errors import ConfigError, UserFacingError
from dwm.shared.shards import check_shards_present, load_manifest

from .checkpoint import check_model_folder
from .engine import StageResult, run_stage, stage_dir_of
from .models.m2p import M2PEncoder
from .stages import get_stage

log = logging.getLogger(__name__)
ORDER = ("A", "B", "C")


def check_run(cfg: TrainConfig) -> dict[str, Any]:
    """Everything bad input can get wrong that is known before training starts, checked before
    anything is written: the manifest, the features each stage reads, the profile the data was
    preprocessed with, ``init=`` and ``resume=``. Returns the manifest."""
    manifest = load_manifest(cfg.data)
    check_shards_present(manifest)
    stages = ORDER if cfg.training_stage == "all" else (cfg.training_stage,)
    have = set(manifest.get("features") or {})
    for name in stages:
        view = get_stage(name).view
        missing = [f for f in make_view(view, None, cfg).needed if f not in have]
        if missing:
            extractors = sorted({FEATURE_BY_NAME[f].extractor for f in missing
                                 if f in FEATURE_BY_NAME})
            raise ConfigError(
                f"data={cfg.data}: stage {name} needs {', '.join(missing)}, which the data lacks "
                f"(preprocessed without the {', '.join(extractors)} extractor); re-run "
                "`just preprocess` with those extractors")
    recorded = ((manifest.get("config") or {}).get("models") or {}).get("profile")
    video_stages = [s for s in stages if s != "A"]
    if video_stages and recorded in ("full", "tiny") and recorded != cfg.models.profile:
        # latents and CLIP embeddings come from the preprocessing models: the video model must
        # be the same profile's (the tiny CLIP gives 32-d embeddings, SVD's UNet takes 1024)
        raise ConfigError(
            f"data={cfg.data} was preprocessed with profile={recorded}, but stage "
            f"{video_stages[0]} would train on models.profile={cfg.models.profile}: set "
            f"profile={recorded}, or re-run `just preprocess` with profile={cfg.models.profile}")
    if cfg.init:
        check_model_folder(cfg.init, "init")
    else:
        check_m2p_fits(cfg, manifest)
    if cfg.resume and cfg.resume != "latest" and not Path(cfg.resume).is_dir():
        raise UserFacingError(f"resume={cfg.resume}: no such checkpoint folder (or use "
                              "resume=latest)")
    return manifest


def check_m2p_fits(cfg: TrainConfig, manifest: dict[str, Any]) -> None:
    """A fresh M2PEncoder of ``model_size`` must be able to decode the data's heatmap grid;
    built on the meta device, so the check allocates nothing."""
    shape = ((manifest.get("features") or {}).get("pose_heatmap") or {}).get("shape")
    if not shape or len(shape) < 2:
        return
    h, w = int(shape[-2]), int(shape[-1])
    with torch.device("meta"):
        try:
            M2PEncoder.from_size(cfg.model_size, heatmap_height=h, heatmap_width=w)
        except ValueError as e:
            other = "tiny" if cfg.model_size == "full" else "full"
            raise ConfigError(f"data={cfg.data}: its {h}x{w} heatmap grid does not fit "
                              f"model_size={cfg.model_size} ({e}); set model_size={other}, or "
                              "preprocess at a frame size whose grid fits") from None


def init_for(stage: str, cfg: TrainConfig) -> str | None:
    """Where stage ``stage`` starts from: ``init=``, else the latest earlier stage's final/."""
    if cfg.init:
        return cfg.init  # checked by check_run
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
    check_run(cfg)
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
