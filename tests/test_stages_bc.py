"""Stages B and C (tiny, CPU): schedules at their boundaries, losses, the EDM sampler, runs through
the engine on shards (exactly the right parameters change), an overfit batch, the ArcFace L_id."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from dwm.datasets import batch_to_device, eval_batches, make_view
from dwm.shared.config import build_train_config
from dwm.shared.shards import load_manifest
from dwm.training import edm, freeze, losses, schedules
from dwm.training.models.dance_model import DanceModel
from dwm.training.stages.stage_b import StageB
from dwm.training.stages.stage_c import StageC


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run many small ops: one thread avoids OpenMP spin-waits on a shared CPU."""
    from fixtures_data import one_torch_thread

    with one_torch_thread():
        yield


# ---------------------------------------------------------------------------------------------
# schedules at their boundaries
# ---------------------------------------------------------------------------------------------
def test_scheduled_sampling_ramps_over_the_last_fraction():
    total, f = 100, 0.2
    r = [schedules.scheduled_sampling_ratio(s, total, f) for s in range(total)]
    start = next(i for i, v in enumerate(r) if v > 0)
    assert 79 <= start <= 81 and r[start - 1] == 0.0
    assert r[-1] == 1.0 and all(b >= a for a, b in zip(r, r[1:]))
    assert 0.45 < schedules.scheduled_sampling_ratio(89, total, f) < 0.55
    assert schedules.scheduled_sampling_ratio(50, total, 0.0) == 0.0
    m2p, gt = torch.ones(2, 3), torch.zeros(2, 3)
    assert torch.equal(schedules.mix_guidance(m2p, gt, 0.0), gt)
    assert torch.equal(schedules.mix_guidance(m2p, gt, 1.0), m2p)
    mixed = schedules.mix_guidance(m2p, gt, torch.tensor([0.25, 1.0]))
    assert torch.allclose(mixed[:, 0], torch.tensor([0.25, 1.0]))


def test_condition_scale_ramp():
    total = 1000
    assert schedules.condition_scale(0, total, 1.0) == 0.5
    assert schedules.condition_scale(150, total, 1.0) == pytest.approx(1.0)
    assert schedules.condition_scale(75, total, 1.0) == pytest.approx(0.75)
    assert schedules.condition_scale(999, total, 1.0) == 1.0  # capped at guidance_scale
    assert schedules.condition_scale(300, total, 2.0) == pytest.approx(1.5)
    assert schedules.condition_scale(999, total, 2.0) == 2.0


def test_temporal_curriculum_and_stage_c_hooks():
    cfg = build_train_config(["model_size=full"], stage="C")
    assert (cfg.sequence_length, cfg.max_sequence_length) == (24, 150)
    stage = StageC(cfg)
    total = 1000
    lengths = [stage.sequence_length(s, total) for s in range(total)]
    assert lengths[0] == 24 and lengths[-1] == 150
    assert all(b >= a for a, b in zip(lengths, lengths[1:]))
    assert lengths[499] == pytest.approx(87, abs=1)
    stage.on_step_start(999, total)
    assert stage.current_length == 150
    assert schedules.curriculum_length(5, 10, 24, 24) == 24
    pickle.loads(pickle.dumps(stage))  # data workers receive the stage


def test_m2p_detach_follows_the_freeze_matrix():
    cfg = build_train_config(["model_size=tiny", "m2p_unfreeze_fraction_b=0.5"], stage="B")
    assert not schedules.m2p_trains("B", cfg, 49, 100)
    assert schedules.m2p_trains("B", cfg, 50, 100)
    assert not schedules.m2p_trains("C", cfg, 0, 100)  # m2p_lr_stage_c = 0
    cfg.m2p_lr_stage_c = 1e-6
    assert schedules.m2p_trains("C", cfg, 0, 100)


def test_condition_dropout_masks():
    keep_pose, keep_app = schedules.dropout_masks(5, 0.0)
    assert keep_pose.all() and keep_app.all()
    keep_pose, keep_app = schedules.dropout_masks(5, 1.0)
    assert not keep_pose.any() and not keep_app.any()
    torch.manual_seed(0)
    kp, ka = schedules.dropout_masks(20000, 0.1)
    assert 0.08 < 1 - kp.float().mean() < 0.12 and 0.08 < 1 - ka.float().mean() < 0.12
    assert 0.005 < (~kp & ~ka).float().mean() < 0.015  # independent


# ---------------------------------------------------------------------------------------------
# losses and EDM
# ---------------------------------------------------------------------------------------------
def test_face_region_loss_makes_the_3_to_1_weighting():
    torch.manual_seed(0)
    den, tgt = torch.randn(2, 3, 4, 8, 6), torch.randn(2, 3, 4, 8, 6)
    sigma = torch.tensor([0.5, 2.0])
    mask = torch.zeros(2, 3, 8, 6)
    mask[:, :, 2:5, 1:4] = 1.0
    total = losses.diffusion_loss(den, tgt, sigma) + losses.face_region_loss(den, tgt, sigma, mask)
    w = edm.loss_weight(sigma).view(2, 1, 1, 1, 1)
    manual = (w * losses.face_weight_map(mask, 3.0).unsqueeze(2) * (den - tgt) ** 2).mean()
    assert torch.allclose(total, manual, rtol=1e-5)
    assert losses.face_weight_map(mask).max() == 3.0 and losses.face_weight_map(mask).min() == 1.0
    # padded frames do not count
    fm = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    den2 = den.clone()
    den2[0, 2] += 100.0
    assert torch.allclose(losses.diffusion_loss(den, tgt, sigma, fm),
                          losses.diffusion_loss(den2, tgt, sigma, fm))


def test_heatmap_and_temporal_losses():
    target = torch.zeros(2, 3, 8, 6)
    target[:, :, 4, 3] = 1.0
    good = target * 20.0
    bad = torch.roll(target, 2, dims=-1) * 20.0
    assert losses.heatmap_loss(good, target) < 0.01 < losses.heatmap_loss(bad, target)
    conf = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # only joint 0 counts
    mixed = good.clone()
    mixed[:, 1:] = bad[:, 1:]
    assert losses.heatmap_loss(mixed, target, conf) < 0.01
    clip = torch.randn(2, 5, 4, 8, 6)
    assert losses.temporal_loss(clip + 3.0, clip) < 1e-10  # same motion, other content
    jitter = clip + 0.3 * torch.randn_like(clip)
    assert losses.temporal_loss(jitter, clip) > 0.05


def test_euler_sampler_with_exact_denoisers():
    point = torch.randn(3, 4)
    sigmas = edm.karras_sigmas(10)
    assert sigmas[0] == pytest.approx(edm.SIGMA_MAX, rel=1e-4) and sigmas[-1] == 0
    out = edm.euler_sample(lambda x, s: point.expand_as(x), torch.randn(3, 4), sigmas)
    assert torch.allclose(out, point, atol=1e-4)
    # data ~ N(0, s^2): the exact denoiser is x s^2 / (s^2 + sigma^2); the ODE maps unit noise
    # to std s (first-order Euler: the error shrinks as steps grow)
    s = 0.5
    torch.manual_seed(0)
    noise = torch.randn(20000)
    errors = []
    for steps in (40, 1000):
        out = edm.euler_sample(lambda x, sig: x * s ** 2 / (s ** 2 + sig ** 2), noise,
                               edm.karras_sigmas(steps))
        errors.append(abs(out.std().item() / noise.std().item() - s))
    assert errors[1] < 0.005 and errors[1] < errors[0] / 5


def test_sigma_distribution():
    torch.manual_seed(0)
    sig = edm.sample_sigmas(50000)
    assert sig.log().mean().item() == pytest.approx(0.7, abs=0.03)
    assert sig.log().std().item() == pytest.approx(1.6, abs=0.03)


# ---------------------------------------------------------------------------------------------
# the stages on shards
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bc_data(request, tmp_path_factory) -> str:
    """The manifest of the real sample shards (``sample_dataset``) when that fixture exists, else
    of a small synthetic dataset with the same contract."""
    try:
        data = request.getfixturevalue("sample_dataset")
    except pytest.FixtureLookupError:
        from test_datasets import write_synthetic_dataset

        return write_synthetic_dataset(tmp_path_factory.mktemp("bc_data"), n_train=4, n_val=2)
    data = Path(getattr(data, "manifest", data))
    return str(data / "manifest.json" if data.is_dir() else data)


def _cfg(data, out, models_dir, *extra):
    return build_train_config([
        "model_size=tiny", f"data={data}", f"output_dir={out}", f"models_dir={models_dir}",
        "train_batch_size=2", "num_workers=0", "checkpointing_steps=0", "log_steps=1",
        "lr_warmup_steps=1", "shuffle_buffer=4", "audio_window=16", "validation_batches=1",
        *extra])


def _groups_changed(before: dict, after: dict) -> dict[str, bool]:
    changed: dict[str, bool] = {}
    assert before.keys() == after.keys()
    for name in before:
        g = freeze.group_of(name).group
        changed[g] = changed.get(g, False) or not torch.equal(before[name], after[name])
    return changed


def _params(model: DanceModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class RecordingStageC(StageC):
    seen_lengths: list[int] = []

    def compute_loss(self, model, batch, step, total_steps):
        self.seen_lengths.append(int(batch["latents"].shape[1]))
        return super().compute_loss(model, batch, step, total_steps)


@pytest.fixture(scope="module")
def trained(bc_data, tiny_models_cfg, tmp_path_factory):
    """A fresh tiny DanceModel, then stage B and stage C through the engine."""
    from dwm.training.engine import run_stage
    from dwm.training.models.animator import build_dance_model

    out = tmp_path_factory.mktemp("bc_run")
    cfg_b = _cfg(bc_data, out, tiny_models_cfg.models_dir, "stage=B", "stage_b_steps=4",
                 "train_batch_size=1",
                 "stage_b_lr=1e-3", "m2p_lr_stage_b=1e-3", "validation_steps=0")
    torch.manual_seed(0)
    init = build_dance_model(cfg_b, "B")
    init.save_pretrained(out / "init")
    res_b = run_stage(StageB(cfg_b), cfg_b, out / "init")
    cfg_c = _cfg(bc_data, out, tiny_models_cfg.models_dir, "stage=C", "stage_c_steps=3",
                 "train_batch_size=1", "stage_c_lr=1e-3", "sequence_length=3",
                 "max_sequence_length=5", "validation_steps=3",
                 # the memory levers on the real path: temporal blocks checkpointed too, and
                 # attention held to the flash / memory-efficient kernels
                 "gradient_checkpointing=true", "use_xformers=true")
    stage_c = RecordingStageC(cfg_c)
    res_c = run_stage(stage_c, cfg_c, res_b.final_dir)
    print(f"\nstage B tiny CPU: {res_b.stats['step_ms']:.0f} ms/step "
          f"(batch 1); stage C tiny CPU: {res_c.stats['step_ms']:.0f} ms/step (batch 1, T 3-5)")
    return {"init": out / "init", "B": res_b, "C": res_c, "c_lengths": stage_c.seen_lengths}


def test_stage_b_changes_exactly_its_groups(trained):
    res = trained["B"]
    assert res.steps == 4 and res.skipped_steps == 0 and res.final_dir is not None
    before = _params(DanceModel.from_pretrained(trained["init"]))
    after = _params(DanceModel.from_pretrained(res.final_dir))
    changed = _groups_changed(before, after)
    assert changed == {"m2p": True, "id_adapter": True, "pose_guider": True,
                       "reference_net": True, "reference_net_frozen": False,
                       "unet_spatial": True, "unet_temporal": False}
    # the face K/V the attention processors use are among what changed
    assert any(not torch.equal(before[n], after[n]) for n in before if ".face_to_" in n)


def test_stage_c_changes_only_temporal_layers_and_follows_the_curriculum(trained):
    res = trained["C"]
    assert res.steps == 3 and res.skipped_steps == 0 and res.final_dir is not None
    before = _params(DanceModel.from_pretrained(trained["B"].final_dir))
    after = _params(DanceModel.from_pretrained(res.final_dir))
    changed = _groups_changed(before, after)
    assert changed.pop("unet_temporal") is True
    assert not any(changed.values()), changed
    assert trained["c_lengths"] == [3, 4, 5]
    assert {"loss_diff", "loss_id", "loss_temp"} <= set(res.val)
    assert all(torch.isfinite(torch.tensor(v)) for v in res.val.values())


@pytest.fixture(scope="module")
def real_batch_b(bc_data, tiny_models_cfg, tmp_path_factory):
    cfg = _cfg(bc_data, tmp_path_factory.mktemp("b"), tiny_models_cfg.models_dir, "stage=B")
    manifest = load_manifest(cfg.data)
    view = make_view("B", manifest.get("stats"), cfg)
    batch = next(iter(eval_batches(manifest, view, 2, split="train", max_batches=1, seed=0)))
    return cfg, _crop(batch_to_device(batch, "cpu"))


def _crop(batch, h=16, w=8):
    """A central h x w window of every latent-grid map (keeps the CPU tests fast; the M2P
    heatmaps are resized to the latent grid, so any window works)."""
    out = dict(batch)
    H, W = batch["target_latent"].shape[-2:]
    y, x = (H - h) // 2, (W - w) // 2
    for k in ("ref_latent", "target_latent", "heatmap", "face_mask"):
        out[k] = batch[k][..., y:y + h, x:x + w].contiguous()
    return out


def test_overfit_one_batch_loss_falls(real_batch_b):
    from dwm.training.models.animator import build_dance_model

    cfg, batch = real_batch_b
    stage = StageB(cfg)
    torch.manual_seed(0)
    model = build_dance_model(cfg, "B").train()
    groups = model.set_training_stage("B", cfg)
    opt = torch.optim.AdamW([{"params": g["params"]} for g in groups], lr=2e-3, weight_decay=0)
    sigma = torch.full((2,), 1.0)

    def loss_now():
        gen = torch.Generator().manual_seed(0)  # same noise every step: one fixed problem
        terms = stage.loss_terms(model, batch, 0, 100, sigma=sigma, generator=gen, dropout=0.0)
        return terms["diff"] + terms["id"]

    with torch.no_grad():
        first = float(loss_now())
    for _ in range(25):
        opt.zero_grad()
        loss = loss_now()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = float(loss_now())
    assert last < 0.5 * first, (first, last)


def test_compute_loss_logs_every_term(real_batch_b):
    from dwm.training.models.animator import build_dance_model

    cfg, batch = real_batch_b
    model = build_dance_model(cfg, "B").train()
    model.set_training_stage("B", cfg)
    stage = StageB(cfg)
    # at 90% of stage B: M2P trains (L_heat) and scheduled sampling is on
    loss, logs = stage.compute_loss(model, batch, 18, 20)
    assert torch.isfinite(loss) and {"diff", "id", "heat"} <= set(logs)
    assert 0 < logs["scheduled_sampling"] < 1 and logs["condition_scale"] == 1.0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.m2p.parameters())
    # early in the stage: no M2P, no L_heat, nothing reaches the M2PEncoder
    model.zero_grad(set_to_none=True)
    loss, logs = stage.compute_loss(model, batch, 0, 20)
    loss.backward()
    assert "heat" not in logs and logs["condition_scale"] == 0.5
    assert all(p.grad is None for p in model.m2p.parameters())


def test_arcface_identity_loss_form(real_batch_b, tmp_path):
    from dwm.training.models.animator import build_dance_model

    cfg, batch = real_batch_b
    torch.manual_seed(0)
    losses.TorchArcFace(layers=(1, 1, 1, 1), widths=(8, 8, 16, 16)).save_pretrained(
        tmp_path / "arcface")
    cfg = build_train_config([f"data={cfg.data}", "model_size=tiny",
                              f"models_dir={cfg.models.models_dir}", "audio_window=16",
                              "id_loss_form=arcface", f"arcface_weights={tmp_path / 'arcface'}",
                              "arcface_max_sigma=5.0"], stage="B")
    stage = StageB(cfg)
    model = build_dance_model(cfg, "B").train()
    model.set_training_stage("B", cfg)
    batch = dict(batch)
    batch["face_mask"] = torch.zeros_like(batch["face_mask"])
    batch["face_mask"][:, 4:10, 2:6] = 1.0  # a face box in every target frame
    batch["face_valid"] = torch.ones_like(batch["face_valid"])
    terms = stage.loss_terms(model, batch, 0, 20, sigma=torch.full((2,), 0.5),
                          generator=torch.Generator().manual_seed(0), dropout=0.0)
    assert 0.0 < terms["id"].item() <= 2.0
    terms["id"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.unet.parameters())
    vae, arcface, _ = stage.identity_models(torch.device("cpu"))
    assert not any(p.requires_grad for p in arcface.parameters())
    assert "_identity_models" not in pickle.loads(pickle.dumps(stage)).__dict__
    cfg.arcface_weights = ""
    with pytest.raises(Exception, match="arcface_weights"):
        StageB(cfg).identity_models(torch.device("cpu"))


def test_gradient_checkpointing_covers_temporal_blocks_and_keeps_the_gradients(tiny_models_cfg,
                                                                                tmp_path):
    """The memory levers change memory, not maths: with every block checkpointed (the temporal
    ones included) and attention held to the memory-efficient kernels, a stage-C step gives the
    same loss and gradients as without."""
    from dwm.bench.memory import make_batch
    from dwm.training.engine import attention_kernels
    from dwm.training.models.animator import build_dance_model

    cfg = _cfg("unused", tmp_path, tiny_models_cfg.models_dir, "stage=C", "sequence_length=3",
               "use_xformers=true")
    batch = make_batch("C", cfg, 64, 128, 3, 1)
    torch.manual_seed(0)
    model = build_dance_model(cfg, "C")
    model.set_training_stage("C", cfg)
    model.train()

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same noise and sigma draws
        with attention_kernels(cfg):
            assert not torch.backends.cuda.math_sdp_enabled()  # no score-storing kernel
            loss, _ = StageC(cfg).compute_loss(model, batch, 0, 10)
            loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.grad is not None}

    loss_plain, grads_plain = loss_and_grads()
    model.enable_gradient_checkpointing()
    wrapped = [m for m in model.unet.modules() if getattr(m, "_dwm_checkpointed", False)]
    assert wrapped and all(type(m).__name__ == "TemporalBasicTransformerBlock" for m in wrapped)
    loss_ckpt, grads_ckpt = loss_and_grads()
    assert torch.backends.cuda.math_sdp_enabled()  # the context restores the kernels
    assert torch.equal(loss_plain, loss_ckpt)
    assert grads_plain.keys() == grads_ckpt.keys() and grads_plain
    for n, g in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[n], g, rtol=1e-5, atol=1e-6, msg=n)
