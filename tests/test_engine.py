"""The shared training engine: exact resume, rotation, atomic and pickle-free checkpoints,
non-finite handling, LR schedule with delayed groups, a golden loss, stage=all orchestration.

Runs stage A's tiny M2PEncoder on a small synthetic dataset (see test_datasets.py) on CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_datasets import write_synthetic_dataset

from dwm.shared.config import build_train_config
from dwm.training import checkpoint as ckpt
from dwm.training.engine import LRSchedule, TrainingError, make_optimizer, run_stage
from dwm.training.models.dance_model import DanceModel
from dwm.training.models.m2p import M2PEncoder
from dwm.training.stages.stage_a import StageA


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> str:
    return write_synthetic_dataset(tmp_path_factory.mktemp("engine_data"), n_train=5, n_val=2)


def _cfg(data: str, out: Path, *extra: str):
    return build_train_config([
        "model_size=tiny", "stage=A", f"data={data}", f"output_dir={out}", "stage_a_steps=4",
        "audio_window=16", "train_batch_size=2", "num_workers=0", "validation_steps=0",
        "checkpointing_steps=0", "lr_warmup_steps=2", "stage_a_lr=1e-3", "log_steps=1",
        "shuffle_buffer=4", *extra])


class DropoutStageA(StageA):
    """Stage A with dropout, so exact resume also needs the restored torch RNG."""

    def build_model(self, cfg, init_path):
        return DanceModel(m2p=M2PEncoder.from_size("tiny", dropout=0.2))


def test_resume_is_exact_and_checkpoints_rotate(synth, tmp_path):
    straight_cfg = _cfg(synth, tmp_path / "a", "checkpointing_steps=1", "checkpoints_total_limit=2",
                        "num_workers=2")
    straight = run_stage(DropoutStageA(straight_cfg), straight_cfg)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "a" / "stage_A")] == [2, 3]  # rotated
    assert (tmp_path / "a" / "stage_A" / "final" / "model_index.json").is_file()

    cfg = _cfg(synth, tmp_path / "b", "checkpointing_steps=2", "num_workers=2")
    first = run_stage(DropoutStageA(cfg), cfg, max_steps=2)
    assert first.final_dir is None and ckpt.latest_checkpoint(tmp_path / "b" / "stage_A").name == "checkpoint-2"
    cfg.resume = "latest"
    second = run_stage(DropoutStageA(cfg), cfg)
    assert [s for s, _ in second.losses] == [3, 4]
    got = [loss for _, loss in first.losses + second.losses]
    want = [loss for _, loss in straight.losses]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    a = M2PEncoder.from_pretrained(tmp_path / "a" / "stage_A" / "final" / "m2p")
    b = M2PEncoder.from_pretrained(tmp_path / "b" / "stage_A" / "final" / "m2p")
    for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)

    # nothing in a checkpoint needs unpickling: safetensors and JSON only
    for f in (tmp_path / "a" / "stage_A").rglob("checkpoint-*/**/*"):
        if f.is_file():
            assert f.suffix in (".json", ".safetensors"), f
    state = json.loads((tmp_path / "b" / "stage_A" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["data"]["batch"] + state["data"]["epoch"] * state["data"]["batches_per_epoch"] == 2


# First losses of a seeded tiny run (seed 42, synthetic data seed 0, CPU float32), recorded
# from this code; a change in the model, loss, data order or init shows up here.
GOLDEN = [40.468884, 39.69363, 39.73494]  # x0 pose denoiser (issue 14) on v2 shards (issue 16)


def test_golden_loss(synth, tmp_path):
    cfg = _cfg(synth, tmp_path, "stage_a_steps=3")
    res = run_stage(StageA(cfg), cfg, save_final=False)
    got = [round(v, 6) for _, v in res.losses]
    print("golden losses:", got)
    assert got == pytest.approx(GOLDEN, rel=2e-3)
    assert res.stats["steps"] == 3 and 0.0 <= res.stats["data_wait_fraction"] <= 1.0
    logs = list((tmp_path / "stage_A" / "logs").glob("events.out.tfevents.*"))
    assert logs and logs[0].stat().st_size > 0


class NaNStage(StageA):
    """Non-finite loss at the steps listed in ``bad`` (all steps when None)."""

    bad: tuple[int, ...] | None = None

    def compute_loss(self, model, batch, step, total_steps):
        loss, terms = super().compute_loss(model, batch, step, total_steps)
        if self.bad is None or step in self.bad:
            loss = loss * float("nan")
        return loss, terms


def test_nonfinite_steps_skipped_then_stop(synth, tmp_path):
    cfg = _cfg(synth, tmp_path / "one", "stage_a_steps=3", "checkpointing_steps=1")
    stage = NaNStage(cfg)
    stage.bad = (1,)
    res = run_stage(stage, cfg)
    assert res.skipped_steps == 1 and [s for s, _ in res.losses] == [1, 3]
    ckpt_dir = ckpt.latest_checkpoint(tmp_path / "one" / "stage_A")
    m = M2PEncoder.from_pretrained(ckpt_dir / "model" / "m2p")
    assert all(torch.isfinite(p).all() for p in m.parameters())

    cfg = _cfg(synth, tmp_path / "all", "stage_a_steps=10", "max_nonfinite_steps=2")
    with pytest.raises(TrainingError, match="2 non-finite losses in a row"):
        run_stage(NaNStage(cfg), cfg)


def test_checkpoint_atomic_and_refuses_nan(synth, tmp_path):
    cfg = _cfg(synth, tmp_path, "stage_a_steps=1")
    sdir = tmp_path / "stage_A"
    model = DanceModel(m2p=M2PEncoder.from_size("tiny"))
    opt = make_optimizer(model.set_training_stage("A", cfg), cfg)
    ckpt.save_checkpoint(sdir, 5, model=model, optimizer=opt, trainer_state={"stage": "A"})
    (sdir / ".tmp-checkpoint-9").mkdir()  # a crash while writing step 9
    (sdir / "checkpoint-7").mkdir()  # not ours / incomplete: no trainer_state.json
    assert ckpt.latest_checkpoint(sdir).name == "checkpoint-5"
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(ckpt.CheckpointError, match="non-finite"):
        ckpt.save_checkpoint(sdir, 8, model=model, optimizer=opt, trainer_state={"stage": "A"})
    assert ckpt.latest_checkpoint(sdir).name == "checkpoint-5"
    # restoring puts the finite weights back
    state = ckpt.load_checkpoint(sdir / "checkpoint-5", model=model, optimizer=opt)
    assert state["step"] == 5 and all(torch.isfinite(p).all() for p in model.parameters())


def test_lr_schedule_warmup_and_delayed_group(synth):
    cfg = build_train_config(["model_size=tiny", "lr_warmup_steps=4", "m2p_lr_stage_b=2e-5",
                              "m2p_unfreeze_fraction_b=0.5"])
    model = DanceModel(m2p=M2PEncoder.from_size("tiny"))
    groups = model.set_training_stage("B", cfg)  # m2p is "delayed" in stage B
    opt = make_optimizer(groups, cfg)
    sched = LRSchedule(opt, groups, cfg, total_steps=10)
    assert all(p.requires_grad for p in model.parameters())  # in the optimiser from step 0
    assert sched.apply(0) == [0.0] and sched.apply(4) == [0.0]
    assert sched.apply(5) == [pytest.approx(2e-5)] and opt.param_groups[0]["lr"] == pytest.approx(2e-5)
    cfg.training_stage = "A"
    groups = model.set_training_stage("A", cfg)
    sched = LRSchedule(make_optimizer(groups, cfg), groups, cfg, total_steps=10)
    assert sched.apply(0)[0] == pytest.approx(cfg.stage_a_lr / 4)
    assert sched.apply(3)[0] == pytest.approx(cfg.stage_a_lr)


def test_stage_all_chains_finals(synth, tiny_models_cfg, tmp_path):
    """stage=all runs the real A, B and C (tiny, 1-2 steps each), each from the previous final/."""
    from safetensors.torch import load_file

    from dwm.training import train

    cfg = _cfg(synth, tmp_path, "stage=all", "stage_a_steps=2", "stage_b_steps=1",
               "stage_c_steps=1", "train_batch_size=1", "sequence_length=3",
               "max_sequence_length=4", "m2p_lr_stage_c=1e-4",
               f"models.models_dir={tiny_models_cfg.models_dir}")
    assert cfg.training_stage == "all" and cfg.models.profile == "tiny"
    assert train.main(cfg) == 0
    for s in "ABC":
        info = json.loads((tmp_path / f"stage_{s}" / "final" / "training_info.json").read_text())
        assert info["stage"] == s and info["steps"] == {"A": 2, "B": 1, "C": 1}[s]
    for part in ("m2p", "unet", "reference_net", "pose_guider", "id_adapter"):
        assert (tmp_path / "final" / part / "config.json").is_file(), part  # C's final, copied
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert set(summary) == {"A", "B", "C"}
    assert all(math.isfinite(summary[s]["losses"][-1][1]) for s in "ABC")
    assert train.init_for("C", cfg).endswith("stage_B/final")

    def m2p_weights(stage):
        files = sorted((tmp_path / f"stage_{stage}" / "final" / "m2p").glob("*.safetensors"))
        return {k: v for f in files for k, v in load_file(str(f)).items()}

    a, b, c = (m2p_weights(s) for s in "ABC")
    # B started from A's final: its M2PEncoder is A's (in B it waits for the last half of the
    # stage, which one step never reaches); C trains it at m2p_lr_stage_c, so C's moved on
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(b[k], c[k]) for k in b)


def test_m2p_gradient_checkpointing_same_gradients_and_roundtrip(tmp_path):
    torch.manual_seed(0)
    m = M2PEncoder.from_size("tiny")
    args = (torch.randn(2, 8, 80), torch.randn(2, 8, 35), torch.ones(2, 8), torch.rand(2, 3, 112, 112))

    denoiser_inputs = dict(ref_pose=torch.rand(2, 18, 3), noisy=torch.randn(2, 8, 18, 2),
                           sigma=torch.full((2,), 0.5))
    torch.nn.init.normal_(m.head.weight, std=0.1)  # zero-initialised: no gradient past it yet

    def grads():
        m.zero_grad()
        out = m(*args, **denoiser_inputs)
        (out.heatmap_logits.square().mean() + out.coords.sum() + out.face_embed.sum()).backward()
        return [None if p.grad is None else p.grad.clone() for p in m.parameters()]

    plain = grads()
    m.enable_gradient_checkpointing()
    assert m.gradient_checkpointing
    for a, b in zip(plain, grads()):
        if a is None or b is None:
            assert a is None and b is None  # unused inputs (no context frames, no dropout)
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    out = m(*args)
    assert out.heatmap_logits.shape == (2, 8, 18, 56, 32) and out.coords.shape == (2, 8, 18, 2)
    assert torch.allclose(out.face_embed.norm(dim=-1), torch.ones(2), atol=1e-5)
    from dwm.training.models.m2p import soft_argmax

    xy = soft_argmax(out.heatmap_logits)  # coords are x0 (unclipped), heatmaps lie in the frame
    assert ((xy >= 0) & (xy <= 1)).all()
    m.save_pretrained(tmp_path / "m2p")
    assert list((tmp_path / "m2p").glob("*.safetensors"))
    m2 = M2PEncoder.from_pretrained(tmp_path / "m2p")
    torch.testing.assert_close(m2(*args).coords, m(*args).coords)
    with torch.device("meta"):  # the full size, counted without allocating it
        full = M2PEncoder.from_size("full")
    assert full.count_parameters()["total"] == 59_759_414
