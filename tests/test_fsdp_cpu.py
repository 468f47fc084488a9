"""The training engine under FSDP2 (torch's ``fully_shard``) on 2 CPU processes (gloo).

Launched exactly as on a cluster, ``accelerate launch --config_file
shared/configs/accelerate/fsdp.yaml --num_processes 2 ...``, with ONE test-only shim: accelerate
1.15 turns an FSDP config into FSDP only on GPUs (``AcceleratorState`` switches to
``DistributedType.FSDP`` for MULTI_GPU/NPU/XPU/...; on CPU it stays MULTI_CPU and silently wraps
the model in DDP). The shim (``FSDP_CPU_SHIM`` in fixtures_launch.py, injected into the launched script only) makes
that one decision the GPU way; everything after it is accelerate's and torch's real FSDP2 path:
``fully_shard`` of the diffusers blocks, DTensor parameters, gathered checkpoints.

* stage B trains 2 steps under FSDP, leaves checkpoint-2, resumes from it (``resume=latest``),
  trains steps 3-4 and writes ``final/``; losses are finite, parameters are really DTensors;
* the resumed FSDP run ends with the same weights (within float tolerance) as an uninterrupted
  4-step DDP run on the same 2 ranks and data: FSDP's gradients are DDP's, and resume restored
  the weights, the optimiser state and the data position;
* only the freeze matrix's trainable parameters changed; the frozen ones equal the initial weights;
* the checkpoints are the usual safetensors + JSON layout: a single process loads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures_launch import STEPS
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def runs(fsdp_ddp_runs) -> dict[str, tuple[Path, list[dict]]]:
    return fsdp_ddp_runs


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*/*.safetensors")):
        out.update({f"{f.parent.name}.{k}": v for k, v in load_file(str(f)).items()})
    return out


def test_fsdp_trains_checkpoints_and_resumes(runs):
    sdir, ranks = runs["fsdp"]
    for r in ranks:
        assert r["world"] == 2 and r["distributed_type"] == "DistributedType.FSDP", r
        assert "DTensor" in r["param_types"], r["param_types"]  # really sharded
        assert r["steps"] == [2, STEPS]  # stopped at 2, resumed from checkpoint-2 to the end
        assert [s for s, _ in r["losses"]] == [1, 2, 3, 4]
        assert all(torch.isfinite(torch.tensor(v)) for _, v in r["losses"])
    assert (sdir / "checkpoint-2" / "trainer_state.json").is_file()
    assert json.loads((sdir / "checkpoint-2" / "trainer_state.json").read_text())["step"] == 2
    assert (sdir / "final" / "model_index.json").is_file()
    # gathered, not sharded: the checkpoint holds full tensors of the model's own shapes
    init = load_file(str(sdir.parent.parent / "fsdp_out" / "init.safetensors"))
    ck = _weights(sdir / "checkpoint-2" / "model")
    assert ck.keys() == init.keys()
    assert all(ck[k].shape == init[k].shape for k in init)
    # the full optimiser state: Adam moments of full parameter shapes (compared with DDP's below)
    opt = load_file(str(sdir / "checkpoint-2" / "optimizer.safetensors"))
    shapes = {tuple(v.shape) for k, v in opt.items() if k.endswith(".exp_avg")}
    assert shapes and shapes <= {tuple(init[n].shape) for n in ranks[0]["trainable"]}


def test_fsdp_changes_only_trainable_params(runs):
    sdir, ranks = runs["fsdp"]
    init = load_file(str(sdir.parent.parent / "fsdp_out" / "init.safetensors"))
    final = _weights(sdir / "final")
    trainable = set(ranks[0]["trainable"])
    assert trainable and trainable < set(init)
    changed = {k for k in init if not torch.equal(init[k], final[k])}
    assert changed and changed <= trainable, sorted(changed - trainable)[:5]


def test_fsdp_resumed_run_matches_uninterrupted_ddp(runs):
    fsdp_dir, fsdp_ranks = runs["fsdp"]
    ddp_dir, ddp_ranks = runs["ddp"]
    assert ddp_ranks[0]["distributed_type"] == "DistributedType.MULTI_CPU"
    assert ddp_ranks[0]["param_types"] == ["Parameter"]  # the reference really is unsharded
    # the same data, the same noise: the same losses step by step
    fl, dl = (torch.tensor([v for _, v in r[0]["losses"]]) for r in (fsdp_ranks, ddp_ranks))
    torch.testing.assert_close(fl, dl, rtol=1e-4, atol=1e-5)
    init = load_file(str(fsdp_dir.parent.parent / "fsdp_out" / "init.safetensors"))
    for name in ("checkpoint-2", "final"):
        f = _weights(fsdp_dir / name / ("model" if name != "final" else ""))
        d = _weights(ddp_dir / name / ("model" if name != "final" else ""))
        assert f.keys() == d.keys()
        # Adam turns reduction-order rounding on near-zero gradients into up to ~lr per element
        # and step, so compare the whole update: FSDP's and DDP's agree to 1% (measured 0.04%);
        # a lost optimiser state or data position after the resume moves them far more apart
        fu = torch.cat([(f[k] - init[k]).flatten() for k in sorted(init)])
        du = torch.cat([(d[k] - init[k]).flatten() for k in sorted(init)])
        assert du.norm() > 0 and (fu - du).norm() <= 0.01 * du.norm(), (name, fu.norm(), du.norm())
    # the gathered optimiser state is DDP's: same param ids, same moments
    fo, do = (load_file(str(d / "checkpoint-2" / "optimizer.safetensors"))
              for d in (fsdp_dir, ddp_dir))
    assert fo.keys() == do.keys()
    for k in fo:
        torch.testing.assert_close(fo[k], do[k], rtol=1e-3, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_fsdp_checkpoint_loads_in_a_single_process(runs, tiny_models_cfg):
    """The gathered checkpoint is an ordinary one: a plain (unsharded) model loads it whole."""
    from dwm.training.checkpoint import load_model_weights
    from dwm.training.models.dance_model import DanceModel

    sdir, _ = runs["fsdp"]
    model = DanceModel.from_pretrained(sdir / "final")
    load_model_weights(model, sdir / "checkpoint-2" / "model")
    ck = _weights(sdir / "checkpoint-2" / "model")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ck.items())
