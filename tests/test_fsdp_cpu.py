"""The training engine under FSDP2 (torch's ``fully_shard``) on 2 CPU processes (gloo).

Launched exactly as on a cluster, ``accelerate launch --config_file
shared/configs/accelerate/fsdp.yaml --num_processes 2 ...``, with ONE test-only shim: accelerate
1.15 turns an FSDP config into FSDP only on GPUs (``AcceleratorState`` switches to
``DistributedType.FSDP`` for MULTI_GPU/NPU/XPU/...; on CPU it stays MULTI_CPU and silently wraps
the model in DDP). The shim (``FSDP_CPU_SHIM`` below, injected into the launched script only) makes
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
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_datasets import write_synthetic_dataset

ACCELERATE_DIR = Path(__file__).resolve().parents[1] / "shared" / "configs" / "accelerate"
STEPS = 4  # stage B total; the FSDP run stops at 2, checkpoints, resumes

FSDP_CPU_SHIM = textwrap.dedent("""
    # test-only: accelerate makes FSDP out of an FSDP launch on GPUs only; make the same
    # decision on CPU (AcceleratorState is re-created later and re-copies PartialState's type,
    # so the switch is re-applied after every __init__)
    import os
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    _orig_init = AcceleratorState.__init__

    def _init(self, *args, **kwargs):
        _orig_init(self, *args, **kwargs)
        if (os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and self.initialized
                and self.distributed_type == DistributedType.MULTI_CPU):
            if getattr(self, "fsdp_plugin", None) is None:
                self.fsdp_plugin = kwargs.get("fsdp_plugin")
            if self.fsdp_plugin is not None:
                self.distributed_type = DistributedType.FSDP

    AcceleratorState.__init__ = _init
""")

PROBE = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    from dwm.shared.config import build_train_config
    from dwm.training.engine import run_stage
    from dwm.training.stages import get_stage

    out, ddp_run = Path(sys.argv[1]), sys.argv[2]
    cfg = build_train_config(sys.argv[3:], stage="B")
    Base = get_stage("B")
    info = {"param_types": set(), "trainable": None, "dist": []}

    class Probe(Base):
        def build_model(self, cfg, init_path):
            model = super().build_model(cfg, init_path)
            if not (out / "init.safetensors").exists():
                from accelerate import PartialState
                if PartialState().is_main_process:
                    out.mkdir(parents=True, exist_ok=True)
                    init = {k: v.detach().clone().contiguous()
                            for k, v in model.state_dict().items()}
                    save_file(init, str(out / "init.safetensors"))
            return model

        def compute_loss(self, model, batch, step, total):
            info["param_types"].update(type(p).__name__ for p in model.parameters())
            if info["trainable"] is None:
                info["trainable"] = sorted(n for n, p in model.named_parameters()
                                           if p.requires_grad)
            return super().compute_loss(model, batch, step, total)

    from accelerate import PartialState
    from accelerate.state import AcceleratorState
    report = {}
    # FSDP: 2 steps, checkpoint, then resume from it to the end
    first = run_stage(Probe(cfg), cfg, max_steps=2, save_final=False)
    cfg.resume = "latest"
    second = run_stage(Probe(cfg), cfg)
    report["fsdp"] = {"distributed_type": str(AcceleratorState().distributed_type),
                      "param_types": sorted(info["param_types"]), "trainable": info["trainable"],
                      "losses": first.losses + second.losses, "steps": [first.steps, second.steps]}
    # the reference in the same processes (saves a second launch): plain DDP, uninterrupted
    os.environ["ACCELERATE_USE_FSDP"] = "false"
    AcceleratorState._reset_state()
    info["param_types"] = set()
    cfg.resume, cfg.output_dir = "", ddp_run
    res = run_stage(Probe(cfg), cfg)
    report["ddp"] = {"distributed_type": str(AcceleratorState().distributed_type),
                     "param_types": sorted(info["param_types"]), "losses": res.losses,
                     "steps": [res.steps]}
    st = PartialState()
    (out / f"rank{st.process_index}.json").write_text(json.dumps({
        "world": st.num_processes, **report}))
""")


@pytest.fixture(scope="module")
def fsdp_data(tmp_path_factory) -> str:
    return write_synthetic_dataset(tmp_path_factory.mktemp("fsdp_data"), n_train=8, n_val=2,
                                   T=16, per_shard=2)


@pytest.fixture(scope="module")
def runs(fsdp_data, tiny_models_cfg, tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    """One launch: the FSDP run (stop, resume) and the DDP reference, in the same 2 processes."""
    tmp = tmp_path_factory.mktemp("fsdp_runs")
    script = tmp / "fsdp_probe.py"
    script.write_text(FSDP_CPU_SHIM + PROBE)
    out = tmp / "fsdp_out"
    out.mkdir()
    args = [f"data={fsdp_data}", f"output_dir={tmp / 'fsdp_run'}", "model_size=tiny",
            f"models.models_dir={tiny_models_cfg.models_dir}", "models.profile=tiny",
            f"stage_b_steps={STEPS}", "train_batch_size=1", "num_workers=1",
            "validation_steps=0", "checkpointing_steps=2", "lr_warmup_steps=0", "log_steps=1",
            "audio_window=8", "shuffle_buffer=2", "mixed_precision=no"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    launcher = [sys.executable, "-m", "accelerate.commands.launch",
                "--config_file", str(ACCELERATE_DIR / "fsdp.yaml"),
                "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", str(29000 + os.getpid() % 900)]
    res = subprocess.run([*launcher, str(script), str(out), str(tmp / "ddp_run"), *args],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-6000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {kind: (tmp / f"{kind}_run" / "stage_B",
                   [{"world": r["world"], **r[kind]} for r in ranks]) for kind in ("fsdp", "ddp")}


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
