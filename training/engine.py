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
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.tensorboard import SummaryWriter

from dwm.datasets import TrainLoader, batch_size_of, batch_to_device, eval_batches, make_view
from dwm.shared.errors import UserFacingError
from dwm.shared.progress import progress
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
            import bitsandbytes as bnb  # type: ignore  # optional, CUDA-only: deferred

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
# the trainer: one object holding a stage's run, with the loop's named steps as methods
# ---------------------------------------------------------------------------------------------
@dataclass
class StepOutcome:
    loss: float
    terms: dict[str, float]
    finite: bool
    grad_norm: float
    lrs: list[float]


class Trainer:
    """Everything one stage's run holds: accelerator, model, optimiser, schedule, loader, logs.
    Built ready to train (resumed when ``cfg.resume`` says so); ``run_stage`` drives it."""

    def __init__(self, stage: Stage, cfg: TrainConfig, init_path: str | Path | None = None):
        self.stage, self.cfg = stage, cfg
        self.total = int(stage.total_steps(cfg))
        self.accum = max(1, int(cfg.gradient_accumulation_steps))
        # the data first: a run with no data fails in one line before anything is created
        self.manifest = load_manifest(cfg.data)
        self.acc = acc = Accelerator(
            gradient_accumulation_steps=1,  # accumulation is done by hand (non-finite skipping)
            mixed_precision=cfg.mixed_precision,
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=[DistributedDataParallelKwargs(
                find_unused_parameters=stage.find_unused_parameters)],
        )
        set_seed(cfg.seed)
        self.model = stage.build_model(cfg, str(init_path) if init_path else None)
        self.groups = self.model.set_training_stage(stage.name, cfg)
        if cfg.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        optimizer = make_optimizer(self.groups, cfg)
        self.schedule = LRSchedule(optimizer, self.groups, cfg, self.total)
        self.wrapper, self.optimizer = acc.prepare(_LossModule(stage, self.model), optimizer)
        # FSDP shards the parameters: checkpoints gather them (collectively) from this root
        self.sharded_root = self.wrapper if acc.distributed_type == DistributedType.FSDP else None
        if self.sharded_root is None and \
                os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
            log.warning("the launcher asked for FSDP but accelerate runs %s (accelerate does FSDP "
                        "on GPUs only): the model is NOT sharded", acc.distributed_type)
        if self.sharded_root is not None and cfg.validation_steps > 0:
            raise TrainingError("validation_steps>0 is not supported under FSDP yet (validation "
                                "runs the model on rank 0 alone); set validation_steps=0 and "
                                "evaluate the checkpoints, or train with DDP")
        self.dir = stage_dir_of(cfg, stage.name)
        if acc.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(self.dir)
        self.loader = TrainLoader(
            self.manifest, make_view(stage.view, self.manifest.get("stats"), cfg,
                                     **stage.view_options()),
            cfg.train_batch_size, split="train", seed=cfg.seed, num_workers=cfg.num_workers,
            pin_memory=cfg.pin_memory, prefetch_factor=cfg.prefetch_factor,
            resampled=cfg.resampled, epoch_samples=cfg.epoch_samples,
            shuffle_buffer=cfg.shuffle_buffer, rank=acc.process_index,
            world_size=acc.num_processes, length_fn=_StepLength(stage, self.accum, self.total),
            float_images=acc.device.type == "cpu",  # on a GPU, uint8 crosses the bus (4x fewer)
        )
        self.step, self.nonfinite, self.skipped = 0, 0, 0
        self.resume()
        self.writer = None
        if acc.is_main_process:
            self.writer = SummaryWriter(str(self.dir / "logs"))
            (self.dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1, default=str))
            self.announce()
        self.stats, self.window = StepStats(), StepStats()  # whole run / since the last log
        self.losses: list[tuple[int, float]] = []
        self.last_val: dict[str, float] = {}
        self._val_batches: list[dict[str, Any]] | None = None
        self._data = None

    def announce(self) -> None:
        counts = freeze.count_by_group(self.model)
        n_train = sum(r["trainable"] for r in counts.values())
        per_group = ", ".join(f"{k} {v['trainable'] / 1e6:.2f} M" for k, v in counts.items())
        print(f"stage {self.stage.name}: {self.total} steps, {n_train / 1e6:.2f} M trainable "
              f"parameters ({per_group}), batch {self.cfg.train_batch_size} x {self.accum} x "
              f"{self.acc.num_processes}, out {self.dir}", flush=True)

    # -- resume and save ----------------------------------------------------------------------
    def resume(self) -> None:
        resume_from = ckpt.resolve_resume(self.cfg.resume, self.dir)
        if resume_from is None:
            if self.cfg.resume and self.cfg.resume != "latest":
                raise ckpt.CheckpointError(f"resume={self.cfg.resume}: nothing to resume")
            return
        state = ckpt.load_checkpoint(resume_from, model=self.model, optimizer=self.optimizer,
                                     rank=self.acc.process_index, sharded_root=self.sharded_root)
        if state.get("stage") != self.stage.name:
            raise ckpt.CheckpointError(f"{resume_from}: a stage {state.get('stage')} checkpoint, "
                                       f"not stage {self.stage.name}")
        self.step, self.nonfinite = int(state["step"]), int(state.get("nonfinite_in_a_row", 0))
        self.loader.load_state_dict(state["data"])
        if self.acc.scaler is not None and state.get("scaler"):
            self.acc.scaler.load_state_dict(state["scaler"])
        log.info("resumed stage %s from %s at step %d", self.stage.name, resume_from, self.step)

    def trainer_state(self) -> dict[str, Any]:
        scaler = self.acc.scaler
        return {"stage": self.stage.name, "step": self.step, "total_steps": self.total,
                "data": self.loader.state_dict(), "lr_schedule": self.schedule.state_dict(),
                "nonfinite_in_a_row": self.nonfinite,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "seed": self.cfg.seed, "config_hash": config_hash(self.cfg)}

    def save(self) -> None:
        ckpt.save_checkpoint(self.dir, self.step, model=self.model, optimizer=self.optimizer,
                             trainer_state=self.trainer_state(), rank=self.acc.process_index,
                             is_main=self.acc.is_main_process, barrier=self.acc.wait_for_everyone,
                             total_limit=self.cfg.checkpoints_total_limit,
                             sharded_root=self.sharded_root)

    def save_final(self) -> Path | None:
        full_state, final_dir = None, None
        if self.sharded_root is not None:  # collective: every rank gathers
            full_state, _ = ckpt.gather_full_state(self.sharded_root, self.model)
        if self.acc.is_main_process:
            final_dir = self.dir / "final"
            _atomic_save_final(self.model, final_dir, {
                "stage": self.stage.name, "steps": self.step, "config": to_dict(self.cfg),
                "val": self.last_val, "stats": self.stats.summary(),
                # generation must normalise audio exactly as training did, without the shards
                "data_stats": self.manifest.get("stats")}, full_state)
        self.acc.wait_for_everyone()
        return final_dir

    # -- validate -----------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.acc.is_main_process:
            if self._val_batches is None:  # built once, on the device
                view = make_view(self.stage.view, self.manifest.get("stats"), self.cfg,
                                 **self.stage.val_view_options())
                self._val_batches = [batch_to_device(b, self.acc.device) for b in eval_batches(
                    self.manifest, view, self.cfg.train_batch_size, split="val",
                    max_batches=self.cfg.validation_batches, seed=self.cfg.seed)]
            self.model.eval()
            try:
                metrics = self.stage.validate(self.model, self._val_batches, self.step,
                                              self.writer, self.dir / "validation") or {}
            finally:
                self.model.train()
            for k, v in metrics.items():
                self.writer.add_scalar(f"val/{k}", v, self.step)
            self.writer.flush()
        self.acc.wait_for_everyone()
        self.last_val = metrics or self.last_val
        return metrics

    # -- one step -----------------------------------------------------------------------------
    def batches(self):
        if self._data is None:
            self._data = iter(self.loader)
        return self._data

    def train_step(self) -> StepOutcome:
        """One step: ``gradient_accumulation_steps`` micro-batches and at most one optimiser
        update (skipped, on every rank together, when a loss or gradient is not finite)."""
        acc, cfg, step = self.acc, self.cfg, self.step
        st = StepStats(steps=1)
        clock = _Clock(st, acc.device.type == "cuda")
        t_step = time.perf_counter()
        self.stage.on_step_start(step, self.total)
        lrs = self.schedule.apply(step)
        terms: dict[str, float] = {}
        step_loss, finite = 0.0, True
        data = self.batches()
        for micro in range(self.accum):
            with clock("data"):
                batch = batch_to_device(next(data), acc.device)
            st.samples += batch_size_of(batch) * acc.num_processes
            last = micro == self.accum - 1
            sync = contextlib.nullcontext() if last else acc.no_sync(self.wrapper)
            with sync, attention_kernels(cfg):
                with clock("forward"):
                    loss, parts = self.wrapper(batch, step, self.total)
                ok = torch.isfinite(loss.detach()).float()
                if acc.num_processes > 1:  # every rank skips together, or DDP would hang
                    ok = acc.reduce(ok, reduction="mean")
                if float(ok) < 1.0:
                    finite = False
                    break
                with clock("backward"):
                    acc.backward(loss / self.accum)
            del batch  # its memory is then freed by the loader's thread, not in the next data wait
            step_loss += float(loss.detach()) / self.accum
            for k, v in parts.items():
                terms[k] = terms.get(k, 0.0) + float(v) / self.accum
        with clock("optimizer"):
            grad_norm = float("nan")
            if finite:
                params = [p for g in self.optimizer.param_groups for p in g["params"]
                          if p.grad is not None]
                if cfg.gradient_clip_norm and cfg.gradient_clip_norm > 0 and params:
                    grad_norm = float(acc.clip_grad_norm_(params, cfg.gradient_clip_norm))
                clipped = cfg.gradient_clip_norm > 0 and acc.scaler is None
                if clipped and not math.isfinite(grad_norm):
                    finite = False  # inf/nan gradients with a finite loss: skip the update too
                else:
                    self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        st.total = time.perf_counter() - t_step
        self.stats.add(st)
        self.window.add(st)
        self.step += 1
        return StepOutcome(step_loss, terms, finite, grad_norm, lrs)

    def record(self, out: StepOutcome) -> None:
        """Count the step's loss (or its skip) and log it; stop the run after too many
        non-finite steps in a row."""
        if out.finite:
            self.nonfinite = 0
            self.losses.append((self.step, out.loss))
        else:
            self.nonfinite += 1
            self.skipped += 1
            log.warning("stage %s step %d: non-finite loss or gradient, update skipped "
                        "(%d in a row)", self.stage.name, self.step, self.nonfinite)
            if self.nonfinite >= self.cfg.max_nonfinite_steps:
                raise TrainingError(
                    f"stage {self.stage.name} stopped at step {self.step}: {self.nonfinite} "
                    f"non-finite losses in a row (max_nonfinite_steps="
                    f"{self.cfg.max_nonfinite_steps}). Last good checkpoint: "
                    f"{ckpt.latest_checkpoint(self.dir) or 'none'}. Try a lower learning rate, "
                    f"mixed_precision=no or bf16, or check the data.")
        w = self.writer
        if w is None or self.step % max(1, self.cfg.log_steps):
            return
        if out.finite:
            w.add_scalar("train/loss", out.loss, self.step)
            for k, v in out.terms.items():
                w.add_scalar(f"train/{k}", v, self.step)
            if math.isfinite(out.grad_norm):
                w.add_scalar("train/grad_norm", out.grad_norm, self.step)
        for g, lr in zip(self.groups, out.lrs):
            w.add_scalar(f"lr/{g['name']}", lr, self.step)
        for k, v in self.window.summary().items():
            if k != "steps":
                w.add_scalar(f"perf/{k}", v, self.step)
        self.window = StepStats()

    def due(self, every: int) -> bool:
        """True every ``every`` steps before the end (the end has its own save and validation)."""
        return every > 0 and self.step % every == 0 and self.step < self.total

    def close(self) -> None:
        if self._data is not None:
            self._data.close()  # shuts the data-loader workers down now, not at collection
            self._data = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def run_stage(stage: Stage, cfg: TrainConfig, init_path: str | Path | None = None,
              max_steps: int | None = None, save_final: bool = True) -> StageResult:
    """Train ``stage``: train steps, with validation and checkpoints on their schedules, then
    ``final/``. ``max_steps``: stop after this many steps of this run (tests; the schedule still
    follows the stage's total), leaving a checkpoint to resume from. A run that fails on bad
    input before its first step is done removes the folders it created: nothing half-made."""
    made = [d for d in (Path(cfg.output_dir), stage_dir_of(cfg, stage.name)) if not d.exists()]
    trainer, first = None, None
    try:
        trainer = Trainer(stage, cfg, init_path)
        first = trainer.step
        return _train(trainer, max_steps, save_final)
    except UserFacingError:
        nothing_done = trainer is None or trainer.step == first
        if nothing_done and int(os.environ.get("RANK", "0")) == 0:
            for d in made:
                shutil.rmtree(d, ignore_errors=True)
        raise


def _train(trainer: Trainer, max_steps: int | None, save_final: bool) -> StageResult:
    cfg, stage = trainer.cfg, trainer.stage
    end = trainer.total if max_steps is None else min(trainer.total, trainer.step + max_steps)
    bar = progress(total=end, initial=trainer.step, desc=f"stage {stage.name}", unit="step",
                   disable=not trainer.acc.is_main_process, dynamic_ncols=True)
    final_dir = None
    try:
        trainer.model.train()
        while trainer.step < end:
            out = trainer.train_step()
            if out.finite:  # before update: a plain progress line then shows this step's loss
                bar.set_postfix(loss=f"{out.loss:.4f}")
            bar.update(1)
            trainer.record(out)
            if trainer.due(cfg.validation_steps):
                trainer.validate()
            if trainer.due(cfg.checkpointing_steps):
                trainer.save()
        bar.close()
        if trainer.step >= trainer.total:
            if cfg.validation_steps > 0:
                trainer.validate()
            if save_final:
                final_dir = trainer.save_final()
        elif cfg.checkpointing_steps > 0:
            trainer.save()  # stopped early (max_steps): leave a checkpoint to resume from
    finally:  # before any error line is printed, so it does not land on the bar's line
        bar.close()
        trainer.close()
    summary = trainer.stats.summary()
    if trainer.acc.is_main_process:
        print(f"stage {stage.name}: {trainer.step} steps, {summary['samples_per_s']:.2f} "
              f"samples/s, data wait {100 * summary['data_wait_fraction']:.1f}%"
              + (f", final {final_dir}" if final_dir else ""), flush=True)
    return StageResult(stage.name, final_dir, trainer.step, trainer.losses, trainer.last_val,
                       summary, trainer.skipped)
