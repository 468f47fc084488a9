"""The integrated video model (tiny, CPU): wiring, conditioning paths, save/load round trip."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dwm.shared.config import build_train_config
from dwm.training import edm
from dwm.training.models import animator
from dwm.training.models.attention import (ContextOnlyProcessor, FaceCrossAttnProcessor,
                                           ReferenceReader, ReferenceWriter, spatial_layers)

B, F, H, W = 2, 3, 16, 8


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run many small ops: one thread avoids OpenMP spin-waits on a shared CPU."""
    from fixtures_data import one_torch_thread

    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def tiny_cfg(tiny_models_cfg):
    cfg = build_train_config(["model_size=tiny"], stage="B")
    return dataclasses.replace(cfg, models=tiny_models_cfg)


@pytest.fixture(scope="module")
def model(tiny_cfg):
    torch.manual_seed(0)
    m = animator.build_dance_model(tiny_cfg, "B").eval()
    return m


def _randomise_zero_inits(model) -> None:
    """Fresh pose guider / face K/V are zero-initialised (no effect): give them weights."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in (model.pose_guider.proj_out.weight, model.pose_guider.proj_out.bias):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for kv in model.id_adapter.face_kv:
            kv.face_to_v.weight.copy_(torch.randn(kv.face_to_v.weight.shape, generator=g) * 0.2)


def _inputs(seed=0, **over):
    g = torch.Generator().manual_seed(seed)
    cond = dict(ref_latent=torch.randn(B, 4, H, W, generator=g),
                clip_embed=torch.randn(B, 32, generator=g),
                face_embed=torch.nn.functional.normalize(torch.randn(B, 512, generator=g), dim=-1),
                pose=torch.rand(B, F, 18, H, W, generator=g))
    cond["concat_latent"] = cond["ref_latent"] / 0.18215
    cond.update(over)
    x = torch.randn(B, F, 4, H, W, generator=g)
    return x, torch.tensor([0.7, 4.0]), animator.Conditioning(**cond)


def _run(model, x, sigma, cond):
    with torch.no_grad():
        return animator.denoise(model, x, sigma, cond)


def test_processors_are_where_they_belong(model, tiny_cfg):
    procs = model.unet.attn_processors
    for name, proc in procs.items():
        if "temporal_transformer_blocks" in name:
            assert not isinstance(proc, (ReferenceReader, FaceCrossAttnProcessor)), name
            if name.endswith("attn2.processor"):
                assert isinstance(proc, ContextOnlyProcessor)
        elif name.endswith("attn1.processor"):
            assert isinstance(proc, ReferenceReader)
        else:
            assert isinstance(proc, FaceCrossAttnProcessor)
    writers = [n for n, p in model.reference_net.attn_processors.items()
               if isinstance(p, ReferenceWriter)]
    assert len(writers) == len(spatial_layers(model.unet, "attn1")) > 0
    assert all("temporal" not in n for n in writers)
    # processor weights are the ID adapter's: the UNet's state is a stock SVD UNet's
    from dwm.shared import pretrained

    stock = pretrained.load_unet(tiny_cfg.models)
    assert set(model.unet.state_dict()) == set(stock.state_dict())
    assert any(".face_to_v." in n for n, _ in model.id_adapter.named_parameters())


def test_reference_is_read_by_spatial_self_attention_only(model):
    x, sigma, cond = _inputs()
    out = _run(model, x, sigma, cond)
    reads = animator.get_wiring(model).bank.read_layers
    assert sorted(reads) == sorted(spatial_layers(model.unet, "attn1"))
    # the reference frame changes the output through the ReferenceNet alone
    other = dataclasses.replace(cond, ref_latent=cond.ref_latent.flip(-1))
    assert not torch.allclose(out, _run(model, x, sigma, other), atol=1e-5)


def test_dropped_appearance_ignores_reference_clip_and_face(model):
    _randomise_zero_inits(model)
    x, sigma, cond = _inputs()
    keep = torch.tensor([True, False])  # sample 1 loses its appearance conditions
    a = _run(model, x, sigma, dataclasses.replace(cond, keep_appearance=keep))
    changed = dataclasses.replace(cond, keep_appearance=keep, ref_latent=torch.randn(B, 4, H, W),
                                  concat_latent=torch.randn(B, 4, H, W),
                                  clip_embed=torch.randn(B, 32), face_embed=torch.randn(B, 512))
    b = _run(model, x, sigma, changed)
    assert torch.allclose(a[1], b[1], atol=1e-5)  # dropped sample: unaffected
    assert not torch.allclose(a[0], b[0], atol=1e-4)  # kept sample: follows its conditions
    # and the dropped sample got plain self-attention, as if there were no ReferenceNet at all
    ref_net, model.reference_net = model.reference_net, None
    try:
        plain = _run(model, x, sigma, dataclasses.replace(cond, keep_appearance=keep))
    finally:
        model.reference_net = ref_net
    assert torch.allclose(plain[1], a[1], atol=1e-5)
    assert not torch.allclose(plain[0], a[0], atol=1e-4)


def test_pose_guidance_zero_init_scale_and_dropout(tiny_cfg):
    torch.manual_seed(0)
    fresh = animator.build_dance_model(tiny_cfg, "B").eval()
    x, sigma, cond = _inputs()
    other_pose = dataclasses.replace(cond, pose=torch.rand(B, F, 18, H, W))
    # zero-initialised projection: a fresh guider leaves the pretrained UNet untouched
    assert torch.equal(_run(fresh, x, sigma, cond), _run(fresh, x, sigma, other_pose))
    _randomise_zero_inits(fresh)
    a, b = _run(fresh, x, sigma, cond), _run(fresh, x, sigma, other_pose)
    assert not torch.allclose(a, b, atol=1e-4)
    keep = torch.tensor([True, False])
    a = _run(fresh, x, sigma, dataclasses.replace(cond, keep_pose=keep))
    b = _run(fresh, x, sigma, dataclasses.replace(other_pose, keep_pose=keep))
    assert torch.allclose(a[1], b[1], atol=1e-6) and not torch.allclose(a[0], b[0], atol=1e-4)
    # pose_scale 0 is the same as no pose at all
    none = _run(fresh, x, sigma, dataclasses.replace(cond, pose=None))
    assert torch.allclose(_run(fresh, x, sigma, dataclasses.replace(cond, pose_scale=0.0)), none,
                          atol=1e-6)


def test_face_tokens_enter_through_face_kv(tiny_cfg):
    torch.manual_seed(0)
    fresh = animator.build_dance_model(tiny_cfg, "B").eval()
    x, sigma, cond = _inputs()
    other = dataclasses.replace(cond, face_embed=torch.randn(B, 512))
    assert torch.allclose(_run(fresh, x, sigma, cond), _run(fresh, x, sigma, other), atol=1e-6)
    _randomise_zero_inits(fresh)
    assert not torch.allclose(_run(fresh, x, sigma, cond), _run(fresh, x, sigma, other), atol=1e-4)
    keep = torch.tensor([False, False])
    assert torch.allclose(_run(fresh, x, sigma, dataclasses.replace(cond, keep_face=keep)),
                          _run(fresh, x, sigma, dataclasses.replace(other, keep_face=keep)),
                          atol=1e-6)


def test_gradients_reach_every_trainable_component(tiny_cfg):
    torch.manual_seed(0)
    m = animator.build_dance_model(tiny_cfg, "B").train()
    _randomise_zero_inits(m)
    x, sigma, cond = _inputs()
    animator.denoise(m, x, sigma, cond).square().mean().backward()
    for comp in ("pose_guider", "id_adapter", "reference_net", "unet"):
        grads = [p.grad for p in getattr(m, comp).parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), comp
    assert all(kv.face_to_k.weight.grad.abs().sum() > 0 for kv in m.id_adapter.face_kv)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_cfg):
    def grads(checkpointing: bool):
        torch.manual_seed(0)
        m = animator.build_dance_model(tiny_cfg, "B").train()
        _randomise_zero_inits(m)
        if checkpointing:
            m.unet.enable_gradient_checkpointing()
            m.reference_net.enable_gradient_checkpointing()
        x, sigma, cond = _inputs()
        animator.denoise(m, x, sigma, cond).square().mean().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()
                if p.grad is not None and not n.startswith("m2p.")}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], atol=1e-5, rtol=1e-4), n


def test_save_load_round_trip_is_exact(model, tmp_path):
    _randomise_zero_inits(model)
    x, sigma, cond = _inputs()
    before = _run(model, x, sigma, cond)
    model.save_pretrained(tmp_path / "final")
    loaded = animator.load_dance_model(tmp_path / "final")
    assert set(loaded.components()) == {"m2p", "pose_guider", "id_adapter", "reference_net", "unet"}
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert torch.equal(_run(loaded, x, sigma, cond), before)
    assert any(isinstance(p, FaceCrossAttnProcessor) for p in loaded.unet.attn_processors.values())


def test_edm_preconditioning_identities():
    sigma = torch.tensor([0.01, 1.0, 50.0])
    c_skip, c_out, c_in, c_noise = edm.preconditioning(sigma)
    # sigma_data = 1: c_skip^2 + c_out^2 * ... the EDM identities
    assert torch.allclose(c_skip + c_out ** 2, torch.ones(3))
    assert torch.allclose(c_in, (sigma ** 2 + 1).rsqrt())
    assert torch.allclose(c_noise, sigma.log() / 4)
    assert torch.allclose(edm.loss_weight(sigma) * c_out ** 2, torch.ones(3))
