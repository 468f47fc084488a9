"""The train-step memory estimator (dwm.bench.memory) against a real run.

The estimator runs the real stage-C step on fake tensors; here the same step (tiny models of the
same classes, bf16 autocast with CUDA's op lists, gradient checkpointing) also runs on real CPU
tensors, and its peak is measured independently of the estimator's own counting: by the torch
profiler's allocation events (every CPU allocator call, workspaces included).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from dwm.bench import memory

SIZE = dict(stage="C", width=64, height=128, T=3, dtype="bf16", model_size="tiny",
            block=1,  # the CPU allocator does not round to CUDA's 512-byte blocks
            # no condition dropout: the real run then takes the branch the fake one assumes
            overrides=["condition_dropout=0"])


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # module-scoped so that it also holds while the module-scoped ``estimates`` runs: with
    # several threads, CPU kernels allocate per-thread workspaces the estimator cannot count
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def profiler_peak_bytes(prof) -> int:
    """Peak of live bytes from the profiler's allocation/free events, from its start."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    return max(itertools.accumulate(n for _, n in events), default=0)


@pytest.fixture(scope="module")
def estimates():
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    _, real = memory.stage_step_memory(gradient_checkpointing=True, fake=False, around_step=prof,
                                       **SIZE)
    on, fake_on = memory.stage_step_memory(gradient_checkpointing=True, fake=True, **SIZE)
    off, _ = memory.stage_step_memory(gradient_checkpointing=False, fake=True, **SIZE)
    return {"measured": profiler_peak_bytes(prof), "real": real, "fake": fake_on, "on": on,
            "off": off}


def test_fake_estimate_matches_a_real_measured_step(estimates):
    fake = estimates["fake"]
    # the step's own peak above what lived before it (weights, optimiser state, batch): the
    # profiler only sees allocations made while it runs
    step_peak = fake.peak - fake.phase_peaks["forward"]["start"]
    measured = estimates["measured"]
    assert measured > 1_000_000  # the step really allocated (activations of the tiny UNet)
    # the profiler also sees kernels' internal workspaces, which no tensor-level count can
    ratio = step_peak / measured
    assert 0.9 <= ratio <= 1.05, (step_peak, measured)
    # the fake step and the real one are the same step, op for op
    real = estimates["real"]
    # (up to the few bytes of data-dependent branches the fake run cannot see)
    assert fake.peak == pytest.approx(real.peak, rel=1e-3)
    for phase, rec in real.phase_peaks.items():
        assert fake.phase_peaks[phase] == pytest.approx(rec, rel=1e-3)


def test_breakdown_is_consistent(estimates):
    e = estimates["on"]
    assert e.params_trainable > 0 and e.params_trainable < e.params_total
    # fp32 master weights, fp32 gradients, two fp32 AdamW moments
    assert e.weights_gib * memory.GiB >= 4 * e.params_total
    assert e.grads_gib * memory.GiB == pytest.approx(4 * e.params_trainable, rel=0.02)
    assert e.optimizer_gib * memory.GiB == pytest.approx(8 * e.params_trainable, rel=0.02)
    parts = e.weights_gib + e.optimizer_gib + e.inputs_gib + e.activations_gib \
        + e.grads_at_peak_gib
    assert max(parts, e.weights_gib + e.optimizer_gib + e.inputs_gib + e.grads_gib
               + e.optimizer_step_extra_gib) == pytest.approx(e.peak_gib, rel=1e-6)
    # memory-efficient attention (no materialised score matrix), as flash/xformers on a GPU
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in e.attention_kernels
    assert not any("math" in k for k in e.attention_kernels)


def test_gradient_checkpointing_lowers_the_activation_peak(estimates):
    on, off = estimates["on"], estimates["off"]
    assert on.activations_gib < 0.8 * off.activations_gib
    assert on.peak_gib < off.peak_gib
    assert on.weights_gib == off.weights_gib and on.optimizer_gib == off.optimizer_gib


def test_8bit_adam_state_is_about_a_quarter():
    params = [torch.empty(10_000), torch.empty(100)]  # the small one keeps fp32 states
    got = memory._optimizer_state_bytes_8bit(params)
    assert got == 2 * (10_000 + 4 * 40) + 8 * 100


def test_cuda_autocast_rules_are_scoped():
    x = torch.randn(2, 8, 4, 4).bfloat16()
    w = torch.ones(8)
    with memory.cuda_autocast_rules(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.group_norm(x, 2, w).dtype == torch.float32  # as on CUDA
        assert torch.softmax(x, -1).dtype == torch.float32
        assert (x @ x.transpose(-1, -2)).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # CPU's own rules are back
        assert torch.nn.functional.group_norm(x, 2, w).dtype == torch.bfloat16
