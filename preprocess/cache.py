"""The feature cache: one Zarr v3 hierarchy, content-addressed.

Layout (readable with plain ``zarr.open_group(<cache>)``; every level has group attributes)::

    <cache>/                                 group  {format_version}
      <video sha256>/                        group  {sources: [...]}
        <extractor>-<key>/                   group  {name, version, config, inputs, key, ...}
          <array>                            array  attrs: {doc}

``key`` is a hash of (extractor name, version, config, keys of its inputs), so a change of the
VAE changes the latents' key only, an unchanged input finds every key present, and the same bytes
under two names (or in two datasets sharing a cache) are computed once. An entry is written under
``.tmp-<extractor>-<key>-<uuid>`` and renamed when complete, so a reader never sees half of one;
leftovers of a killed run are removed with :func:`dwm.shared.storage.remove_temporaries`.

The root may be a local folder or an fsspec URL (s3://, gs://, memory://, file://). On a URL an
entry is written in place (object stores have no atomic rename) and only its ``complete``
attribute, set last, makes it count: an interrupted entry is recomputed.
"""

from __future__ import annotations

import hashlib
import contextlib
import json
import os
import shutil
import uuid
from typing import Any

import numpy as np
import zarr
import zarr.codecs as zc
from zarr.storage import FsspecStore
from zarr.storage import LocalStore

from dwm.shared import storage
from dwm.shared.contract import CACHE_FORMAT_VERSION
from dwm.shared.storage import TMP_MARK


def entry_key(name: str, version: str, config: Any, inputs: dict[str, str]) -> str:
    blob = json.dumps({"name": name, "version": version, "config": config, "inputs": inputs},
                      sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def array_digest(*arrays: np.ndarray) -> str:
    """Content hash of arrays: downstream keys depend on *values* (e.g. the crop boxes)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _compressors(level: int = 3) -> list:
    return [zc.ZstdCodec(level=level)]


class EntryWriter:
    """Arrays of one extractor result under a temporary name; :meth:`commit` renames it."""

    def __init__(self, cache: FeatureCache, video_hash: str, name: str, key: str,
                 attrs: dict[str, Any]):
        self.cache = cache
        self.final = cache.entry_path(video_hash, name, key)
        cache.ensure_video_group(video_hash)
        if cache.remote:  # written in place; "complete" (set by commit) is the commit mark
            self.tmp = self.final
            if cache.fs.exists(self.final):
                cache.fs.rm(self.final, recursive=True)
        else:
            parent = os.path.dirname(self.final)
            self.tmp = os.path.join(parent, f"{TMP_MARK}{name}-{key}-{uuid.uuid4().hex[:8]}")
        self.group = zarr.open_group(store=cache.store(self.tmp), mode="w",
                                     attributes={**attrs, "complete": False})
        self.attrs = attrs
        self.arrays: dict[str, zarr.Array] = {}

    def create(self, name: str, shape: tuple[int, ...], dtype: Any, chunks: tuple[int, ...] | None = None,
               doc: str = "", **attrs: Any) -> zarr.Array:
        shape = tuple(int(s) for s in shape)
        if chunks is None:
            chunks = shape if shape else ()
        # clamp chunks to the shape, except along an empty (growable) axis: there the asked
        # chunk stays, or every later append would write one chunk per element
        chunks = tuple(max(1, min(int(c), s) if s > 0 else int(c)) for c, s in zip(chunks, shape))
        arr = self.group.create_array(name, shape=shape, chunks=chunks or None, dtype=np.dtype(dtype),
                                      compressors=_compressors(), fill_value=0,
                                      attributes={"doc": doc, **attrs})
        self.arrays[name] = arr
        return arr

    def put(self, name: str, data: np.ndarray, doc: str = "", chunks=None, **attrs: Any) -> None:
        data = np.asarray(data)
        arr = self.create(name, data.shape, data.dtype, chunks or data.shape, doc, **attrs)
        if data.size:
            arr[...] = data

    def commit(self, **attrs: Any) -> str:
        self.group.attrs.update({**attrs, "complete": True})
        if self.cache.remote:
            return self.final
        if os.path.exists(self.final):  # a concurrent writer won; its result is the same
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            os.rename(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        if self.cache.remote:
            with contextlib.suppress(Exception):
                self.cache.fs.rm(self.tmp, recursive=True)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


class FeatureCache:
    def __init__(self, root: str):
        root = str(root)
        if root.startswith("file://"):  # a local folder: keep the atomic renames
            root = root[len("file://"):]
        self.remote = storage.is_url(root)
        if self.remote:
            self.fs, path = storage.fs_and_path(root)
            self.protocol = str(root).split("://", 1)[0]
            self.root = path.rstrip("/")
            self.fs.makedirs(self.root, exist_ok=True)
        else:
            self.fs = None
            self.root = os.path.abspath(root)
            os.makedirs(self.root, exist_ok=True)
        if not self._exists(self._join(self.root, "zarr.json")):
            zarr.open_group(store=self.store(self.root), mode="a",
                            attributes={"format_version": CACHE_FORMAT_VERSION,
                                        "doc": "dwm feature cache: <video sha256>/<extractor>-<key>"})

    # -- paths and stores (local folder or fsspec URL) -------------------------------------
    def _join(self, *parts: str) -> str:
        return "/".join(parts) if self.remote else os.path.join(*parts)

    def _exists(self, path: str) -> bool:
        return self.fs.exists(path) if self.remote else os.path.exists(path)

    def store(self, path: str, read_only: bool = False):
        if self.remote:
            return FsspecStore.from_url(f"{self.protocol}://{path}", read_only=read_only)
        return LocalStore(path, read_only=read_only)

    def video_dir(self, video_hash: str) -> str:
        return self._join(self.root, video_hash)

    def entry_path(self, video_hash: str, name: str, key: str) -> str:
        return self._join(self.video_dir(video_hash), f"{name}-{key}")

    def ensure_video_group(self, video_hash: str) -> None:
        d = self.video_dir(video_hash)
        if not self._exists(self._join(d, "zarr.json")):
            zarr.open_group(store=self.store(d), mode="a", attributes={"video_hash": video_hash})

    def has(self, video_hash: str, name: str, key: str) -> bool:
        meta = self._join(self.entry_path(video_hash, name, key), "zarr.json")
        try:
            if self.remote:
                text = self.fs.cat_file(meta)
            else:
                with open(meta, "rb") as fh:
                    text = fh.read()
            return bool(json.loads(text).get("attributes", {}).get("complete"))
        except (OSError, ValueError):  # missing (FileNotFoundError) or half-written
            return False

    def open(self, video_hash: str, name: str, key: str) -> zarr.Group:
        return zarr.open_group(store=self.store(self.entry_path(video_hash, name, key),
                                                read_only=True), mode="r")

    def writer(self, video_hash: str, name: str, key: str, attrs: dict[str, Any]) -> EntryWriter:
        return EntryWriter(self, video_hash, name, key, attrs)

    def add_source(self, video_hash: str, source: str) -> None:
        """Remember the file names this content was seen under (informational)."""
        self.ensure_video_group(video_hash)
        g = zarr.open_group(store=self.store(self.video_dir(video_hash)), mode="a")
        sources = list(g.attrs.get("sources", []))
        if source not in sources:
            g.attrs["sources"] = sorted([*sources, source])[:64]

    def size_bytes(self) -> int:
        if self.remote:
            return int(self.fs.du(self.root, total=True))
        total = 0
        for dirpath, _dirs, files in os.walk(self.root):
            total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
        return total
