"""Fault tests of preprocessing: bad inputs, SIGKILL at random points, a full disk.

* Bad-input corpus (tests/badinput.py) through the real ``dwm preprocess`` command: each file gets
  the expected status and a reason naming it in report.json, the good files complete, and nothing
  of a bad file reaches a shard. VFR and rotation are checked on the pictures (timing band).
* Kill: ``dwm preprocess`` is SIGKILLed at seeded random file commits (right before or after the
  N-th rename of a cache chunk, shard or manifest: tests/killpoint.py), then re-run; shards and
  manifest equal an uninterrupted run byte for byte, no temporary file left.
* Disk full: the file writes fail with ENOSPC after N bytes during the shard phase: one clear
  line, the shards already written intact, and a re-run completes with the same bytes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from badinput import BAND_ROWS, H, band_index, good_clip, make_corpus
from killpoint import Renames

from dwm.shared.contract import decode_thumbs
from dwm.shared.shards import decode_sample, load_manifest, verify_shards

# tiny, fast settings: 64x112 crops, 24-frame segments, no heavy model extractors
BASE_ARGS = ["profile=tiny", "decode.width=64", "decode.height=112", "decode.segment_frames=24",
             "decode.min_frames=8", "workers=1"]
TMP_NAME = re.compile(r"(^\.tmp-|\.partial$)")


def run_env() -> dict[str, str]:
    return {**os.environ, "DWM_PROGRESS": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def pp_args(videos: Path, out: Path, models_dir: str, *extra: str) -> list[str]:
    """``dwm preprocess`` arguments (without the program)."""
    return ["preprocess", str(videos), f"out={out}", f"models.models_dir={models_dir}",
            *BASE_ARGS, *extra]


def samples_of(manifest_path: Path) -> dict[str, dict]:
    """key -> {"json": meta, "<name>.<suffix>": bytes} of every sample in the manifest's shards."""
    from dwm.datasets import iter_tar_samples

    out = {}
    for s in load_manifest(str(manifest_path))["shards"]:
        for raw in iter_tar_samples(s["url"]):
            meta = json.loads(raw["json"])
            assert raw["__key__"] not in out, f"sample {raw['__key__']} twice"
            out[raw["__key__"]] = {**raw, "json": meta}
    return out


def thumb_frames(raw: dict) -> list[int]:
    """Source frame index of every thumbnail, read from the timing band."""
    arrays = decode_sample(raw)
    blobs = decode_thumbs(arrays["thumbs_jpeg"], arrays["thumbs_offsets"])
    out = []
    for b in blobs:
        img = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_GRAYSCALE)
        rows = int(img.shape[0] * (BAND_ROWS - 5) / H)  # inside the band after the crop
        out.append(band_index(img[2:rows].mean()))
    return out


def leftovers(*dirs: Path) -> list[str]:
    return [str(p) for d in dirs if d.exists() for p in d.rglob("*") if TMP_NAME.search(p.name)]


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# 1. the bad-input corpus
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("badinput")
    videos, cases = make_corpus(root)
    return root, videos, cases


def dwm_main(*args: str) -> int:
    """``dwm ARGS`` in this process (the console script's entry point), progress bars off."""
    from dwm.shared import cli

    mp = pytest.MonkeyPatch()
    mp.setenv("DWM_PROGRESS", "0")
    try:
        return cli.main(list(args))
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def corpus_run(corpus, tiny_models_cfg):
    root, videos, cases = corpus
    out = root / "out"
    rc = dwm_main(*pp_args(videos, out, tiny_models_cfg.models_dir, "extractors=audio,pose,thumbs"))
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    rows = {r["path"]: r for r in report["videos"]}
    return out, report, rows, rc


def test_bad_inputs_each_get_their_status_and_reason(corpus, corpus_run):
    _, videos, cases = corpus
    out, report, rows, _ = corpus_run
    table = []
    for name, case in sorted(cases.items()):
        row = rows.get(name)
        assert row is not None, f"{name}: missing from report.json"
        table.append(f"{name:<32} expected {case.expect:<8} observed {row['status']:<8} "
                     f"{row['reason'] or ''}")
        assert row["status"] == case.expect, f"{name}: {row}"
        if case.expect == "ok":
            assert not row["reason"], row
        else:
            assert re.search(case.reason, row["reason"] or ""), (name, row["reason"])
            assert "\n" not in row["reason"].strip(), row["reason"]  # one line
    print("\n".join(table))
    assert report["counts"] == {"ok": 5, "skipped": 6, "failed": 2}


def test_nothing_of_a_bad_file_reaches_a_shard(corpus, corpus_run):
    _, videos, cases = corpus
    out, report, rows, _ = corpus_run
    manifest = load_manifest(str(out / "manifest.json"))
    verify_shards(manifest)  # checksums and member names
    samples = samples_of(out / "manifest.json")
    ok_hashes = {rows[n]["hash"] for n, c in cases.items() if c.expect == "ok"}
    bad_hashes = {hashlib.sha256(Path(videos, n).read_bytes()).hexdigest()
                  for n, c in cases.items() if c.expect != "ok" and Path(videos, n).stat().st_size}
    bad_hashes -= ok_hashes  # the duplicate and the symlink have good.mp4's content
    seen = {s["json"]["video_hash"] for s in samples.values()}
    assert seen == ok_hashes and not seen & bad_hashes
    for key, s in samples.items():
        assert key.startswith(s["json"]["video_hash"][:16])
        assert cases[s["json"]["source"]].expect == "ok"
    # every good video complete: 36 frames = segments of 24 + 12
    for name in (n for n, c in cases.items() if c.expect == "ok"):
        segs = sorted(s["json"]["segment"] for s in samples.values() if s["json"]["source"] == name)
        assert segs == [0, 1], (name, segs)


def test_real_shards_hold_no_pickle(corpus_run):
    import io
    import tarfile

    from fixtures_data import zstd_frames

    out = corpus_run[0]
    tars = sorted(out.glob("*.tar"))
    assert tars
    for t in tars:
        with tarfile.open(t) as tar:
            for m in tar.getmembers():
                assert m.isreg() and m.name.endswith((".npy", ".npy.zst", ".json")), (t.name,
                                                                                       m.name)
                data = tar.extractfile(m).read()
                if m.name.endswith(".npy"):  # no object arrays: loads without pickle
                    np.load(io.BytesIO(data), allow_pickle=False)
                elif m.name.endswith(".npy.zst"):  # zstd frames, each a whole .npy
                    for chunk in zstd_frames(data):
                        np.load(io.BytesIO(chunk), allow_pickle=False)


def test_duplicate_and_symlink_are_computed_once(corpus, corpus_run):
    out, report, rows, _ = corpus_run
    for name in ("good_copy.mp4", "good_link.mp4"):
        assert rows[name]["hash"] == rows["good.mp4"]["hash"]
        assert rows[name].get("duplicate_of") == "good.mp4"
        assert not rows[name].get("extractor_calls")  # no work done for it
    # one cache folder per content; pose ran once per processed video
    cache_videos = [p for p in (out / "cache").iterdir() if p.is_dir()]
    processed = [r for r in rows.values() if r.get("probe") is not None or r.get("frames")]
    assert rows["good.mp4"]["hash"] in {p.name for p in cache_videos}
    assert report["extractor_calls"]["thumbs"] == sum(
        (r.get("extractor_calls") or {}).get("thumbs", 0) for r in processed)
    assert sum(1 for r in rows.values() if (r.get("extractor_calls") or {}).get("pose")) == 5


def test_video_only_kept_for_bc_not_a(corpus_run):
    from dwm.datasets import make_view

    out, report, rows, _ = corpus_run
    assert rows["video_only.mp4"]["has_audio"] is False
    samples = [s for s in samples_of(out / "manifest.json").values()
               if s["json"]["source"] == "video_only.mp4"]
    assert samples and all(s["json"]["has_audio"] is False for s in samples)
    assert all(not k.startswith("audio_") for s in samples for k in s)
    stats = load_manifest(str(out / "manifest.json"))["stats"]
    assert not make_view("A", stats, None, audio_window=16).accepts(samples[0]["json"])
    assert make_view("C", stats, None).accepts(samples[0]["json"])


def test_vfr_frames_follow_timestamps(corpus_run):
    out, _, rows, _ = corpus_run
    samples = sorted((s for s in samples_of(out / "manifest.json").values()
                      if s["json"]["source"] == "vfr.mp4"), key=lambda s: s["json"]["segment"])
    frames = [i for s in samples for i in thumb_frames(s)]
    # source frames 8..19 were dropped, the rest keep their times: frame 7 stays on screen
    want = list(range(8)) + [7] * 12 + list(range(20, 36))
    assert frames == want
    assert rows["vfr.mp4"]["frames"] == 36


def test_rotation_is_applied_once(corpus_run):
    out, _, rows, _ = corpus_run
    row = rows["rotated.mp4"]
    assert (row["orig_width"], row["orig_height"]) == (72, 128) and row["rotation"] in (90, 270)
    samples = sorted((s for s in samples_of(out / "manifest.json").values()
                      if s["json"]["source"] == "rotated.mp4"), key=lambda s: s["json"]["segment"])
    assert [i for s in samples for i in thumb_frames(s)] == list(range(36))  # upright band on top


# ---------------------------------------------------------------------------------------------
# 2. SIGKILL at random points, then resume
# ---------------------------------------------------------------------------------------------
KILL_ARGS = ("extractors=pose,thumbs", "shards.target_shard_mb=0.02")


@pytest.fixture(scope="module")
def kill_videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("kill_videos")
    for i in range(2):
        good_clip(d / f"clip_{i}.mp4", seconds=1.5, seed=10 + i, audio=i != 1)
    return d


@pytest.fixture(scope="module")
def reference(kill_videos, tiny_models_cfg, tmp_path_factory):
    """An uninterrupted run, and the files it commits (renames), in order."""
    out = tmp_path_factory.mktemp("kill_ref") / "out"
    with Renames() as renames:
        assert dwm_main(*pp_args(kill_videos, out, tiny_models_cfg.models_dir, *KILL_ARGS)) == 0
    return out, renames.targets


def killed_cmd(at: int, when: str, *args: str) -> list[str]:
    """``dwm ARGS``, SIGKILLed by itself right ``when`` (before/after) its rename number ``at``."""
    return [sys.executable, str(Path(__file__).with_name("killpoint.py")), str(at), when,
            os.devnull, "--", *args]


def dataset_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.suffix == ".tar" or p.name == "manifest.json"}


def test_kill_anywhere_then_resume_gives_the_same_bytes(reference, kill_videos, tiny_models_cfg,
                                                        tmp_path):
    ref_out, commits = reference
    want = dataset_files(ref_out)
    assert len([n for n in want if n.endswith(".tar")]) >= 4  # several shards: kills between them
    rng = random.Random(20240611)
    # seeded points over the whole run (mostly cache chunks), one at a shard, the manifest last
    shards = [i for i, t in enumerate(commits, 1) if t.endswith(".tar")]
    assert len(shards) >= 4 and commits[-1].endswith("manifest.json"), commits[-5:]
    points = sorted(rng.sample(range(1, shards[0]), 3) + [rng.choice(shards)]) + [len(commits)]
    for trial, at in enumerate(points):
        out = tmp_path / f"trial{trial}" / "out"
        when = rng.choice(["before", "after"])
        proc = subprocess.run(
            killed_cmd(at, when, *pp_args(kill_videos, out, tiny_models_cfg.models_dir,
                                          *KILL_ARGS)),
            env=run_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == -signal.SIGKILL, (trial, proc.stderr[-3000:])
        state = sorted(p.name for p in out.iterdir()) if out.exists() else []
        target = Path(commits[at - 1])
        print(f"trial {trial}: killed {when} commit {at}/{len(commits)} "
              f"({target.parent.name}/{target.name}); left: {state}")
        # the re-run: the same entry point, in this process (saves a start-up per trial)
        rc = dwm_main(*pp_args(kill_videos, out, tiny_models_cfg.models_dir, *KILL_ARGS))
        assert rc == 0, trial
        got = dataset_files(out)
        assert sorted(got) == sorted(want), trial
        for name in want:
            assert got[name] == want[name], f"trial {trial} (killed at commit {at}): {name}"
        assert leftovers(out) == [], trial
        verify_shards(load_manifest(str(out / "manifest.json")))


# ---------------------------------------------------------------------------------------------
# 3. the disk fills up while shards are written
# ---------------------------------------------------------------------------------------------
def test_disk_full_during_a_shard_write(reference, kill_videos, tiny_models_cfg, tmp_path,
                                        monkeypatch, capsys):
    import fsspec.implementations.local as fl

    from dwm.shared import cli

    ref_out = reference[0]
    ref = dataset_files(ref_out)
    budget = max(len(v) for n, v in ref.items() if n.endswith(".tar")) + 1
    out = tmp_path / "out"
    cache_dir = tmp_path / "cache"
    shutil.copytree(ref_out / "cache", cache_dir)  # features are there: the run goes to shards
    state = {"tar_started": False, "left": budget}
    real_write = fl.LocalFileOpener.write

    def full_disk_write(self, data, *a, **kw):
        if ".tar-" in os.path.basename(self.path):  # the disk fills once shards are written
            state["tar_started"] = True
        if state["tar_started"]:
            n = len(memoryview(data).cast("B"))
            if n > state["left"]:
                real_write(self, bytes(memoryview(data).cast("B")[: state["left"]]))
                state["left"] = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            state["left"] -= n
        return real_write(self, data, *a, **kw)

    monkeypatch.setenv("DWM_PROGRESS", "0")
    args = ["preprocess", str(kill_videos), f"out={out}", f"cache_dir={cache_dir}",
            f"models.models_dir={tiny_models_cfg.models_dir}", *BASE_ARGS, *KILL_ARGS]
    with monkeypatch.context() as m:
        m.setattr(fl.LocalFileOpener, "write", full_disk_write)
        rc = cli.main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    last = err.strip().splitlines()[-1]
    assert "No space left on device" in last and ".tar" in last, err[-2000:]
    assert "Traceback" not in err
    written = sorted(p.name for p in out.glob("*.tar"))
    assert len(written) == 1  # the first shard fitted, the second did not
    for name in written:
        assert (out / name).read_bytes() == ref[name]  # intact
    assert not (out / "manifest.json").exists()
    assert leftovers(out) == []
    # space is back: the re-run completes with the same bytes
    assert cli.main(args) == 0
    assert dataset_files(out) == ref
