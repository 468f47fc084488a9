"""``dwm bench gpu=true``: the numbers a GPU run needs, in the same table as the CPU sections.

    dwm bench gpu=true [out=bench_out] [gpu_steps=5] [batch_c=1] [batch_b=4]
    dwm bench gpu=true dry_run=true   # the same code on the CPU, tiny models and sizes (CI)
    dwm bench estimate_step=true      # no GPU: estimated full-size stage-C step time

Figures (each the median over timed steps or repetitions, with its reference and ratio):

G1 stage-C train step at 512x896, T=24, bf16, gradient checkpointing on and off: step time,
   peak memory, achieved TFLOP/s against the GPU's peak (FLOPs of one step counted with
   ``torch.utils.flop_counter.FlopCounterMode``, gradient checkpointing off, so recomputation is
   not counted as useful work) and against a measured dense bf16 matmul; data-wait share.
G2 stage-B train step (single frames, 512x896).
G3 preprocessing models: VAE-encode frames/s and DWpose frames/s (onnxruntime's CUDA provider
   when onnxruntime-gpu is installed).
G4 the loader: stage-C samples/s against what the train step consumes.

The train steps run through the real engine (``dwm.training.engine.run_stage``) on synthetic
shards of the contract's shapes (``dwm.bench.synthetic.synth_shards``). Without the SVD
weights (``dwm models``) the UNet is SVD's architecture with random weights, saved once under
``out``: speed and memory do not depend on the weights' values. Without the DWpose files the
tiny stand-in ONNX files are used and the figure says so (their speed means nothing).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import decord
import numpy as np
import onnxruntime as ort
import torch
from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
from torch.utils.flop_counter import FlopCounterMode

from dwm.preprocess.extractors import REGISTRY, FrameBatch, VideoContext
from dwm.shared import vae as vae_io, weights
from dwm.shared.config import (BenchConfig, ModelsConfig, TrainConfig, build_preprocess_config,
                               build_train_config, to_dict)
from dwm.shared.errors import UserFacingError
from dwm.shared.synthetic import dancer_pose, render_frame

from .common import samples_dir
from .loader import loader_seconds, make_loader
from .synthetic import synth_shards
from .memory import PEAK_BF16_TFLOPS
from .report import Figure, Goal, Reference, Report, Section, median
from .trainstep import run_config, step_means

@dataclass
class Sizes:
    width: int
    height: int
    T: int
    frames: int  # per synthetic sample
    samples: int
    steps: int
    warm: int
    vae_frames: int
    pose_frames: int


FULL = Sizes(512, 896, 24, 48, 8, 5, 2, 48, 48)
DRY = Sizes(128, 256, 2, 8, 2, 1, 0, 4, 4)  # one step, no warm-up


def peak_tflops(name: str, override: float) -> float | None:
    if override > 0:
        return override
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # most specific name first
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def matmul_tflops(device: str, dtype: torch.dtype, n: int, iters: int = 10) -> float:
    """Achieved TFLOP/s of a square matmul: what this device's dense math really reaches."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t) / 1e12


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_gb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process)


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def device_memory_gb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


# ---------------------------------------------------------------------------------------------
class GpuBench:
    def __init__(self, cfg: BenchConfig):
        self.cfg = cfg
        self.dry = bool(cfg.dry_run)
        self.device = "cpu" if self.dry else "cuda"
        self.sz = DRY if self.dry else FULL
        if cfg.gpu_steps > 0:
            self.sz = dataclasses.replace(self.sz, steps=cfg.gpu_steps)
        self.out = Path(cfg.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.workers = TrainConfig().num_workers if cfg.workers < 0 else cfg.workers
        self.models = ModelsConfig(profile="tiny" if self.dry else "full",
                                   models_dir=str(self.out / "models") if self.dry
                                   else cfg.models_dir)
        self.unet_note = ""
        self.step_c: dict[str, dict[str, float]] = {}

    # -- inputs -------------------------------------------------------------------------------
    def shards(self):
        if not hasattr(self, "_shards"):
            s = self.sz
            self._shards = synth_shards(self.out / "shards", s.samples, s.frames, s.width,
                                        s.height, shards=max(2, 2 * self.workers))
        return self._shards

    def unet_override(self) -> str:
        """'' when SVD's UNet weights are here; else a folder with SVD's UNet, random weights."""
        if self.dry:
            return ""
        try:
            weights.ensure_available(self.models, ["unet"])
            self.unet_note = "SVD UNet weights (models_dir)"
            return ""
        except weights.MissingWeightError:
            folder = self.out / "random_svd_unet"
            if not (folder / "config.json").is_file():
                UNetSpatioTemporalConditionModel().save_pretrained(folder)  # SVD's defaults
            self.unet_note = ("SVD weights not found: SVD's UNet architecture with random "
                              f"weights ({folder}); speed and memory do not depend on the values")
            return str(folder)

    def train_cfg(self, stage: str, batch: int, ckpt: bool, out: Path, steps: int) -> TrainConfig:
        s = self.sz
        ov = {
            "model_size": "tiny" if self.dry else "full", "data": self.shards().manifest,
            "output_dir": str(out), "models.profile": self.models.profile,
            "models.models_dir": self.models.models_dir,
            # bf16 autocast on the GPU; the CPU dry run stays in fp32 (CPU bf16 is very slow)
            "mixed_precision": "no" if self.dry else "bf16",
            "gradient_checkpointing": ckpt, "train_batch_size": batch,
            "sequence_length": s.T, "max_sequence_length": s.T, "validation_steps": 0,
            "checkpointing_steps": 0, "log_steps": 1, "num_workers": self.workers,
            "epoch_samples": 10**5, f"stage_{stage.lower()}_steps": max(steps, 10),
        }
        unet = self.unet_override()
        if unet:
            ov["models.unet"] = unet
        return build_train_config([f"{k}={v}" for k, v in ov.items()], stage=stage)

    def inputs(self, **extra) -> dict:
        s = self.sz
        d = {"res": f"{s.width}x{s.height}", "latents": f"4x{s.height // 8}x{s.width // 8}",
             "model": "tiny" if self.dry else "full", "device": self.device,
             "dtype": "fp32" if self.dry else "bf16 autocast", "workers": self.workers}
        d.update(extra)
        return d

    # -- G1 / G2: train steps -----------------------------------------------------------------
    def timed_stage(self, stage: str, batch: int, ckpt: bool) -> dict[str, float]:
        out = self.out / "train" / f"{stage}-ckpt{int(ckpt)}"
        cfg = self.train_cfg(stage, batch, ckpt, out, self.sz.warm + self.sz.steps)
        reset_peak(self.device)
        run_config(cfg, stage, self.sz.warm + self.sz.steps)
        means = step_means(out / f"stage_{stage}" / "logs", self.sz.warm)
        means["peak_gb"] = peak_memory_gb(self.device)
        return means

    def count_flops(self, stage: str, batch: int) -> float:
        cfg = self.train_cfg(stage, batch, False, self.out / "train" / f"{stage}-flops", 1)
        with FlopCounterMode(display=False) as fc:
            run_config(cfg, stage, 1)
        return float(fc.get_total_flops())

    def section_train(self, sec: Section, secb: Section) -> None:
        s = self.sz
        dev_name = torch.cuda.get_device_name(0) if self.device == "cuda" else "CPU"
        peak = peak_tflops(dev_name, self.cfg.peak_tflops) if not self.dry else None
        mm_dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        mm = matmul_tflops(self.device, mm_dtype, 8192 if self.device == "cuda" else 512)
        mm_name = f"dense {'bf16' if mm_dtype == torch.bfloat16 else 'fp32'} matmul, measured"
        base = self.inputs(T=s.T, batch=self.cfg.batch_c, timed_steps=s.steps, warmup=s.warm)
        for ckpt in (False, True):
            try:
                key = "on" if ckpt else "off"
                self.step_c[key] = self.timed_stage("C", self.cfg.batch_c, ckpt)
            except torch.cuda.OutOfMemoryError as e:
                sec.notes.append(f"checkpointing {key}: out of memory ({e})"[:300])
        if self.unet_note:
            sec.notes.append(self.unet_note)
        if not self.step_c:
            raise RuntimeError("stage C did not fit in memory with checkpointing on or off")
        flops = self.count_flops("C", self.cfg.batch_c)
        sec.notes.append(f"one stage-C step = {flops / 1e12:.3f} TFLOP (FlopCounterMode, "
                         "checkpointing off: recomputation is not counted)")
        mem = device_memory_gb(self.device)
        if "on" in self.step_c and "off" in self.step_c:
            sec.add(Figure("stage-C step, checkpointing on", self.step_c["on"]["step"], "ms",
                           Reference("checkpointing off", self.step_c["off"]["step"], "ms"), None,
                           base))
        for key, m in self.step_c.items():
            tag = f"checkpointing {key}"
            inp = {**base, "grad_ckpt": key}
            sec.add(Figure(f"stage-C peak memory, {tag}", m["peak_gb"], "GiB",
                           Reference("device memory" if self.device == "cuda"
                                     else "RAM (process max RSS)", mem, "GiB"), None, inp))
            achieved = flops / (m["step"] / 1000) / 1e12
            sec.add(Figure(f"stage-C achieved TFLOP/s, {tag}", achieved, "TFLOP/s",
                           Reference(mm_name, mm, "TFLOP/s"), None, inp))
            if peak:
                sec.add(Figure(f"stage-C achieved TFLOP/s vs peak, {tag}", achieved, "TFLOP/s",
                               Reference(f"{dev_name} bf16 dense peak (datasheet)", peak,
                                         "TFLOP/s"), None, inp))
            sec.add(Figure(f"stage-C data-wait, {tag}", m["data"], "ms/step",
                           Reference("whole step", m["step"], "ms/step"), Goal("<=", 0.02), inp))
        if peak:
            sec.add(Figure("dense bf16 matmul (8192^3)", mm, "TFLOP/s",
                           Reference(f"{dev_name} bf16 dense peak (datasheet)", peak, "TFLOP/s"),
                           None, self.inputs()))
        elif not self.dry:
            sec.notes.append(f"{dev_name}: bf16 peak unknown; give peak_tflops=")

        # G2: stage B
        batch_b = 1 if self.dry else self.cfg.batch_b
        b = self.timed_stage("B", batch_b, False)
        ref_key = "off" if "off" in self.step_c else "on"
        inp = self.inputs(batch=batch_b, timed_steps=s.steps, warmup=s.warm,
                          grad_ckpt="off")
        secb.add(Figure("stage-B step", b["step"], "ms",
                        Reference(f"stage-C step (checkpointing {ref_key})",
                                  self.step_c[ref_key]["step"], "ms"), None, inp))
        secb.add(Figure("stage-B data-wait", b["data"], "ms/step",
                        Reference("whole step", b["step"], "ms/step"), Goal("<=", 0.02), inp))
        secb.add(Figure("stage-B peak memory", b["peak_gb"], "GiB",
                        Reference("device memory" if self.device == "cuda" else "RAM", mem, "GiB"),
                        None, inp))

    # -- G3: preprocessing models ---------------------------------------------------------------
    def frames(self, n: int, width: int, height: int) -> np.ndarray:
        """``n`` RGB frames: the sample video's, else the generated dancer."""
        video = samples_dir() / "dance_music.mp4"
        if video.is_file():
            vr = decord.VideoReader(str(video), width=width, height=height)
            return vr.get_batch(list(range(min(n, len(vr))))).asnumpy()
        return np.stack([render_frame(dancer_pose(i / 24, 120, width, height), width, height)
                         for i in range(n)])

    def section_models(self, sec: Section) -> None:
        s = self.sz
        frames = self.frames(s.vae_frames, s.width, s.height)
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        vaes = []
        try:
            vaes.append(("VAE (" + ("tiny profile" if self.dry else "SVD") + ")",
                         vae_io.load_vae(self.models, device=self.device, dtype=dtype)[0]))
        except weights.MissingWeightError:
            vae = AutoencoderKLTemporalDecoder(  # SVD's VAE architecture, random weights
                down_block_types=("DownEncoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512), layers_per_block=2)
            vaes.append(("SVD VAE architecture, random weights (SVD weights not found)",
                         vae.to(self.device, dtype).eval()))
        taesd = samples_dir() / "weights" / "taesd"
        if (taesd / "config.json").is_file():
            vaes.append(("TAESD", vae_io.load_vae(ModelsConfig(vae=str(taesd)),
                                                  device=self.device, dtype=dtype)[0]))
        bs = 8 if self.device == "cuda" else 2
        for name, vae in vaes:
            with torch.inference_mode():
                vae_io.encode_latents(vae, frames[:bs], batch_size=bs)  # warm-up
                sync(self.device)
                t = time.perf_counter()
                vae_io.encode_latents(vae, frames, batch_size=bs)
                sync(self.device)
            fps = len(frames) / (time.perf_counter() - t)
            sec.add(Figure(f"VAE encode: {name}", fps, "frames/s",
                           Reference("real time (24 fps video)", 24.0, "frames/s"), None,
                           self.inputs(frames=len(frames), vae_batch=bs,
                                       dtype=str(dtype).replace("torch.", ""))))
            del vae

        # DWpose through the pose extractor
        stand_in = self.dry
        try:
            weights.dwpose_paths(self.models)
            models = self.models
        except weights.MissingWeightError:
            models = ModelsConfig(profile="tiny", models_dir=str(self.out / "models"))
            stand_in = True
        pcfg = build_preprocess_config(["pose.backend=dwpose", f"device={self.device}",
                                        f"models.profile={models.profile}",
                                        f"models.models_dir={models.models_dir}"])
        ext = REGISTRY["pose"](pcfg, self.device)
        pframes = self.frames(s.pose_frames, s.width, s.height)
        ext.reset(VideoContext("bench", "bench", len(pframes), 24.0, s.width, s.height))
        idx = np.arange(len(pframes))
        ext(FrameBatch(pframes[:2], idx[:2], idx[:2], 0))  # warm-up (sessions, CUDA kernels)
        t = time.perf_counter()
        for b in range(0, len(pframes), pcfg.pose.batch_size):
            sl = slice(b, b + pcfg.pose.batch_size)
            ext(FrameBatch(pframes[sl], idx[sl], idx[sl], 0))
        fps = len(pframes) / (time.perf_counter() - t)
        providers = ort.get_available_providers()
        cuda_ort = "CUDAExecutionProvider" in providers
        sec.add(Figure("DWpose (rtmlib, onnxruntime)" + (" - STAND-IN ONNX" if stand_in else ""),
                       fps, "frames/s", Reference("real time (24 fps video)", 24.0, "frames/s"),
                       None, self.inputs(frames=len(pframes), ort_cuda=cuda_ort,
                                         onnx="tiny stand-ins" if stand_in else "DWpose")))
        if stand_in:
            sec.notes.append("DWpose files not found: the tiny stand-in ONNX files ran (same "
                             "inputs/outputs, not the same work); `dwm models` fetches the real "
                             "ones")
        if self.device == "cuda" and not cuda_ort:
            sec.notes.append("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu): "
                             "DWpose ran on the CPU")

    # -- G4: loader vs consumption --------------------------------------------------------------
    def section_loader(self, sec: Section) -> None:
        s = self.sz
        if not self.step_c:
            raise RuntimeError("needs the stage-C step of G1")
        key = "on" if "on" in self.step_c else "off"
        consume = self.cfg.batch_c / (self.step_c[key]["step"] / 1000)
        rates = []
        for _ in range(2 if self.dry else 3):
            dt, n = loader_seconds(make_loader(self.shards(), "C", self.workers, seq_len=s.T),
                                   4 if self.dry else 16)
            rates.append(n / dt)
        sec.add(Figure("stage-C loader samples/s", median(rates), "samples/s",
                       Reference(f"train step consumption (checkpointing {key})", consume,
                                 "samples/s"), Goal(">=", 1.0),
                       self.inputs(T=s.T, batch=1, shards=len(self.shards().urls)), rates))


def run_section(sec: Section, fn) -> None:
    t = time.perf_counter()
    print(f"[gpu bench] {sec.key}: {sec.title} ...", flush=True)
    try:
        fn()
    except Exception as e:
        sec.error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        sec.notes.append("traceback: " + " | ".join(
            traceback.format_exc(limit=4).strip().splitlines()[-4:]))
    sec.seconds = time.perf_counter() - t


def main(cfg: BenchConfig) -> int:
    """Sections G1-G4 into ``<out>/bench_gpu.md`` and ``.json``; 1 when a section failed."""
    if not cfg.dry_run and not torch.cuda.is_available():
        raise UserFacingError("gpu=true: no CUDA device here; dry_run=true runs the same code "
                              "on the CPU")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    gb = GpuBench(cfg)
    if gb.dry:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    report = Report("dwm GPU bench" + (" (dry run: CPU, tiny models and sizes)" if gb.dry else ""),
                    to_dict(cfg))
    g1 = report.section("G1", "stage-C train step")
    g2 = report.section("G2", "stage-B train step")
    g3 = report.section("G3", "preprocessing models")
    g4 = report.section("G4", "loader vs train step")
    run_section(g1, lambda: gb.section_train(g1, g2))
    if g1.error and not g2.figures:
        g2.error = f"see G1: {g1.error}"
    run_section(g3, lambda: gb.section_models(g3))
    run_section(g4, lambda: gb.section_loader(g4))
    report.seconds = time.perf_counter() - t0
    md, js = report.write(gb.out, stem="bench_gpu")
    print(report.markdown())
    print(f"[gpu bench] wrote {md} and {js}")
    return 1 if report.summary()["errors"] else 0
