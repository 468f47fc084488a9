"""The ``tiny`` profile's fixtures: random-init models of the full models' classes
(:mod:`.models`) and stand-in ONNX files for DWpose and insightface (:mod:`.onnx`), built once
into ``<models_dir>/tiny`` so that tests and the demo run the real loaders with no download.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
import uuid
from importlib.metadata import version
from pathlib import Path

from . import models, onnx

_STAMP_CACHE: list[str] = []


def _stamp() -> str:
    """Changes whenever the tiny definitions (or the libraries that serialise them) change."""
    if not _STAMP_CACHE:
        h = hashlib.sha256()
        for mod in (models, onnx):
            h.update(Path(mod.__file__).read_bytes())
        h.update(" ".join(version(p) for p in ("diffusers", "transformers", "onnx")).encode())
        _STAMP_CACHE.append(f"{models.TINY_VERSION}-{h.hexdigest()[:16]}")
    return _STAMP_CACHE[0]


@contextlib.contextmanager
def _file_lock(path: Path):
    """Inter-process lock so parallel workers do not build the tiny models twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_tiny(models_dir: str | os.PathLike) -> Path:
    """Build (once) the tiny models and stand-in ONNX files; returns ``<models_dir>/tiny``.

    Built in a temporary folder and renamed into place, so a crash never leaves a half-built
    tree; a stamp makes a changed definition rebuild.
    """
    models_dir = Path(models_dir).expanduser().absolute()
    root = models_dir / "tiny"
    stamp_file = root / "STAMP"
    if stamp_file.is_file() and stamp_file.read_text().strip() == _stamp():
        return root
    with _file_lock(models_dir / ".tiny.lock"):
        if stamp_file.is_file() and stamp_file.read_text().strip() == _stamp():
            return root  # another process built it while we waited
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=models_dir))
        tmp.chmod(0o755)  # mkdtemp makes it private; the tree is meant to be shared
        try:
            models.save_all(tmp)
            onnx.build_all(tmp)
            (tmp / "STAMP").write_text(_stamp() + "\n")
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
