"""Preprocessing: the session dataset (real video, mediapipe pose, tiny models), its shards,
manifest, cache and report; cache reuse and partial recompute."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import zarr

from dwm.shared import contract
from dwm.shared.shards import decode_sample, load_manifest, verify_shards


def _samples(manifest: dict) -> list[dict]:
    """Every sample, each member decoded in its declared encoding (tar members read by
    ``tarfile``, then :func:`dwm.shared.shards.decode_sample`)."""
    out = []
    for s in manifest["shards"]:
        with tarfile.open(s["url"]) as tar:
            groups: dict[str, dict] = {}
            for m in tar.getmembers():
                key, rest = m.name.split(".", 1)
                groups.setdefault(key, {"__key__": key})[rest] = tar.extractfile(m).read()
            for k in sorted(groups):
                out.append({**decode_sample(groups[k]), "__shard__": s["name"]})
    return out


@pytest.fixture(scope="module")
def manifest(sample_dataset):
    m = load_manifest(str(sample_dataset))
    verify_shards(m)
    return m


@pytest.fixture(scope="module")
def samples(manifest):
    return _samples(manifest)


@pytest.fixture(scope="module")
def report(sample_dataset_dir):
    return json.loads((sample_dataset_dir / "report.json").read_text())


def test_manifest_has_both_splits_and_stats(manifest):
    splits = {s["split"] for s in manifest["shards"]}
    assert splits == {"train", "val"}
    assert all(s["name"].startswith(s["split"] + "-") for s in manifest["shards"])
    assert manifest["num_samples"] == sum(s["samples"] for s in manifest["shards"])
    st = manifest["stats"]
    assert len(st["audio_mel"]["mean"]) == 80 and len(st["audio_baseline"]["std"]) == 35
    assert len(st["latents"]["mean"]) == contract.LATENT_CHANNELS
    assert all(v > 0 for v in st["audio_mel"]["std"])
    for name in ("audio_mel", "pose_body", "face_mask", "latents", "clip_embed", "thumbs_jpeg"):
        f = manifest["features"][name]
        assert f["dtype"] == contract.FEATURE_BY_NAME[name].dtype and f["version"]
        assert len(f["config_hash"]) == 16
    assert manifest["features"]["pose_heatmap"]["shape"] == ["T", 18, 56, 32]
    assert manifest["config"]["decode"]["segment_frames"] == 48
    assert "out" not in manifest["config"]  # where a run happened does not change the data


def test_samples_follow_the_contract(samples, manifest):
    assert len(samples) == manifest["num_samples"] >= 4
    keys = [s["json"]["key"] for s in samples]
    assert len(set(keys)) == len(keys)
    by_video: dict[str, list] = {}
    for s in samples:
        meta = s["json"]
        assert set(meta) == set(contract.SAMPLE_META_KEYS)
        t = meta["num_frames"]
        assert 8 <= t <= 48 and meta["width"] == 256 and meta["height"] == 448
        assert meta["has_audio"] is True and meta["fps"] == 24
        assert meta["split"] in s["__shard__"]
        assert sorted(meta["features"]) == sorted(k for k in s if k not in ("json", "__shard__"))
        for name in meta["features"]:  # each member in the encoding the contract declares
            assert name in meta["chunks"] or contract.FEATURE_BY_NAME[name].encoding == "npy"
            assert manifest["features"][name]["encoding"] == contract.FEATURE_BY_NAME[name].encoding
        for name in meta["features"]:
            spec = contract.FEATURE_BY_NAME[name]
            arr = s[name]
            assert arr.dtype == np.dtype(spec.dtype), name
            if spec.per_frame:
                assert arr.shape[0] == t, name
        assert s["audio_mel"].shape == (t, 80) and s["audio_baseline"].shape == (t, 35)
        assert s["pose_body"].shape == (t, 18, 3) and s["pose_hands"].shape == (t, 42, 3)
        assert s["pose_face"].shape == (t, 68, 3) and s["pose_heatmap"].shape == (t, 18, 56, 32)
        assert s["latents"].shape == (t, 4, 56, 32)
        assert s["face_mask"].shape == (t, 56, 32)
        # face crops on reference-candidate frames only: the best-scored face of every run of
        # face_crop_every frames that has one
        every = manifest["config"]["shards"]["face_crop_every"]
        frames = s["face_crop_frames"]
        assert s["face_crop"].shape == (len(frames), 112, 112, 3)
        runs = [r for r in range(0, t, every) if s["face_present"][r : r + every].any()]
        assert [int(f) // every for f in frames] == [r // every for r in runs]
        assert s["face_present"][frames].all() and (s["face_crop"].reshape(len(frames), -1)
                                                    .max(axis=1) > 0).all()
        assert s["face_ref_embed"].shape == (512,)
        assert len(s["thumbs_offsets"]) == t + 1 and s["thumbs_offsets"][-1] == len(s["thumbs_jpeg"])
        jpgs = contract.decode_thumbs(s["thumbs_jpeg"], s["thumbs_offsets"])
        assert all(j[:2] == b"\xff\xd8" for j in jpgs)
        assert len(s["clip_frames"]) >= 1 and s["clip_frames"][0] == 0
        assert s["clip_embed"].shape[0] == len(s["clip_frames"])
        # masks: never all ones; zeros exactly where no face
        for m, present in zip(s["face_mask"], s["face_present"]):
            assert not (m == 255).all()
            assert (m.max() > 0) == bool(present)
        # points kept are inside the crop
        body = s["pose_body"]
        ok = body[..., 2] > 0
        assert ((body[..., :2][ok] >= 0) & (body[..., :2][ok] <= 1)).all()
        by_video.setdefault(meta["video_hash"], []).append(meta)
    assert len(by_video) == 2
    for metas in by_video.values():  # one split per video, segments in order
        assert len({m["split"] for m in metas}) == 1
        assert [m["segment"] for m in metas] == list(range(len(metas)))
        starts = [m["start_frame"] for m in metas]
        assert starts == sorted(starts) and starts[0] == 0


def test_real_pose_tracks_the_dancer(samples):
    """mediapipe on the real video: nearly every frame has a body with the head above the hips."""
    body = np.concatenate([s["pose_body"] for s in samples])
    nose, rhip, lhip = body[:, 0], body[:, contract.R_HIP], body[:, contract.L_HIP]
    good = (nose[:, 2] > 0.3) & (rhip[:, 2] > 0.3) & (lhip[:, 2] > 0.3)
    good &= nose[:, 1] < np.minimum(rhip[:, 1], lhip[:, 1])
    assert good.mean() >= 0.95, good.mean()
    # the heatmap peak sits where the keypoint is
    s = samples[0]
    j = contract.NECK
    f = int(np.argmax(s["pose_body"][:, j, 2]))
    hm = s["pose_heatmap"][f, j]
    y, x = np.unravel_index(np.argmax(hm), hm.shape)
    assert hm.max() > 200
    assert abs((x + 0.5) / 32 - s["pose_body"][f, j, 0]) < 2 / 32
    assert abs((y + 0.5) / 56 - s["pose_body"][f, j, 1]) < 2 / 56


def test_report_and_cache(report, sample_dataset_dir):
    assert report["counts"] == {"ok": 2, "skipped": 0, "failed": 0}
    for v in report["videos"]:
        assert v["status"] == "ok" and v["has_audio"] and v["frames"] > 0
        assert v["orig_width"] == 540 and v["orig_height"] == 960 and v["rotation"] == 0
        assert v["timings"]["total"] > 0
    assert report["extractor_calls"]["pose"] > 0 and report["extractor_calls"]["latents"] > 0
    assert report["cache"]["bytes_per_frame"] > 0
    # the cache reads with plain zarr, and each array says what it is
    root = zarr.open_group(str(sample_dataset_dir / "cache"), mode="r")
    vh = report["videos"][0]["hash"]
    entries = list(root[vh].group_keys())
    assert {e.split("-")[0] for e in entries} >= {"probe", "pose", "audio", "face", "latents",
                                                  "clip", "thumbs"}
    lat = root[vh][f"latents-{report['videos'][0]['keys']['latents']}"]
    assert lat.attrs["complete"] is True and lat.attrs["scaling_factor"] > 0
    assert lat["mean"].attrs["doc"]
    face = root[vh][f"face-{report['videos'][0]['keys']['face']}"]
    full = face["mask_full"][:]
    assert full.shape[1:] == (448, 256) and not (full == 255).all(axis=(1, 2)).any()
    assert not list(sample_dataset_dir.rglob(".tmp-*"))


def test_second_run_does_no_work(sample_dataset_cfg, sample_dataset):
    """Same input, same config: no extractor call, not even a decode, and the same bytes."""
    from dwm.preprocess.run import main

    before = sample_dataset.read_bytes()
    main(copy.deepcopy(sample_dataset_cfg))
    rep = json.loads((sample_dataset.parent / "report.json").read_text())
    assert all(n == 0 for n in rep["extractor_calls"].values()), rep["extractor_calls"]
    assert rep["decoded_frames"] == 0
    assert sample_dataset.read_bytes() == before


def test_old_format_shards_are_rewritten_from_the_cache(sample_dataset_cfg, sample_dataset_dir,
                                                        sample_dataset, tmp_path):
    """A dataset of shard format 1 (every array a plain .npy member): readers refuse it in one
    line; re-running preprocessing on the same input rewrites it in the current format from the
    cache, with no extractor call and no decode."""
    import shutil

    from dwm.datasets import TrainLoader, make_view
    from dwm.preprocess.run import main
    from dwm.shared.errors import ManifestError
    from dwm.shared.shards import encode_npy

    out = tmp_path / "old"
    shutil.copytree(sample_dataset_dir, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for s in manifest["shards"]:  # as format 1 wrote them
        path = out / s["name"]
        samples = _samples({"shards": [{"url": str(path), "name": s["name"]}]})
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for smp in samples:
                key = smp["json"]["key"]
                members = {f"{key}.json": json.dumps(smp["json"]).encode()}
                members.update({f"{key}.{k}.npy": encode_npy(v) for k, v in smp.items()
                                if k not in ("json", "__shard__")})
                for name, data in sorted(members.items()):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    manifest["format_version"] = 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="re-run preprocessing") as e:
        load_manifest(str(out / "manifest.json"))
    assert "\n" not in str(e.value)

    cfg = copy.deepcopy(sample_dataset_cfg)
    cfg.out = str(out)
    if not cfg.cache_dir:
        cfg.cache_dir = str(out / "cache")
    main(cfg)
    rep = json.loads((out / "report.json").read_text())
    assert all(n == 0 for n in rep["extractor_calls"].values()), rep["extractor_calls"]
    assert rep["decoded_frames"] == 0
    assert (out / "manifest.json").read_bytes() == sample_dataset.read_bytes()
    m = load_manifest(str(out / "manifest.json"))
    batch = next(iter(TrainLoader(m, make_view("C", m["stats"], None, sequence_length=8), 2)))
    assert batch["latents"].shape[:2] == (2, 8)


def test_workers_shared_cache_and_vae_change(sample_videos_dir, tiny_models_cfg, tmp_path):
    """Two worker processes fill a cache; a second dataset (another folder, the same videos plus
    a copy under another name) sharing that cache computes nothing and writes the same shards;
    another VAE then recomputes the latents only."""
    import os
    import shutil

    from dwm.preprocess.run import main
    from fixtures_data import one_torch_thread, sample_preprocess_config

    vids = tmp_path / "videos"
    vids.mkdir()
    for i, start in enumerate((0, 3)):
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-ss", str(start), "-i",
                        str(sample_videos_dir / "dance_a.mp4"), "-t", "1", "-c:v", "libx264",
                        "-preset", "ultrafast", "-c:a", "aac", str(vids / f"clip{i}.mp4")],
                       check=True)
    small = {"decode.width": 64, "decode.height": 112, "decode.segment_frames": 24,
             "extractors": "audio,pose,latents,thumbs"}
    cache = tmp_path / "shared_cache"
    cfg1 = sample_preprocess_config(vids, tmp_path / "ds1", tiny_models_cfg, cache_dir=cache,
                                    workers=2, **small)
    assert main(copy.deepcopy(cfg1)) == 0
    calls1 = _calls(tmp_path / "ds1")
    assert all(calls1[k] > 0 for k in ("audio", "pose", "latents", "thumbs")), calls1
    m1 = json.loads((tmp_path / "ds1" / "manifest.json").read_text())
    assert m1["counts"]["videos_ok"] == 2 and {s["split"] for s in m1["shards"]} == {"train", "val"}

    other = tmp_path / "videos2"
    shutil.copytree(vids, other)
    shutil.copy(vids / "clip0.mp4", other / "copy_of_clip0.mp4")
    cfg2 = sample_preprocess_config(other, tmp_path / "ds2", tiny_models_cfg, cache_dir=cache, **small)
    with one_torch_thread():
        assert main(copy.deepcopy(cfg2)) == 0
    assert all(n == 0 for n in _calls(tmp_path / "ds2").values())
    rows = {r["path"]: r for r in json.loads((tmp_path / "ds2" / "report.json").read_text())["videos"]}
    assert rows["copy_of_clip0.mp4"]["status"] == "skipped"
    assert "same content as" in rows["copy_of_clip0.mp4"]["reason"]
    for f in (s["name"] for s in m1["shards"]):
        assert (tmp_path / "ds1" / f).read_bytes() == (tmp_path / "ds2" / f).read_bytes(), f
    m2 = json.loads((tmp_path / "ds2" / "manifest.json").read_text())
    assert m2["counts"]["videos_skipped"] == 1  # the copy; everything else is the same data
    assert {**m1, "counts": None} == {**m2, "counts": None}

    cfg3 = copy.deepcopy(cfg2)
    cfg3.out = str(tmp_path / "ds3")
    cfg3.models.vae = str(_second_vae(cfg3, tmp_path))
    with one_torch_thread():
        assert main(cfg3) == 0
    calls3 = _calls(tmp_path / "ds3")
    assert calls3["latents"] == calls1["latents"]
    assert all(n == 0 for k, n in calls3.items() if k != "latents"), calls3
    video_dir = cache / rows["clip0.mp4"]["hash"]
    assert len([p for p in os.listdir(video_dir) if p.startswith("latents-")]) == 2


def _calls(out) -> dict:
    return json.loads((out / "report.json").read_text())["extractor_calls"]


def _second_vae(cfg, tmp_path):
    """A copy of the tiny VAE with other weights (a 'changed VAE')."""
    import torch

    from dwm.shared.vae import load_vae

    vae, _ = load_vae(cfg.models)
    with torch.no_grad():
        for p in vae.parameters():
            p.mul_(0.5)
    out = tmp_path / "vae2"
    vae.save_pretrained(out)
    return out


def test_decode_keeps_aspect_and_resamples():
    from dwm.preprocess.decode import decode_size, resampled_count, source_indices

    dw, dh, s = decode_size(1080, 1920, 512, 896)
    assert (dw, dh) == (512, 911) and abs(dw / dh - 1080 / 1920) < 0.002
    dw, dh, s = decode_size(1920, 1080, 512, 896)  # landscape: wide decode, crop in x
    assert dh == 896 and dw == 1593
    assert resampled_count(300, 30.0, 24.0) == 240
    idx = source_indices(0, 5, 30.0, 24.0, 300)
    assert idx.tolist() == [0, 1, 2, 3, 5]  # skips one frame in five
    assert source_indices(0, 4, 12.0, 24.0, 100).tolist() == [0, 0, 1, 1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_audio_job_runs_at_lower_priority_and_so_does_its_ffmpeg():
    """The audio thread yields the CPU to the decoder (the critical path); the ffmpeg it starts
    inherits the lower priority, while the calling thread keeps its own."""
    from dwm.preprocess.pipeline import AUDIO_THREAD_NICE, _Job

    base = os.nice(0)
    seen: dict[str, int] = {}

    def work() -> None:
        seen["thread"] = os.nice(0)
        out = subprocess.run([sys.executable, "-c", "import os; print(os.nice(0))"],
                             capture_output=True, text=True, check=True).stdout
        seen["child"] = int(out)

    job = _Job(work, nice=AUDIO_THREAD_NICE)
    assert job.join() is None
    want = min(19, base + AUDIO_THREAD_NICE)
    assert AUDIO_THREAD_NICE > 0 and want > base
    assert seen == {"thread": want, "child": want}
    assert os.nice(0) == base  # the caller's thread is untouched
