"""Scale-out on existing engines: preprocessing by rank slices + merge, training through
accelerate DDP on 2 CPU ranks (gloo), loaders with more workers than shards, fsspec storage.

* 2 preprocessing ranks (one from RANK/WORLD_SIZE, one from a SLURM array's variables) + merge
  give the same dataset as 1 rank: the same sample keys, the same arrays, the same metadata.
* ``accelerate launch --multi_gpu --num_processes 2`` with ACCELERATE_USE_CPU=true trains stage A
  a few steps: the ranks see disjoint samples and hold equal weights after each step; stage B is
  checked the same way on the DDP run of the launch test_fsdp_cpu shares (fixtures_launch.py).
* a TrainLoader with more workers than shards (plain and resampled) does not hang (timeout).
* preprocessing writes its cache, shards, manifest and report to ``memory://`` and ``file://``
  URLs through the same code path, and training reads the shards back from there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from badinput import good_clip
from test_datasets import write_synthetic_dataset

from dwm.shared.shards import load_manifest, verify_shards

PP_ARGS = ["profile=tiny", "decode.width=64", "decode.height=112", "decode.segment_frames=24",
           "decode.min_frames=8", "extractors=audio,thumbs", "shards.target_shard_mb=0.05",
           "shards.holdout_fraction=0.3", "workers=1"]
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT",
             "SLURM_ARRAY_TASK_MIN")


def preprocess(videos: Path, out: str, models_dir: str, *extra: str) -> int:
    from dwm.preprocess.run import main
    from dwm.shared.config import build_preprocess_config

    cfg = build_preprocess_config([f"input_dir={videos}", f"out={out}",
                                   f"models.models_dir={models_dir}", *PP_ARGS, *extra])
    return main(cfg)


def sample_set(manifest_path: str) -> dict[str, dict]:
    """key -> {member: decoded array or json} of every sample (order-free)."""
    from dwm.datasets import iter_tar_samples
    from dwm.shared.shards import decode_sample

    out = {}
    for s in load_manifest(manifest_path)["shards"]:
        for raw in iter_tar_samples(s["url"]):
            item = decode_sample(raw)
            item["json"]["source"] = Path(item["json"]["source"]).name
            assert raw["__key__"] not in out
            out[raw["__key__"]] = item
    return out


def assert_same_samples(a: dict[str, dict], b: dict[str, dict]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert sorted(a[key]) == sorted(b[key]), key
        for member, va in a[key].items():
            vb = b[key][member]
            if isinstance(va, np.ndarray):
                assert va.dtype == vb.dtype and va.shape == vb.shape, (key, member)
                assert np.array_equal(va, vb), (key, member)
            else:
                assert va == vb, (key, member)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("scale_videos")
    for i in range(4):
        good_clip(d / f"clip_{i}.mp4", seconds=1.5, seed=20 + i, audio=i != 3)
    (d / "empty.mp4").write_bytes(b"")  # reported once, by one rank
    return d


@pytest.fixture(scope="module")
def one_rank(videos, tiny_models_cfg, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one_rank") / "out"
    mp = pytest.MonkeyPatch()
    for v in RANK_VARS:
        mp.delenv(v, raising=False)
    mp.setenv("DWM_PROGRESS", "0")
    try:
        assert preprocess(videos, str(out), tiny_models_cfg.models_dir) == 0
    finally:
        mp.undo()
    return out


# ---------------------------------------------------------------------------------------------
# preprocessing: 2 ranks + merge == 1 rank
# ---------------------------------------------------------------------------------------------
def test_two_ranks_and_merge_equal_one_rank(videos, one_rank, tiny_models_cfg, tmp_path,
                                            monkeypatch):
    monkeypatch.setenv("DWM_PROGRESS", "0")
    out = tmp_path / "out"
    for v in RANK_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("RANK", "0")  # torchrun / accelerate launch style
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert preprocess(videos, str(out), tiny_models_cfg.models_dir) == 0
    for v in RANK_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")  # a SLURM array task
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    assert preprocess(videos, str(out), tiny_models_cfg.models_dir) == 0
    assert not (out / "manifest.json").exists()  # only the merge writes it
    for v in RANK_VARS:
        monkeypatch.delenv(v, raising=False)
    assert preprocess(videos, str(out), tiny_models_cfg.models_dir, "mode=merge") == 0

    # each rank took a disjoint, deterministic slice and wrote its own shards
    done = []
    for r in (0, 1):
        rep = json.loads((out / f"report-r{r:04d}.json").read_text())
        ok = {v["hash"] for v in rep["videos"] if v["status"] == "ok"}
        assert ok and (rep["rank"], rep["world_size"]) == (r, 2)
        done.append(ok)
        assert list(out.glob(f"r{r:04d}-*.tar"))
    assert not done[0] & done[1]

    merged = load_manifest(str(out / "manifest.json"))
    single = load_manifest(str(one_rank / "manifest.json"))
    verify_shards(merged)
    assert_same_samples(sample_set(str(out / "manifest.json")),
                        sample_set(str(one_rank / "manifest.json")))
    assert merged["num_samples"] == single["num_samples"]
    assert merged["num_frames"] == single["num_frames"]
    assert merged["counts"] == single["counts"]
    assert merged["features"] == single["features"]
    assert merged["splits"] == single["splits"]
    for name, st in single["stats"].items():  # normalisation statistics from the raw sums
        np.testing.assert_allclose(merged["stats"][name]["mean"], st["mean"], atol=1e-5)
        np.testing.assert_allclose(merged["stats"][name]["std"], st["std"], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# fsspec storage: the same code path with memory:// and file:// URLs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_preprocess_to_a_url_and_train_reads_it_back(scheme, videos, one_rank, tiny_models_cfg,
                                                     tmp_path, monkeypatch):
    import fsspec

    from dwm.datasets.pipeline import StreamSpec, split_urls, worker_stream

    monkeypatch.setenv("DWM_PROGRESS", "0")
    for v in RANK_VARS:
        monkeypatch.delenv(v, raising=False)
    base = f"memory://dwm-test-{tmp_path.name}" if scheme == "memory" else f"file://{tmp_path}"
    out = f"{base}/data"
    assert preprocess(videos, out, tiny_models_cfg.models_dir, f"cache_dir={base}/cache") == 0
    fs, root = fsspec.core.url_to_fs(base)
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/data", detail=False)}
    assert {"manifest.json", "report.json"} <= names and any(n.endswith(".tar") for n in names)
    assert fs.exists(f"{root}/cache/zarr.json")  # the feature cache lives there too
    if scheme == "memory":
        assert not Path("memory:").exists()  # nothing leaked to a local folder of that name
    manifest = f"{out}/manifest.json"
    verify_shards(load_manifest(manifest))
    assert_same_samples(sample_set(manifest), sample_set(str(one_rank / "manifest.json")))
    # the training reader streams the shards from the URL (sha256 checked on the way)
    m = load_manifest(manifest)
    spec = StreamSpec(split_urls(m, "train"), seed=0, shuffle_buffer=2)
    keys = [s["__key__"] for s in worker_stream(spec, 0, 0, 1, infinite=False)]
    assert sorted(keys) == sorted(k for k, v in sample_set(manifest).items()
                                  if v["json"]["split"] == "train")
    # a second run finds everything in the cache: no extractor runs again
    assert preprocess(videos, out, tiny_models_cfg.models_dir, f"cache_dir={base}/cache") == 0
    rep = json.loads(fs.cat(f"{root}/data/report.json"))
    assert sum(rep["extractor_calls"].values()) == 0


# ---------------------------------------------------------------------------------------------
# loaders with more workers than shards
# ---------------------------------------------------------------------------------------------
LOADER_SCRIPT = textwrap.dedent("""
    import sys
    from dwm.datasets import TrainLoader, make_view
    from dwm.shared.shards import ManifestError, load_manifest
    m = load_manifest(sys.argv[1])
    view = make_view("A", m["stats"], None, audio_window=8)
    for resampled in (False, True):
        loader = TrainLoader(m, view, 2, seed=1, num_workers=4, resampled=resampled,
                             shuffle_buffer=2, rank=1, world_size=2)
        try:
            seen = [tuple(x["key"] for x in b["meta"]) for b, _ in zip(loader, range(10))]
        except ManifestError as e:
            print("error", resampled, str(e).splitlines()[-1])
            continue
        assert len(seen) == 10, seen
        print("ok", resampled, loader.batches_per_epoch)
""")


def _loader_run(manifest: str, tmp_path: Path) -> str:
    script = tmp_path / "loader.py"
    script.write_text(LOADER_SCRIPT)
    res = subprocess.run([sys.executable, str(script), manifest], capture_output=True, text=True,
                         timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory) -> str:
    return write_synthetic_dataset(tmp_path_factory.mktemp("two_shards"), n_train=12, n_val=2,
                                   T=16, per_shard=6)


def test_more_workers_than_shards_does_not_hang(two_shards, tmp_path):
    assert len([s for s in load_manifest(two_shards)["shards"] if s["split"] == "train"]) == 2
    # rank 1 of 2 with 4 workers each: 8 readers for 2 shards (12 samples); the run has a
    # timeout, so a hang fails the test instead of blocking it
    out = _loader_run(two_shards, tmp_path)
    assert "ok False" in out and "ok True" in out, out


def test_more_readers_than_samples_is_a_clear_error_or_resampled(tmp_path):
    tiny = write_synthetic_dataset(tmp_path / "tiny", n_train=4, n_val=2, T=16, per_shard=2)
    out = _loader_run(tiny, tmp_path)
    # 8 readers, 4 samples: a pass leaves some readers empty -> one clear line, no hang;
    # resampled mode draws shards with replacement and always works
    assert "error False" in out and "got no samples" in out and "ok True" in out, out


# ---------------------------------------------------------------------------------------------
# training: accelerate DDP on 2 CPU processes (gloo)
# ---------------------------------------------------------------------------------------------
DDP_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    import torch
    from dwm.shared.config import build_train_config
    from dwm.training.engine import run_stage
    from dwm.training.stages import get_stage

    stage_name, out = sys.argv[1], sys.argv[2]
    cfg = build_train_config(sys.argv[3:], stage=stage_name)
    Base = get_stage(stage_name)
    seen, digests = [], []

    def digest(model):
        h = hashlib.sha256()
        for n, p in sorted(model.named_parameters()):
            if p.requires_grad:
                h.update(n.encode() + p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()

    class Probe(Base):
        def compute_loss(self, model, batch, step, total):
            seen.append([m["key"] for m in batch["meta"]])
            digests.append(digest(model))  # weights before this step's update
            return super().compute_loss(model, batch, step, total)

    res = run_stage(Probe(cfg), cfg, save_final=False)
    from accelerate import PartialState
    st = PartialState()
    Path = __import__("pathlib").Path
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, f"rank{st.process_index}.json").write_text(json.dumps({
        "rank": st.process_index, "world": st.num_processes, "seen": seen,
        "digests": digests, "losses": res.losses}))
""")


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory) -> str:
    return write_synthetic_dataset(tmp_path_factory.mktemp("ddp_data"), n_train=8, n_val=2, T=16,
                                   per_shard=2)


def assert_ddp_ranks(ranks: list[dict], steps: int) -> None:
    assert [r["world"] for r in ranks] == [2, 2]  # really two processes
    assert len(ranks[0]["seen"]) == steps
    for step in range(steps):
        a, b = (set(r["seen"][step]) for r in ranks)
        assert a and b and not a & b, f"step {step}: both ranks saw {a & b}"
        # DDP averaged the gradients: the weights are the same on both ranks at every step
        assert ranks[0]["digests"][step] == ranks[1]["digests"][step], step
    assert ranks[0]["digests"][0] != ranks[0]["digests"][-1]  # and they did train
    assert len(ranks[0]["losses"]) == steps


def test_ddp_two_cpu_ranks_stage_b(fsdp_ddp_runs):
    """Stage B under DDP on 2 ranks: the DDP reference of the shared FSDP launch."""
    _, ranks = fsdp_ddp_runs["ddp"]
    assert ranks[0]["distributed_type"] == "DistributedType.MULTI_CPU"
    assert_ddp_ranks(ranks, len(ranks[0]["losses"]))


@pytest.mark.parametrize("stage", ["A"])
def test_ddp_two_cpu_ranks(stage, ddp_data, tiny_models_cfg, tmp_path):
    script = tmp_path / "ddp_probe.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "ranks"
    steps = 2
    args = [f"data={ddp_data}", f"output_dir={tmp_path / 'run'}", "model_size=tiny",
            f"models.models_dir={tiny_models_cfg.models_dir}", "models.profile=tiny",
            f"stage_{stage.lower()}_steps={steps}", "train_batch_size=1", "num_workers=1",
            "validation_steps=0", "checkpointing_steps=0", "lr_warmup_steps=0", "log_steps=1",
            "audio_window=8", "shuffle_buffer=2", "mixed_precision=no"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "MASTER_PORT": str(29500 + (os.getpid() % 500))}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", env["MASTER_PORT"]]
    res = subprocess.run([*launcher, str(script), stage, str(out), *args], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert_ddp_ranks(ranks, steps)


# ---------------------------------------------------------------------------------------------
# the accelerate config files
# ---------------------------------------------------------------------------------------------
ACCELERATE_DIR = Path(__file__).resolve().parents[1] / "shared" / "configs" / "accelerate"


@pytest.mark.parametrize("name,kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"),
                                       ("deepspeed_zero2", "DEEPSPEED")])
def test_accelerate_config_files_are_valid(name, kind):
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    path = ACCELERATE_DIR / f"{name}.yaml"
    cfg = load_config_from_file(str(path))  # unknown top-level keys raise
    assert cfg.distributed_type.name == kind and cfg.num_processes >= 1
    # the nested sections become launch options: each key must be one accelerate knows
    known = {a.dest for a in launch_command_parser()._actions}
    data = yaml.safe_load(path.read_text())
    for section in ("fsdp_config", "deepspeed_config"):
        unknown = [k for k in data.get(section, {}) if k not in known]
        assert not unknown, f"{path}: {section} keys accelerate does not know: {unknown}"
