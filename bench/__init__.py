"""``dwm bench`` / ``just bench``: measured speed of the data path and the train step, on the CPU.

One run writes ``<out>/bench.md`` (one Markdown table, also printed) and ``<out>/bench.json``.
Each figure is the median of ``repeats`` repetitions, taken in the same run as its reference,
reported as a ratio to it, with its goal marked met or missed:

1. decode limit: decord decoding the sample video alone (aspect-kept decode + crop, sequential)
2. preprocessing: each extractor alone and the whole pipeline, against (1); goal: with the model
   extractors off the pipeline runs at >= 0.8 of decoding alone
3. cache reuse: a second preprocess of unchanged input against the first; goal <= 0.02
4. loader: stage-C samples/s from shards against what one GPU's full-size step consumes
   (``gpu_step_ms=`` measured on a GPU, else bench/gpu.py's estimate; goal >= 2x), against
   20 samples/s on 2 cores and against decode + VAE + render per step, what a loader without a
   feature cache does (goal >= 20x); stage-A windows/s and stage-B pairs/s (goal >= 100/s each)
5. train step per stage (tiny): data-wait / forward / backward / optimiser; goal: data-wait
   <= 2% of the step
6. storage: shard bytes per frame at 512x896 against the fp16 latents' bytes (goal <= 1.25) and
   the source mp4, per member against the plain .npy; cache bytes per frame per extractor

Where a figure misses its goal, it is run once more under cProfile and the top functions go into
the report. ``quick=true`` makes every section tiny (the test runs it). ``gpu=true`` runs the
GPU sections instead (:mod:`.gpu`, same table format); ``estimate_memory=true`` prints the
estimated train-step memory (:mod:`.memory`) and stops.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable

from dwm.shared.config import BenchConfig, to_dict

from . import gpu
from .common import TITLES, Bench, set_threads
from .data import section_decode, section_preprocess, section_storage
from .loader import section_loader
from .memory import estimate_step, memory_table
from .report import Figure, Goal, Reference, Report, Section, check_report
from .trainstep import section_train

log = logging.getLogger(__name__)


def _run(sec: Section, fn: Callable[[], None]) -> None:
    t = time.perf_counter()
    print(f"[bench] section {sec.key}: {sec.title} ...", flush=True)
    try:
        fn()
    except Exception as e:  # one broken section must not hide the others
        sec.error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        log.debug("section %s failed", sec.key, exc_info=True)
        sec.notes.append("traceback: " + " | ".join(
            traceback.format_exc(limit=4).strip().splitlines()[-4:]))
    sec.seconds = time.perf_counter() - t
    print(f"[bench] section {sec.key}: {len(sec.figures)} figures in {sec.seconds:.0f} s"
          + (f" (error: {sec.error})" if sec.error else ""), flush=True)


def main(cfg: BenchConfig) -> int:
    if cfg.estimate_memory:
        print(memory_table(width=gpu.FULL.width, height=gpu.FULL.height, batch=cfg.batch_c))
        return 0
    if cfg.estimate_step:
        est = estimate_step(batch=cfg.batch_c)
        print(f"stage-C step, 512x896, T=24, batch {cfg.batch_c}: {est['seconds'] * 1000:.0f} ms "
              f"({est['source']}); {cfg.batch_c / est['seconds']:.2f} samples/s per GPU")
        return 0
    if cfg.gpu:
        return gpu.main(cfg)
    t0 = time.perf_counter()
    bench = Bench.create(cfg)
    set_threads(bench.threads)
    wanted = [k for k in TITLES if k in {str(s) for s in cfg.sections}]
    report = Report("dwm bench" + (" (quick)" if bench.quick else ""), to_dict(cfg))
    secs = {k: report.section(k, TITLES[k]) for k in wanted}

    if "1" in secs:
        _run(secs["1"], lambda: section_decode(bench, secs["1"]))
    if any(k in secs for k in ("2", "3", "5", "6")):
        # 2 and 3 share their runs; 5 and 6 use the output of the whole pipeline
        holder = secs.get("2") or secs.get("3") or Section("2", TITLES["2"])
        _run(holder, lambda: section_preprocess(bench, secs.get("2"), secs.get("3")))
        if holder.error:
            for k in ("2", "3", "5", "6"):
                if k in secs and secs[k] is not holder:
                    secs[k].error = f"preprocessing failed: {holder.error}"
                    secs[k].notes += holder.notes
    if "4" in secs:
        _run(secs["4"], lambda: section_loader(bench, secs["4"]))
    if "5" in secs and not secs["5"].error:
        _run(secs["5"], lambda: section_train(bench, secs["5"]))
    if "6" in secs and not secs["6"].error:
        _run(secs["6"], lambda: section_storage(bench, secs["6"]))

    report.seconds = time.perf_counter() - t0
    md, js = report.write(bench.out)
    print(report.markdown())
    print(f"[bench] wrote {md} and {js}")
    s = report.summary()
    return 1 if s["errors"] else 0


__all__ = ["main", "Report", "Section", "Figure", "Goal", "Reference", "check_report"]
