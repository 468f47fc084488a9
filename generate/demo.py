"""``just demo``: the whole chain on the tiny profile, on a generated known-answer corpus or on the
user's videos.

preprocess -> stage A -> B -> C -> generate -> eval, each through the same entry point as its own
command, so the demo exercises exactly what a user runs.

The default corpus is the known answer of stage A (:func:`dwm.shared.synthetic.choreography`): a
stick-figure dancer makes one of three arm moves on every beat, chosen at random, placed and
sized differently in every clip, on beat tracks of several tempos. Each clip carries its true
keypoints (``<stem>.keypoints.json``) and preprocessing reads them (``pose.backend=file``), so the
poses stage A learns from are the ones the pictures show. Stage A trains long enough to learn the
choreography (800 steps); the demo then dances to a beat track no clip has, from a reference
photo of the dancer standing where no clip puts them, and scores the trained model, its one-step
(deterministic) prediction and the ground truth on that song: valid moves, how often seeds choose
different moves, seed diversity, beat F1 and the distance of frame 0 to the reference.

The video is not a result: the tiny profile's VAE is random-init, so even the true latents
decode to noise; the demo measures that and says so (stages B and C run a few steps only, to run
the chain).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import decord
import numpy as np
import torch

from dwm.generate import evaluate
from dwm.generate import pipeline as generate
from dwm.preprocess import run as preprocess_run
from dwm.preprocess.extractors import keypoints_file
from dwm.shared import config as C
from dwm.shared import contract, media, synthetic
from dwm.shared import vae as vae_io
from dwm.shared.errors import UserFacingError
from dwm.training import metrics, train

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
# quick=true (tests): stages B and C take the fewest steps that run every code path once (stage A
# keeps stage_a_steps: what the known-answer table measures is its learning).
QUICK_STEPS = {"stage_b_steps": 2, "stage_c_steps": 2}
# Stage A as issue 14's known-answer calibration trains it (tiny model, 2 CPU cores, ~1 minute
# for 800 steps): 2-second windows (4 beats at 120 BPM), big batches, a high learning rate.
STAGE_A_OVERRIDES = ["audio_window=48", "train_batch_size=16", "stage_a_lr=2e-3",
                     "lr_warmup_steps=20", "shuffle_buffer=32", "resampled=true",
                     "face_loss_weight=0", "log_steps=100"]
COMMON_TRAIN = ["validation_steps=0", "checkpointing_steps=0", "num_workers=0"]


def _step(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def _done(t: float) -> None:
    print(f"({time.perf_counter() - t:.1f} s)", flush=True)


def _song_of(videos: list[Path]) -> Path:
    """The first video with an audio track: its music drives the generation."""
    for v in videos:
        try:
            if media.probe(v)["has_audio"]:
                return v
        except media.MediaError:
            continue
    raise UserFacingError(f"none of the {len(videos)} videos has an audio track to dance to")


def check_config(cfg: C.DemoConfig) -> None:
    """Values the chain cannot run with fail here, before anything is made."""
    for key in ("seconds", "generate_seconds"):
        if not getattr(cfg, key) > 0:
            raise C.ConfigError(f"{key}={getattr(cfg, key)}: must be > 0")
    for key in ("clips", "steps"):
        if getattr(cfg, key) < 1:
            raise C.ConfigError(f"{key}={getattr(cfg, key)}: must be >= 1")
    for key in ("width", "height"):
        # latents and heatmaps at image / 8, and the tiny M2PEncoder upsamples its grid x8
        if getattr(cfg, key) <= 0 or getattr(cfg, key) % 64:
            raise C.ConfigError(f"{key}={getattr(cfg, key)}: must be a positive multiple of 64")


def _has_sidecars(clips: list[Path]) -> bool:
    return all(synthetic.sidecar_of(c).is_file() for c in clips)


# ---------------------------------------------------------------------------------------------
# generation: the one place the demo calls `generate`
# ---------------------------------------------------------------------------------------------
def generate_dance(ckpt: Path, music: Path, ref: Path, out: Path, cfg: C.DemoConfig,
                   models_dir: str, fps: float, window: int, seed: int = 0,
                   pose_steps: int | None = None, quiet: bool = False) -> Path:
    """``dwm generate`` for one song, photo and seed; returns the poses JSON it writes."""
    overrides: dict[str, Any] = {
        "music": str(music), "ref": str(ref), "out": str(out), "ckpt": str(ckpt),
        "steps": cfg.steps, "seed": seed, "max_seconds": cfg.generate_seconds,
        "resolution": f"{cfg.width}x{cfg.height}", "fps": fps,
        "window": window, "overlap": max(1, window // 4), "quiet": quiet,
        "models.profile": "tiny", "models.models_dir": models_dir,
    }
    if pose_steps is not None:
        overrides["pose_steps"] = pose_steps
    generate.main(C.apply_overrides(C.GenerateConfig(), overrides))
    return generate.poses_path(out)


def read_poses(path: Path) -> np.ndarray:
    """(T, 18, 3) in [0, 1] of the frame from a poses JSON written by ``generate``."""
    doc = json.loads(Path(path).read_text())
    w, h = float(doc["width"]), float(doc["height"])
    body = np.asarray(doc["frames"], np.float32).reshape(-1, contract.NUM_BODY_JOINTS, 3)
    return body / np.array([w, h, 1.0], np.float32)


# ---------------------------------------------------------------------------------------------
# the known-answer table
# ---------------------------------------------------------------------------------------------
KNOWN_ANSWER_COLUMNS = (
    ("valid_moves", "valid moves"),
    ("moves_differ", "moves differ across seeds"),
    ("seed_diversity", "seed diversity"),
    ("beat_f1", "beat F1"),
    ("frame0_distance", "frame-0 distance to reference"),
)
KNOWN_ANSWER_ROWS = (("model", "trained model"), ("one_step", "one-step baseline"),
                     ("ground_truth", "ground truth"))


def dance_scores(dances: list[np.ndarray], beat_frames: np.ndarray, ref_pose: np.ndarray,
                 fps: float, width: int, height: int) -> dict[str, float]:
    """Scores of several dances (seeds) of one song against the choreography's known answer."""
    labels = [synthetic.classify_moves(d, beat_frames, width, height) for d in dances]
    differ = []
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            both = (labels[i] >= 0) & (labels[j] >= 0)
            differ.extend((labels[i][both] != labels[j][both]).tolist())
    beats = np.round(beat_frames).astype(int)
    return {
        "valid_moves": float(np.mean([(lab >= 0).mean() for lab in labels])),
        "moves_differ": float(np.mean(differ)) if differ else 0.0,
        "seed_diversity": metrics.seed_diversity(np.stack(dances)),
        "beat_f1": float(np.mean([metrics.beat_scores(d, beats, fps)["beat_f1"] for d in dances])),
        "frame0_distance": float(np.mean([metrics.reference_consistency(d, ref_pose)
                                          ["frame0_distance"] for d in dances])),
    }


def known_answer_markdown(table: dict[str, dict[str, float]], bpm: float, seeds: int) -> str:
    head = "| | " + " | ".join(label for _, label in KNOWN_ANSWER_COLUMNS) + " |"
    lines = [f"Known answer: a new beat track ({bpm:g} BPM, never seen in training), the reference "
             f"standing somewhere new; {seeds} seeds per row. A valid move is one of the three "
             "moves, on the beat.", "", head,
             "|---" * (len(KNOWN_ANSWER_COLUMNS) + 1) + "|"]
    for key, label in KNOWN_ANSWER_ROWS:
        row = table[key]
        lines.append(f"| {label} | " + " | ".join(f"{row[k]:.3f}" for k, _ in KNOWN_ANSWER_COLUMNS)
                     + " |")
    return "\n".join(lines)


def skeleton_strip(poses: np.ndarray, reference: np.ndarray, beat_frames: np.ndarray,
                   out_png: Path, beats: int = 3, per_beat: int = 4) -> Path:
    """Frames of the skeleton over the reference photo across a few beats (``per_beat`` frames
    per beat), side by side, for one look at whether the dance moves on the beat."""
    first = 1 if len(beat_frames) > beats + 1 else 0
    picks = []
    for b in range(first, min(first + beats, len(beat_frames) - 1)):
        a, e = beat_frames[b], beat_frames[b + 1]
        picks += [int(round(a + (e - a) * k / per_beat)) for k in range(per_beat)]
    picks = [p for p in picks if p < len(poses)]
    tiles = [media.draw_skeleton(reference, poses[p]) for p in picks]
    media.write_image(out_png, np.concatenate(tiles, axis=1))
    return out_png


def vae_round_trip_psnr(clip: Path, models: C.ModelsConfig, width: int, height: int,
                        frames: int = 8) -> tuple[float, float]:
    """PSNR against the true frames of (VAE decode of their own latents, their mean frame): the
    best any video model can do through this VAE, beside a blank guess."""
    vr = decord.VideoReader(str(clip), width=width, height=height)
    real = vr.get_batch(list(range(min(frames, len(vr))))).asnumpy()
    vae, _ = vae_io.load_vae(models)
    img = vae_io.decode_latents(vae, vae_io.encode_latents(vae, real))  # uint8 NHWC in
    rec = (img.permute(0, 2, 3, 1).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
    mean = np.broadcast_to(real.mean(0, keepdims=True).round().astype(np.uint8), real.shape)
    return metrics.psnr(rec, real), metrics.psnr(mean, real)


# ---------------------------------------------------------------------------------------------
# the demo
# ---------------------------------------------------------------------------------------------
def main(cfg: C.DemoConfig) -> int:

    check_config(cfg)
    out = Path(cfg.out).resolve()
    models_dir = str(out / "models")
    start = time.perf_counter()
    steps = {"stage_a_steps": cfg.stage_a_steps, "stage_b_steps": cfg.stage_b_steps,
             "stage_c_steps": cfg.stage_c_steps, **(QUICK_STEPS if cfg.quick else {})}

    t = _step("inputs")
    ref_pose = None
    if cfg.videos:
        videos = Path(cfg.videos)
        if not videos.is_dir():
            raise UserFacingError(f"videos={cfg.videos}: not a directory")
        clips = sorted(p for p in videos.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
        if not clips:
            raise UserFacingError(f"videos={cfg.videos}: no video files "
                                  f"({', '.join(VIDEO_SUFFIXES)})")
        song = _song_of(clips)  # before the long work: the dance needs music
        print(f"{len(clips)} videos in {videos}")
        ref = out / "reference.png"
        out.mkdir(parents=True, exist_ok=True)
        generate.reference_from_video(clips[-1], ref)  # another dancer than the song's, if several
    else:
        videos = out / "videos"
        clips = synthetic.make_demo_corpus(videos, n=cfg.clips, seconds=cfg.seconds,
                                           width=cfg.width, height=cfg.height)
        tempos = sorted({synthetic.DEMO_TEMPOS[i % len(synthetic.DEMO_TEMPOS)]
                         for i in range(len(clips))})
        print(f"generated {len(clips)} clips in {videos}: one of {len(synthetic.MOVES)} moves "
              f"per beat at random, placement and size random per clip, beat tracks at "
              f"{', '.join(f'{b:g}' for b in tempos)} BPM, each with its <stem>.keypoints.json")
        ref, ref_pose = synthetic.make_demo_reference(out / "reference.png", cfg.width,
                                                      cfg.height)
        song = synthetic.make_demo_song(out / "song.wav", cfg.generate_seconds)
        print(f"reference photo: {ref} (the dancer at rest, standing where no clip puts them; "
              f"keypoints beside it)")
        print(f"new beat track:  {song} ({synthetic.DEMO_SONG_TEMPO:g} BPM, a tempo no clip has)")
    use_files = _has_sidecars(clips)
    _done(t)

    backend = "file" if use_files else "the tiny profile's"
    t = _step(f"preprocess (tiny profile, {cfg.width}x{cfg.height}, pose: {backend})")
    data = out / "data"
    pp = [f"input_dir={videos}", f"out={data}", "profile=tiny", f"models.models_dir={models_dir}",
          f"decode.width={cfg.width}", f"decode.height={cfg.height}"]
    if use_files:
        pp.append("pose.backend=file")
    pcfg = C.build_preprocess_config(pp)
    preprocess_run.main(pcfg)
    if not (data / "manifest.json").is_file():
        raise UserFacingError(f"preprocessing wrote no {data / 'manifest.json'}; see "
                              f"{data / 'report.json'}")
    if use_files and cfg.videos:  # the photo needs its keypoints too: those of its frame
        reference_sidecar(clips[-1], ref)
    _done(t)

    ckpt_root = out / "champ_2stage_output"
    base = ["profile=tiny", f"data={data / 'manifest.json'}", f"output_dir={ckpt_root}",
            f"models.models_dir={models_dir}", *COMMON_TRAIN,
            *[f"{k}={v}" for k, v in steps.items()]]
    t = _step(f"train A (tiny, {steps['stage_a_steps']} steps on the choreography)")
    train.main(C.build_train_config([*base, "stage=A", *STAGE_A_OVERRIDES]))
    _done(t)
    t = _step(f"train B -> C (tiny, {steps['stage_b_steps']} + {steps['stage_c_steps']} steps: "
              "runs the chain)")
    tcfg = C.build_train_config([*base, "stage=B"])
    train.main(tcfg)
    train.main(C.build_train_config([*base, "stage=C"]))
    final = ckpt_root / "final"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(ckpt_root / "stage_C" / "final", final)
    print(f"final model: {final}")
    _done(t)

    t = _step("generate")
    window = int(tcfg.max_sequence_length)
    fps = pcfg.decode.fps
    dance = out / "dance.mp4"
    poses_json = generate_dance(final, song, ref, dance, cfg, models_dir, fps, window)
    _done(t)

    known = None
    if ref_pose is not None:
        t = _step("known answer (stage-A model, new beat track)")
        known = known_answer(cfg, ckpt_root / "stage_A" / "final", song, ref, ref_pose,
                             out / "known_answer", models_dir, fps, window)
        skeleton_strip(read_poses(poses_json), media.read_image(ref), known["beat_frames_array"],
                       out / "skeleton_strip.png")
        _done(t)

    t = _step("eval")
    ecfg = C.apply_overrides(C.EvalConfig(), {
        "ckpt": str(final), "data": str(data / "manifest.json"),
        "out": str(out / "eval"), "steps": cfg.steps, "max_samples": 8,
        "seeds": 2,  # each seed is a model call per clip; two show whether seeds differ
        "video_samples": 1, "video_frames": min(8, window),
        "models.profile": "tiny", "models.models_dir": models_dir,
    })
    evaluate.main(ecfg)
    ceiling, blank = vae_round_trip_psnr(clips[0], pcfg.models, cfg.width, cfg.height)
    note = (f"The video cannot show the figure: the tiny profile's VAE is random-init, so even "
            f"the true latents decode to {ceiling:.1f} dB PSNR against the true frames (their "
            f"mean frame scores {blank:.1f} dB). Stages B and C ran "
            f"{steps['stage_b_steps']} + {steps['stage_c_steps']} steps to run the chain; the "
            f"full profile's VAE is what makes frames (`just models`).")
    print(f"\n{note}")
    _add_to_eval(out / "eval", known, note, ceiling, blank)
    _done(t)

    skeleton = generate.skeleton_path(dance)
    print(f"\nDemo done in {time.perf_counter() - start:.0f} s. Where things are:")
    print(f"  shards + manifest:  {data / 'manifest.json'}")
    print(f"  preprocess report:  {data / 'report.json'}")
    print(f"  checkpoints:        {ckpt_root}  (stage_A, stage_B, stage_C)")
    print(f"  final model:        {final}")
    print(f"  TensorBoard logs:   {ckpt_root / 'stage_A' / 'logs'}  "
          f"(all stages: tensorboard --logdir {ckpt_root})")
    print(f"  generated video:    {dance}")
    print(f"  skeleton preview:   {skeleton}")
    print(f"  poses JSON:         {poses_json}")
    if known is not None:
        print(f"  skeleton strip:     {out / 'skeleton_strip.png'}")
    print(f"  eval table:         {out / 'eval' / 'eval.md'}")
    print(f"  eval metrics:       {out / 'eval' / 'eval.json'}")
    return 0


def known_answer(cfg: C.DemoConfig, ckpt: Path, song: Path, ref: Path, ref_pose: np.ndarray,
                 work: Path, models_dir: str, fps: float, window: int) -> dict[str, Any]:
    """Dances of the stage-A model (``cfg.seeds`` seeds), of its one-step prediction and of the
    ground truth (the choreography on this song, at the reference) scored on the song's beats."""
    work.mkdir(parents=True, exist_ok=True)
    n = int(np.floor(cfg.generate_seconds * fps + 1e-6))
    period = fps * 60.0 / synthetic.DEMO_SONG_TEMPO
    beat_frames = np.arange(0.0, n, period)
    seeds = max(2, cfg.seeds)
    runs = {"model": [None] * seeds, "one_step": [None, None]}
    for name, settings in runs.items():
        for s in range(len(settings)):
            path = generate_dance(ckpt, song, ref, work / f"{name}_seed{s}.mp4", cfg, models_dir,
                                  fps, window, seed=s, pose_steps=1 if name == "one_step" else None,
                                  quiet=True)
            settings[s] = read_poses(path)[:n]
    centre, scale = synthetic.DEMO_REFERENCE_PLACE
    truth = [synthetic.choreography(n / fps, synthetic.DEMO_SONG_TEMPO, fps, width=cfg.width,
                                    height=cfg.height, centre=centre, scale=scale,
                                    seed=100 + s).keypoints for s in range(seeds)]
    table = {name: dance_scores(d, beat_frames, ref_pose, fps, cfg.width, cfg.height)
             for name, d in (("model", runs["model"]), ("one_step", runs["one_step"]),
                             ("ground_truth", truth))}
    md = known_answer_markdown(table, synthetic.DEMO_SONG_TEMPO, seeds)
    print(md, flush=True)
    return {"table": table, "markdown": md, "bpm": synthetic.DEMO_SONG_TEMPO, "seeds": seeds,
            "beat_frames": beat_frames.tolist(), "beat_frames_array": beat_frames}


def _add_to_eval(eval_dir: Path, known: dict | None, note: str, ceiling: float,
                 blank: float) -> None:
    """The known-answer table and the video note go into eval.json and eval.md beside the rest."""
    path = eval_dir / "eval.json"
    report = json.loads(path.read_text())
    report["known_answer"] = None if known is None else {
        k: v for k, v in known.items() if k not in ("markdown", "beat_frames_array")}
    report["video_note"] = {"text": note, "vae_round_trip_psnr": ceiling,
                            "mean_frame_psnr": blank}
    path.write_text(json.dumps(report, indent=1, default=float))
    md = eval_dir / "eval.md"
    extra = ("\n\n" + known["markdown"]) if known is not None else ""
    md.write_text(md.read_text() + extra + "\n\n" + note + "\n")


def reference_sidecar(video: Path, photo: Path, at: float = 0.5) -> Path:
    """The keypoints of the frame :func:`reference_from_video` took (at ``at`` of the video),
    from the video's sidecar, written as the photo's one-frame sidecar."""
    kp = keypoints_file.load(keypoints_file.sidecar_path(video))
    frame = kp.points[min(kp.num_frames - 1, int(kp.num_frames * at))]
    out = keypoints_file.sidecar_path(photo)
    out.write_text(json.dumps({"layout": kp.layout, "fps": kp.fps, "width": kp.width,
                               "height": kp.height, "frames": [frame.tolist()]}))
    return out
