"""Bad input to every command ends in ONE stderr line naming the file or key and the reason,
with no traceback and nothing created.

One case per command goes through the installed console script (``.venv/bin/dwm``, as a user
runs it; the six are started together, since each pays the start-up). The other cases run the
same entry point in this process (``cli.main``), where one start-up serves them all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_datasets import write_synthetic_dataset

from dwm.shared import cli

DWM = Path(sys.executable).with_name("dwm")  # the installed entry point beside this python


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder of bad inputs: an empty folder, a text file posing as a song, a manifest of
    data without latents, one of tiny-profile data, one naming a missing shard, a checkpoint
    folder stub and a damaged one."""
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "empty").mkdir()
    (root / "notes.mp3").write_text("not a song\n" * 20)
    manifest = Path(write_synthetic_dataset(root / "synth", n_train=2, n_val=1, T=8,
                                            per_shard=1))
    m = json.loads(manifest.read_text())
    no_latents = {**m, "features": {k: v for k, v in m["features"].items() if k != "latents"}}
    (manifest.parent / "no_latents.json").write_text(json.dumps(no_latents))
    tiny = {**m, "config": {"profile": "tiny", "models": {"profile": "tiny"}}}
    (manifest.parent / "tiny.json").write_text(json.dumps(tiny))
    (manifest.parent / "missing_shard.json").write_text(json.dumps(
        {**m, "shards": [{**s, "name": "gone-" + s["name"]} for s in m["shards"]]}))
    (root / "ckpt").mkdir()
    (root / "ckpt" / "model_index.json").write_text("{}")
    (root / "damaged").mkdir()
    (root / "damaged" / "model_index.json").write_text('{"m2p": ["dwm.training')  # cut short
    return root


def assert_one_line(rc: int, stderr: str, before: set[str], after: set[str], *names: str):
    lines = stderr.strip().splitlines()
    assert rc == 2, (rc, stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1, lines  # exactly one line: nothing else on stderr
    assert after == before, f"created: {sorted(after - before)}"
    for name in names:  # the line names the file or key
        assert name in lines[0], (name, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------
# through the installed console script
# ---------------------------------------------------------------------------------------------
SCRIPT_CASES = {
    # command: (arguments, what the line must name)
    "preprocess": (["preprocess", "no_such_videos"], ["no_such_videos", "does not exist"]),
    "train": (["train", "profile=tiny"], ["data/manifest.json", "manifest not found"]),
    "generate": (["generate", "music=notes.mp3", "ref=missing.png"], ["ref=missing.png"]),
    "eval": (["eval", "ckpt=ckpt", "data=missing.json"], ["missing.json", "not found"]),
    "bench": (["bench", "quick=true", "video=notes.mp3"], ["notes.mp3"]),
    "demo": (["demo", "videos=empty"], ["videos=empty", "no video files"]),
}


@pytest.fixture(scope="module")
def script_runs(inputs) -> dict[str, tuple[int, str, set[str], set[str]]]:
    """Every command's bad case through ``.venv/bin/dwm``, started together, in ``inputs``."""
    assert DWM.is_file(), f"{DWM}: the console script is not installed (run scripts/setup.sh)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    before = tree(inputs)
    procs = {name: subprocess.Popen([str(DWM), *args], cwd=inputs, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (args, _) in SCRIPT_CASES.items()}
    out = {}
    for name, p in procs.items():
        _, err = p.communicate(timeout=600)
        out[name] = (p.returncode, err)
    after = tree(inputs)
    return {name: (rc, err, before, after) for name, (rc, err) in out.items()}


@pytest.mark.parametrize("command", list(SCRIPT_CASES))
def test_console_script_bad_input_is_one_line(command, script_runs):
    rc, err, before, after = script_runs[command]
    line = assert_one_line(rc, err, before, after, *SCRIPT_CASES[command][1])
    assert line.startswith(f"dwm {command}: error: "), line


def test_train_before_preprocess_creates_no_output_dir(script_runs, inputs):
    assert not (inputs / "champ_2stage_output").exists()


# ---------------------------------------------------------------------------------------------
# more cases, the same entry point in this process
# ---------------------------------------------------------------------------------------------
CASES = [
    # preprocess
    (["preprocess", "empty"], ["empty", "holds no files"]),
    (["preprocess", "synth", "profile=tiny", "decode.width=100"], ["decode.width=100", "multiple"]),
    (["preprocess", "synth", "profile=tiny", "decode.segment_frames=0"],
     ["decode.segment_frames=0"]),
    (["preprocess", "synth", "profile=tiny", "extractors=audio,bogus"], ["bogus"]),
    (["preprocess", "synth", "out=notes.mp3", "profile=tiny"], ["out=notes.mp3", "not a folder"]),
    (["preprocess", "synth", "out=merged", "mode=merge"], ["out=merged", "manifest-r"]),
    (["preprocess", "synth", "profile=medium"], ["profile", "medium"]),
    # train
    (["train", "data=synth"], ["synth", "not a file"]),
    (["train", "data=notes.mp3"], ["notes.mp3", "not valid JSON"]),
    (["train", "profile=tiny", "stage=B", "data=synth/no_latents.json"],
     ["no_latents.json", "latents", "stage B"]),
    (["train", "stage=B", "data=synth/tiny.json"], ["tiny.json", "profile=tiny"]),
    (["train", "profile=tiny", "stage=A", "data=synth/missing_shard.json"],
     ["gone-", "missing"]),
    (["train", "profile=tiny", "data=synth/manifest.json", "init=nowhere"], ["init=nowhere"]),
    (["train", "profile=tiny", "data=synth/manifest.json", "stage=A", "resume=nowhere"],
     ["resume=nowhere"]),
    (["train", "stage=D"], ["stage", "'D'"]),
    (["train", "stage_a_steps=many"], ["stage_a_steps", "many"]),
    # generate
    (["generate"], ["music="]),
    (["generate", "music=missing.ogg", "ref=missing.png"], ["music=missing.ogg", "no such file"]),
    (["generate", "music=notes.mp3", "ref=notes.mp3", "ckpt=empty"], ["ckpt=empty"]),
    (["generate", "music=notes.mp3", "ref=notes.mp3", "ckpt=ckpt", "resolution=100x100"],
     ["resolution", "100x100"]),
    # eval
    (["eval", "ckpt=empty"], ["ckpt=empty"]),
    (["eval", "ckpt=damaged", "data=synth/manifest.json"], ["model_index.json", "damaged"]),
    (["train", "profile=tiny", "data=synth/manifest.json", "init=damaged"],
     ["model_index.json", "damaged"]),
    (["eval", "ckpt=ckpt", "data=synth/manifest.json", "max_samples=0"], ["max_samples=0"]),
    (["eval", "ckpt=ckpt", "data=synth/missing_shard.json"], ["gone-", "missing"]),
    # bench
    (["bench", "video=missing.mp4"], ["missing.mp4"]),
    # demo
    (["demo", "videos=missing"], ["videos=missing"]),
    (["demo", "width=100"], ["width=100", "multiple of 64"]),
    (["demo", "seconds=-1"], ["seconds=-1"]),
]


@pytest.mark.parametrize("argv,names", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_line_and_creates_nothing(argv, names, inputs, capfd, monkeypatch):
    monkeypatch.chdir(inputs)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = tree(inputs)
    rc = cli.main(list(argv))
    err = capfd.readouterr().err
    line = assert_one_line(rc, err, before, tree(inputs), *names)
    assert line.startswith(("dwm: error: ", f"dwm {argv[0]}: error: ")), line
