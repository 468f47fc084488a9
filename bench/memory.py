"""Peak GPU memory of one train step, estimated on a machine without a GPU.

The REAL step runs -- the project's DanceModel (SVD-xt's UNet config, the ReferenceNet copy, pose
guider, ID adapter, M2PEncoder), the freeze matrix, the stage's own loss code on a batch made by
the real stage view from a synthetic sample, backward, gradient clipping and AdamW -- but on
*fake* tensors (``torch._subclasses.fake_tensor.FakeTensorMode``): every op computes shapes and
dtypes only, so a 3 B-parameter step costs seconds and no memory. A ``TorchDispatchMode``
(:class:`LiveBytes`) sees every op's outputs and counts the bytes of each new storage while it
is alive (storage weakrefs), rounded to the CUDA caching allocator's 512-byte blocks.

Why fake *CPU* tensors: a CPU build of torch cannot hold fake CUDA tensors (indexing and
``.to("cuda")`` need a CUDA device guard). Two things differ between CPU and CUDA and are made
to match what a GPU run does:

- autocast: CUDA's bf16/fp16 autocast runs norms, softmax, exp, pow, reductions ... in fp32
  (and so keeps fp32 activations there); CPU autocast keeps them in bf16. While estimating,
  :func:`cuda_autocast_rules` installs CUDA's op lists (from ATen's ``autocast_mode.h``) as
  ``AutocastCPU`` kernels; lower-precision ops (conv, linear, matmul, SDPA) are the same on both
  and keep torch's own kernels, including its cast cache for trainable fp32 weights.
- attention: ``F.scaled_dot_product_attention`` on CPU picks the fused flash kernel, which, like
  the GPU's flash / memory-efficient kernels (and xformers), keeps only the output and a
  log-sum-exp per query, never the ``T x (h w)^2`` score matrix (checked by
  :attr:`MemoryEstimate.attention_kernels`).

What the estimate includes: weights (fp32 master weights, as the engine keeps them under
accelerate's autocast), gradients of the trainable parameters, AdamW state (exact), the input
batch, activations saved for backward, temporaries, autocast's bf16 weight copies, recomputation
under gradient checkpointing and the optimiser's own temporaries (``foreach`` AdamW, as torch
picks on CUDA). What it excludes: the CUDA context and kernels (~0.5-1 GiB per process, outside
the allocator), cuBLAS/cuDNN workspaces, NCCL buffers, allocator fragmentation and caching
(``memory_reserved`` runs ~5-15 % above ``max_memory_allocated``), and the data loader's pinned
host memory. Compare the peak with ``torch.cuda.max_memory_allocated()``.

``dwm bench estimate_memory=true`` prints :func:`memory_table`. Gradient checkpointing is
the engine's (:meth:`DanceModel.enable_gradient_checkpointing`, which also checkpoints the
temporal transformer blocks that diffusers' SVD checkpointing leaves out). One *what-if* (not
what the engine does) shows a further lever: ``frozen_weights="bf16"``.
tests/test_memory_estimate.py checks the estimate
against a real CPU run of the same step measured by the torch profiler.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import init_empty_weights
from diffusers import UNetSpatioTemporalConditionModel
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from dwm.datasets.views import NearestRows, batch_to_device, collate, make_view
from dwm.shared import contract
from dwm.shared.config import build_train_config
from dwm.shared.tiny.models import TINY_UNET
from dwm.training.models.animator import build_video_components, install_wiring
from dwm.training.models.dance_model import DanceModel
from dwm.training.models.m2p import M2PEncoder
from dwm.training.stages import get_stage
from dwm.training.stages.stage_b import weighted_total

from .synthetic import N_MELS, synth_sample

from dwm.shared import progress as P

GiB = 2**30
CUDA_BLOCK = 512  # the CUDA caching allocator rounds every block up to this many bytes
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None, "no": None}
ADAMW8BIT_BLOCK = 256  # bitsandbytes' block size for 8-bit optimiser states
ADAMW8BIT_MIN_SIZE = 4096  # bitsandbytes keeps 32-bit states for tensors smaller than this


# ---------------------------------------------------------------------------------------------
# live-bytes tracking
# ---------------------------------------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage an op creates, from its creation to its release.

    ``track(t)`` adds a tensor created before the mode was entered (weights, the batch).
    ``phase(name)`` starts a named phase; ``phase_peaks`` holds each phase's peak live bytes and
    the gradient bytes live at that moment. Data-dependent scalars (``bool(t)``, ``float(t)``)
    of fake tensors have no value: they read as True / 1 (``scalar_reads`` counts them), which is
    what keeps the stages' log lines and the "no sample dropped" branch running.
    """

    def __init__(self, block: int = CUDA_BLOCK):
        super().__init__()
        self.block = max(1, int(block))
        self.live = 0
        self.peak = 0
        self.grad_bytes = 0
        self.scalar_reads = 0
        self.ops: set[str] = set()
        self._sizes: dict[int, int] = {}
        self._grads: set[int] = set()
        self._phase = ""
        self.phase_peaks: dict[str, dict[str, int]] = {}

    # -- bookkeeping ---------------------------------------------------------------------------
    def _rounded(self, nbytes: int) -> int:
        return -(-nbytes // self.block) * self.block if nbytes else 0

    def track(self, t: Any) -> int:
        """Count ``t``'s storage if it is not counted yet; returns its (rounded) bytes."""
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            return 0
        st = t.untyped_storage()
        key = st._cdata
        if key in self._sizes:
            return self._sizes[key]
        size = self._rounded(st.nbytes())
        self._sizes[key] = size
        self.live += size
        weakref.finalize(st, self._release, key)
        self._note_peak()
        return size

    def _release(self, key: int) -> None:
        size = self._sizes.pop(key, 0)
        self.live -= size
        if key in self._grads:
            self._grads.discard(key)
            self.grad_bytes -= size

    def mark_grad(self, t: torch.Tensor) -> None:
        key = t.untyped_storage()._cdata
        if key not in self._grads:
            self._grads.add(key)
            self.grad_bytes += self.track(t)

    def _note_peak(self) -> None:
        self.peak = max(self.peak, self.live)
        if self._phase:
            rec = self.phase_peaks[self._phase]
            if self.live > rec["peak"]:
                rec["peak"], rec["grads"] = self.live, self.grad_bytes

    def phase(self, name: str) -> None:
        self._phase = name
        self.phase_peaks[name] = {"start": self.live, "peak": self.live, "grads": self.grad_bytes}

    # -- the mode ------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.add(func.name())
        if func is torch.ops.aten._local_scalar_dense.default and _is_fake(args[0]):
            self.scalar_reads += 1
            return _stand_in_scalar(args[0].dtype)
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


def _is_fake(t: Any) -> bool:
    return isinstance(t, FakeTensor)


def _stand_in_scalar(dtype: torch.dtype) -> bool | int | float:
    if dtype == torch.bool:
        return True
    return 1 if not dtype.is_floating_point and not dtype.is_complex else 1.0


# ---------------------------------------------------------------------------------------------
# CUDA's autocast op lists, installed on the CPU autocast key while estimating
# ---------------------------------------------------------------------------------------------
# From ATen/autocast_mode.h (AT_FORALL_FP32, AT_FORALL_FP32_SET_OPT_DTYPE, AT_FORALL_PROMOTE and
# the lower-precision ops CUDA has and CPU lacks); "op" or "op.overload".
CUDA_FP32_OPS = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
    "reciprocal", "rsqrt", "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar",
    "softplus", "layer_norm", "native_layer_norm", "rms_norm", "group_norm", "frobenius_norm.dim",
    "nuclear_norm", "nuclear_norm.dim", "cosine_similarity", "poisson_nll_loss",
    "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div",
    "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss",
    "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
    "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
    "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d",
    "_upsample_nearest_exact2d", "upsample_nearest3d", "_upsample_nearest_exact3d",
    "upsample_linear1d", "upsample_bilinear2d", "_upsample_bilinear2d_aa", "upsample_trilinear3d",
    "upsample_bicubic2d", "_upsample_bicubic2d_aa",
)  # fmt: skip
CUDA_FP32_SET_OPT_DTYPE_OPS = (
    "prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum",
    "linalg_vector_norm", "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum",
    "sum.dim_IntList",
)  # fmt: skip
CUDA_PROMOTE_OPS = ("addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot",
                    "grid_sampler", "index_put", "tensordot", "scatter_add")
CUDA_ONLY_LOWER_OPS = ("addmv", "addr", "einsum", "mv", "chain_matmul", "linalg_multi_dot")


def _eligible(x: Any) -> bool:
    return (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64
            and x.device.type == "cpu")


def _cast_all(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if _eligible(obj) and obj.dtype != dtype else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast_all(o, dtype) for o in obj)
    return obj


def _overload(name: str) -> torch._ops.OpOverload:
    op, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, op), overload or "default")


def _autocast_kernel(op: torch._ops.OpOverload, policy: str):
    no_autocast = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def kernel(*args, **kwargs):
        if policy == "fp32":
            args, kwargs = _cast_all(args, torch.float32), {
                k: _cast_all(v, torch.float32) for k, v in kwargs.items()}
        elif policy == "lower":
            low = torch.get_autocast_dtype("cpu")
            args, kwargs = _cast_all(args, low), {k: _cast_all(v, low) for k, v in kwargs.items()}
        elif policy == "fp32_set_opt_dtype":
            if args and _eligible(args[0]) and kwargs.get("dtype") is None:
                names = [a.name for a in op._schema.arguments]
                if "dtype" in names and len(args) <= names.index("dtype"):
                    kwargs = {**kwargs, "dtype": torch.float32}
        elif policy == "promote":
            floats = [a.dtype for a in tree_flatten((args, kwargs))[0] if _eligible(a)]
            if floats:
                wide = torch.float32 if torch.float32 in floats else floats[0]
                args = _cast_all(args, wide)
        with torch._C._ExcludeDispatchKeyGuard(no_autocast):
            return op(*args, **kwargs)

    return kernel


@contextlib.contextmanager
def cuda_autocast_rules() -> Iterator[None]:
    """Make CPU autocast follow CUDA autocast's op lists until the block ends."""
    lib = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            for names, policy in ((CUDA_FP32_OPS, "fp32"),
                                  (CUDA_FP32_SET_OPT_DTYPE_OPS, "fp32_set_opt_dtype"),
                                  (CUDA_PROMOTE_OPS, "promote"),
                                  (CUDA_ONLY_LOWER_OPS, "lower")):
                for name in names:
                    try:
                        op = _overload(name)
                    except AttributeError:  # not in this torch release
                        continue
                    lib.impl(op, _autocast_kernel(op, policy), "AutocastCPU")
        yield
    finally:
        lib._destroy()  # the CPU kernels come back


# ---------------------------------------------------------------------------------------------
# the model and the batch
# ---------------------------------------------------------------------------------------------
def unet_config(model_size: str) -> dict[str, Any]:
    """SVD-xt's UNet config (the diffusers class defaults) or the tiny profile's."""
    if model_size == "tiny":
        return dict(TINY_UNET)
    if model_size != "full":
        raise ValueError(f"unknown model size {model_size!r} (full or tiny)")
    return {}


def build_model(cfg: Any, stage: str, latent_hw: tuple[int, int], fake_mode: Any = None,
                unet_cfg: dict[str, Any] | None = None,
                frozen_dtype: torch.dtype | None = None) -> nn.Module:
    """The stage's DanceModel (``cfg.model_size``), wired, freeze matrix applied, gradient
    checkpointing switched on as the engine does when ``cfg.gradient_checkpointing``.

    With ``fake_mode`` the weights are fake CPU tensors (built on the meta device first, so no
    memory is touched); otherwise real, randomly initialised CPU weights.
    ``frozen_dtype``: a what-if -- keep the frozen
    weights in this dtype (e.g. bf16) instead of fp32 master weights."""
    ucfg = unet_config(cfg.model_size) if unet_cfg is None else unet_cfg
    ctx = contextlib.nullcontext()
    if fake_mode is not None:
        ctx = init_empty_weights(include_buffers=True)
    with ctx:
        unet = UNetSpatioTemporalConditionModel(**ucfg)
        parts = build_video_components(unet, cfg.model_size, face_tokens=cfg.face_tokens)
        m2p = M2PEncoder.from_size(cfg.model_size, heatmap_height=latent_hw[0],
                                   heatmap_width=latent_hw[1])
        model = DanceModel(m2p=m2p, **parts)
    if fake_mode is not None:
        _meta_to_fake(model, fake_mode)
    install_wiring(model)
    model.set_training_stage(stage, cfg)
    if frozen_dtype is not None:
        ctx = fake_mode if fake_mode is not None else contextlib.nullcontext()
        with ctx, torch.no_grad():
            for p in model.parameters():
                if not p.requires_grad and p.is_floating_point():
                    p.data = p.data.to(frozen_dtype)
    if cfg.gradient_checkpointing:  # as the engine does
        model.enable_gradient_checkpointing()
    return model.train()


def _meta_to_fake(model: nn.Module, fake_mode: Any) -> None:
    with fake_mode:
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    fake = torch.empty(p.shape, dtype=p.dtype, device="cpu")
                    module._parameters[name] = nn.Parameter(fake, requires_grad=p.requires_grad)
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device="cpu")


def make_batch(stage: str, cfg: Any, width: int, height: int, T: int, batch: int,
               seed: int = 0) -> dict[str, Any]:
    """A real batch of the stage's view (CPU tensors, as ``batch_to_device`` leaves them), from
    synthetic samples with every contract feature at ``width x height``."""
    rng = np.random.default_rng(seed)
    frames = max(T, 2 * int(getattr(cfg, "min_ref_gap", 12)) + 1) if stage == "B" else T + 1
    view = make_view(stage, None, cfg, n_mels=N_MELS,
                     **({"sequence_length": T} if stage == "C" else {}))
    items = []
    for i in range(batch):
        sample = synth_sample(i, frames, width, height, rng)
        meta = sample.pop("json")
        sample.pop("__key__")
        # as decode_features hands them over: crops stored on reference frames, found by frame
        sample["face_crop"] = NearestRows(sample["face_crop"], sample["face_crop_frames"],
                                          "synthetic")
        items.append(view.build(meta, sample, rng, T if stage == "C" else None))
    return batch_to_device(collate(items), "cpu")


# ---------------------------------------------------------------------------------------------
# the step
# ---------------------------------------------------------------------------------------------
@dataclass
class MemoryEstimate:
    """One step's memory, in GiB (2**30 bytes)."""

    stage: str
    width: int
    height: int
    T: int
    batch: int
    dtype: str
    gradient_checkpointing: bool
    optimizer: str
    frozen_weights: str
    model_size: str
    params_total: int
    params_trainable: int
    weights_gib: float  # every parameter and buffer (fp32 master weights)
    grads_gib: float  # gradients of the trainable parameters
    optimizer_gib: float  # optimiser state
    inputs_gib: float  # the batch on the device
    activations_gib: float  # activations + temporaries at the forward/backward peak
    grads_at_peak_gib: float  # gradients already accumulated at that peak
    optimizer_step_extra_gib: float  # the optimiser step's temporaries (+ state kept from forward)
    peak_gib: float  # steady-state step peak (optimiser state already allocated)
    peak_phase: str
    attention_kernels: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _optimizer_state_bytes_8bit(params: list[torch.Tensor]) -> int:
    """bitsandbytes AdamW8bit: two uint8 states + an fp32 absmax per block; small tensors keep
    two fp32 states."""
    total = 0
    for p in params:
        n = p.numel()
        if n >= ADAMW8BIT_MIN_SIZE:
            total += 2 * (n + 4 * math.ceil(n / ADAMW8BIT_BLOCK))
        else:
            total += 2 * 4 * n
    return total


def run_step(model: nn.Module, stage_obj: Any, batch: dict[str, Any], tracker: LiveBytes,
             dtype: torch.dtype | None, optimizer_kind: str, clip_norm: float,
             lr: float, weight_decay: float,
             around_step: contextlib.AbstractContextManager | None = None) -> dict[str, int]:
    """One steady-state engine step (forward under autocast, backward, clipping, AdamW) with
    ``tracker`` counting (``around_step``: a context entered around just the step, e.g. a
    profiler). Returns byte counts of the persistent parts."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for t in list(model.parameters()) + list(model.buffers()):
        tracker.track(t)
    weights = tracker.live
    for t in tree_flatten(batch)[0]:
        tracker.track(t)
    inputs = tracker.live - weights

    optimizer = None
    if optimizer_kind == "adamw":
        # foreach: what torch picks for CUDA parameters (one temporary the size of the params)
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, foreach=True)
        for p in trainable:  # allocate the state as after the first step
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        opt_bytes = sum(tracker.track(s) for st in optimizer.state.values()
                        for s in st.values() if isinstance(s, torch.Tensor))
    elif optimizer_kind == "adamw8bit":
        opt_bytes = _optimizer_state_bytes_8bit(trainable)  # bitsandbytes is not needed to count
        tracker.live += opt_bytes
    else:
        raise ValueError(f"unknown optimizer {optimizer_kind!r} (adamw or adamw8bit)")
    base = tracker.live
    tracker.peak = tracker.live  # the set-up above (first-step state) is not the step

    hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.mark_grad(p.grad))
             for p in trainable]
    try:
        with around_step or contextlib.nullcontext(), tracker:
            tracker.phase("forward")
            autocast = (torch.autocast("cpu", dtype=dtype) if dtype is not None
                        else contextlib.nullcontext())
            total = stage_obj.total_steps(stage_obj.cfg)
            stage_obj.on_step_start(0, total)
            with autocast:
                # the stage's loss terms and weighting; compute_loss adds only float() log values
                terms = stage_obj.loss_terms(model, batch, 0, total)
                loss = weighted_total(stage_obj.cfg, terms)
            del terms
            tracker.phase("backward")
            loss.backward()
            del loss
            tracker.phase("optimizer")
            grads = [p for p in trainable if p.grad is not None]
            if clip_norm > 0 and grads:
                torch.nn.utils.clip_grad_norm_(grads, clip_norm, foreach=True)
            if optimizer is not None:
                optimizer.step()
            grad_bytes = tracker.grad_bytes
            for p in trainable:
                p.grad = None
    finally:
        for h in hooks:
            h.remove()
    return {"weights": weights, "inputs": inputs, "optimizer": opt_bytes, "base": base,
            "grads": grad_bytes}


def train_config(stage: str, model_size: str, T: int, batch: int, dtype: str,
                 gradient_checkpointing: bool, overrides: list[str] | None = None) -> Any:
    mp = {"bf16": "bf16", "fp16": "fp16"}.get(dtype, "no")
    ov = [f"model_size={model_size}", f"mixed_precision={mp}",
          f"gradient_checkpointing={str(bool(gradient_checkpointing)).lower()}",
          f"train_batch_size={batch}", f"sequence_length={T}", f"max_sequence_length={T}"]
    return build_train_config(ov + list(overrides or []), stage=stage)


def stage_step_memory(stage: str = "C", width: int = 512, height: int = 896, T: int = 24,
                      dtype: str = "bf16", gradient_checkpointing: bool = True, batch: int = 1,
                      optimizer: str = "adamw", model_size: str = "full", fake: bool = True,
                      block: int = CUDA_BLOCK, overrides: list[str] | None = None,
                      seed: int = 0, around_step: contextlib.AbstractContextManager | None = None,
                      frozen_weights: str = "fp32") -> tuple[MemoryEstimate, LiveBytes]:
    """Run one step (fake or real tensors) and count it; the estimate and the tracker."""
    stage = stage.upper()
    if stage not in ("B", "C"):
        raise ValueError(f"stage must be B or C, got {stage!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if width % contract.LATENT_DOWNSAMPLE or height % contract.LATENT_DOWNSAMPLE:
        raise ValueError(f"{width}x{height}: width and height must be multiples of "
                         f"{contract.LATENT_DOWNSAMPLE}")
    T = 1 if stage == "B" else int(T)
    cfg = train_config(stage, model_size, T, batch, dtype, gradient_checkpointing, overrides)
    latent_hw = (height // contract.LATENT_DOWNSAMPLE, width // contract.LATENT_DOWNSAMPLE)
    real_batch = make_batch(stage, cfg, width, height, T, batch, seed)
    stage_obj = get_stage(stage)(cfg)
    tracker = LiveBytes(block)
    torch.manual_seed(seed)
    mode = FakeTensorMode(allow_non_fake_inputs=False) if fake else None
    rules = cuda_autocast_rules() if DTYPES[dtype] is not None else contextlib.nullcontext()
    with rules, (mode if mode is not None else contextlib.nullcontext()):
        model = build_model(cfg, stage, latent_hw, mode, frozen_dtype=DTYPES[frozen_weights])
        batch_t = {k: (mode.from_tensor(v) if mode is not None and isinstance(v, torch.Tensor)
                       else v) for k, v in real_batch.items()}
        del real_batch
        sizes = run_step(model, stage_obj, batch_t, tracker, DTYPES[dtype], optimizer,
                         float(cfg.gradient_clip_norm), float(cfg.stage_c_lr),
                         float(cfg.adam_weight_decay), around_step)
    params = list(model.parameters())
    fwd, bwd, opt = (tracker.phase_peaks[k] for k in ("forward", "backward", "optimizer"))
    # at the forward/backward peak: weights + optimiser state + batch + gradients so far + the rest
    top = fwd if fwd["peak"] >= bwd["peak"] else bwd
    act_peak = max(0, top["peak"] - sizes["base"] - top["grads"])  # base: weights+state+batch
    # above weights + optimiser state + batch + gradients: the step's temporaries (and what the
    # forward pass leaves alive until the next step, e.g. the ReferenceNet's recorded tokens)
    opt_extra = max(0, opt["peak"] - sizes["base"] - sizes["grads"])
    peaks = {"forward": fwd["peak"], "backward": bwd["peak"], "optimizer": opt["peak"]}
    phase = max(peaks, key=peaks.get)
    attn = sorted(op for op in tracker.ops if "attention" in op or op.endswith("::_softmax"))
    notes = []
    if tracker.scalar_reads:
        notes.append(f"{tracker.scalar_reads} data-dependent scalar reads answered True/1 "
                     "(log values, the all-samples-kept branch)")
    if optimizer == "adamw8bit":
        notes.append("AdamW8bit state counted from bitsandbytes' layout (2 B/param + block "
                     "scales); its fused step has no full-size temporaries")
    est = MemoryEstimate(
        stage=stage, width=width, height=height, T=T, batch=batch, dtype=dtype,
        gradient_checkpointing=bool(gradient_checkpointing), optimizer=optimizer,
        frozen_weights=frozen_weights,
        model_size=model_size, params_total=sum(p.numel() for p in params),
        params_trainable=sum(p.numel() for p in params if p.requires_grad),
        weights_gib=sizes["weights"] / GiB, grads_gib=sizes["grads"] / GiB,
        optimizer_gib=sizes["optimizer"] / GiB, inputs_gib=sizes["inputs"] / GiB,
        activations_gib=act_peak / GiB, grads_at_peak_gib=top["grads"] / GiB,
        optimizer_step_extra_gib=opt_extra / GiB,
        peak_gib=tracker.peak / GiB, peak_phase=phase, attention_kernels=attn, notes=notes)
    return est, tracker


def estimate_stage_step_memory(stage: str = "C", width: int = 512, height: int = 896,
                               T: int = 24, dtype: str = "bf16",
                               gradient_checkpointing: bool = True, batch: int = 1,
                               optimizer: str = "adamw", model_size: str = "full",
                               overrides: list[str] | None = None,
                               frozen_weights: str = "fp32") -> MemoryEstimate:
    """Peak GPU memory of one steady-state train step of ``stage`` ("B" or "C"), estimated on
    fake tensors (no GPU, no memory). ``dtype``: bf16 / fp16 (autocast, fp32 master weights, as
    ``mixed_precision``) or fp32. ``optimizer``: adamw (torch) or adamw8bit (bitsandbytes'
    state layout, counted). ``overrides``: extra TrainConfig ``key=value`` strings.
    A what-if the engine does not do (see :func:`build_model`): ``frozen_weights="bf16"``
    (frozen weights stored in bf16, not fp32)."""
    return stage_step_memory(stage, width, height, T, dtype, gradient_checkpointing, batch,
                             optimizer, model_size, fake=True, overrides=overrides,
                             frozen_weights=frozen_weights)[0]


# ---------------------------------------------------------------------------------------------
# the Markdown table of `dwm bench estimate_memory=true`
# ---------------------------------------------------------------------------------------------
TABLE_HEAD = ("| stage | size | T | batch | dtype | grad ckpt | variant | optimizer | weights | "
              "grads | optimizer state | activations at peak | optimizer temps | peak (GiB) |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def variant(e: MemoryEstimate) -> str:
    if e.frozen_weights != "fp32":
        return f"what-if: frozen weights {e.frozen_weights}"
    return "engine as is"


def table_row(e: MemoryEstimate) -> str:
    return (f"| {e.stage} | {e.width}x{e.height} | {e.T} | {e.batch} | {e.dtype} | "
            f"{'on' if e.gradient_checkpointing else 'off'} | {variant(e)} | {e.optimizer} | "
            f"{e.weights_gib:.2f} | {e.grads_gib:.2f} | {e.optimizer_gib:.2f} | "
            f"{e.activations_gib:.2f} | {e.optimizer_step_extra_gib:.2f} | "
            f"**{e.peak_gib:.2f}** |")


DEFAULT_CASES: tuple[dict[str, Any], ...] = (
    dict(stage="C", T=24, gradient_checkpointing=True),
    dict(stage="C", T=24, gradient_checkpointing=False),
    dict(stage="C", T=24, gradient_checkpointing=True, optimizer="adamw8bit"),
    dict(stage="C", T=24, gradient_checkpointing=True, frozen_weights="bf16",
         optimizer="adamw8bit"),
    dict(stage="C", T=150, gradient_checkpointing=True),
    dict(stage="C", T=150, gradient_checkpointing=False),
    dict(stage="B", gradient_checkpointing=True),
    dict(stage="B", gradient_checkpointing=False),
)


def memory_table(cases: tuple[dict[str, Any], ...] = DEFAULT_CASES, width: int = 512,
                 height: int = 896, batch: int = 1, dtype: str = "bf16",
                 model_size: str = "full", progress: bool = True) -> str:
    """Markdown table of :func:`estimate_stage_step_memory` over ``cases``, with a legend."""
    rows = [TABLE_HEAD]
    for case in P.progress(cases, desc="memory estimate", unit="case", disable=not progress):
        rows.append(table_row(estimate_stage_step_memory(
            width=width, height=height, batch=batch, dtype=dtype, model_size=model_size,
            **case)))
    rows += ["", LEGEND]
    return "\n".join(rows)


LEGEND = (
    "Estimated on fake tensors (no GPU): the real DanceModel, freeze matrix, stage loss, "
    "backward, clipping and optimiser step; GiB = 2^30 bytes, comparable with "
    "torch.cuda.max_memory_allocated(). Not included: CUDA context (~0.5-1 GiB), cuBLAS/cuDNN "
    "workspaces, allocator fragmentation/caching (reserved runs ~5-15 % above allocated). "
    "'activations at peak': activations, temporaries and autocast's bf16 weight copies at the "
    "forward/backward peak. 'optimizer temps': foreach AdamW's temporaries during the step. "
    "Gradient checkpointing 'on' is the engine's: every res, spatial and temporal block. The "
    "'what-if' row keeps the frozen weights in bf16, which the engine does not do."
)


# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s, no sparsity).
PEAK_BF16_TFLOPS = {
    "H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0,
    "H100 PCIe": 756.0, "H100": 756.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
    "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.2, "RTX 6000 Ada": 364.2,
}


# Where no GPU step was measured, its time is estimated: the FLOPs of one full-size step counted
# on fake tensors (dwm.bench.memory runs the real step on shapes only; gradient checkpointing on,
# so its recomputation counts as the work it is) at an assumed share of a datasheet peak.
ESTIMATE_GPU = "H100 SXM"
ESTIMATE_MFU = 0.4  # assumed utilisation of the bf16 peak by a UNet train step (0.3-0.5 typical)


def estimate_step(stage: str = "C", width: int = 512, height: int = 896, T: int = 24,
                  batch: int = 1, model_size: str = "full", gpu: str = ESTIMATE_GPU,
                  mfu: float = ESTIMATE_MFU) -> dict[str, float | str]:
    """Estimated seconds of one train step of ``stage`` on ``gpu`` (bf16, checkpointing on):
    counted FLOPs / (datasheet peak x ``mfu``). About 40 s on a CPU at the full size."""
    counter = FlopCounterMode(display=False)
    stage_step_memory(stage, width, height, T, "bf16", True, batch, model_size=model_size,
                      around_step=counter)
    flops = float(counter.get_total_flops())
    peak = PEAK_BF16_TFLOPS[gpu]
    return {"flops": flops, "seconds": flops / (peak * 1e12 * mfu), "gpu": gpu, "mfu": mfu,
            "peak_tflops": peak, "source": f"estimate: {flops / 1e12:.1f} TFLOP/step at {mfu:g} "
                                         f"of {gpu} bf16 peak ({peak:g} TFLOP/s)"}
