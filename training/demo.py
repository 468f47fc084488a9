"""``just demo``: the whole chain on the tiny profile, on generated clips or the user's videos.

preprocess -> stage A -> B -> C -> generate -> eval, each through the same entry point as its own
command, so the demo exercises exactly what a user runs.
"""

from __future__ import annotations

import time
from pathlib import Path

from dwm.shared import config as C
from dwm.shared.cli import UserFacingError


def _step(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def main(cfg: C.DemoConfig) -> int:
    from dwm.preprocess import run as preprocess_run
    from dwm.shared.synthetic import make_demo_corpus
    from dwm.training import evaluate, generate, train

    out = Path(cfg.out).resolve()
    models_dir = str(out / "models")
    start = time.perf_counter()

    t = _step("inputs")
    if cfg.videos:
        videos = Path(cfg.videos)
        if not videos.is_dir():
            raise UserFacingError(f"videos={cfg.videos}: not a directory")
    else:
        videos = out / "videos"
        clips = make_demo_corpus(videos, n=3, seconds=cfg.seconds)
        print(f"generated {len(clips)} clips with beat tracks in {videos}")
    print(f"({time.perf_counter() - t:.1f} s)")

    t = _step("preprocess (tiny profile)")
    data = out / "data"
    pcfg = C.build_preprocess_config([f"input_dir={videos}", f"out={data}", "profile=tiny",
                                      f"models.models_dir={models_dir}"])
    preprocess_run.main(pcfg)
    print(f"({time.perf_counter() - t:.1f} s)")

    t = _step("train A -> B -> C (tiny)")
    ckpt_root = out / "champ_2stage_output"
    tcfg = C.build_train_config(["model_size=tiny", f"data={data / 'manifest.json'}",
                                 f"output_dir={ckpt_root}", f"models.models_dir={models_dir}"])
    train.main(tcfg)
    print(f"({time.perf_counter() - t:.1f} s)")

    t = _step("generate")
    clip_audio = sorted(videos.glob("*.mp4"))[0]
    ref = out / "reference.png"
    generate.reference_from_video(clip_audio, ref)
    gcfg = C.apply_overrides(C.GenerateConfig(), {
        "music": str(clip_audio), "ref": str(ref), "out": str(out / "dance.mp4"),
        "ckpt": str(ckpt_root / "final"), "steps": 4, "max_seconds": min(2.0, cfg.seconds),
        "resolution": f"{pcfg.decode.width}x{pcfg.decode.height}",
        "models.profile": "tiny", "models.models_dir": models_dir,
    })
    generate.main(gcfg)
    print(f"({time.perf_counter() - t:.1f} s)")

    t = _step("eval")
    ecfg = C.apply_overrides(C.EvalConfig(), {
        "ckpt": str(ckpt_root / "final"), "data": str(data / "manifest.json"),
        "out": str(out / "eval"), "steps": 4, "max_samples": 4,
        "models.profile": "tiny", "models.models_dir": models_dir,
    })
    evaluate.main(ecfg)
    print(f"({time.perf_counter() - t:.1f} s)")

    print(f"\nDemo done in {time.perf_counter() - start:.0f} s. Where things are:")
    print(f"  shards + manifest   {data / 'manifest.json'}  (run report: {data / 'report.json'})")
    print(f"  checkpoints         {ckpt_root}/stage_{{A,B,C}}/  final model: {ckpt_root / 'final'}")
    print(f"  TensorBoard logs    tensorboard --logdir {ckpt_root}")
    print(f"  generated video     {gcfg.out}  (skeleton preview beside it)")
    print(f"  eval table          {out / 'eval' / 'eval.md'}  ({out / 'eval' / 'eval.json'})")
    return 0
