"""The training engine shared by every stage (accelerate; torchtitan-style short loop).

``run_stage(stage, cfg, init_path)`` trains one stage: AdamW on the freeze matrix's param groups
(per-group LR from :func:`freeze.stage_lrs` x linear warmup; delayed groups sit in the optimiser
from step 0 with LR 0), gradient accumulation, clipping, mixed precision, gradient checkpointing,
optional 8-bit Adam; non-finite losses skipped (the run stops after ``max_nonfinite_steps`` in a
row); atomic, rotated checkpoints with an exact data position; TensorBoard logs; validation; and
``final/`` at the end. A step is one iteration (``gradient_accumulation_steps`` micro-batches and
at most one optimiser update); a skipped step still counts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dwm.datasets import TrainLoader, batch_size_of, batch_to_device, eval_batches, make_view
from dwm.shared.errors import UserFacingError
from dwm.shared.progress import progress
from dwm.shared.config import TrainConfig, config_hash, to_dict
from dwm.shared.shards import load_manifest

from . import checkpoint as ckpt
from . import freeze
from .stages.base import Stage

log = logging.getLogger(__name__)


class TrainingError(UserFacingError):
    """The run cannot go on (e.g. too many non-finite losses in a row); the message says why."""


# ---------------------------------------------------------------------------------------------
# small pieces
# ---------------------------------------------------------------------------------------------
@dataclass
class StepStats:
    """Where step time goes: data wait / forward / backward / optimiser (seconds, summed)."""

    steps: int = 0
    samples: int = 0
    data: float = 0.0
    forward: float = 0.0
    backward: float = 0.0
    optimizer: float = 0.0
    total: float = 0.0

    def add(self, other: StepStats) -> None:
        for k in ("steps", "samples", "data", "forward", "backward", "optimizer", "total"):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def summary(self) -> dict[str, float]:
        t = max(self.total, 1e-9)
        n = max(self.steps, 1)
        return {
            "steps": self.steps,
            "samples_per_s": self.samples / t,
            "data_wait_fraction": self.data / t,
            "data_ms": 1000 * self.data / n, "forward_ms": 1000 * self.forward / n,
            "backward_ms": 1000 * self.backward / n, "optimizer_ms": 1000 * self.optimizer / n,
            "step_ms": 1000 * self.total / n,
        }


class _Clock:
    """Adds elapsed time to a StepStats field; synchronises CUDA so the split is honest."""

    def __init__(self, stats: StepStats, cuda: bool):
        self.stats, self.cuda = stats, cuda

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        setattr(self.stats, name, getattr(self.stats, name) + time.perf_counter() - t0)


class LRSchedule:
    """Per-group LR = freeze.stage_lrs(progress) x linear warmup. A pure function of the step,
    so its checkpointed state is just the step."""

    def __init__(self, optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]],
                 cfg: TrainConfig, total_steps: int):
        self.optimizer, self.groups, self.cfg = optimizer, groups, cfg
        self.total = max(1, total_steps)
        self.step_ = 0

    def warmup(self, step: int) -> float:
        w = int(self.cfg.lr_warmup_steps)
        return 1.0 if w <= 0 else min(1.0, (step + 1) / w)

    def lrs(self, step: int) -> list[float]:
        f = self.warmup(step)
        return [lr * f for lr in freeze.stage_lrs(self.groups, self.cfg, step / self.total)]

    def apply(self, step: int) -> list[float]:
        self.step_ = step
        lrs = self.lrs(step)
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr
        return lrs

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step_}


class _LossModule(nn.Module):
    """Runs the stage's loss inside ``forward`` so DDP and autocast wrap it."""

    def __init__(self, stage: Stage, model: nn.Module):
        super().__init__()
        self.model = model
        self.stage = stage

    def forward(self, batch: dict[str, Any], step: int, total: int):
        return self.stage.compute_loss(self.model, batch, step, total)


class _StepLength:
    """Picklable: T of the batch with global index ``b`` (data workers call it ahead of time)."""

    def __init__(self, stage: Stage, accum: int, total: int):
        self.stage, self.accum, self.total = stage, accum, total

    def __call__(self, b: int) -> int | None:
        return self.stage.sequence_length(b // self.accum, self.total)


def make_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    if not groups:
        raise TrainingError("nothing to train: the freeze matrix leaves no trainable parameter")
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb  # type: ignore

            return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate,
                                       weight_decay=cfg.adam_weight_decay)
        except ImportError:
            log.warning("use_8bit_adam=true but bitsandbytes is not installed: using torch AdamW")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.adam_weight_decay)


def attention_kernels(cfg: TrainConfig) -> contextlib.AbstractContextManager:
    """``use_xformers=true`` (the seed's key): attention may run only on the memory-efficient
    kernels, flash and xformers' cutlass kernel (which PyTorch ships as SDPA's
    EFFICIENT_ATTENTION), never on the math kernel that stores the (tokens x tokens) scores. An
    input those kernels cannot take then fails loudly instead of silently costing the memory.
    False: SDPA picks, which on a GPU prefers the same kernels."""
    if not cfg.use_xformers:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def stage_dir_of(cfg: TrainConfig, name: str) -> Path:
    return Path(cfg.output_dir) / f"stage_{name}"


def _atomic_save_final(model, final: Path, info: dict[str, Any],
                       state: dict[str, torch.Tensor] | None = None) -> None:
    """``state``: the gathered full weights of a sharded (FSDP) model, else None."""
    try:  # like every checkpoint: never save weights that overflowed
        if state is None:
            freeze.assert_finite(model)
        else:
            ckpt.assert_finite_state(state)
    except FloatingPointError as e:
        raise ckpt.CheckpointError(f"refusing to write {final}: {e}") from None
    tmp = final.parent / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    ckpt.save_model(model, tmp, state)
    (tmp / "training_info.json").write_text(json.dumps(info, indent=1, default=str))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


@dataclass
class StageResult:
    stage: str
    final_dir: Path | None
    steps: int
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) of this run
    val: dict[str, float] = field(default_factory=dict)  # last validation metrics
    stats: dict[str, float] = field(default_factory=dict)  # StepStats.summary()
    skipped_steps: int = 0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["final_dir"] = str(self.final_dir) if self.final_dir else None
        return d


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def run_stage(stage: Stage, cfg: TrainConfig, init_path: str | Path | None = None,
              max_steps: int | None = None, save_final: bool = True) -> StageResult:
    """Train ``stage``. ``max_steps``: stop after this many steps of this run (tests; the
    schedule still follows the stage's total). Returns a :class:`StageResult`.

    A run that fails on bad input before its first step (a corrupt shard, a sample the view
    cannot read) removes the folders it created: nothing is left half-made."""
    made = [d for d in (Path(cfg.output_dir), stage_dir_of(cfg, stage.name)) if not d.exists()]
    steps_run = [0]
    try:
        return _run_stage(stage, cfg, init_path, max_steps, save_final, steps_run)
    except UserFacingError:
        if steps_run[0] == 0 and int(os.environ.get("RANK", "0")) == 0:
            for d in made:
                shutil.rmtree(d, ignore_errors=True)
        raise


def _run_stage(stage: Stage, cfg: TrainConfig, init_path: str | Path | None, max_steps: int | None,
               save_final: bool, steps_run: list[int]) -> StageResult:
    """The body of :func:`run_stage`; ``steps_run[0]`` counts the steps this run has done."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed

    total = int(stage.total_steps(cfg))
    accum = max(1, int(cfg.gradient_accumulation_steps))
    acc = Accelerator(
        gradient_accumulation_steps=1,  # accumulation is done by hand (non-finite skipping)
        mixed_precision=cfg.mixed_precision,
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(
            find_unused_parameters=stage.find_unused_parameters)],
    )
    if acc.distributed_type == DistributedType.FSDP and cfg.validation_steps > 0:
        raise TrainingError("validation_steps>0 is not supported under FSDP yet (validation runs "
                            "the model on rank 0 alone); set validation_steps=0 and evaluate the "
                            "checkpoints, or train with DDP")
    manifest = load_manifest(cfg.data)  # a missing or bad manifest fails before anything is made
    sdir = stage_dir_of(cfg, stage.name)
    if acc.is_main_process:
        sdir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temporaries(sdir)
    set_seed(cfg.seed)

    model = stage.build_model(cfg, str(init_path) if init_path else None)
    groups = model.set_training_stage(stage.name, cfg)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    optimizer = make_optimizer(groups, cfg)
    schedule = LRSchedule(optimizer, groups, cfg, total)
    wrapper, optimizer = acc.prepare(_LossModule(stage, model), optimizer)
    # FSDP shards the parameters: checkpoints gather them (collectively) from this root module
    sharded_root = wrapper if acc.distributed_type == DistributedType.FSDP else None
    if sharded_root is None and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        log.warning("the launcher asked for FSDP but accelerate runs %s (accelerate does FSDP "
                    "on GPUs only): the model is NOT sharded", acc.distributed_type)
    counts = freeze.count_by_group(model)
    n_train = sum(r["trainable"] for r in counts.values())
    per_group = ", ".join(f"{k} {v['trainable'] / 1e6:.2f} M" for k, v in counts.items())

    view = make_view(stage.view, manifest.get("stats"), cfg, **stage.view_options())
    loader = TrainLoader(
        manifest, view, cfg.train_batch_size, split="train", seed=cfg.seed,
        num_workers=cfg.num_workers, pin_memory=cfg.pin_memory, prefetch_factor=cfg.prefetch_factor,
        resampled=cfg.resampled, epoch_samples=cfg.epoch_samples, shuffle_buffer=cfg.shuffle_buffer,
        rank=acc.process_index, world_size=acc.num_processes,
        length_fn=_StepLength(stage, accum, total),
        float_images=acc.device.type == "cpu",  # on a GPU, uint8 crosses the bus (4x fewer bytes)
    )

    step, nonfinite, skipped = 0, 0, 0
    resume_from = ckpt.resolve_resume(cfg.resume, sdir)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model=model, optimizer=optimizer,
                                     rank=acc.process_index, sharded_root=sharded_root)
        if state.get("stage") != stage.name:
            raise ckpt.CheckpointError(f"{resume_from}: a stage {state.get('stage')} checkpoint, "
                                       f"not stage {stage.name}")
        step, nonfinite = int(state["step"]), int(state.get("nonfinite_in_a_row", 0))
        loader.load_state_dict(state["data"])
        if acc.scaler is not None and state.get("scaler"):
            acc.scaler.load_state_dict(state["scaler"])
        log.info("resumed stage %s from %s at step %d", stage.name, resume_from, step)
    elif cfg.resume and cfg.resume != "latest":
        raise ckpt.CheckpointError(f"resume={cfg.resume}: nothing to resume")

    writer = None
    if acc.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(sdir / "logs"))
        (sdir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1, default=str))
        print(f"stage {stage.name}: {total} steps, {n_train / 1e6:.2f} M trainable parameters "
              f"({per_group}), "
              f"batch {cfg.train_batch_size} x {accum} x {acc.num_processes}, out {sdir}",
              flush=True)

    def trainer_state(s: int) -> dict[str, Any]:
        return {"stage": stage.name, "step": s, "total_steps": total, "data": loader.state_dict(),
                "lr_schedule": schedule.state_dict(), "nonfinite_in_a_row": nonfinite,
                "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                "seed": cfg.seed, "config_hash": config_hash(cfg)}

    def save(s: int) -> None:
        ckpt.save_checkpoint(sdir, s, model=model, optimizer=optimizer,
                             trainer_state=trainer_state(s),
                             rank=acc.process_index, is_main=acc.is_main_process,
                             barrier=acc.wait_for_everyone, total_limit=cfg.checkpoints_total_limit,
                             sharded_root=sharded_root)

    val_cache: list[dict[str, Any]] | None = None

    def validate(s: int) -> dict[str, float]:
        nonlocal val_cache
        metrics: dict[str, float] = {}
        if acc.is_main_process:
            if val_cache is None:
                vview = make_view(stage.view, manifest.get("stats"), cfg,
                                  **stage.val_view_options())
                val_cache = [batch_to_device(b, acc.device) for b in eval_batches(
                    manifest, vview, cfg.train_batch_size, split="val",
                    max_batches=cfg.validation_batches, seed=cfg.seed)]
            model.eval()
            try:
                metrics = stage.validate(model, val_cache, s, writer, sdir / "validation") or {}
            finally:
                model.train()
            for k, v in metrics.items():
                writer.add_scalar(f"val/{k}", v, s)
            writer.flush()
        acc.wait_for_everyone()
        return metrics

    stats, window = StepStats(), StepStats()  # whole run / since the last log line
    losses: list[tuple[int, float]] = []
    last_val: dict[str, float] = {}
    end = total if max_steps is None else min(total, step + max_steps)
    data_iter = iter(loader)
    model.train()
    bar = progress(total=end, initial=step, desc=f"stage {stage.name}", unit="step",
                   disable=not acc.is_main_process, dynamic_ncols=True)
    while step < end:
        st = StepStats(steps=1)
        clock = _Clock(st, acc.device.type == "cuda")
        t_step = time.perf_counter()
        stage.on_step_start(step, total)
        lrs = schedule.apply(step)
        terms: dict[str, float] = {}
        step_loss, finite = 0.0, True
        for micro in range(accum):
            with clock("data"):
                batch = batch_to_device(next(data_iter), acc.device)
            st.samples += batch_size_of(batch) * acc.num_processes
            sync = contextlib.nullcontext() if micro == accum - 1 else acc.no_sync(wrapper)
            with sync, attention_kernels(cfg):
                with clock("forward"):
                    loss, parts = wrapper(batch, step, total)
                ok = torch.isfinite(loss.detach()).float()
                if acc.num_processes > 1:  # every rank skips together, or DDP would hang
                    ok = acc.reduce(ok, reduction="mean")
                if float(ok) < 1.0:
                    finite = False
                    break
                with clock("backward"):
                    acc.backward(loss / accum)
            del batch  # its memory is then freed by the loader's thread, not in the next data wait
            step_loss += float(loss.detach()) / accum
            for k, v in parts.items():
                terms[k] = terms.get(k, 0.0) + float(v) / accum
        with clock("optimizer"):
            grad_norm = float("nan")
            if finite:
                params = [p for g in optimizer.param_groups for p in g["params"]
                          if p.grad is not None]
                if cfg.gradient_clip_norm and cfg.gradient_clip_norm > 0 and params:
                    grad_norm = float(acc.clip_grad_norm_(params, cfg.gradient_clip_norm))
                clipped = cfg.gradient_clip_norm > 0 and acc.scaler is None
                if clipped and not math.isfinite(grad_norm):
                    finite = False  # inf/nan gradients with a finite loss: skip the update too
                else:
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        st.total = time.perf_counter() - t_step
        stats.add(st)
        window.add(st)
        step += 1
        steps_run[0] += 1
        if finite:
            bar.set_postfix(loss=f"{step_loss:.4f}")
        bar.update(1)
        if finite:
            nonfinite = 0
            losses.append((step, step_loss))
        else:
            nonfinite += 1
            skipped += 1
            log.warning("stage %s step %d: non-finite loss or gradient, update skipped "
                        "(%d in a row)",
                        stage.name, step, nonfinite)
            if nonfinite >= cfg.max_nonfinite_steps:
                bar.close()  # the error line must not land on the progress bar's line
                last = ckpt.latest_checkpoint(sdir)
                raise TrainingError(
                    f"stage {stage.name} stopped at step {step}: {nonfinite} non-finite losses in "
                    f"a row (max_nonfinite_steps={cfg.max_nonfinite_steps}). Last good checkpoint: "
                    f"{last or 'none'}. Try a lower learning rate, mixed_precision=no or bf16, or "
                    f"check the data.")
        if writer is not None and (step % max(1, cfg.log_steps) == 0 or step == end):
            if finite:
                writer.add_scalar("train/loss", step_loss, step)
                for k, v in terms.items():
                    writer.add_scalar(f"train/{k}", v, step)
                if math.isfinite(grad_norm):
                    writer.add_scalar("train/grad_norm", grad_norm, step)
            for g, lr in zip(groups, lrs):
                writer.add_scalar(f"lr/{g['name']}", lr, step)
            for k, v in window.summary().items():
                if k != "steps":
                    writer.add_scalar(f"perf/{k}", v, step)
            window = StepStats()
        if cfg.validation_steps > 0 and step % cfg.validation_steps == 0 and step < total:
            last_val = validate(step)
        if cfg.checkpointing_steps > 0 and step % cfg.checkpointing_steps == 0 and step < total:
            save(step)
    bar.close()
    data_iter.close()  # shuts the data-loader workers down now, not at garbage collection

    final_dir = None
    if step >= total:
        last_val = validate(step) if cfg.validation_steps > 0 else last_val
        full_state = None
        if save_final and sharded_root is not None:  # collective: every rank gathers
            full_state, _ = ckpt.gather_full_state(sharded_root, model)
        if save_final and acc.is_main_process:
            final_dir = sdir / "final"
            _atomic_save_final(model, final_dir, {
                "stage": stage.name, "steps": step, "config": to_dict(cfg), "val": last_val,
                "stats": stats.summary(),
                # generation must normalise audio exactly as training did, without the shards
                "data_stats": manifest.get("stats")}, full_state)
        acc.wait_for_everyone()
    elif cfg.checkpointing_steps > 0:
        save(step)  # stopped early (max_steps): leave a checkpoint to resume from
    if writer is not None:
        writer.close()
    summary = stats.summary()
    if acc.is_main_process:
        print(f"stage {stage.name}: {step} steps, {summary['samples_per_s']:.2f} samples/s, "
              f"data wait {100 * summary['data_wait_fraction']:.1f}%"
              + (f", final {final_dir}" if final_dir else ""), flush=True)
    return StageResult(stage.name, final_dir, step, losses, last_val, summary, skipped)
