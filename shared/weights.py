"""Where each pretrained component's weights are, and ``dwm models``, which downloads them.

Components (names used by :func:`ensure_available`):

* ``vae``   SVD's ``AutoencoderKLTemporalDecoder`` (``<svd>/vae``), or any local/HF folder
            holding an ``AutoencoderKL`` or ``AutoencoderTiny`` (TAESD); loaded by :mod:`.vae`.
* ``clip``  ``CLIPVisionModelWithProjection`` (``<svd>/image_encoder``); :mod:`.pretrained`.
* ``unet``  ``UNetSpatioTemporalConditionModel`` (``<svd>/unet``); :mod:`.pretrained`.
* ``dwpose`` ONNX files ``yolox_l.onnx`` + ``dw-ll_ucoco_384.onnx`` (HF repo ``yzd-v/DWPose``)
            under ``<models_dir>/dwpose/``.
* ``insightface`` a model pack at ``<models_dir>/insightface/models/<pack>/*.onnx``.

A Hugging Face component is looked for, in order, in: an explicit local folder; the mirror that
``dwm models`` writes (``<models_dir>/hf/<repo id>/<subfolder>``); the Hugging Face cache. With
``HF_HUB_OFFLINE=1`` nothing is downloaded and a missing component raises
:class:`MissingWeightError`, whose one-line message names the id/file, where it goes, and says
``just models`` downloads it. Without it, a missing HF component is fetched into the HF cache.

``profile="tiny"`` points every default at the fixtures of :mod:`dwm.shared.tiny`, loaded
through the same ``from_pretrained`` code. Explicit ``vae``/``clip``/``unet`` overrides are
honoured in both profiles.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from huggingface_hub import constants, hf_hub_download, snapshot_download, try_to_load_from_cache

from .config import ModelsConfig
from .errors import UserFacingError
from .tiny import build_tiny

COMPONENTS = ("vae", "clip", "unet", "dwpose", "insightface")
# component -> subfolder of the SVD repo
SVD_SUBFOLDERS = {"vae": "vae", "clip": "image_encoder", "unet": "unet"}
DWPOSE_REPO = "yzd-v/DWPose"
INSIGHTFACE_RELEASES = "https://github.com/deepinsight/insightface/releases"

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
    return bool(constants.HF_HUB_OFFLINE)


def _models_dir(cfg: ModelsConfig) -> Path:
    return Path(cfg.models_dir).expanduser().absolute()


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors*"))


def safetensors_variant(folder: Path) -> str | None:
    """None when plain safetensors are there; "fp16" when only the fp16 variant is."""
    files = [p.name for p in folder.glob("*.safetensors*")]
    if any(".fp16." not in f for f in files):
        return None
    return "fp16" if files else None


def _hf_mirror(cfg: ModelsConfig, repo: str, sub: str | None) -> Path:
    d = _models_dir(cfg) / "hf" / repo
    return d / sub if sub else d


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
# config.json of a located folder (the loaders in vae.py and pretrained.py read it too)
# ----------------------------------------------------------------------------------------------
def read_config(folder: Path) -> dict:
    with open(folder / "config.json") as fh:
        return json.load(fh)


def unet_config(cfg: ModelsConfig) -> dict:
    """The UNet's config.json as a dict (no weights loaded)."""
    return read_config(component_dir(cfg, "unet"))


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
                # deferred: insightface is optional and only this download uses it here
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
