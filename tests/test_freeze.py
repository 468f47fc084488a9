"""The freeze matrix on the real full-size model (meta device) and on the tiny one."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dwm.shared.config import TrainConfig
from dwm.training import freeze

M = 1e6
TEMPORAL_MARKS = ("temporal", "time_mixer", "time_pos_embed")


def _expected_group(name: str) -> str:
    """Group of a parameter by plain string tests (independent of the matrix's regexes)."""
    top = name.split(".", 1)[0]
    temporal = any(m in name for m in TEMPORAL_MARKS)
    if top == "unet":
        return "unet_temporal" if temporal else "unet_spatial"
    if top == "reference_net":
        head = name.startswith(("reference_net.conv_out.", "reference_net.conv_norm_out."))
        return "reference_net_frozen" if temporal or head else "reference_net"
    return top  # m2p, pose_guider, id_adapter


# which groups get gradients, per stage, with the default config (m2p_lr_stage_c = 0)
TRAINS = {
    "B": {"m2p", "id_adapter", "pose_guider", "unet_spatial", "reference_net"},
    "C": {"unet_temporal"},
}


@pytest.fixture(scope="module")
def full_model():
    """The full-size DanceModel (SVD-xt UNet config = the class defaults) without memory."""
    from accelerate import init_empty_weights
    from diffusers import UNetSpatioTemporalConditionModel

    from dwm.training.models.animator import build_video_components
    from dwm.training.models.dance_model import DanceModel
    from dwm.training.models.m2p import M2PEncoder

    with init_empty_weights():
        unet = UNetSpatioTemporalConditionModel()
        model = DanceModel(m2p=M2PEncoder.from_size("full"), **build_video_components(unet, "full"))
    assert next(model.unet.parameters()).is_meta
    return model


def _sum(model, pred) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if pred(n))


def test_full_unet_matches_svd_xt(full_model):
    unet_total = _sum(full_model, lambda n: n.startswith("unet."))
    temporal = _sum(full_model, lambda n: n.startswith("unet.") and
                    any(m in n for m in TEMPORAL_MARKS))
    assert round(unet_total / M, 1) == 1524.6
    assert round(temporal / M, 1) == 656.1
    assert round((unet_total - temporal) / M, 1) == 868.5
    # the ReferenceNet is a full copy; processors add no parameters to the UNet
    assert _sum(full_model, lambda n: n.startswith("reference_net.")) == unet_total


@pytest.mark.parametrize("stage", ["B", "C"])
def test_full_size_trainable_counts_per_group(full_model, stage):
    cfg = TrainConfig()
    groups = full_model.set_training_stage(stage, cfg)
    expected: dict[str, dict[str, int]] = {}
    for name, p in full_model.named_parameters():
        g = _expected_group(name)
        row = expected.setdefault(g, {"total": 0, "trainable": 0})
        row["total"] += p.numel()
        row["trainable"] += p.numel() if g in TRAINS[stage] else 0
        assert p.requires_grad == (g in TRAINS[stage]), name
    got = freeze.count_by_group(full_model)  # from requires_grad, as apply_stage set it
    assert got == expected
    assert freeze.count_by_group(full_model, stage, cfg=cfg) == expected
    assert {g["name"] for g in groups} == TRAINS[stage]
    total = sum(r["trainable"] for r in got.values())
    print(f"\nstage {stage}: trainable {total / M:.1f} M = " + ", ".join(
        f"{k} {v['trainable'] / M:.2f}/{v['total'] / M:.2f} M" for k, v in got.items()))
    if stage == "B":
        assert round(got["unet_spatial"]["trainable"] / M, 1) == 868.5
        assert got["unet_temporal"]["trainable"] == 0
    else:
        assert round(total / M, 1) == 656.1


def test_stage_c_optional_m2p_lr(full_model):
    cfg = dataclasses.replace(TrainConfig(), m2p_lr_stage_c=1e-6)
    groups = full_model.set_training_stage("C", cfg)
    assert {g["name"] for g in groups} == {"unet_temporal", "m2p"}
    assert all(p.requires_grad for p in full_model.m2p.parameters())


def test_delayed_m2p_lr_in_stage_b(full_model):
    cfg = TrainConfig(m2p_unfreeze_fraction_b=0.5, m2p_lr_stage_b=1e-5, stage_b_lr=1e-4)
    groups = full_model.set_training_stage("B", cfg)
    names = [g["name"] for g in groups]
    before = dict(zip(names, freeze.stage_lrs(groups, cfg, 0.49)))
    after = dict(zip(names, freeze.stage_lrs(groups, cfg, 0.5)))
    assert before["m2p"] == 0.0 and after["m2p"] == 1e-5
    assert before["unet_spatial"] == after["unet_spatial"] == 1e-4


def test_every_parameter_has_one_rule_and_face_kv_belongs_to_id_adapter(full_model):
    names = [n for n, _ in full_model.named_parameters()]
    for n in names:
        assert freeze.group_of(n).group == _expected_group(n), n
    face = [n for n in names if ".face_to_k." in n or ".face_to_v." in n]
    # 16 spatial cross-attention layers in SVD, each with face_to_k and face_to_v
    assert len(face) == 32 and all(n.startswith("id_adapter.face_kv.") for n in face)
    assert not any("processor" in n for n in names)


def test_freeze_table_markdown_lists_every_group():
    table = freeze.freeze_table_markdown()
    for rule in freeze.FREEZE_MATRIX:
        assert f"| {rule.group} |" in table
