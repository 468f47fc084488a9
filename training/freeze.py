"""The freeze matrix and learning rates of every stage, declared once, as data.

Each rule maps a regular expression over the integrated model's parameter names to what the group
does in each stage. ``apply_stage`` sets ``requires_grad`` from the table and returns the optimiser
parameter groups; nothing else in the code base decides what trains.

Modes:
- ``train``:   trains at the LR named by ``lr_key`` (a TrainConfig field).
- ``frozen``:  loaded and run, no gradient.
- ``unused``:  not needed in this stage (not built, or built and ignored); no gradient.
- ``delayed``: frozen until ``unfreeze_key`` (a fraction of the stage's steps), then trains at
               ``lr_key``. The parameters sit in the optimiser from the start with LR 0, so the
               optimiser state layout never changes mid-stage (resume stays exact).
- ``optional``: trains at ``lr_key`` only when that LR is > 0, else frozen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

STAGES = ("A", "B", "C")


@dataclass(frozen=True)
class Mode:
    mode: str  # train | frozen | unused | delayed | optional
    lr_key: str | None = None
    unfreeze_key: str | None = None


TRAIN = lambda lr_key: Mode("train", lr_key)  # noqa: E731
DELAYED = lambda lr_key, at: Mode("delayed", lr_key, at)  # noqa: E731
OPTIONAL = lambda lr_key: Mode("optional", lr_key)  # noqa: E731
FROZEN = Mode("frozen")
UNUSED = Mode("unused")


@dataclass(frozen=True)
class GroupRule:
    group: str
    pattern: str  # regex, matched with re.search against full parameter names; first rule wins
    stages: dict[str, Mode] = field(default_factory=dict)
    doc: str = ""


# The freeze matrix of README "Training: the three-stage curriculum", as data. Order matters:
# the first matching rule claims a parameter.
FREEZE_MATRIX: tuple[GroupRule, ...] = (
    GroupRule("m2p", r"^m2p\.", {
        "A": TRAIN("stage_a_lr"),
        "B": DELAYED("m2p_lr_stage_b", "m2p_unfreeze_fraction_b"),
        "C": OPTIONAL("m2p_lr_stage_c"),
    }, "M2PEncoder: music + face -> pose heatmaps, face embedding"),
    # The face tokens' own key/value projections (id_adapter.face_kv.<i>.face_to_k/face_to_v) are
    # parameters of the ID adapter; the UNet's attention processors only hold references to them.
    GroupRule("id_adapter", r"^id_adapter\.", {
        "A": UNUSED, "B": TRAIN("stage_b_lr"), "C": FROZEN,
    }, "perceiver 512-d -> N face tokens, plus face K/V in the UNet's cross-attention"),
    GroupRule("pose_guider", r"^pose_guider\.", {
        "A": UNUSED, "B": TRAIN("stage_b_lr"), "C": FROZEN,
    }, "heatmaps -> latent-resolution features added after conv_in"),
    GroupRule("unet_temporal", r"^unet\..*(temporal|time_mixer|time_pos_embed)", {
        "A": UNUSED, "B": UNUSED, "C": TRAIN("stage_c_lr"),
    }, "SVD temporal transformer/res blocks and their mixers"),
    GroupRule("unet_spatial", r"^unet\.", {
        "A": UNUSED, "B": TRAIN("stage_b_lr"), "C": FROZEN,
    }, "everything else of the denoising UNet"),
    # The ReferenceNet runs the reference frame as a one-frame clip: its temporal layers only ever
    # see one frame and its output head feeds nothing, so both stay at SVD's weights.
    GroupRule("reference_net_frozen", r"^reference_net\.(.*(temporal|time_mixer|time_pos_embed)"
                                      r"|conv_norm_out\.|conv_out\.)",
              {"A": UNUSED, "B": FROZEN, "C": FROZEN},
              "ReferenceNet temporal layers and output head (kept from SVD)"),
    GroupRule("reference_net", r"^reference_net\.", {
        "A": UNUSED, "B": TRAIN("stage_b_lr"), "C": FROZEN,
    }, "CHAMP ReferenceNet: spatial self-attention features of the reference latent"),
)
# Components that are never part of the trained model: their outputs come from the cache.
NEVER_LOADED_IN_TRAINING = ("ArcFace", "VAE", "CLIP image encoder")


def group_of(name: str, rules: tuple[GroupRule, ...] = FREEZE_MATRIX) -> GroupRule:
    for rule in rules:
        if re.search(rule.pattern, name):
            return rule
    raise KeyError(f"parameter {name!r} matches no rule of the freeze matrix")


def _lr(cfg: Any, key: str | None) -> float:
    return float(getattr(cfg, key)) if key else 0.0


def is_trainable(mode: Mode, cfg: Any) -> bool:
    """Whether a group gets gradients in the stage at all (delayed groups do, later)."""
    if mode.mode in ("train", "delayed"):
        return True
    return mode.mode == "optional" and _lr(cfg, mode.lr_key) > 0


def group_lr(mode: Mode, cfg: Any, progress: float) -> float:
    """The group's LR at ``progress`` in [0, 1] of the stage (before warmup/schedule factors)."""
    if mode.mode == "train":
        return _lr(cfg, mode.lr_key)
    if mode.mode == "delayed":
        at = float(getattr(cfg, mode.unfreeze_key)) if mode.unfreeze_key else 0.0
        return _lr(cfg, mode.lr_key) if progress >= at else 0.0
    if mode.mode == "optional":
        return _lr(cfg, mode.lr_key)
    return 0.0


def apply_stage(model: nn.Module, stage: str, cfg: Any,
                rules: tuple[GroupRule, ...] = FREEZE_MATRIX) -> list[dict[str, Any]]:
    """Set requires_grad from the table; return optimiser param groups (one per trainable group).

    Each group dict carries ``name``, ``params``, ``lr`` (at progress 0) and ``mode``; the engine
    calls :func:`stage_lrs` every step to update LRs of delayed groups.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown training stage {stage!r} (one of {STAGES})")
    groups: dict[str, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        rule = group_of(name, rules)
        mode = rule.stages[stage]
        trainable = is_trainable(mode, cfg)
        p.requires_grad_(trainable)
        if trainable:
            g = groups.setdefault(rule.group, {"name": rule.group, "params": [], "mode": mode,
                                               "lr": group_lr(mode, cfg, 0.0)})
            g["params"].append(p)
    return list(groups.values())


def stage_lrs(param_groups: list[dict[str, Any]], cfg: Any, progress: float) -> list[float]:
    """Base LR of each optimiser param group at ``progress`` of the stage."""
    return [group_lr(g["mode"], cfg, progress) for g in param_groups]


def count_by_group(model: nn.Module, stage: str | None = None,
                   rules: tuple[GroupRule, ...] = FREEZE_MATRIX,
                   cfg: Any = None) -> dict[str, dict[str, int]]:
    """{group: {"total": n, "trainable": n}}; with ``stage``, trainable follows the table
    (``optional`` groups count as trainable unless ``cfg`` says their LR is 0)."""
    out: dict[str, dict[str, int]] = {}
    for name, p in model.named_parameters():
        rule = group_of(name, rules)
        row = out.setdefault(rule.group, {"total": 0, "trainable": 0})
        row["total"] += p.numel()
        if stage is None:
            row["trainable"] += p.numel() if p.requires_grad else 0
        elif cfg is not None:
            row["trainable"] += p.numel() if is_trainable(rule.stages[stage], cfg) else 0
        elif rule.stages[stage].mode in ("train", "delayed", "optional"):
            row["trainable"] += p.numel()
    return out


def freeze_table_markdown() -> str:
    """The matrix as a Markdown table (README, --help)."""
    lines = ["| group | " + " | ".join(STAGES) + " |", "|---|" + "---|" * len(STAGES)]
    for r in FREEZE_MATRIX:
        cells = []
        for s in STAGES:
            m = r.stages[s]
            cells.append(m.mode + (f" `{m.lr_key}`" if m.lr_key else ""))
        lines.append(f"| {r.group} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def assert_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise FloatingPointError(f"parameter {name} holds non-finite values")
