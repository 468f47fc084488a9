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
GOLDEN = [10.287617, 16.554813, 25.516375]  # the reference-aware pose denoiser (issue 14)


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


class FakeLaterStage(StageA):
    """Stands in for B/C in the orchestration test: trains the M2PEncoder it is given."""

    def build_model(self, cfg, init_path):
        assert init_path and Path(init_path, "model_index.json").is_file()
        return DanceModel.from_pretrained(init_path, components=("m2p",))

    def total_steps(self, cfg):
        return 2


def test_stage_all_chains_finals(synth, tmp_path, monkeypatch):
    from dwm.training import stages, train

    class FakeB(FakeLaterStage):
        name = "B"

    class FakeC(FakeLaterStage):
        name = "C"

    monkeypatch.setitem(stages.STAGES, "B", "test_engine:FakeB")
    monkeypatch.setitem(stages.STAGES, "C", "test_engine:FakeC")
    import test_engine

    monkeypatch.setattr(test_engine, "FakeB", FakeB, raising=False)
    monkeypatch.setattr(test_engine, "FakeC", FakeC, raising=False)
    cfg = _cfg(synth, tmp_path, "stage_a_steps=2", "m2p_lr_stage_c=1e-4")
    cfg.training_stage = "all"
    assert train.main(cfg) == 0
    for s in "ABC":
        assert (tmp_path / f"stage_{s}" / "final" / "model_index.json").is_file()
    assert (tmp_path / "final" / "m2p" / "config.json").is_file()
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert set(summary) == {"A", "B", "C"} and all(math.isfinite(summary[s]["losses"][-1][1]) for s in "ABC")
    assert train.init_for("C", cfg).endswith("stage_B/final")


def test_m2p_gradient_checkpointing_same_gradients_and_roundtrip(tmp_path):
    torch.manual_seed(0)
    m = M2PEncoder.from_size("tiny")
    args = (torch.randn(2, 8, 80), torch.randn(2, 8, 35), torch.ones(2, 8), torch.rand(2, 3, 112, 112))

    def grads():
        m.zero_grad()
        out = m(*args)
        (out.heatmap_logits.square().mean() + out.coords.sum() + out.face_embed.sum()).backward()
        return [p.grad.clone() for p in m.parameters()]

    plain = grads()
    m.enable_gradient_checkpointing()
    assert m.gradient_checkpointing
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    out = m(*args)
    assert out.heatmap_logits.shape == (2, 8, 18, 56, 32) and out.coords.shape == (2, 8, 18, 2)
    assert torch.allclose(out.face_embed.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert ((out.coords >= 0) & (out.coords <= 1)).all()
    m.save_pretrained(tmp_path / "m2p")
    assert list((tmp_path / "m2p").glob("*.safetensors"))
    m2 = M2PEncoder.from_pretrained(tmp_path / "m2p")
    torch.testing.assert_close(m2(*args).coords, m(*args).coords)
    with torch.device("meta"):  # the full size, counted without allocating it
        full = M2PEncoder.from_size("full")
    assert full.count_parameters()["total"] == 59_759_414
