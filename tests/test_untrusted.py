"""Untrusted files: nothing the project loads can run code.

* the source never unpickles: no pickle/dill/joblib/marshal, torch.load only with
  weights_only=True, no accelerate save_state/load_state (it pickles RNG states), yaml.safe_load;
* a real training run writes only safetensors + JSON in checkpoints and final/, and its RNG state
  as safetensors (accelerate's random_states_*.pkl replaced);
* planted malicious pickles (a ``__reduce__`` that would create a marker file) in a checkpoint,
  in final/, and inside a shard's .npy are refused or ignored, never run;
* tar members with '..', absolute paths or pickle suffixes are rejected by the reader;
* a shard whose bytes do not match the manifest's sha256 is refused before it is used.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import zstd_frames
from test_datasets import write_synthetic_dataset

from dwm.shared.config import build_train_config
from dwm.shared.shards import ManifestError, ShardInfo, load_manifest, verify_shards, write_manifest

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("shared", "preprocess", "datasets", "training")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "marshal", "shelve",
                  "cloudpickle"}


# ---------------------------------------------------------------------------------------------
# the source
# ---------------------------------------------------------------------------------------------
def _call_name(node: ast.Call) -> str:
    f = node.func
    parts = []
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def _kw(node: ast.Call, name: str):
    for k in node.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<expr>"
    return None


def source_problems() -> list[str]:
    problems = []
    for d in SOURCE_DIRS:
        for path in sorted((REPO / d).rglob("*.py")):
            rel = path.relative_to(REPO)
            tree = ast.parse(path.read_text(), str(rel))
            for node in ast.walk(tree):
                where = f"{rel}:{getattr(node, 'lineno', 0)}"
                if isinstance(node, ast.Import):
                    bad = [a.name for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
                    if bad:
                        problems.append(f"{where}: imports {bad}")
                elif isinstance(node, ast.ImportFrom):
                    if (node.module or "").split(".")[0] in PICKLE_MODULES:
                        problems.append(f"{where}: imports from {node.module}")
                elif isinstance(node, ast.Call):
                    name = _call_name(node)
                    last = name.rsplit(".", 1)[-1]
                    if name.endswith("torch.load"):
                        if _kw(node, "weights_only") is not True:
                            problems.append(f"{where}: torch.load without weights_only=True")
                    if name.endswith("jit.load"):
                        problems.append(f"{where}: torch.jit.load runs TorchScript code")
                    if last in ("load", "loads") and name.split(".")[0] in ("np", "numpy"):
                        if _kw(node, "allow_pickle") not in (None, False):
                            problems.append(f"{where}: np.load with allow_pickle")
                    if last in ("save_state", "load_state"):
                        problems.append(f"{where}: accelerate {last} pickles RNG/sampler states")
                    if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
                        problems.append(f"{where}: {name} (use yaml.safe_load)")
                    if _kw(node, "use_safetensors") is False:
                        problems.append(f"{where}: use_safetensors=False")
                    if _kw(node, "trust_remote_code") not in (None, False):
                        problems.append(f"{where}: trust_remote_code")
                    if last in ("eval", "exec") and isinstance(node.func, ast.Name):
                        problems.append(f"{where}: {last}()")
    return problems


def test_source_never_unpickles():
    assert source_problems() == []


# ---------------------------------------------------------------------------------------------
# a real tiny training run: what it writes
# ---------------------------------------------------------------------------------------------
class Marker:
    """A pickle payload that would create ``path`` when unpickled."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps({"state": Marker(marker)}, protocol=2)


def _cfg(data: str, out: Path, *extra: str):
    return build_train_config([
        "model_size=tiny", "stage=A", f"data={data}", f"output_dir={out}", "stage_a_steps=2",
        "audio_window=16", "train_batch_size=2", "num_workers=0", "validation_steps=0",
        "checkpointing_steps=1", "lr_warmup_steps=1", "log_steps=1", "shuffle_buffer=4", *extra])


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> str:
    return write_synthetic_dataset(tmp_path_factory.mktemp("untrusted_data"), n_train=4, n_val=2,
                                   T=16)


@pytest.fixture(scope="module")
def trained(synth, tmp_path_factory):
    from dwm.training.engine import run_stage
    from dwm.training.stages.stage_a import StageA

    out = tmp_path_factory.mktemp("untrusted_run")
    cfg = _cfg(synth, out, "stage_a_steps=3")
    run_stage(StageA(cfg), cfg, max_steps=2)  # leaves checkpoint-1, checkpoint-2
    cfg = _cfg(synth, out, "stage_a_steps=3", "resume=latest")
    run_stage(StageA(cfg), cfg)  # resumes, writes final/
    return out / "stage_A"


PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def test_checkpoints_and_final_hold_only_safetensors_and_json(trained):
    from dwm.training import checkpoint as ckpt

    ckpts = ckpt.list_checkpoints(trained)
    assert ckpts and (trained / "final" / "model_index.json").is_file()
    files = [f for c in [p for _, p in ckpts] + [trained / "final"] for f in c.rglob("*")
             if f.is_file()]
    for f in files:
        assert f.suffix in (".json", ".safetensors"), f
        head = f.read_bytes()[:4]
        assert not head.startswith(PICKLE_MAGIC) and head != b"PK\x03\x04", f  # pickle / torch zip
    last = ckpts[-1][1]
    assert (last / "rng_0.safetensors").is_file() and (last / "rng_0.json").is_file()
    assert not list(last.glob("random_states_*")) and not list(last.glob("*.bin"))
    weights = [f for f in (trained / "final").rglob("*.safetensors")]
    assert weights  # the weights themselves are safetensors
    from safetensors.torch import load_file

    for f in weights:
        assert all(torch.isfinite(t).all() for t in load_file(str(f)).values())


def _fresh_state(cfg):
    from dwm.training.engine import make_optimizer
    from dwm.training.models.dance_model import DanceModel
    from dwm.training.models.m2p import M2PEncoder

    model = DanceModel(m2p=M2PEncoder.from_size("tiny"))
    return model, make_optimizer(model.set_training_stage("A", cfg), cfg)


def test_accelerate_pickles_planted_in_a_checkpoint_are_never_read(trained, synth, tmp_path):
    from dwm.training import checkpoint as ckpt

    marker = tmp_path / "PWNED"
    src = ckpt.latest_checkpoint(trained)
    planted = tmp_path / "stage_A" / src.name
    shutil.copytree(src, planted)
    for name in ("random_states_0.pkl", "optimizer.bin", "scheduler.bin", "pytorch_model.bin",
                 "sampler.bin", "scaler.pt"):
        (planted / name).write_bytes(malicious_pickle(marker))
    cfg = _cfg(synth, tmp_path / "x")
    model, opt = _fresh_state(cfg)
    state = ckpt.load_checkpoint(planted, model=model, optimizer=opt)
    assert state["stage"] == "A"
    assert not marker.exists()


@pytest.mark.parametrize("target", ["model/m2p/diffusion_pytorch_model.safetensors",
                                    "optimizer.safetensors", "rng_0.safetensors"])
def test_pickle_disguised_as_safetensors_in_a_checkpoint_is_refused(trained, synth, tmp_path,
                                                                    target):
    from dwm.training import checkpoint as ckpt

    marker = tmp_path / "PWNED"
    src = ckpt.latest_checkpoint(trained)
    planted = tmp_path / "stage_A" / src.name
    shutil.copytree(src, planted)
    (planted / target).write_bytes(malicious_pickle(marker))
    cfg = _cfg(synth, tmp_path / "x")
    model, opt = _fresh_state(cfg)
    with pytest.raises(ckpt.CheckpointError, match=Path(target).name.replace(".", r"\.")):
        ckpt.load_checkpoint(planted, model=model, optimizer=opt)
    assert not marker.exists()


def test_pickle_weights_in_final_are_refused(trained, tmp_path):
    from dwm.training.models.dance_model import DanceModel

    marker = tmp_path / "PWNED"
    final = tmp_path / "final"
    shutil.copytree(trained / "final", final)
    weights = final / "m2p" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    (final / "m2p" / "diffusion_pytorch_model.bin").write_bytes(malicious_pickle(marker))
    with pytest.raises(Exception, match=r"(?i)safetensors|weights only|unpickl"):
        DanceModel.from_pretrained(final)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------------------------
def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _one_shard_dataset(out: Path, members: list[tuple[str, bytes]]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    data = _tar(members)
    (out / "train-000000.tar").write_bytes(data)
    info = ShardInfo("train-000000.tar", "train", 1, 4, len(data), hashlib.sha256(data).hexdigest())
    return write_manifest(str(out), [info], {}, {})


def _read_all(manifest_path: str) -> list[dict]:
    from dwm.datasets import iter_tar_samples

    return [s for sh in load_manifest(manifest_path)["shards"] for s in iter_tar_samples(sh["url"])]


META = json.dumps({"key": "k", "has_audio": False}).encode()


@pytest.mark.parametrize("bad", ["../escape.pose_body.npy", "/abs/k.pose_body.npy",
                                 "k.state.pkl", "k.model.pt", "a/../../k.pose_body.npy"])
def test_unsafe_tar_members_are_rejected(bad, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    manifest = _one_shard_dataset(tmp_path / "data" / "ds", [
        ("k.json", META), ("k.pose_body.npy", _npy(np.zeros((4, 18, 3), np.float32))),
        (bad, _npy(np.ones(3, np.float32)))])
    with pytest.raises(ManifestError, match="unsafe tar member|pickle format"):
        _read_all(manifest)
    with pytest.raises(ManifestError, match="unsafe tar member|pickle format"):
        verify_shards(load_manifest(manifest))
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "manifest.json", "train-000000.tar"]  # the reader never writes anything out


def test_object_npy_inside_a_shard_is_refused_not_run(tmp_path):
    from dwm.datasets.views import decode_member

    marker = tmp_path / "PWNED"
    buf = io.BytesIO()
    np.save(buf, np.array([Marker(marker)], dtype=object), allow_pickle=True)
    manifest = _one_shard_dataset(tmp_path / "ds", [("k.json", META), ("k.pose_body.npy",
                                                                      buf.getvalue())])
    (raw,) = _read_all(manifest)
    with pytest.raises(ValueError, match="allow_pickle"):
        decode_member("k.pose_body.npy", raw["pose_body.npy"], "test")
    assert not marker.exists()


def test_the_writer_refuses_object_arrays(tmp_path):
    from dwm.shared.shards import ShardWriter

    w = ShardWriter(str(tmp_path), target_bytes=1)
    with pytest.raises(ValueError, match="allow_pickle"):
        w.write({"__key__": "k", "json": {"num_frames": 1},
                 "x": np.array([{"a": 1}], dtype=object)})
        w.close()
    assert not list(tmp_path.glob("*.tar"))


def test_synthetic_and_real_writer_shards_hold_no_pickle(synth):
    for s in load_manifest(synth)["shards"]:
        with tarfile.open(s["url"]) as tar:
            for m in tar.getmembers():
                assert m.isreg() and m.name.endswith((".npy", ".npy.zst", ".json")), m.name
                data = tar.extractfile(m).read()
                assert not data.startswith(PICKLE_MAGIC), m.name
                if m.name.endswith(".npy.zst"):  # every zstd frame is a whole .npy
                    for chunk in zstd_frames(data):
                        assert not chunk.startswith(PICKLE_MAGIC), m.name
                        np.load(io.BytesIO(chunk), allow_pickle=False)  # no object dtype
                elif m.name.endswith(".npy"):
                    np.load(io.BytesIO(data), allow_pickle=False)  # no object dtype


def test_shard_not_matching_the_manifest_sha256_is_refused(synth, tmp_path):
    from dwm.datasets import TrainLoader, eval_batches, make_view

    ds = tmp_path / "ds"
    shutil.copytree(Path(synth).parent, ds)
    manifest = load_manifest(str(ds / "manifest.json"))
    victim = next(s for s in manifest["shards"] if s["split"] == "train")
    data = bytearray(Path(victim["url"]).read_bytes())
    data[600] ^= 0xFF  # one flipped bit inside the first member's bytes
    Path(victim["url"]).write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=rf"{victim['name']}.*sha256.*does not match"):
        verify_shards(manifest)
    with pytest.raises(ManifestError, match=rf"{victim['name']}.*sha256.*does not match"):
        _read_all(str(ds / "manifest.json"))
    view = make_view("C", manifest["stats"], None)
    for workers in (0, 2):  # with workers, the error crosses the worker and receiver thread
        loader = TrainLoader(str(ds / "manifest.json"), view, 1, seed=0, num_workers=workers,
                             shuffle_buffer=1, epoch_samples=64)
        with pytest.raises(ManifestError, match="does not match"):
            for _ in zip(range(64), loader):
                pass
    val = next(s for s in manifest["shards"] if s["split"] == "val")
    Path(val["url"]).write_bytes(Path(val["url"]).read_bytes() + b"\0" * 512)  # appended data
    with pytest.raises(ManifestError, match="does not match"):
        eval_batches(str(ds / "manifest.json"), view, 1, split="val")
