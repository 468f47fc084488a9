"""Training checkpoints that nothing can execute code from, written atomically, rotated.

Layout of ``<output_dir>/stage_X/checkpoint-<step>/``::

    model/                      DanceModel.save_pretrained (config.json + safetensors per component)
    optimizer.safetensors       every tensor of the optimiser state ("state.<param>.<name>")
    optimizer.json              the non-tensor rest (param groups, scalar state entries)
    rng_<rank>.safetensors/.json  torch (CPU + CUDA), numpy and Python RNG states of each process
    trainer_state.json          step, data position, LR schedule, non-finite counter, scaler

Why not ``accelerator.save_state``/``load_state``: its loader unpickles the RNG, sampler and scaler
files. Here every tensor is safetensors and everything else JSON; nothing is torch-serialised, so
there is nothing to ``torch.load`` at all.

Atomicity: everything is written into ``.tmp-checkpoint-<step>`` and renamed at the end, so a
directory named ``checkpoint-<step>`` is always complete; :func:`latest_checkpoint` also requires
its ``trainer_state.json``. A checkpoint is refused when a weight is NaN or Inf.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dwm.shared.cli import UserFacingError

from . import freeze

log = logging.getLogger(__name__)

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-checkpoint-"
STATE_NAME = "trainer_state.json"


class CheckpointError(UserFacingError):
    """A checkpoint that cannot be written or read; the message names it."""


# ---------------------------------------------------------------------------------------------
# finding checkpoints
# ---------------------------------------------------------------------------------------------
def list_checkpoints(stage_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``stage_dir``, oldest first."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return []
    out = []
    for p in stage_dir.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_NAME).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(stage_dir: str | Path) -> Path | None:
    found = list_checkpoints(stage_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: str, stage_dir: Path) -> Path | None:
    """``resume``: "" (no), "latest" (newest complete checkpoint, or None), or a path."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(stage_dir)
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        raise CheckpointError(f"resume={resume}: not a checkpoint folder (no {STATE_NAME})")
    return path


def remove_stale_temporaries(stage_dir: Path) -> None:
    if stage_dir.is_dir():
        for p in stage_dir.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def rotate(stage_dir: Path, limit: int) -> list[Path]:
    """Keep the newest ``limit`` checkpoints (0 or less: keep all); returns those removed."""
    found = list_checkpoints(stage_dir)
    if limit <= 0 or len(found) <= limit:
        return []
    removed = []
    for _, p in found[: len(found) - limit]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file of a checkpoint; anything else (a pickle under that name, a truncated
    file) is refused with a CheckpointError naming it."""
    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); the checkpoint is "
                              f"damaged or was tampered with") from None


# ---------------------------------------------------------------------------------------------
# optimiser state <-> safetensors + json
# ---------------------------------------------------------------------------------------------
def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def optimizer_to_files(opt_state: dict[str, Any], out: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in opt_state["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    groups = [{k: v for k, v in g.items() if _jsonable(v)} for g in opt_state["param_groups"]]
    save_file(tensors, str(out / "optimizer.safetensors"))
    (out / "optimizer.json").write_text(json.dumps({"param_groups": groups, "scalars": scalars}))


def optimizer_from_files(src: Path, current: dict[str, Any]) -> dict[str, Any]:
    """A state dict for ``optimizer.load_state_dict``; non-JSON group entries (the freeze
    matrix's mode objects) come from the ``current`` optimiser."""
    meta = json.loads((src / "optimizer.json").read_text())
    tensors = _load_tensors(src / "optimizer.safetensors")
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for idx, sc in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(sc)
    saved = meta["param_groups"]
    if len(saved) != len(current["param_groups"]):
        raise CheckpointError(f"{src}: optimiser has {len(saved)} param groups, the model "
                              f"now {len(current['param_groups'])} (different stage or model?)")
    groups = []
    for cur, sv in zip(current["param_groups"], saved):
        g = {**cur, **sv}
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------------------
# RNG states <-> safetensors + json
# ---------------------------------------------------------------------------------------------
def rng_to_files(out: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy.keys"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    py_version, py_state, py_gauss = random.getstate()
    save_file(tensors, str(out / f"rng_{rank}.safetensors"))
    (out / f"rng_{rank}.json").write_text(json.dumps({
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }))


def rng_from_files(src: Path, rank: int) -> None:
    st = src / f"rng_{rank}.safetensors"
    if not st.is_file():
        log.warning("%s: no RNG state for process %d; continuing with the current RNG", src, rank)
        return
    tensors = _load_tensors(st)
    meta = json.loads((src / f"rng_{rank}.json").read_text())
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")),
                                           key=lambda k: int(k.split(".")[1]))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    n = meta["numpy"]
    np.random.set_state((n["kind"], tensors["numpy.keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


# ---------------------------------------------------------------------------------------------
# model weights
# ---------------------------------------------------------------------------------------------
def load_model_weights(model: torch.nn.Module, model_dir: Path) -> None:
    """Load ``DanceModel.save_pretrained`` safetensors into an already built model, in place."""
    for name, module in model.components().items():
        files = sorted((model_dir / name).glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{model_dir / name}: no safetensors weights for {name}")
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(_load_tensors(f))
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{model_dir / name}: weights do not fit the model "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------
def save_checkpoint(stage_dir: Path, step: int, *, model, optimizer, trainer_state: dict[str, Any],
                    rank: int = 0, is_main: bool = True, barrier=lambda: None,
                    total_limit: int = 0) -> Path:
    """Write ``checkpoint-<step>`` atomically. All processes call it (each saves its RNG)."""
    final = stage_dir / f"checkpoint-{step}"
    tmp = stage_dir / f"{TMP_PREFIX}{step}"
    if is_main:
        try:
            freeze.assert_finite(model)
        except FloatingPointError as e:
            raise CheckpointError(f"refusing to write {final}: {e}") from None
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    rng_to_files(tmp, rank)
    if is_main:
        model.save_pretrained(tmp / "model")
        optimizer_to_files(optimizer.state_dict(), tmp)
        (tmp / STATE_NAME).write_text(json.dumps({**trainer_state, "step": step}, indent=1))
    barrier()
    if is_main:
        if final.exists():  # the same step written again (a resumed run): replace it whole
            shutil.rmtree(final)
        tmp.rename(final)
        for p in rotate(stage_dir, total_limit):
            log.info("removed old checkpoint %s", p)
    barrier()
    return final


def load_checkpoint(path: Path, *, model, optimizer, rank: int = 0) -> dict[str, Any]:
    """Restore model weights, optimiser state and this process's RNG; returns trainer_state."""
    try:
        state = json.loads((path / STATE_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable {STATE_NAME} ({e})") from None
    load_model_weights(model, path / "model")
    optimizer.load_state_dict(optimizer_from_files(path, optimizer.state_dict()))
    rng_from_files(path, rank)
    return state
