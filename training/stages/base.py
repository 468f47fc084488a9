"""The stage interface: what one training stage (A, B or C) tells the shared engine.

The engine (:mod:`dwm.training.engine`) owns everything a stage has in common: data loading,
the optimiser and its per-group learning rates (from the freeze matrix), mixed precision,
gradient accumulation and clipping, checkpoints, resume, logging and timing. A stage only says
which model it trains, how the loss is computed on a batch, and how it is validated.

Batches come from the dataset view named by :attr:`Stage.view` (see :mod:`dwm.datasets.views`
for every key, shape and dtype). They arrive as dicts of tensors already on the training device;
non-tensor entries (``key``: list of sample keys, ``thumbs``: lists of JPEG bytes, ...) stay
Python lists.

Rules for implementers:

- ``compute_loss`` receives the *unwrapped* :class:`DanceModel`; the engine runs it inside a
  wrapper module's ``forward`` so DDP and autocast apply. Return a scalar tensor (the weighted
  total) and a dict of plain floats (each loss term, unweighted or weighted, your choice; they are
  logged under ``train/<name>``). Do not call ``backward`` or step anything.
- Learning rates and what trains are decided by :mod:`dwm.training.freeze` only; the engine calls
  ``model.set_training_stage(stage.name, cfg)`` on the model ``build_model`` returns.
- Randomness: use ``torch`` / ``numpy`` generators seeded from ``step`` (or the global RNG, which
  the engine seeds and checkpoints). Anything the stage keeps between steps must be a function of
  ``step`` so that resume is exact (the engine restores model, optimiser, scheduler, RNG and the
  data position, nothing else).
- ``sequence_length`` is how the curriculum of stage C reaches the data: the data pipeline asks
  it for the T of the batch used at optimiser step ``step``, in the worker processes, ahead of
  time; so it must be a pure function of its arguments (and of ``self.cfg``), and the stage
  object must stay picklable (hold the config, not models or open files).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:  # pragma: no cover
    from dwm.shared.config import TrainConfig
    from dwm.training.models.dance_model import DanceModel


class Stage:
    """Base class of the training stages. Subclasses set ``name`` and ``view`` and implement
    ``total_steps``, ``build_model``, ``compute_loss`` and ``validate``."""

    name: ClassVar[str] = ""  # "A" | "B" | "C": the freeze-matrix column and the output subfolder
    view: ClassVar[str] = ""  # dataset view: "A" | "B" | "C"
    # DDP: set True when some trainable parameters get no gradient in some steps.
    find_unused_parameters: ClassVar[bool] = True

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    # -- schedule ------------------------------------------------------------------------------
    def total_steps(self, cfg: TrainConfig) -> int:
        """Optimiser steps of this stage (e.g. ``cfg.stage_a_steps``)."""
        raise NotImplementedError

    def sequence_length(self, step: int, total_steps: int) -> int | None:
        """Frames per clip (T) of the batch used at optimiser ``step`` (view C); None otherwise.
        Must be a pure function (it runs inside data-loader workers, ahead of the step)."""
        return None

    def on_step_start(self, step: int, total_steps: int) -> None:
        """Called in the main process before each optimiser step (curriculum hooks)."""

    def view_options(self) -> dict[str, Any]:
        """Extra keyword arguments for the training dataset view (defaults come from the config)."""
        return {}

    def val_view_options(self) -> dict[str, Any]:
        """Extra keyword arguments for the validation view (e.g. ``with_thumbs=True`` in A)."""
        return self.view_options()

    # -- model ---------------------------------------------------------------------------------
    def build_model(self, cfg: TrainConfig, init_path: str | None) -> DanceModel:
        """The model this stage trains. ``init_path``: a DanceModel folder (an earlier stage's
        ``final/`` or ``init=``), or None to start from scratch / pretrained components."""
        raise NotImplementedError

    # -- step ----------------------------------------------------------------------------------
    def compute_loss(self, model: DanceModel, batch: dict[str, Any], step: int,
                     total_steps: int) -> tuple[torch.Tensor, dict[str, float]]:
        """(weighted total loss, {term name: float}) for one micro-batch."""
        raise NotImplementedError

    # -- validation ----------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, model: DanceModel, val_batches: list[dict[str, Any]], step: int,
                 writer: Any, out_dir: Path) -> dict[str, float]:
        """Metrics on the validation batches (``val_batches``: a list of view batches, on the
        device). ``writer``: a TensorBoard SummaryWriter or None (scalars are logged by the
        engine from the returned dict under ``val/<name>``; images/videos the stage logs
        itself). ``out_dir``: ``<output_dir>/stage_X/validation`` for files (mp4s)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(stage={self.name}, view={self.view})"
