"""A known answer for stage A: each beat carries one of three arm moves, chosen at random
(dwm.shared.synthetic.choreography), and placement and size vary per clip. Music to dance is
one-to-many here by construction, so only a generative model can pass:

* the tiny M2PEncoder, trained through the real stage-A code and engine on shards written by the
  project's ShardWriter, samples valid moves on most beats, on the beat (beat F1), differently
  per seed, starting from the reference pose (frame 0);
* its deterministic one-step prediction, D(0; sigma_max), averages the moves into one that never
  happens: the same checks fail for it.

A whole song (several windows) then comes out of ``sample_dance`` as one dance: the windows
continue each other without a jump at the seams.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dwm.datasets import batch_to_device, eval_batches, make_view
from dwm.shared import synthetic
from dwm.shared.config import build_train_config
from dwm.shared.shards import load_manifest
from dwm.training import metrics
from dwm.training.models.dance_model import DanceModel
from dwm.training.pose_sampling import sample_dance, window_starts
from dwm.training.stages.stage_c import StageC
from fixtures_data import one_torch_thread
from fixtures_known_answer import BPM, FPS, GRID, H_PX, W_PX, WINDOW, choreo_sample

def dance_figures(coords: np.ndarray, seconds_beats: np.ndarray, ref: np.ndarray) -> dict:
    """Valid-move share, beat F1 and frame-0 distance of one sampled window."""
    labels = synthetic.classify_moves(coords, seconds_beats, W_PX, H_PX)
    beats = metrics.beat_scores(coords, np.round(seconds_beats).astype(int), FPS)
    start = float(np.abs(coords[0] - ref[:, :2]).max())
    return {"labels": labels, "valid": float((labels >= 0).mean()), "f1": beats["beat_f1"],
            "start": start}


def test_choreography_is_its_own_known_answer():
    """The generator and its checker agree, and the checker refuses what a regressor makes."""
    c = synthetic.choreography(8, BPM, FPS, width=W_PX, height=H_PX, centre=(0.4, 0.55),
                               scale=0.6, seed=3)
    labels = synthetic.classify_moves(c.keypoints, c.beat_frames, W_PX, H_PX)
    assert (labels == c.moves[: len(labels)]).all()
    assert len(set(c.moves.tolist())) == len(synthetic.MOVES)
    moved = synthetic.choreography(8, BPM, FPS, width=W_PX, height=H_PX, centre=(0.6, 0.5),
                                   scale=0.5, moves=c.moves)  # placement and size do not matter
    assert (synthetic.classify_moves(moved.keypoints, c.beat_frames, W_PX, H_PX) == labels).all()
    mean = np.mean([synthetic.choreography(8, BPM, FPS, moves=np.full(16, m)).keypoints
                    for m in range(len(synthetic.MOVES))], 0)
    assert synthetic.valid_moves(mean, c.beat_frames, 256, 448) == 0.0  # the average move
    still = np.repeat(c.keypoints[:1], len(c.keypoints), 0)
    assert synthetic.valid_moves(still, c.beat_frames, W_PX, H_PX) == 0.0
    beats = metrics.beat_scores(c.keypoints, np.round(c.beat_frames).astype(int), FPS)
    assert beats["beat_f1"] >= 0.95  # the dancer stops on every beat (but frame 0), only there


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():  # on a shared 2-core machine one thread is several times faster
        yield


@pytest.fixture(scope="module")
def trained(known_answer_run):
    run = known_answer_run
    model = DanceModel.from_pretrained(run.final_dir).m2p.eval()
    m = load_manifest(run.manifest)
    view = make_view("A", m["stats"], run.cfg)
    batches = [batch_to_device(b, "cpu") for b in eval_batches(m, view, 4, split="val",
                                                              max_batches=1, seed=0)]
    return run.cfg, model, batches[0], m


def test_denoiser_dances_and_one_step_cannot(trained):
    cfg, m2p, batch, _ = trained
    b = batch["audio_mel"].shape[0]
    start = torch.zeros(b, WINDOW)
    start[:, 0] = 1
    ref = batch["ref_pose"]
    common = dict(ref_pose=ref, known=batch["coords"], known_mask=start)
    seeds = [m2p.sample(batch["audio_mel"], batch["audio_baseline"], **common, steps=12,
                        generator=torch.Generator().manual_seed(s)).numpy() for s in (0, 1)]
    onestep = m2p.sample(batch["audio_mel"], batch["audio_baseline"], **common, steps=1).numpy()
    period = FPS * 60 / BPM
    figs = {"model": [], "seed2": [], "onestep": []}
    for i, meta in enumerate(batch["meta"]):
        first = -meta["window_start"] % period  # the first beat inside the window
        beats = np.arange(first, WINDOW, period)
        # frame 0 of the window is given (the start pose) and plays the reference here
        start_pose = batch["coords"][i, 0].numpy()
        start_pose = np.concatenate([start_pose, np.ones((18, 1))], -1)
        for name, arr in (("model", seeds[0]), ("seed2", seeds[1]), ("onestep", onestep)):
            figs[name].append(dance_figures(arr[i], beats, start_pose))
    summary = {}
    for name, rows in figs.items():
        summary[name] = {k: float(np.mean([r[k] for r in rows])) for k in ("valid", "f1", "start")}
    a = np.concatenate([r["labels"] for r in figs["model"]])
    c = np.concatenate([r["labels"] for r in figs["seed2"]])
    both = (a >= 0) & (c >= 0)
    summary["seed_differs"] = float((a[both] != c[both]).mean()) if both.any() else 0.0
    print("known answer:", json.dumps(summary))
    model = summary["model"]
    assert model["valid"] >= 0.8, summary
    assert summary["seed_differs"] >= 0.5, summary
    assert model["f1"] >= 0.7, summary
    assert model["start"] <= 0.05, summary
    # the deterministic one-step prediction averages the moves: it fails the same test
    one = summary["onestep"]
    assert one["valid"] < 0.8 and one["f1"] < 0.7, summary


def test_sample_dance_long_song_is_one_dance(trained):
    """A song of several windows: frame 0 is the reference, every window continues the last
    (no jump at a seam beyond the motion's own frame-to-frame speed), seeds differ, steps=1 is
    deterministic whatever the seed."""
    cfg, m2p, _, m = trained
    rng = np.random.default_rng(5)
    song = choreo_sample("songc0ffee0123456_0000", "val", rng)
    view = make_view("A", m["stats"], cfg)
    feats = np.concatenate([view.norm_mel(song["audio_mel"]), view.norm_base(song["audio_baseline"])], 1)
    ref = song["pose_body"][30]  # a frame of the dance: the photo's body
    kw = dict(window=WINDOW, overlap=12, steps=8)
    dance = sample_dance(m2p, feats, ref, None, generator=0, **kw)
    other = sample_dance(m2p, feats, ref, None, generator=1, **kw)
    n = len(feats)
    assert dance.coords.shape == (n, 18, 2) and dance.scores.shape == (n, 18)
    np.testing.assert_allclose(dance.coords[0], ref[:, :2], atol=1e-6)
    speed = np.abs(np.diff(dance.coords, axis=0)).max(-1).max(-1)  # (n-1,) largest joint step
    starts = window_starts(n, WINDOW, 12)
    assert len(starts) >= 4
    seams = [s - 1 for s in starts[1:]] + [s + 11 for s in starts[1:]]  # into / out of overlaps
    typical = float(np.percentile(speed, 95))
    assert max(speed[i] for i in seams if i < n - 1) <= 1.5 * typical + 1e-3
    assert np.abs(dance.coords - other.coords).mean() > 0.005
    one_a = sample_dance(m2p, feats, ref, None, generator=0, window=WINDOW, overlap=12, steps=1)
    one_b = sample_dance(m2p, feats, ref, None, generator=7, window=WINDOW, overlap=12, steps=1)
    np.testing.assert_array_equal(one_a.coords, one_b.coords)


def test_scheduled_sampling_guidance_denoises_the_target_poses(trained):
    """Stages B/C: the M2PEncoder's guidance is its denoising of the ground-truth poses, so at a
    low scheduled-sampling sigma it shows the target frames' poses, far closer than a
    free-running sample of the same music does (that is another dance); detached."""
    cfg, m2p, batch, _ = trained
    cfg = build_train_config(["model_size=tiny", "stage=C", "scheduled_sampling_sigma=0.05"])
    model = DanceModel(m2p=m2p)
    batch = {**batch, "ref_face_crop": batch["face_crop"]}
    torch.manual_seed(0)
    _, heat, _ = StageC(cfg).m2p_guidance(model, batch, None, False, GRID)
    assert heat.shape == (*batch["coords"].shape[:3], *GRID) and not heat.requires_grad
    peak = heat.flatten(-2).argmax(-1)  # (B, W, K) flat index of each joint's peak
    px = torch.stack([(peak % GRID[1] + 0.5) / GRID[1], (peak // GRID[1] + 0.5) / GRID[0]], -1)
    arms = [3, 4, 6, 7]  # elbows and wrists: where one dance differs from another
    guided = float((px - batch["coords"])[:, :, arms].abs().mean())
    free = m2p.sample(batch["audio_mel"], batch["audio_baseline"], ref_pose=batch["ref_pose"],
                      steps=8, generator=torch.Generator().manual_seed(0))
    sampled = float((free - batch["coords"])[:, :, arms].abs().mean())
    assert guided < 1.5 / GRID[1] and guided < 0.5 * sampled, (guided, sampled)
