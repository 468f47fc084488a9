"""dwm.datasets: shard pipeline (shuffle, splits, resampling, epochs, exact position) and views.

Most tests run on a small synthetic dataset written here with the real ShardWriter following
shared/contract.py; view shapes are also checked on the real preprocessed sample video.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import cv2
import fsspec
import numpy as np
import pytest
import torch
import zstandard

from dwm.datasets import (TrainLoader, ViewA, ViewB, ViewC, batch_to_device, collate, eval_batches,
                          make_view)
from dwm.datasets.pipeline import StreamSpec, iter_tar_samples, worker_stream
from dwm.shared import contract
from dwm.shared.shards import ManifestError, ShardWriter, load_manifest, write_manifest


# ---------------------------------------------------------------------------------------------
# synthetic dataset (test helper; the package has one writer: ShardWriter)
# ---------------------------------------------------------------------------------------------
def _heatmaps(body: np.ndarray, h: int, w: int, sigma: float = 1.5) -> np.ndarray:
    ys = np.arange(h, dtype=np.float32)[None, None, :, None] + 0.5
    xs = np.arange(w, dtype=np.float32)[None, None, None, :] + 0.5
    g = np.exp(-((xs - body[..., 0, None, None] * w) ** 2 + (ys - body[..., 1, None, None] * h) ** 2)
               / (2 * sigma**2))
    g = np.where((body[..., 2] >= 0.3)[..., None, None], g, 0.0)
    return np.round(g * 255).astype(np.uint8)


def synthetic_sample(key: str, split: str, T: int, h: int, w: int, rng: np.random.Generator,
                     has_audio: bool = True, bpm: float = 120.0, fps: float = 24.0) -> dict:
    """One clip segment: a dancer whose wrists go up on every beat of a click track."""
    t = np.arange(T)
    beat_period = fps * 60.0 / bpm
    phase = (t % beat_period) / beat_period
    mel = rng.normal(-40, 3, (T, 80)).astype(np.float32)
    mel[phase < 1.0 / beat_period + 1e-6] += 30.0  # a click on each beat
    base = rng.normal(0, 1, (T, contract.AUDIO_BASELINE_DIM)).astype(np.float32)
    base[:, 0] = np.exp(-phase * 4)  # onset envelope
    rest = np.array([[0.5, 0.15], [0.5, 0.25], [0.4, 0.25], [0.35, 0.4], [0.33, 0.55],
                     [0.6, 0.25], [0.65, 0.4], [0.67, 0.55], [0.43, 0.55], [0.43, 0.72],
                     [0.43, 0.9], [0.57, 0.55], [0.57, 0.72], [0.57, 0.9], [0.47, 0.13],
                     [0.53, 0.13], [0.44, 0.14], [0.56, 0.14]], np.float32)
    body = np.zeros((T, 18, 3), np.float32)
    body[:, :, :2] = rest + rng.normal(0, 0.003, (T, 18, 2))
    lift = 0.25 * np.cos(2 * np.pi * phase)  # wrists up on the beat
    body[:, (4, 7), 1] -= lift[:, None]
    body[:, :, 2] = 0.9
    face_present = np.ones(T, bool)
    face_present[: T // 4] = False
    ident = rng.normal(0, 1, 512).astype(np.float32)
    ident /= np.linalg.norm(ident)
    face_embed = (ident + rng.normal(0, 0.05, (T, 512))).astype(np.float32)
    face_embed /= np.linalg.norm(face_embed, axis=1, keepdims=True)
    face_embed[~face_present] = 0
    # face crops on reference-candidate frames only, as the writer keeps them
    crop_frames = np.flatnonzero(face_present)[::4].astype(np.int32)
    crops = rng.integers(1, 255, (len(crop_frames), 112, 112, 3), dtype=np.uint8)
    thumbs = [cv2.imencode(".jpg", np.full((64, 36, 3), i, np.uint8))[1].tobytes() for i in range(T)]
    offsets = np.cumsum([0] + [len(b) for b in thumbs]).astype(np.int64)
    clip_frames = np.arange(0, T, 12, dtype=np.int32)
    sample = {
        "__key__": key,
        "json": {"key": key, "video_hash": key[:16], "source": f"/nonexistent/{key}.mp4",
                 "segment": int(key.rsplit("_", 1)[-1]), "start_frame": 0, "num_frames": T,
                 "fps": fps, "orig_fps": fps, "orig_width": w * 8, "orig_height": h * 8,
                 "rotation": 0, "width": w * 8, "height": h * 8, "crop_box": [0, 0, w * 8, h * 8],
                 "has_audio": has_audio, "tempo": bpm if has_audio else None,
                 "beat_frames": [], "latent_scaling_factor": 0.5, "split": split, "features": []},
        "pose_body": body,
        "pose_hands": np.zeros((T, 42, 3), np.float32),
        "pose_face": np.zeros((T, 68, 3), np.float32),
        "pose_heatmap": _heatmaps(body, h, w),
        "face_present": face_present,
        "face_box": np.tile(np.array([0.4, 0.05, 0.6, 0.2], np.float32), (T, 1)) * face_present[:, None],
        "face_landmarks": np.zeros((T, 5, 2), np.float32),
        "face_score": face_present.astype(np.float32),
        "face_embed": face_embed.astype(np.float16),
        "face_mask": (rng.random((T, h, w)) * 255 * face_present[:, None, None]).astype(np.uint8),
        "face_crop": crops,
        "face_crop_frames": crop_frames,
        "face_ref_embed": ident,
        "latents": rng.normal(0, 1, (T, 4, h, w)).astype(np.float16),
        "clip_frames": clip_frames,
        "clip_embed": rng.normal(0, 1, (len(clip_frames), 32)).astype(np.float16),
        "thumbs_jpeg": np.frombuffer(b"".join(thumbs), np.uint8),
        "thumbs_offsets": offsets,
    }
    if has_audio:
        sample["audio_mel"] = mel.astype(np.float16)
        sample["audio_baseline"] = base.astype(np.float16)
    sample["json"]["features"] = sorted(k for k in sample if k not in ("__key__", "json"))
    return sample


def write_synthetic_dataset(out: str | Path, n_train: int = 6, n_val: int = 2, T: int = 24,
                            h: int = 56, w: int = 32, per_shard: int = 2, no_audio: tuple = (),
                            seed: int = 0) -> str:
    """Write train/val shards + manifest.json; returns the manifest path (str).
    ``no_audio``: train sample indices written without audio."""
    rng = np.random.default_rng(seed)
    out = str(out)
    shards = []
    mel_all, base_all = [], []
    for split, n in (("train", n_train), ("val", n_val)):
        writer = ShardWriter(out, prefix=split, target_bytes=1 << 40, split=split)
        pending = 0
        for i in range(n):
            s = synthetic_sample(f"{split}{i:02d}abcdef12345_{i:04d}", split, T, h, w, rng,
                                 has_audio=not (split == "train" and i in no_audio))
            if "audio_mel" in s:
                mel_all.append(s["audio_mel"].astype(np.float64))
                base_all.append(s["audio_baseline"].astype(np.float64))
            writer.write(s)  # exact shard sizes: per_shard samples per tar
            pending += 1
            if pending == per_shard:
                writer.flush()
                pending = 0
        shards += writer.close()
    mel, base = np.concatenate(mel_all), np.concatenate(base_all)
    stats = {"audio_mel": {"mean": mel.mean(0).tolist(), "std": mel.std(0).tolist()},
             "audio_baseline": {"mean": base.mean(0).tolist(), "std": base.std(0).tolist()}}
    features = {f.name: {"shape": [T if d == "T" else h if d == "h" else w if d == "w" else d
                                   for d in f.shape], "dtype": f.dtype, "encoding": f.encoding}
                for f in contract.FEATURES}
    return write_manifest(out, shards, features, stats)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> str:
    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"), no_audio=(5,))


def _ids(batch) -> list[tuple]:
    return [(m["key"], m.get("window_start", m.get("clip_start", m.get("ref_frame")))) for m in batch["meta"]]


def _loader(manifest, view="A", bs=2, **kw):
    m = load_manifest(manifest)
    return TrainLoader(m, make_view(view, m["stats"], None, audio_window=16) if view == "A"
                       else make_view(view, m["stats"], None), bs, seed=kw.pop("seed", 3), **kw)


# ---------------------------------------------------------------------------------------------
# views
# ---------------------------------------------------------------------------------------------
def test_view_a_shapes_normalisation_and_no_audio_excluded(synth):
    m = load_manifest(synth)
    view = ViewA(m["stats"], audio_window=16, with_thumbs=True)
    keys, items = [], []
    for s in m["shards"]:
        if s["split"] != "train":
            continue
        for raw in iter_tar_samples(s["url"]):
            meta = json.loads(raw["json"])
            if not view.accepts(meta):
                keys.append(meta["key"])
                continue
            items.append(view.make_item(raw, np.random.default_rng(0)))
    assert len(keys) == 1 and keys[0].startswith("train05")  # has_audio=false: A only skips it
    it = items[0]
    assert it["audio_mel"].shape == (16, 80) and it["audio_baseline"].shape == (16, 35)
    assert it["heatmap"].shape == (16, 18, 56, 32) and it["heatmap"].dtype == np.uint8
    assert it["coords"].shape == (16, 18, 2) and it["conf"].shape == (16, 18)
    assert it["face_crop"].shape == (3, 112, 112) and it["face_embed"].shape == (512,)
    assert len(it["thumbs"]) == 16
    mel = np.stack([i["audio_mel"] for i in items])
    assert abs(mel.mean()) < 0.5 and 0.5 < mel.std() < 1.5  # normalised with the manifest stats
    # the reference face comes from another frame that has a face
    for it in items:  # faces start at frame 6; a frame outside the 16-frame window always has one
        ref, start = it["meta"]["ref_frame"], it["meta"]["window_start"]
        assert ref >= 6 and not (start <= ref < start + 16)
    assert abs(np.linalg.norm(it["face_embed"]) - 1) < 1e-2
    batch = batch_to_device(collate(items[:2]), "cpu")
    assert batch["heatmap"].dtype == torch.float32 and float(batch["heatmap"].max()) <= 1.0
    assert float(batch["heatmap"].max()) > 0.9 and batch["face_crop"].dtype == torch.float32


def test_batch_to_device_passes_through_what_is_already_there(monkeypatch):
    """Tensors already on the device are not touched (each ``.to`` releases the GIL, and in the
    training loop the loader's receiver thread then holds up the step's data wait); uint8 images
    still become floats in [0, 1], and other dtypes and non-tensors are kept."""
    batch = {"latents": torch.randn(2, 4, 8, 8),
             "face_crop": torch.full((2, 3, 4, 4), 255, dtype=torch.uint8),
             "frame_idx": torch.arange(2), "meta": [{"k": 1}, {"k": 2}]}
    calls = []
    real_to = torch.Tensor.to

    def counting_to(self, *a, **kw):
        calls.append((tuple(self.shape), a, kw))
        return real_to(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    for device in ("cpu", torch.device("cpu")):
        calls.clear()
        out = batch_to_device(batch, device)
        assert out["latents"] is batch["latents"] and out["frame_idx"] is batch["frame_idx"]
        assert out["meta"] is batch["meta"]
        assert out["face_crop"].dtype == torch.float32 and float(out["face_crop"].max()) == 1.0
        assert [c[0] for c in calls] == [(2, 3, 4, 4)]  # only the uint8 -> float conversion
    # a tensor elsewhere is moved (the meta device stands in for a GPU here)
    calls.clear()
    out = batch_to_device({"latents": torch.randn(2, 3)}, "meta")
    assert out["latents"].device.type == "meta" and len(calls) == 1


def test_view_a_pads_short_segments(synth):
    m = load_manifest(synth)
    view = ViewA(m["stats"], audio_window=40)  # longer than the 24-frame segments
    raw = next(iter_tar_samples(m["shards"][0]["url"]))
    it = view.make_item(raw, np.random.default_rng(0))
    assert it["audio_mel"].shape == (40, 80)
    assert it["frame_mask"][:24].all() and not it["frame_mask"][24:].any()
    assert not it["conf"][24:].any() and not it["heatmap"][24:].any()


def test_view_b_and_c(synth):
    m = load_manifest(synth)
    raws = [r for s in m["shards"] if s["split"] == "train" for r in iter_tar_samples(s["url"])]
    vb = ViewB(m["stats"], audio_window=16, min_ref_gap=12)
    for seed in range(10):
        it = vb.make_item(raws[seed % len(raws)], np.random.default_rng(seed))
        assert abs(int(it["ref_index"]) - int(it["target_index"])) >= 12
        assert it["ref_latent"].shape == (4, 56, 32) and it["heatmap"].shape == (18, 56, 32)
        assert it["clip_embed"].shape == (32,) and it["face_mask"].shape == (56, 32)
        assert 0 <= int(it["audio_target"]) < 16
    lat = np.load(io.BytesIO(raws[0]["latents.npy"]), allow_pickle=False)
    it = vb.make_item(raws[0], np.random.default_rng(1))
    np.testing.assert_allclose(it["target_latent"], lat[int(it["target_index"])].astype(np.float32) * 0.5)
    # a segment shorter than the gap: the gap is clamped, the item still comes out
    it = ViewB(m["stats"], min_ref_gap=100).make_item(raws[0], np.random.default_rng(0))
    assert abs(int(it["ref_index"]) - int(it["target_index"])) == 23
    # the no-audio sample is used by B with zero audio features
    noaud = next(r for r in raws if r["__key__"].startswith("train05"))
    assert vb.accepts(json.loads(noaud["json"]))
    assert vb.make_item(noaud, np.random.default_rng(0))["audio_valid"] == 0
    vc = ViewC(m["stats"], sequence_length=8)
    it = vc.make_item(raws[0], np.random.default_rng(0))
    s = int(it["clip_start"])
    assert it["latents"].shape == (8, 4, 56, 32) and it["heatmap"].shape == (8, 18, 56, 32)
    assert not (s <= int(it["ref_index"]) < s + 8)  # reference from outside the clip
    long = vc.make_item(raws[0], np.random.default_rng(0), length=30)  # longer than the segment
    assert long["latents"].shape[0] == 30 and long["frame_mask"].sum() == 24


# ---------------------------------------------------------------------------------------------
# pipeline
# ---------------------------------------------------------------------------------------------
def test_deterministic_shuffle_per_epoch(synth):
    def epoch_keys(epoch):
        m = load_manifest(synth)
        spec = StreamSpec([s["url"] for s in m["shards"] if s["split"] == "train"], seed=7,
                          shuffle_buffer=4)
        return [s["__key__"] for s in worker_stream(spec, epoch, 0, 1, infinite=False)]

    a0, b0, a1 = epoch_keys(0), epoch_keys(0), epoch_keys(1)
    assert a0 == b0  # same seed + epoch: same order
    assert sorted(a0) == sorted(a1) and len(set(a0)) == 6  # every sample once per pass
    assert a0 != a1  # a new epoch reshuffles
    assert a0 != sorted(a0) or a1 != sorted(a1)


def test_split_by_worker_and_node_disjoint(synth):
    m = load_manifest(synth)
    urls = [s["url"] for s in m["shards"] if s["split"] == "train"]  # 3 shards
    for total in (2, 4):  # by shard (3 >= 2) and by sample (3 < 4)
        spec = StreamSpec(urls, seed=1, shuffle_buffer=2)
        parts = [[s["__key__"] for s in worker_stream(spec, 0, w, total, infinite=False)]
                 for w in range(total)]
        union = set().union(*parts)
        assert sum(len(p) for p in parts) == len(union) == 6
    # through a DataLoader with 2 workers: one epoch of single-sample batches has no repeats
    loader = _loader(synth, bs=1, num_workers=2, epoch_samples=4, shuffle_buffer=1)
    it = iter(loader)
    keys = [next(it)["meta"][0]["key"] for _ in range(4)]
    assert len(set(keys)) == 4


def _collect(loader, n):
    it = iter(loader)
    out = []
    for _ in range(n):
        b = next(it)
        out.append((_ids(b), b["audio_mel"].clone()))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_position_restore_is_exact(synth, workers):
    # 5 train samples with audio, batch 2 -> 2 batches per epoch with 0 workers, 2 with 2
    ref = _loader(synth, num_workers=workers)
    straight = _collect(ref, 7)  # crosses epoch boundaries
    for k in (1, 3):
        first = _loader(synth, num_workers=workers)
        it = iter(first)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
        resumed = _loader(synth, num_workers=workers)
        resumed.load_state_dict(state)
        rest = _collect(resumed, 7 - k)
        for (ids_a, mel_a), (ids_b, mel_b) in zip(straight[k:], rest):
            assert ids_a == ids_b
            assert torch.equal(mel_a, mel_b)
    assert ref.position.epoch >= 1  # the run went past an epoch


def test_resampled_and_epoch_length(synth):
    loader = _loader(synth, bs=1, resampled=True, epoch_samples=5, num_workers=0)
    assert loader.batches_per_epoch == 5
    it = iter(loader)
    keys = [next(it)["meta"][0]["key"] for _ in range(5)]
    assert loader.position.epoch == 0 and loader.position.batch == 5
    next(it)
    assert loader.position.epoch == 1 and loader.position.batch == 1
    # with replacement: 25 draws from 5 samples repeat, and reach every sample
    more = keys + [next(it)["meta"][0]["key"] for _ in range(20)]
    assert len(set(more)) == 5
    loader2 = _loader(synth, bs=1, epoch_samples=6, num_workers=2)
    assert loader2.batches_per_epoch == 6  # a multiple of the workers


def test_rank_split(synth):
    keys = []
    for rank in (0, 1):
        # 2 of the 3 shards on one rank, 1 on the other; 2 samples per rank fit in one pass
        loader = _loader(synth, view="B", bs=1, rank=rank, world_size=2, num_workers=0,
                         epoch_samples=4)
        it = iter(loader)
        keys.append({next(it)["meta"][0]["key"] for _ in range(loader.batches_per_epoch)})
    assert not keys[0] & keys[1]


def test_fsspec_memory_manifest(synth):
    fs = fsspec.filesystem("memory")
    src = Path(synth).parent
    for p in src.iterdir():
        fs.pipe(f"/dwmtest/{p.name}", p.read_bytes())
    loader = _loader("memory://dwmtest/manifest.json", num_workers=0)
    b = next(iter(loader))
    assert b["audio_mel"].shape == (2, 16, 80)
    vb = eval_batches("memory://dwmtest/manifest.json", make_view("B", None, None), 2)
    assert sum(x["ref_latent"].shape[0] for x in vb) == 2  # the val split


def _tar_with(members: dict[str, bytes], path: Path) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_unsafe_members_rejected(tmp_path):
    js = json.dumps({"key": "a", "num_frames": 1, "has_audio": True}).encode()
    _tar_with({"../evil.json": js}, tmp_path / "a.tar")
    with pytest.raises(ManifestError, match="unsafe"):
        list(iter_tar_samples(str(tmp_path / "a.tar")))
    _tar_with({"k.json": js, "k.audio_mel.pkl": b"\x80\x04N."}, tmp_path / "b.tar")
    with pytest.raises(ManifestError, match="pickle"):
        list(iter_tar_samples(str(tmp_path / "b.tar")))
    # a pickled object array inside a .npy is refused by np.load(allow_pickle=False)
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    _tar_with({"k.json": js, "k.latents.npy": buf.getvalue()}, tmp_path / "c.tar")
    raw = next(iter_tar_samples(str(tmp_path / "c.tar")))
    from dwm.datasets.views import decode_features

    with pytest.raises(ValueError, match="allow_pickle"):
        decode_features(raw, ("latents",))
    # ... and inside a zstd chunk of an .npy.zst member too
    chunk = zstandard.compress(buf.getvalue())
    meta = {"key": "k", "num_frames": 1, "chunks": {"audio_mel": {
        "offsets": [0, len(chunk)], "rows": 1, "shape": [1], "dtype": "float16"}}}
    _tar_with({"k.json": json.dumps(meta).encode(), "k.audio_mel.npy.zst": chunk},
              tmp_path / "d.tar")
    raw = next(iter_tar_samples(str(tmp_path / "d.tar")))
    with pytest.raises(ManifestError, match="allow_pickle"):
        decode_features(raw, ("audio_mel",))


def _one_sample(tmp_path: Path, sample: dict) -> dict:
    writer = ShardWriter(str(tmp_path), target_bytes=1 << 40)
    writer.write(sample)
    (info,) = writer.close()
    return next(iter_tar_samples(str(tmp_path / info.name)))


def test_chunked_member_decodes_only_the_window(tmp_path):
    """A T-frame window of a chunked member decompresses only its chunks: with every other
    chunk's bytes destroyed, the window still reads, and reading a destroyed one fails loudly."""
    from dwm.datasets.views import decode_features

    rng = np.random.default_rng(0)
    T, h, w = 40, 14, 8
    heat = rng.integers(0, 256, (T, 18, h, w), dtype=np.uint8)
    raw = _one_sample(tmp_path, {"__key__": "k", "json": {"key": "k", "num_frames": T},
                                 "pose_heatmap": heat})
    meta = json.loads(raw["json"])
    offsets = meta["chunks"]["pose_heatmap"]["offsets"]
    assert meta["chunks"]["pose_heatmap"]["rows"] == 8 and len(offsets) == T // 8 + 1
    data = bytearray(raw["pose_heatmap.npy.zst"])
    for c in (0, 3, 4):  # keep chunks 1 and 2: frames 8..23
        data[offsets[c] : offsets[c + 1]] = bytes(offsets[c + 1] - offsets[c])
    raw["pose_heatmap.npy.zst"] = memoryview(bytes(data))
    feats = decode_features(raw, ("pose_heatmap",))
    lazy = feats["pose_heatmap"]
    assert lazy.shape == (T, 18, h, w) and lazy.dtype == np.uint8
    assert np.array_equal(lazy[9:23], heat[9:23]) and np.array_equal(lazy[16], heat[16])
    with pytest.raises(ManifestError, match="pose_heatmap.npy.zst: chunk 0 unreadable"):
        lazy[5:12]
    # whole chunks of a window are decompressed in place, with the same checks
    fresh = decode_features(raw, ("pose_heatmap",))["pose_heatmap"]
    assert np.array_equal(fresh[8:24], heat[8:24]) and np.array_equal(fresh[10:24], heat[10:24])
    with pytest.raises(ManifestError, match="pose_heatmap.npy.zst: chunk 0 unreadable"):
        fresh[0:16]


def test_old_shards_and_unknown_encodings_are_refused_in_one_line(tmp_path, synth):
    from dwm.datasets.views import decode_features

    # a shard sample of format 1: every array a plain .npy member
    old = {"k.json": json.dumps({"key": "k", "num_frames": 2}).encode()}
    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 18, 4, 4), np.uint8))
    old["k.pose_heatmap.npy"] = buf.getvalue()
    _tar_with(old, tmp_path / "old.tar")
    raw = next(iter_tar_samples(str(tmp_path / "old.tar")))
    with pytest.raises(ManifestError) as e:
        decode_features(raw, ("pose_heatmap",))
    msg = str(e.value)
    assert "\n" not in msg and "older format" in msg and "re-run preprocessing" in msg
    # a manifest of format 1, and one declaring an encoding this code does not know
    ds = tmp_path / "ds"
    shutil.copytree(Path(synth).parent, ds)
    m = json.loads((ds / "manifest.json").read_text())
    for change, pattern in ((lambda m: m.update(format_version=1), "re-run preprocessing"),
                            (lambda m: m["features"]["pose_heatmap"].update(encoding="npy.lz4"),
                             "pose_heatmap has encoding 'npy.lz4'")):
        bad = json.loads(json.dumps(m))
        change(bad)
        (ds / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(ManifestError, match=pattern):
            load_manifest(str(ds / "manifest.json"))


def test_a_zstd_frame_larger_than_its_rows_is_refused(tmp_path):
    """A chunk that declares more bytes than its rows can hold is refused before it is
    decompressed (no decompression bomb)."""
    from dwm.datasets.views import decode_features

    big = io.BytesIO()
    np.save(big, np.zeros((1 << 22,), np.uint8))
    chunk = zstandard.compress(big.getvalue())
    meta = {"key": "k", "num_frames": 1, "chunks": {"face_score": {
        "offsets": [0, len(chunk)], "rows": 1, "shape": [1], "dtype": "float32"}}}
    _tar_with({"k.json": json.dumps(meta).encode(), "k.face_score.npy.zst": chunk},
              tmp_path / "bomb.tar")
    raw = next(iter_tar_samples(str(tmp_path / "bomb.tar")))
    with pytest.raises(ManifestError, match="declares 4194432 bytes"):
        decode_features(raw, ("face_score",))


def test_readme_reads_a_shard_with_webdataset_numpy_and_zstandard(synth):
    """The README's few lines (no project code) read every member as the project does."""
    import re

    from dwm.shared.shards import decode_sample

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(# Read a shard without dwm.*?)```", readme, re.S).group(1)
    assert "dwm" not in code.replace("# Read a shard without dwm", "")
    url = load_manifest(synth)["shards"][0]["url"]
    ns: dict = {}
    exec(code.replace("data/train-000000.tar", str(url)), ns)  # noqa: S102 - our README
    first = next(iter_tar_samples(str(url)))
    want = decode_sample(first)
    last = decode_sample(list(iter_tar_samples(str(url)))[-1])
    for var, name in (("latents", "latents"), ("heatmaps", "pose_heatmap"),
                      ("crops", "face_crop"), ("crop_frames", "face_crop_frames")):
        assert np.array_equal(ns[var], last[name]), var
    assert ns["array"](ns["wds"].WebDataset(str(url), shardshuffle=False).__iter__().__next__(),
                       "face_mask").shape == want["face_mask"].shape


# ---------------------------------------------------------------------------------------------
# zero-copy reads and packed batches
# ---------------------------------------------------------------------------------------------
def test_npy_members_are_views_of_the_mapped_shard(synth):
    """Array members are decoded without a copy (a window read touches only its bytes), with
    the same values as np.load; a truncated array names the problem."""
    from dwm.shared.shards import decode_npy

    m = load_manifest(synth)
    raw = next(iter_tar_samples(m["shards"][0]["url"]))
    assert isinstance(raw["json"], bytes) and isinstance(raw["latents.npy"], memoryview)
    lat = decode_npy(raw["latents.npy"])
    assert np.array_equal(lat, np.load(io.BytesIO(bytes(raw["latents.npy"])), allow_pickle=False))
    assert not lat.flags.owndata and not lat.flags.writeable  # a view of the shard's bytes
    fortran = np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4))
    buf = io.BytesIO()
    np.save(buf, fortran)
    assert np.array_equal(decode_npy(buf.getvalue()), fortran)
    with pytest.raises(ValueError, match="truncated"):
        decode_npy(bytes(raw["latents.npy"])[:-7])
    with pytest.raises(ValueError, match="magic"):
        decode_npy(b"PK\x03\x04 not an array")


@pytest.mark.parametrize("float_images", [False, True])
def test_packed_batch_equals_collate(synth, float_images):
    """A worker's batch travels as one buffer: unpacked, it equals collate + batch_to_device,
    dtype for dtype (uint8 images as float in the worker give the same floats)."""
    from dwm.datasets.views import collate_packed, unpack_batch

    m = load_manifest(synth)
    raws = [r for s in m["shards"] if s["split"] == "train" for r in iter_tar_samples(s["url"])]
    view = ViewC(m["stats"], sequence_length=8)
    items = [view.make_item(r, np.random.default_rng(i)) for i, r in enumerate(raws[:3])]
    packed = collate_packed(items, float_images)
    assert [k for k, v in packed.items() if isinstance(v, torch.Tensor)] == ["__packed__"]
    got = unpack_batch(packed)
    want = {k: torch.from_numpy(np.stack([it[k] for it in items]))  # an independent reference
            if isinstance(items[0][k], (np.ndarray, np.generic)) and k != "meta"
            else [it[k] for it in items] for k in items[0]}
    assert set(got) == set(want)
    for k, v in want.items():
        if not isinstance(v, torch.Tensor):
            assert got[k] == v
            continue
        if float_images and k in ("heatmap", "face_mask", "ref_face_crop"):
            assert got[k].dtype == torch.float32
            assert torch.equal(got[k], batch_to_device({k: v}, "cpu")[k])
        else:
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    with pytest.raises(ValueError, match="shapes"):
        collate_packed([items[0], view.make_item(raws[0], np.random.default_rng(0), 4)])


@pytest.mark.parametrize("workers", [0, 2])
def test_shards_are_hashed_once_per_run(synth, monkeypatch, tmp_path, workers):
    """One DataLoader serves every epoch, and its workers share which shards are checked: each
    shard's sha256 is computed once per run, not per pass, epoch or worker."""
    import hashlib

    from dwm.shared import shards

    log = tmp_path / "hashed.txt"  # appended to by whichever process hashes (workers fork)
    real = hashlib.sha256

    def counting(data=b""):
        with open(log, "a") as fh:
            fh.write(f"{len(data)}\n")
        return real(data)

    monkeypatch.setattr(shards.hashlib, "sha256", counting)
    monkeypatch.setattr(shards, "_VERIFIED", set())
    monkeypatch.setattr(shards, "_MEMBER_TABLES", {})
    loader = _loader(synth, view="B", bs=1, num_workers=workers, epoch_samples=6)
    it = iter(loader)
    for _ in range(4 * loader.batches_per_epoch):  # four epochs
        next(it)
    it.close()
    assert loader.position.epoch == 3
    n_train = sum(1 for s in load_manifest(synth)["shards"] if s["split"] == "train")
    assert len(log.read_text().split()) == n_train


def test_background_batches_keep_order_raise_errors_and_stop():
    """The receiver thread hands batches over in order, re-raises a worker's error where the
    consumer asks for the next batch, and ends when closed."""
    from dwm.datasets.pipeline import BackgroundBatches

    def source():
        yield from ({"i": i} for i in range(3))
        raise ManifestError("shard x: sha256 does not match")

    got = []
    with pytest.raises(ManifestError, match="shard x"):
        for b in BackgroundBatches(source(), depth=1):
            got.append(b["i"])
    assert got == [0, 1, 2]

    # handed-out batches are released by the thread (bounded: no batch kept for long)
    import weakref

    class Batch(dict):
        pass

    refs = []

    def tracked():
        for i in range(12):
            b = Batch(i=i)
            refs.append(weakref.ref(b))
            yield b

    seen = [b["i"] for b in BackgroundBatches(tracked(), depth=2)]
    assert seen == list(range(12))
    assert sum(r() is not None for r in refs[:8]) == 0

    endless = BackgroundBatches(({"i": i} for i in iter(int, 1)), depth=2)
    assert next(iter(endless)) == {"i": 0}
    endless.close()
    endless.thread.join(timeout=5)
    assert not endless.thread.is_alive()



def test_recycled_blocks_are_never_rewritten_while_a_batch_lives(synth):
    """Workers reuse a batch's shared-memory block only after every tensor viewing it is freed:
    batches kept by the consumer keep their values while the loader goes on."""
    loader = _loader(synth, view="C", bs=2, num_workers=2, epoch_samples=8)
    it = iter(loader)
    kept, copies = [], []
    for i in range(12):
        batch = next(it)
        if i % 3 == 0:  # keep some, drop the others (their blocks go back to the workers)
            kept.append(batch)
            copies.append({k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)})
    it.close()
    for batch, copy in zip(kept, copies, strict=True):
        for k, v in copy.items():
            assert torch.equal(batch[k], v), k
