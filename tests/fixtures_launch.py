"""The 2-rank stage-B launch shared by test_fsdp_cpu (FSDP, stop and resume) and test_scale_out
(DDP on 2 CPU ranks): one ``accelerate launch`` runs both, once per session.

Launched exactly as on a cluster, ``accelerate launch --config_file
shared/configs/accelerate/fsdp.yaml --num_processes 2 ...``, with ONE test-only shim (see
test_fsdp_cpu.py): on CPU, accelerate would wrap the model in DDP instead of FSDP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_datasets import write_synthetic_dataset

__all__ = ["fsdp_ddp_runs", "STEPS"]

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
    import hashlib, json, os, sys
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

    def digest(model):
        h = hashlib.sha256()
        for n, p in sorted(model.named_parameters()):
            if p.requires_grad:
                h.update(n.encode() + p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()

    class DDPProbe(Probe):
        # the DDP reference also records what each rank saw and its weights before each step

        def compute_loss(self, model, batch, step, total):
            info["dist"].append({"seen": [m["key"] for m in batch["meta"]],
                                 "digest": digest(model)})
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
    res = run_stage(DDPProbe(cfg), cfg)
    report["ddp"] = {"distributed_type": str(AcceleratorState().distributed_type),
                     "param_types": sorted(info["param_types"]), "losses": res.losses,
                     "steps": [res.steps], "seen": [d["seen"] for d in info["dist"]],
                     "digests": [d["digest"] for d in info["dist"]]}
    st = PartialState()
    (out / f"rank{st.process_index}.json").write_text(json.dumps({
        "world": st.num_processes, **report}))
""")


@pytest.fixture(scope="session")
def fsdp_ddp_runs(tiny_models_cfg, tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    """One launch: the FSDP run (stop, resume) and the DDP reference, in the same 2 processes."""
    fsdp_data = write_synthetic_dataset(tmp_path_factory.mktemp("fsdp_data"), n_train=8,
                                        n_val=2, T=16, per_shard=2)
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
