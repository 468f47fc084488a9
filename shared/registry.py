"""One registry for every pretrained component: where it comes from, whether it is here, how it
loads. Everything else in the project goes through these functions.

Components (names used by :func:`ensure_available`):

* ``vae``   SVD's ``AutoencoderKLTemporalDecoder`` (``<svd>/vae``), or any local/HF folder
            holding an ``AutoencoderKL`` or ``AutoencoderTiny`` (TAESD): the class comes from config.json.
* ``clip``  ``CLIPVisionModelWithProjection`` (``<svd>/image_encoder``).
* ``unet``  ``UNetSpatioTemporalConditionModel`` (``<svd>/unet``).
* ``dwpose`` ONNX files ``yolox_l.onnx`` + ``dw-ll_ucoco_384.onnx`` (HF repo ``yzd-v/DWPose``)
            under ``<models_dir>/dwpose/``.
* ``insightface`` a model pack at ``<models_dir>/insightface/models/<pack>/*.onnx``.

Where a Hugging Face component is looked for, in order: an explicit local folder; the mirror that
``dwm models`` writes (``<models_dir>/hf/<repo id>/<subfolder>``); the Hugging Face cache. With
``HF_HUB_OFFLINE=1`` nothing is downloaded and a missing component raises
:class:`MissingWeightError`, whose one-line message names the id/file, where it goes, and says
``just models`` downloads it. Without it, a missing HF component is fetched into the HF cache.

``profile="tiny"`` replaces the defaults with random-init models of the same classes and stand-in
ONNX files (:mod:`dwm.shared.tiny_models`, :mod:`dwm.shared.onnx_standins`), built once into
``<models_dir>/tiny`` and then loaded through the same ``from_pretrained`` code. Explicit
``vae``/``clip``/``unet`` overrides are honoured in both profiles.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserFacingError
from .config import ModelsConfig

COMPONENTS = ("vae", "clip", "unet", "dwpose", "insightface")
# component -> subfolder of the SVD repo
SVD_SUBFOLDERS = {"vae": "vae", "clip": "image_encoder", "unet": "unet"}
DWPOSE_REPO = "yzd-v/DWPose"
INSIGHTFACE_RELEASES = "https://github.com/deepinsight/insightface/releases"
# CLIP's normalisation (OpenAI); SVD's feature extractor uses the same numbers.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny", "AutoencoderKLTemporalDecoder")

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(/[\w.\-/]+)?$")


class MissingWeightError(UserFacingError, FileNotFoundError):
    """A pretrained file is not here. The message names it, where it goes, and `just models`."""


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
def _offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    if env in ("1", "ON", "YES", "TRUE"):
        return True
    if env in ("0", "OFF", "NO", "FALSE"):
        return False
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _models_dir(cfg: ModelsConfig) -> Path:
    return Path(cfg.models_dir).expanduser().absolute()


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors*"))


def _variant(folder: Path) -> str | None:
    """None when plain safetensors are there; "fp16" when only the fp16 variant is."""
    files = [p.name for p in folder.glob("*.safetensors*")]
    if any(".fp16." not in f for f in files):
        return None
    return "fp16" if files else None


def _hf_mirror(cfg: ModelsConfig, repo: str, sub: str | None) -> Path:
    d = _models_dir(cfg) / "hf" / repo
    return d / sub if sub else d


@contextlib.contextmanager
def _file_lock(path: Path):
    """Inter-process lock (fcntl) so parallel workers do not build the tiny models twice."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------
# tiny profile
# ----------------------------------------------------------------------------------------------
_STAMP_CACHE: list[str] = []


def _tiny_stamp() -> str:
    """Changes whenever the tiny definitions (or the libraries that serialise them) change."""
    if _STAMP_CACHE:
        return _STAMP_CACHE[0]
    from importlib.metadata import version

    from . import onnx_standins, tiny_models

    h = hashlib.sha256()
    for mod in (tiny_models, onnx_standins):
        h.update(Path(mod.__file__).read_bytes())
    # package metadata, not imports: the ONNX-only callers need not import diffusers
    h.update(" ".join(version(p) for p in ("diffusers", "transformers", "onnx")).encode())
    _STAMP_CACHE.append(f"{tiny_models.TINY_VERSION}-{h.hexdigest()[:16]}")
    return _STAMP_CACHE[0]


def build_tiny(models_dir: str | os.PathLike) -> Path:
    """Build (once) the tiny models and stand-in ONNX files; returns ``<models_dir>/tiny``.

    Built in a temporary folder and renamed into place, so a crash never leaves a half-built
    tree; a stamp makes a changed definition rebuild.
    """
    models_dir = Path(models_dir).expanduser().absolute()
    root = models_dir / "tiny"
    stamp = _tiny_stamp()
    stamp_file = root / "STAMP"
    if stamp_file.is_file() and stamp_file.read_text().strip() == stamp:
        return root
    from . import onnx_standins, tiny_models

    with _file_lock(models_dir / ".tiny.lock"):
        if stamp_file.is_file() and stamp_file.read_text().strip() == stamp:
            return root  # another process built it while we waited
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=models_dir))
        tmp.chmod(0o755)  # mkdtemp makes it private; the tree is meant to be shared
        try:
            tiny_models.save_all(tmp)
            onnx_standins.build_all(tmp)
            (tmp / "STAMP").write_text(stamp + "\n")
            old = None
            if root.exists():
                old = models_dir / f".tiny-old-{uuid.uuid4().hex[:8]}"
                root.rename(old)
            tmp.rename(root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return root


# ----------------------------------------------------------------------------------------------
# resolving a diffusers/transformers component to a local folder
# ----------------------------------------------------------------------------------------------
def _spec(cfg: ModelsConfig, component: str) -> tuple[str, str | None]:
    """(spec, default subfolder) for vae/clip/unet: the override, else the SVD repo."""
    override = getattr(cfg, component)
    if override:
        return override, None
    return cfg.svd, SVD_SUBFOLDERS[component]


def _local_candidates(spec: str, cfg: ModelsConfig) -> list[Path]:
    p = Path(spec).expanduser()
    return [p] if p.is_absolute() else [p, _models_dir(cfg) / p]


def _looks_local(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or not _HF_ID.match(spec)


def _pick_folder(folder: Path, default_sub: str | None, component: str) -> Path:
    """A folder holding config.json, or a pipeline folder holding the component's subfolder."""
    subs = [default_sub] if default_sub else []
    subs.append(SVD_SUBFOLDERS[component])
    if (folder / "config.json").is_file():
        return folder
    for sub in subs:
        if (folder / sub / "config.json").is_file():
            return folder / sub
    raise MissingWeightError(
        f"missing weight: models.{component} folder {folder} has no config.json (nor a "
        f"{subs[-1]}/ subfolder with one); save the model there with save_pretrained, or run "
        f"`just models` to download the default weights"
    )


def _download_hf(repo: str, sub: str | None, component: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = [f"{sub}/config.json", f"{sub}/*.safetensors*"] if sub else [
        "config.json", "*.safetensors*"]
    try:
        snap = snapshot_download(repo, allow_patterns=patterns,
                                 ignore_patterns=["*.fp16.safetensors"])
    except Exception as e:  # network, gated repo, bad id: one clear line
        raise MissingWeightError(
            f"missing weight: could not download {component} '{repo}'"
            f"{f' (subfolder {sub})' if sub else ''} from Hugging Face ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); gated repos need the license accepted "
            f"on huggingface.co and `hf auth login`; `just models` downloads everything"
        ) from None
    folder = Path(snap) / sub if sub else Path(snap)
    if not _has_weights(folder):
        raise MissingWeightError(
            f"missing weight: '{repo}'{f' subfolder {sub}' if sub else ''} has no config.json + "
            f"safetensors weights for {component}"
        )
    return folder


def _resolve_hf(cfg: ModelsConfig, component: str, repo: str, sub: str | None,
                download: bool) -> Path:
    mirror = _hf_mirror(cfg, repo, sub)
    if _has_weights(mirror):
        return mirror
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo, f"{sub}/config.json" if sub else "config.json")
    if isinstance(hit, str) and _has_weights(Path(hit).parent):
        return Path(hit).parent
    if download and not _offline():
        return _download_hf(repo, sub, component)
    where = f"'{repo}'" + (f" subfolder '{sub}'" if sub else "")
    why = "HF_HUB_OFFLINE=1" if _offline() else "not downloaded yet"
    raise MissingWeightError(
        f"missing weight: {component} = Hugging Face {where} is neither in {mirror} nor in the "
        f"Hugging Face cache ({why}); run `just models` (dwm models models_dir="
        f"{cfg.models_dir}) to download it there, or set models.{component}=/a/local/folder"
    )


def component_dir(cfg: ModelsConfig, component: str, download: bool = True) -> Path:
    """The local folder (config.json + safetensors) of vae / clip / unet.

    ``download``: when online (HF_HUB_OFFLINE unset), fetch a missing HF component into the cache.
    """
    if component not in SVD_SUBFOLDERS:
        raise ValueError(f"component_dir: '{component}' is not one of {list(SVD_SUBFOLDERS)}")
    spec, default_sub = _spec(cfg, component)
    if not getattr(cfg, component) and cfg.profile == "tiny":
        return build_tiny(cfg.models_dir) / SVD_SUBFOLDERS[component]
    for cand in _local_candidates(spec, cfg):
        if cand.is_dir():
            return _pick_folder(cand, default_sub, component)
    if _looks_local(spec):
        raise MissingWeightError(
            f"missing weight: models.{'svd' if default_sub else component} folder '{spec}' "
            f"does not "
            f"exist; point it at a folder saved with save_pretrained, or leave it empty and run "
            f"`just models` to download the default weights"
        )
    parts = spec.split("/")
    repo = "/".join(parts[:2])
    sub = "/".join(parts[2:]) or default_sub
    return _resolve_hf(cfg, component, repo, sub, download)


# ----------------------------------------------------------------------------------------------
# ONNX components
# ----------------------------------------------------------------------------------------------
def _under_models(cfg: ModelsConfig, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else _models_dir(cfg) / p


def dwpose_paths(cfg: ModelsConfig) -> tuple[Path, Path]:
    """(detector yolox_l.onnx, pose dw-ll_ucoco_384.onnx). Raises MissingWeightError if absent
    (rtmlib would otherwise try to download a path it does not find)."""
    if cfg.profile == "tiny":
        root = build_tiny(cfg.models_dir) / "dwpose"
        return root / "yolox_l.onnx", root / "dw-ll_ucoco_384.onnx"
    det, pose = _under_models(cfg, cfg.dwpose_det), _under_models(cfg, cfg.dwpose_pose)
    for p in (det, pose):
        if not p.is_file():
            raise MissingWeightError(
                f"missing weight: DWpose file {p} not found; `just models` downloads {p.name} "
                f"from the Hugging Face repo {DWPOSE_REPO} into {p.parent} (or put it there by "
                f"hand, or set models.dwpose_det / models.dwpose_pose)"
            )
    return det, pose


def insightface_root(cfg: ModelsConfig) -> tuple[str, str]:
    """(root, pack name) for ``FaceAnalysis(name=pack, root=root)``.

    insightface looks for ``<root>/models/<pack>/*.onnx``; an empty pack folder makes it fail
    with a bare AssertionError, so it is checked here first.
    """
    pack = cfg.insightface_pack
    if cfg.profile == "tiny":
        return str(build_tiny(cfg.models_dir) / "insightface"), pack
    root = _models_dir(cfg) / "insightface"
    pack_dir = root / "models" / pack
    if not any(pack_dir.glob("*.onnx")):
        state = "is empty" if pack_dir.is_dir() else "does not exist"
        raise MissingWeightError(
            f"missing weight: insightface pack '{pack}' ({pack_dir} {state}, it needs the pack's "
            f"*.onnx files); `just models` fetches it, or download {pack}.zip from insightface's "
            f"GitHub releases ({INSIGHTFACE_RELEASES}) and unzip it so the .onnx files sit in "
            f"{pack_dir}"
        )
    return str(root), pack


# ----------------------------------------------------------------------------------------------
# availability check, before any work starts
# ----------------------------------------------------------------------------------------------
def ensure_available(cfg: ModelsConfig, components: Iterable[str] | str) -> None:
    """Fail early, with one clear line, if any of ``components`` is not here.

    Names: "vae", "clip", "unet", "dwpose", "insightface". In the tiny profile this builds the
    tiny models (seconds, once). Online (HF_HUB_OFFLINE unset) a missing HF component is
    downloaded into the Hugging Face cache.
    """
    if isinstance(components, str):
        components = [components]
    components = list(components)
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise ValueError(f"ensure_available: unknown component(s) {unknown}; known: {COMPONENTS}")
    if cfg.profile == "tiny":
        build_tiny(cfg.models_dir)
    for c in components:
        if c in SVD_SUBFOLDERS:
            component_dir(cfg, c, download=True)
        elif c == "dwpose":
            dwpose_paths(cfg)
        else:
            insightface_root(cfg)


# ----------------------------------------------------------------------------------------------
# loaders
# ----------------------------------------------------------------------------------------------
def _read_config(folder: Path) -> dict:
    with open(folder / "config.json") as fh:
        return json.load(fh)


def load_vae(cfg: ModelsConfig, device="cpu", dtype=None) -> tuple[Any, float]:
    """(vae, scaling_factor). The class (AutoencoderKL, AutoencoderTiny,
    AutoencoderKLTemporalDecoder) comes from the folder's config.json ``_class_name``.
    Use :func:`encode_latents` / :func:`decode_latents` to hide their differences."""
    import diffusers
    import torch

    folder = component_dir(cfg, "vae")
    name = _read_config(folder).get("_class_name", "")
    if name not in VAE_CLASSES:
        raise UserFacingError(
            f"{folder}/config.json: _class_name '{name}' is not a supported VAE ({VAE_CLASSES})"
        )
    vae = getattr(diffusers, name).from_pretrained(
        folder, torch_dtype=dtype or torch.float32, use_safetensors=True, variant=_variant(folder)
    )
    vae = vae.to(device).eval()
    return vae, float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)


def load_clip(cfg: ModelsConfig, device="cpu", dtype=None) -> tuple[Any, Callable]:
    """(CLIPVisionModelWithProjection, preprocess_fn).

    ``preprocess_fn(list of HxWx3 uint8 RGB arrays) -> [N,3,S,S]`` tensor on the model's device
    and dtype: resized to the model's ``image_size`` (stretched with antialiasing, as SVD's
    pipeline does) and normalised with CLIP's mean/std. No processor config is needed.
    """
    import torch
    from transformers import CLIPVisionModelWithProjection

    folder = component_dir(cfg, "clip")
    model = CLIPVisionModelWithProjection.from_pretrained(
        folder, dtype=dtype or torch.float32, use_safetensors=True, variant=_variant(folder)
    ).to(device).eval()
    return model, make_clip_preprocess(model)


def make_clip_preprocess(model) -> Callable:
    import torch
    import torch.nn.functional as F

    size = int(model.config.image_size)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    def preprocess(images: Sequence[np.ndarray]) -> torch.Tensor:
        p = next(model.parameters())
        out = []
        for img in images:
            arr = np.asarray(img)
            if arr.ndim != 3 or arr.shape[2] != 3:
                raise ValueError(f"CLIP preprocess expects HxWx3 RGB images, got {arr.shape}")
            t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None].float()
            t = t / 255.0 if arr.dtype == np.uint8 else t
            t = F.interpolate(t, size=(size, size), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 1)
            out.append((t - mean) / std)
        if not out:
            raise ValueError("CLIP preprocess got no images")
        return torch.cat(out).to(device=p.device, dtype=p.dtype)

    preprocess.image_size = size  # type: ignore[attr-defined]
    return preprocess


def load_unet(cfg: ModelsConfig, device="cpu", dtype=None):
    """UNetSpatioTemporalConditionModel from the resolved folder."""
    import torch
    from diffusers import UNetSpatioTemporalConditionModel

    folder = component_dir(cfg, "unet")
    return UNetSpatioTemporalConditionModel.from_pretrained(
        folder, torch_dtype=dtype or torch.float32, use_safetensors=True, variant=_variant(folder)
    ).to(device).eval()


def unet_config(cfg: ModelsConfig) -> dict:
    """The UNet's config.json as a dict (no weights loaded)."""
    return _read_config(component_dir(cfg, "unet"))


# ----------------------------------------------------------------------------------------------
# VAE helpers that hide the class differences
# ----------------------------------------------------------------------------------------------
def vae_kind(vae) -> str:
    """"kl" (AutoencoderKL), "temporal" (AutoencoderKLTemporalDecoder) or "tiny" (TAESD)."""
    name = type(vae).__name__
    return {"AutoencoderTiny": "tiny", "AutoencoderKLTemporalDecoder": "temporal"}.get(name, "kl")


def _to_pixels(images, device, dtype):
    """uint8 NHWC/NCHW or float [0,1] NCHW/NHWC (array or tensor) -> NCHW in [-1, 1]."""
    import torch

    t = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise ValueError(f"expected images [N,H,W,3] or [N,3,H,W], got shape {tuple(t.shape)}")
    if t.shape[1] != 3 and t.shape[-1] == 3:
        t = t.permute(0, 3, 1, 2)
    if t.shape[1] != 3:
        raise ValueError(f"expected 3 colour channels, got shape {tuple(t.shape)}")
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    return (t * 2.0 - 1.0).to(device=device, dtype=dtype)


def _batches(n: int, batch_size: int | None):
    step = n if not batch_size or batch_size <= 0 else batch_size
    return [(i, min(i + step, n)) for i in range(0, n, max(step, 1))]


def encode_latents(vae, images, batch_size: int | None = None, grad: bool = False):
    """Images -> UNSCALED latents (the posterior mean for KL VAEs). Multiply by the scaling
    factor from :func:`load_vae` for diffusion. ``images``: uint8 (0..255) or float (0..1),
    NHWC or NCHW, array or tensor. Small batches are faster on CPU (measured with TAESD: 24
    frames at 512x896 take 44 s in one batch, 32 s in batches of 1, with identical latents)."""
    import torch

    p = next(vae.parameters())
    x = _to_pixels(images, p.device, p.dtype)
    kind = vae_kind(vae)
    out = []
    with contextlib.nullcontext() if grad else torch.no_grad():
        for a, b in _batches(x.shape[0], batch_size):
            enc = vae.encode(x[a:b])
            out.append(enc.latents if kind == "tiny" else enc.latent_dist.mean)
    return torch.cat(out)


def decode_latents(vae, latents, num_frames: int | None = None, batch_size: int | None = None,
                   grad: bool = False):
    """UNSCALED latents [N,4,h,w] -> float images [N,3,8h,8w] in [0, 1].

    The temporal decoder of SVD decodes ``num_frames`` consecutive latents together
    (default: each batch as one clip)."""
    import torch

    p = next(vae.parameters())
    z = latents.to(device=p.device, dtype=p.dtype)
    kind = vae_kind(vae)
    out = []
    with contextlib.nullcontext() if grad else torch.no_grad():
        for a, b in _batches(z.shape[0], batch_size):
            if kind == "temporal":
                frames = num_frames or (b - a)
                x = vae.decode(z[a:b], num_frames=frames).sample
            else:
                x = vae.decode(z[a:b]).sample
            out.append(((x.float() + 1.0) / 2.0).clamp(0, 1))
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# `dwm models`: download the full weights
# ----------------------------------------------------------------------------------------------
def download_plan(cfg: ModelsConfig) -> list[tuple[str, str, Path]]:
    """(component, source, destination) for everything ``dwm models`` fetches."""
    plan: list[tuple[str, str, Path]] = []
    for comp in SVD_SUBFOLDERS:
        spec, default_sub = _spec(cfg, comp)
        if any(c.is_dir() for c in _local_candidates(spec, cfg)) or _looks_local(spec):
            continue  # a local folder: nothing to download
        parts = spec.split("/")
        repo, sub = "/".join(parts[:2]), "/".join(parts[2:]) or default_sub
        plan.append((comp, f"hf://{repo}" + (f"/{sub}" if sub else ""),
                     _hf_mirror(cfg, repo, sub)))
    for path in (cfg.dwpose_det, cfg.dwpose_pose):
        dest = _under_models(cfg, path)
        plan.append(("dwpose", f"hf://{DWPOSE_REPO}/{dest.name}", dest))
    pack = cfg.insightface_pack
    plan.append(("insightface", f"{INSIGHTFACE_RELEASES} {pack}.zip",
                 _models_dir(cfg) / "insightface" / "models" / pack))
    return plan


def _flatten_pack(pack_dir: Path) -> None:
    """Some pack zips hold a folder of the same name: move its .onnx files up one level."""
    nested = pack_dir / pack_dir.name
    if not any(pack_dir.glob("*.onnx")) and nested.is_dir():
        for f in nested.glob("*.onnx"):
            f.rename(pack_dir / f.name)


def download_main(cfg: ModelsConfig) -> int:
    """``dwm models``: print what is fetched and where, then fetch it (needs internet)."""
    if cfg.profile == "tiny":
        root = build_tiny(cfg.models_dir)
        print(f"tiny models and stand-in ONNX files are in {root}")
        return 0
    plan = download_plan(cfg)
    print(f"dwm models: downloading into {_models_dir(cfg)}")
    for comp, src, dest in plan:
        print(f"  {comp:<12} {src}  ->  {dest}")
    # `just` exports HF_HUB_OFFLINE=1 for every recipe; this one command is meant to go online.
    from huggingface_hub import constants, hf_hub_download, snapshot_download

    constants.HF_HUB_OFFLINE = False
    os.environ["HF_HUB_OFFLINE"] = "0"
    failures = []
    for comp, src, dest in plan:
        try:
            if comp in SVD_SUBFOLDERS:
                repo_sub = src.removeprefix("hf://").split("/")
                repo, sub = "/".join(repo_sub[:2]), "/".join(repo_sub[2:])
                local = _hf_mirror(cfg, repo, None)
                patterns = [f"{sub}/config.json", f"{sub}/*.safetensors*"] if sub else [
                    "config.json", "*.safetensors*"]
                snapshot_download(repo, local_dir=local, allow_patterns=patterns,
                                  ignore_patterns=["*.fp16.safetensors"])
            elif comp == "dwpose":
                hf_hub_download(DWPOSE_REPO, dest.name, local_dir=dest.parent)
            else:
                from insightface.utils.storage import download

                download("models", dest.name, root=str(dest.parent.parent))
                _flatten_pack(dest)
            print(f"  ok  {comp}: {dest}")
        except Exception as e:  # keep going: report every failure at the end
            first_line = str(e).splitlines()[0] if str(e) else ""
            failures.append(f"{comp} ({src}): {type(e).__name__}: {first_line}")
    if failures:
        raise UserFacingError(
            "could not download: " + "; ".join(failures) + ". Needs internet; SVD is gated "
            "(accept its license on huggingface.co, then `hf auth login`); insightface packs: "
            f"download <pack>.zip from {INSIGHTFACE_RELEASES} and unzip into "
            f"{_models_dir(cfg) / 'insightface' / 'models'}/<pack>/"
        )
    print("all weights are in place")
    return 0
