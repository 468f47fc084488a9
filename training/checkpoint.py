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

Sharded training (FSDP, through accelerate): pass the FSDP-wrapped root module as
``sharded_root``. The full weights and the full optimiser state are then gathered to rank 0 with
torch's ``torch.distributed.checkpoint.state_dict`` API (every process must call), and written in
the very same layout; loading gives every process the full state and lets FSDP shard it. So a
checkpoint does not depend on how it was trained: FSDP, DDP and single-process runs resume each
other's checkpoints.

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

from dwm.shared.errors import UserFacingError

from . import freeze

log = logging.getLogger(__name__)

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-checkpoint-"
STATE_NAME = "trainer_state.json"


class CheckpointError(UserFacingError):
    """A checkpoint that cannot be written or read; the message names it."""


def check_model_folder(path: str | Path, key: str = "ckpt") -> None:
    """A saved DanceModel folder (``final/``) that can be loaded: ``model_index.json`` is a JSON
    object of component -> [module, class], and each component has its folder. Fails in one
    line naming ``key=path`` or the damaged file, before anything is loaded."""
    path = Path(path)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise CheckpointError(f"{key}={path}: not a trained model folder (no model_index.json); "
                              "train first (`just train`) or give a stage's final/ folder")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{index_file}: unreadable ({e}); the checkpoint is damaged")
    if not isinstance(index, dict) or not all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v)
            for v in index.values()):
        raise CheckpointError(f"{index_file}: not a model index (component -> [module, class])")
    for name in index:
        if not (path / name / "config.json").is_file():
            raise CheckpointError(f"{path / name}: component '{name}' is missing (no "
                                  "config.json); the checkpoint is incomplete")


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
# sharded (FSDP) state: gathered to / scattered from full tensors
# ---------------------------------------------------------------------------------------------
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _clean(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def _root_to_model_names(root: torch.nn.Module, model: torch.nn.Module) -> dict[str, str]:
    """FQN in ``root`` (the FSDP-wrapped module holding ``model``) -> name in ``model``."""
    prefix = next((_clean(n) + "." for n, m in root.named_modules() if m is model), None)
    if prefix is None or prefix == ".":
        raise ValueError("sharded_root must hold the model as a submodule")
    return {n: n[len(prefix):] for n in (_clean(k) for k in root.state_dict().keys())
            if n.startswith(prefix)}


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer


def _require_fsdp2(root: torch.nn.Module) -> None:
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in root.parameters()):
        raise CheckpointError("sharded checkpoints need FSDP2 (DTensor parameters): set "
                              "fsdp_version: 2 in the accelerate config")


def gather_full_state(root: torch.nn.Module, model: torch.nn.Module, optimizer=None,
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Collective (every process calls): the full model state dict (``model``'s own names) and
    the full optimiser state dict (as ``optimizer.state_dict()``: integer param ids), on CPU, on
    rank 0; empty on the other ranks. FSDP2 only (DTensor parameters and optimiser state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    _require_fsdp2(root)
    names = _root_to_model_names(root, model)
    full = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True,
                                                               cpu_offload=True))
    model_state = {names[k]: v for k, v in full.items() if k in names}
    if optimizer is None:
        return model_state, None
    main = torch.distributed.get_rank() == 0
    # torch's get_optimizer_state_dict cannot carry the freeze matrix's objects in the param
    # groups; the moments are DTensors shaped like their parameters: gather them one by one
    # (the same order on every rank), keep them on rank 0 only
    osd = _inner(optimizer).state_dict()
    state: dict[int, dict[str, Any]] = {}
    for idx, st in osd["state"].items():
        for k, v in st.items():
            if isinstance(v, DTensor):
                v = v.full_tensor()
            if main:
                state.setdefault(idx, {})[k] = v.detach().cpu() if torch.is_tensor(v) else v
    return (model_state, {"state": state, "param_groups": osd["param_groups"]}) if main \
        else ({}, {})


def load_full_state(root: torch.nn.Module, model: torch.nn.Module, model_state: dict[str, Any],
                    optimizer=None, optim_state: dict[str, Any] | None = None) -> None:
    """Collective: load full (unsharded) states, as read by every process, into the sharded
    ``root``; FSDP keeps each process's shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import DTensor, distribute_tensor

    _require_fsdp2(root)
    to_root = {v: k for k, v in _root_to_model_names(root, model).items()}
    unknown = [k for k in model_state if k not in to_root]
    missing = [k for k in to_root if k not in model_state]
    if unknown or missing:
        raise CheckpointError(f"weights do not fit the model (missing {missing[:3]}, "
                              f"unexpected {unknown[:3]})")
    set_model_state_dict(root, {to_root[k]: v for k, v in model_state.items()},
                         options=StateDictOptions(full_state_dict=True))
    if optimizer is not None and optim_state is not None:
        inner = _inner(optimizer)
        params = [p for g in inner.param_groups for p in g["params"]]
        state: dict[int, dict[str, Any]] = {}
        for idx, st in optim_state["state"].items():
            p = params[idx]
            state[idx] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                          if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape
                          else v for k, v in st.items()}
        inner.load_state_dict({"state": state, "param_groups": optim_state["param_groups"]})


def assert_finite_state(state: dict[str, torch.Tensor]) -> None:
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise FloatingPointError(f"parameter {name} holds non-finite values")


def save_model(model, path: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """``model.save_pretrained(path)``; with ``state`` (model names -> full tensors, e.g. from
    :func:`gather_full_state`), those tensors are written instead of the live (sharded) ones."""
    if state is None:
        model.save_pretrained(path)
        return
    comps = model.components()
    per: dict[str, dict[str, torch.Tensor]] = {n: {} for n in comps}
    for k, v in state.items():
        name, rest = k.split(".", 1)
        per[name][rest] = v
    try:  # diffusers' save_pretrained reads module.state_dict(): hand it the gathered one
        for name, module in comps.items():
            module.state_dict = (lambda sd: lambda *a, **k: sd)(per[name])
        model.save_pretrained(path)
    finally:
        for module in comps.values():
            module.__dict__.pop("state_dict", None)


def read_model_weights(model: torch.nn.Module, model_dir: Path) -> dict[str, torch.Tensor]:
    """The ``save_pretrained`` safetensors of every component, as one state dict in the model's
    own names."""
    out: dict[str, torch.Tensor] = {}
    for name in model.components():
        files = sorted((model_dir / name).glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{model_dir / name}: no safetensors weights for {name}")
        for f in files:
            out.update({f"{name}.{k}": v for k, v in _load_tensors(f).items()})
    return out


# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------
def save_checkpoint(stage_dir: Path, step: int, *, model, optimizer, trainer_state: dict[str, Any],
                    rank: int = 0, is_main: bool = True, barrier=lambda: None,
                    total_limit: int = 0, sharded_root: torch.nn.Module | None = None) -> Path:
    """Write ``checkpoint-<step>`` atomically. All processes call it (each saves its RNG).
    ``sharded_root``: the FSDP-wrapped module holding ``model`` (its state is gathered first)."""
    final = stage_dir / f"checkpoint-{step}"
    tmp = stage_dir / f"{TMP_PREFIX}{step}"
    model_state = optim_state = None
    if sharded_root is not None:
        model_state, optim_state = gather_full_state(sharded_root, model, optimizer)
    if is_main:
        try:
            if model_state is None:
                freeze.assert_finite(model)
            else:
                assert_finite_state(model_state)
        except FloatingPointError as e:
            raise CheckpointError(f"refusing to write {final}: {e}") from None
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    rng_to_files(tmp, rank)
    if is_main:
        save_model(model, tmp / "model", model_state)
        optimizer_to_files(optim_state if optim_state is not None else optimizer.state_dict(), tmp)
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


def load_checkpoint(path: Path, *, model, optimizer, rank: int = 0,
                    sharded_root: torch.nn.Module | None = None) -> dict[str, Any]:
    """Restore model weights, optimiser state and this process's RNG; returns trainer_state.
    ``sharded_root``: as for :func:`save_checkpoint` (every process must call then)."""
    try:
        state = json.loads((path / STATE_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable {STATE_NAME} ({e})") from None
    if sharded_root is not None:
        try:
            load_full_state(sharded_root, model, read_model_weights(model, path / "model"),
                            optimizer, optimizer_from_files(path, optimizer.state_dict()))
        except CheckpointError as e:
            raise CheckpointError(f"{path / 'model'}: {e}") from None
    else:
        load_model_weights(model, path / "model")
        optimizer.load_state_dict(optimizer_from_files(path, optimizer.state_dict()))
    rng_from_files(path, rank)
    return state
