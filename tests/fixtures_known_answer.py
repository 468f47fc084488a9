"""The known-answer corpus of stage A (``dwm.shared.synthetic.choreography``: one of three arm
moves per beat, at random; placement and size random per clip), written through the project's
own ShardWriter, and a tiny stage A trained on it through the real stage code, once per session:
the known-answer test checks what it learned, and the generate tests dance with it to a real
photo."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from dwm.preprocess.extractors.pose import render_heatmaps
from dwm.shared import contract, synthetic
from dwm.shared.config import TrainConfig, build_train_config
from dwm.shared.shards import ShardWriter, write_manifest
from dwm.training.engine import run_stage
from dwm.training.stages.stage_a import StageA
from fixtures_data import one_torch_thread

FPS, BPM, W_PX, H_PX = 24.0, 120.0, 256, 448
GRID = (H_PX // 8, W_PX // 8)
CLIP_SECONDS = 8.0
WINDOW = 48  # 4 beats
STEPS = 800  # the calibration: ~1 minute on 2 cores


def beat_features(n: int, beats: np.ndarray, rng: np.random.Generator):
    """(mel (n, 80), baseline (n, 35)): a click on each beat and the contract's baseline layout
    (onset envelope first, onset peak and beat one-hots last), the rest noise."""
    frame = np.arange(n)
    since = np.min(np.where(frame[:, None] >= np.round(beats)[None], frame[:, None]
                            - np.round(beats)[None], 99), axis=1).astype(np.float32)
    mel = rng.normal(-50, 2, (n, 80)).astype(np.float32)
    mel += (30.0 * np.exp(-since / 1.5))[:, None]
    base = rng.normal(0, 0.3, (n, contract.AUDIO_BASELINE_DIM)).astype(np.float32)
    onehot = (since == 0).astype(np.float32)
    base[:, 0] = np.exp(-since / 2.0)
    base[:, -2], base[:, -1] = onehot, onehot
    return mel, base


def choreo_sample(key: str, split: str, rng: np.random.Generator) -> dict:
    centre = (float(rng.uniform(0.42, 0.58)), float(rng.uniform(0.45, 0.58)))
    scale = float(rng.uniform(0.45, 0.72))
    c = synthetic.choreography(CLIP_SECONDS, BPM, FPS, width=W_PX, height=H_PX, centre=centre,
                               scale=scale, seed=int(rng.integers(1 << 30)))
    body = c.keypoints
    n = len(body)
    mel, base = beat_features(n, c.beat_frames, rng)
    sample = {
        "__key__": key,
        "json": {"key": key, "video_hash": key[:16], "source": None, "segment": 0,
                 "start_frame": 0, "num_frames": n, "fps": FPS, "orig_fps": FPS,
                 "orig_width": W_PX, "orig_height": H_PX, "rotation": 0, "width": W_PX,
                 "height": H_PX, "crop_box": [0, 0, W_PX, H_PX], "has_audio": True,
                 "tempo": BPM, "beat_frames": np.round(c.beat_frames).astype(int).tolist(),
                 "latent_scaling_factor": 1.0, "split": split, "features": []},
        "audio_mel": mel.astype(np.float16), "audio_baseline": base.astype(np.float16),
        "pose_body": body,
        "pose_heatmap": render_heatmaps(body, *GRID, sigma=1.5, min_score=0.3),
        "face_present": np.zeros(n, bool),
        "face_crop": np.zeros((len(range(0, n, 8)), 112, 112, 3), np.uint8),
        "face_crop_frames": np.arange(0, n, 8, dtype=np.int32),  # crops on every 8th frame
        "face_embed": np.zeros((n, 512), np.float16),
        "face_ref_embed": np.zeros(512, np.float32),
    }
    sample["json"]["features"] = sorted(k for k in sample if k not in ("__key__", "json"))
    return sample


def write_corpus(out, n_train: int = 32, n_val: int = 4, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    shards, mels, bases = [], [], []
    for split, n in (("train", n_train), ("val", n_val)):
        writer = ShardWriter(str(out), prefix=split, target_bytes=4 << 20, split=split)
        for i in range(n):
            s = choreo_sample(f"{split}{i:02d}c0ffee0123456_0000", split, rng)
            mels.append(s["audio_mel"].astype(np.float64))
            bases.append(s["audio_baseline"].astype(np.float64))
            writer.write(s)
        shards += writer.close()
    mel, base = np.concatenate(mels), np.concatenate(bases)
    stats = {"audio_mel": {"mean": mel.mean(0).tolist(), "std": mel.std(0).tolist()},
             "audio_baseline": {"mean": base.mean(0).tolist(), "std": base.std(0).tolist()}}
    features = {f.name: {"shape": [{"h": GRID[0], "w": GRID[1]}.get(d, d) for d in f.shape],
                         "dtype": f.dtype, "encoding": f.encoding} for f in contract.FEATURES}
    return write_manifest(str(out), shards, features, stats)


@dataclass
class KnownAnswerRun:
    cfg: TrainConfig
    final_dir: Path
    manifest: str


@pytest.fixture(scope="session")
def known_answer_run(tmp_path_factory) -> KnownAnswerRun:
    root = tmp_path_factory.mktemp("known_answer")
    manifest = write_corpus(root / "data")
    cfg = build_train_config([
        "model_size=tiny", "stage=A", f"data={manifest}", f"output_dir={root / 'run'}",
        f"stage_a_steps={STEPS}", f"audio_window={WINDOW}", "train_batch_size=16",
        "stage_a_lr=2e-3", "lr_warmup_steps=20", "num_workers=0", "validation_steps=0",
        "checkpointing_steps=0", "log_steps=100", "shuffle_buffer=32", "resampled=true",
        "face_loss_weight=0", "heatmap_loss_frames=2", "seed=0"])
    torch.manual_seed(0)
    with one_torch_thread():  # on a shared 2-core machine one thread is several times faster
        res = run_stage(StageA(cfg), cfg)
    return KnownAnswerRun(cfg, res.final_dir, manifest)
