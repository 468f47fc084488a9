"""Paths that may be local or fsspec URLs (s3://, gs://, memory://, file://), and atomic writes.

Everything that writes a final artefact (shard, manifest, report, checkpoint file) goes through
:func:`atomic_write` / :func:`atomic_write_bytes`: the bytes land under a temporary name first and
appear under their final name only when complete, so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import fsspec

TMP_MARK = ".tmp-"  # every temporary file carries this in its name; cleanup looks for it


def is_url(path: str | os.PathLike) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def fs_and_path(path: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, _, paths = fsspec.get_fs_token_paths(str(path))
    return fs, paths[0]


def join(base: str | os.PathLike, *parts: str) -> str:
    base = str(base)
    if "://" in base:  # a URL, file:// included (Path would fold its "//")
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base, *parts))


def exists(path: str | os.PathLike) -> bool:
    fs, p = fs_and_path(path)
    return fs.exists(p)


def makedirs(path: str | os.PathLike) -> None:
    fs, p = fs_and_path(path)
    fs.makedirs(p, exist_ok=True)


def read_bytes(path: str | os.PathLike) -> bytes:
    fs, p = fs_and_path(path)
    with fs.open(p, "rb") as fh:
        return fh.read()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write to ``<dir>/.tmp-<name>-<uuid>`` then rename to ``path``; on error remove the temp."""
    fs, final = fs_and_path(path)
    parent = final.rsplit("/", 1)[0] if "/" in final else "."
    fs.makedirs(parent, exist_ok=True)
    name = final.rsplit("/", 1)[-1]
    tmp = f"{parent}/{TMP_MARK}{name}-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, mode) as fh:
            yield fh
            if hasattr(fh, "flush"):
                fh.flush()
            if hasattr(fh, "fileno"):
                with contextlib.suppress(Exception):
                    os.fsync(fh.fileno())
        fs.mv(tmp, final)
    except BaseException as e:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        if isinstance(e, OSError) and e.errno and e.filename is None:
            # e.g. ENOSPC from write(): name the file that could not be written
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# zarr's LocalStore writes ``<name>.<uuid hex>.partial`` and renames it: a kill leaves it behind
_ZARR_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")


def remove_temporaries(directory: str | os.PathLike) -> int:
    """Delete leftovers of interrupted atomic writes under ``directory`` (ours and zarr's);
    returns how many."""
    fs, p = fs_and_path(directory)
    if not fs.exists(p):
        return 0
    n = 0
    for f in sorted(fs.find(p, withdirs=True), key=len):
        name = f.rsplit("/", 1)[-1]
        if (name.startswith(TMP_MARK) or _ZARR_PARTIAL.search(name)) and fs.exists(f):
            fs.rm(f, recursive=True)
            n += 1
    return n
