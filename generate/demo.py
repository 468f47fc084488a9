"""``just demo``: the whole chain on the tiny profile, on generated clips or the user's videos.

preprocess -> stage A -> B -> C -> generate -> eval, each through the same entry point as its own
command, so the demo exercises exactly what a user runs. The tiny profile (random-init models of
the real classes, stand-in ONNX files) and a small frame size keep it to minutes on 2 CPU cores;
the output is noise-like video: the point is the chain, not the picture.
"""

from __future__ import annotations

import time
from pathlib import Path

from dwm.shared import config as C
from dwm.shared.errors import UserFacingError

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
# quick=true (tests): a few optimiser steps per stage, enough to run every code path once.
QUICK_STEPS = {"stage_a_steps": 6, "stage_b_steps": 2, "stage_c_steps": 2,
               "validation_steps": 0, "checkpointing_steps": 0}


def _step(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def _song_of(videos: list[Path]) -> Path:
    """The first video with an audio track: its music drives the generation."""
    from dwm.shared import media

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


def main(cfg: C.DemoConfig) -> int:
    from dwm.preprocess import run as preprocess_run
    from dwm.shared.synthetic import make_demo_corpus
    from dwm.generate import evaluate, pipeline as generate
    from dwm.training import train

    check_config(cfg)
    out = Path(cfg.out).resolve()
    models_dir = str(out / "models")
    start = time.perf_counter()

    t = _step("inputs")
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
    else:
        videos = out / "videos"
        clips = make_demo_corpus(videos, n=cfg.clips, seconds=cfg.seconds)
        song = clips[0]  # generated with a beat track
        print(f"generated {len(clips)} clips with beat tracks in {videos}")
    print(f"({time.perf_counter() - t:.1f} s)")

    t = _step(f"preprocess (tiny profile, {cfg.width}x{cfg.height})")
    data = out / "data"
    pcfg = C.build_preprocess_config([f"input_dir={videos}", f"out={data}", "profile=tiny",
                                      f"models.models_dir={models_dir}",
                                      f"decode.width={cfg.width}", f"decode.height={cfg.height}"])
    preprocess_run.main(pcfg)
    if not (data / "manifest.json").is_file():
        raise UserFacingError(f"preprocessing wrote no {data / 'manifest.json'}; see "
                              f"{data / 'report.json'}")
    print(f"({time.perf_counter() - t:.1f} s)")

    t = _step("train A -> B -> C (tiny)")
    ckpt_root = out / "champ_2stage_output"
    overrides = ["profile=tiny", f"data={data / 'manifest.json'}", f"output_dir={ckpt_root}",
                 f"models.models_dir={models_dir}"]
    if cfg.quick:
        overrides += [f"{k}={v}" for k, v in QUICK_STEPS.items()]
    tcfg = C.build_train_config(overrides)
    train.main(tcfg)
    print(f"({time.perf_counter() - t:.1f} s)")

    t = _step("generate")
    ref = out / "reference.png"
    generate.reference_from_video(clips[-1], ref)  # another dancer than the song's, if several
    window = int(tcfg.max_sequence_length)
    gcfg = C.apply_overrides(C.GenerateConfig(), {
        "music": str(song), "ref": str(ref), "out": str(out / "dance.mp4"),
        "ckpt": str(ckpt_root / "final"), "steps": cfg.steps,
        "max_seconds": min(cfg.generate_seconds, cfg.seconds) if not cfg.videos
        else cfg.generate_seconds,
        "resolution": f"{pcfg.decode.width}x{pcfg.decode.height}", "fps": pcfg.decode.fps,
        "window": window, "overlap": max(1, window // 4),
        "models.profile": "tiny", "models.models_dir": models_dir,
    })
    generate.main(gcfg)
    print(f"({time.perf_counter() - t:.1f} s)")

    t = _step("eval")
    ecfg = C.apply_overrides(C.EvalConfig(), {
        "ckpt": str(ckpt_root / "final"), "data": str(data / "manifest.json"),
        "out": str(out / "eval"), "steps": cfg.steps, "max_samples": 8,
        "seeds": 2,  # each seed is a model call per clip; two show whether seeds differ
        "video_samples": 1, "video_frames": min(8, window),
        "models.profile": "tiny", "models.models_dir": models_dir,
    })
    evaluate.main(ecfg)
    print(f"({time.perf_counter() - t:.1f} s)")

    skeleton = generate.skeleton_path(gcfg.out)
    print(f"\nDemo done in {time.perf_counter() - start:.0f} s. Where things are:")
    print(f"  shards + manifest:  {data / 'manifest.json'}")
    print(f"  preprocess report:  {data / 'report.json'}")
    print(f"  checkpoints:        {ckpt_root}  (stage_A, stage_B, stage_C)")
    print(f"  final model:        {ckpt_root / 'final'}")
    print(f"  TensorBoard logs:   {ckpt_root / 'stage_A' / 'logs'}  "
          f"(all stages: tensorboard --logdir {ckpt_root})")
    print(f"  generated video:    {gcfg.out}")
    print(f"  skeleton preview:   {skeleton}")
    print(f"  eval table:         {out / 'eval' / 'eval.md'}")
    print(f"  eval metrics:       {out / 'eval' / 'eval.json'}")
    return 0
