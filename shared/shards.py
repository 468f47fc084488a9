"""WebDataset shards and their manifest: the only way training sees preprocessed data.

A shard is a plain POSIX tar readable with ``tar`` and ``webdataset``. Each sample is a group of
members ``<key>.json`` and ``<key>.<feature>.npy`` (``np.save`` with ``allow_pickle=False``) or
``<key>.<feature>.npy.zst`` (zstd frames of ``.npy`` chunks, offsets in the ``.json``), as the
contract declares each feature's encoding (:mod:`dwm.shared.contract`). Readable with
``webdataset``, ``numpy`` and ``zstandard`` alone. Tars are written deterministically (sorted
members, zero mtimes/uids) so that the same samples give the same bytes, and atomically (temp
name, then rename). ``manifest.json`` is written last.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import tarfile
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import zstandard

from . import storage
from .contract import (CHUNK_FRAMES, CHUNK_ROW, CHUNK_WHOLE, ENCODINGS, FEATURE_BY_NAME,
                       SHARD_FORMAT_VERSION, member_name)
from .errors import ManifestError

MANIFEST_NAME = "manifest.json"


@dataclass
class ShardInfo:
    name: str
    split: str
    samples: int
    frames: int
    bytes: int
    sha256: str


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes | memoryview) -> np.ndarray:
    """The array of an ``.npy`` member, as a read-only view of ``data`` (no copy), so that a
    reader that slices a window touches only the window's bytes. Object dtypes (pickle) are
    refused, as ``np.load(allow_pickle=False)`` does."""
    mv = memoryview(data).cast("B")
    if bytes(mv[:6]) != b"\x93NUMPY" or len(mv) < 10:
        raise ValueError("not an .npy array (bad magic)")
    major = mv[6]
    if major == 1:
        start = 10 + int.from_bytes(mv[8:10], "little")
    elif major in (2, 3):
        start = 12 + int.from_bytes(mv[8:12], "little")
    else:
        raise ValueError(f"unsupported .npy format version {major}")
    shape, fortran, dtype = npy_header(mv[:start].tobytes())
    if dtype.hasobject:
        raise ValueError("the .npy array holds Python objects: a pickle, refused (allow_pickle=False)")
    count = int(np.prod(shape, dtype=np.int64))
    if len(mv) - start < count * dtype.itemsize:
        raise ValueError(f".npy array truncated: {len(mv) - start} data bytes for shape {shape} "
                         f"{dtype}")
    arr = np.frombuffer(mv, dtype=dtype, count=count, offset=start)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


def npy_header(head: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of a whole ``.npy`` header (magic to padding). Samples of
    a dataset repeat a few headers: each is parsed once (numpy parses with ``ast``, ~0.1 ms)."""
    got = _NPY_HEADERS.get(head)
    if got is None:
        fp = io.BytesIO(head)
        version = np.lib.format.read_magic(fp)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        if len(_NPY_HEADERS) > 4096:
            _NPY_HEADERS.clear()
        got = _NPY_HEADERS[head] = read_header(fp)
    return got


_NPY_HEADERS: dict[bytes, tuple] = {}  # .npy header bytes -> (shape, fortran_order, dtype)

# Bytes a decompressed chunk may have beyond its rows' data: the .npy header (64-byte aligned,
# at most a few hundred bytes for any shape here). A frame that claims more is refused before
# anything is allocated (no decompression bomb).
_NPY_HEADER_SLACK = 4096
_ZSTD = threading.local()  # one decompression context per thread


class ChunkedRows:
    """An ``npy.zst`` member, decompressed chunk by chunk as rows are asked for.

    ``rows[i]`` and ``rows[a:b]`` decompress only the chunks holding those rows (a stage-C window
    of 24 frames out of 150 touches 3 to 4 chunks of 8); ``np.asarray(rows)`` decompresses all.
    Offsets, each frame's declared size, the arrays' dtype and shape are checked against the
    sample's ``chunks`` entry; a mismatch raises :class:`ManifestError` naming the member."""

    def __init__(self, data: Any, info: dict[str, Any], where: str):
        self.data, self.where = memoryview(data).cast("B"), where
        try:
            self.shape = tuple(int(v) for v in info["shape"])
            self.dtype = np.dtype(str(info["dtype"]))
            self.rows = int(info["rows"])
            self.offsets = [int(v) for v in info["offsets"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{where}: bad chunk table ({e})") from None
        n = self.shape[0] if self.shape else 0
        chunks = -(-n // self.rows) if self.rows > 0 else -1
        if (self.dtype.hasobject or not self.shape or chunks != len(self.offsets) - 1
                or self.offsets[0] != 0 or self.offsets[-1] != len(self.data)
                or any(b < a for a, b in zip(self.offsets, self.offsets[1:]))):
            raise ManifestError(f"{where}: chunk table does not match the member "
                                f"({len(self.data)} bytes, shape {self.shape}, rows {self.rows})")
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _frame(self, c: int) -> tuple[memoryview, int, int]:
        """(zstd frame of chunk ``c``, its rows, its declared decompressed size), the size
        checked against what its rows can hold before anything is decompressed."""
        frame = self.data[self.offsets[c] : self.offsets[c + 1]]
        want = min(self.rows, self.shape[0] - c * self.rows)
        limit = want * self.row_bytes + _NPY_HEADER_SLACK
        try:
            size = zstandard.frame_content_size(frame)
        except zstandard.ZstdError as e:
            raise ManifestError(f"{self.where}: chunk {c} unreadable ({e})") from None
        if not 0 < size <= limit:
            raise ManifestError(f"{self.where}: chunk {c} unreadable (frame declares {size} "
                                f"bytes, at most {limit} expected)")
        return frame, want, size

    def chunk(self, c: int) -> np.ndarray:
        """Rows ``c * rows`` up to ``(c + 1) * rows`` of the array."""
        got = self._cache.get(c)
        if got is not None:
            return got
        frame, want, size = self._frame(c)
        try:
            dctx = getattr(_ZSTD, "dctx", None) or _new_dctx()
            arr = decode_npy(dctx.decompress(frame, max_output_size=size))
        except (zstandard.ZstdError, ValueError) as e:
            raise ManifestError(f"{self.where}: chunk {c} unreadable ({e})") from None
        if arr.dtype != self.dtype or arr.shape != (want, *self.shape[1:]):
            raise ManifestError(f"{self.where}: chunk {c} is {arr.dtype}{list(arr.shape)}, the "
                                f"chunk table says {self.dtype}{[want, *self.shape[1:]]}")
        if len(self._cache) >= 4:  # a window's chunks; older ones are not read again
            self._cache.clear()
        self._cache[c] = arr
        return arr

    def _decompress_into(self, c: int, out: np.ndarray) -> None:
        """Chunk ``c`` decompressed straight into ``out`` (its rows, C-contiguous): a window of
        several chunks is written once, not decompressed and then concatenated (stage A's
        120-frame heatmap windows: 15 MB copied once less per item)."""
        frame, want, size = self._frame(c)
        head_len = size - want * self.row_bytes
        try:
            if head_len <= 0:
                raise ValueError(f"{size} bytes cannot hold {want} rows and a header")
            dctx = getattr(_ZSTD, "dctx", None) or _new_dctx()
            reader = dctx.stream_reader(frame, read_across_frames=False)
            shape, fortran, dtype = npy_header(reader.read(head_len))
            if dtype != self.dtype or tuple(shape) != (want, *self.shape[1:]) or fortran:
                raise ValueError(f"chunk is {dtype}{list(shape)}, the chunk table says "
                                 f"{self.dtype}{[want, *self.shape[1:]]}")
            view, got = memoryview(out).cast("B"), 0
            while got < len(view):
                n = reader.readinto(view[got:])
                if not n:
                    raise ValueError(f"truncated: {got} of {len(view)} data bytes")
                got += n
        except (zstandard.ZstdError, ValueError) as e:
            raise ManifestError(f"{self.where}: chunk {c} unreadable ({e})") from None

    def __getitem__(self, idx: Any) -> np.ndarray:
        n = self.shape[0]
        if isinstance(idx, (int, np.integer)):
            i = int(idx) + (n if idx < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"row {idx} of {n}")
            return self.chunk(i // self.rows)[i % self.rows]
        if isinstance(idx, slice) and idx.step in (None, 1):
            a, b, _ = idx.indices(n)
            if b <= a:
                return np.zeros((0, *self.shape[1:]), self.dtype)
            first, last = a // self.rows, (b - 1) // self.rows
            if first == last:
                lo = first * self.rows
                return self.chunk(first)[a - lo : b - lo]
            out = np.empty((b - a, *self.shape[1:]), self.dtype)
            for c in range(first, last + 1):
                lo, hi = c * self.rows, min(n, (c + 1) * self.rows)
                if a <= lo and hi <= b and c not in self._cache:  # whole chunk: in place
                    self._decompress_into(c, out[lo - a : hi - a])
                else:  # the window's first or last chunk, part of it
                    s0, s1 = max(a, lo), min(b, hi)
                    out[s0 - a : s1 - a] = self.chunk(c)[s0 - lo : s1 - lo]
            return out
        return np.asarray(self)[idx]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self[0 : self.shape[0]] if self.shape[0] else np.zeros(self.shape, self.dtype)
        return arr.astype(dtype) if dtype is not None else arr

    def astype(self, dtype: Any) -> np.ndarray:
        return np.asarray(self).astype(dtype)


def _new_dctx() -> zstandard.ZstdDecompressor:
    _ZSTD.dctx = zstandard.ZstdDecompressor()
    return _ZSTD.dctx


def decode_array(name: str, raw: dict[str, Any], meta: dict[str, Any], where: str,
                 lazy: bool = True) -> np.ndarray | ChunkedRows | None:
    """Feature ``name`` of a raw sample (``{"<name>.<suffix>": bytes, ...}``), in its contract
    encoding; None when the sample has no such member. A member in another encoding than the
    contract's (a shard of an older format) raises one line saying to re-run preprocessing.
    ``lazy``: a multi-chunk npy.zst member comes back as :class:`ChunkedRows` (else decoded)."""
    member = member_name(name)
    if member not in raw:
        others = [m for m in (f"{name}.{suf}" for suf in ENCODINGS.values()) if m in raw]
        if others:
            raise ManifestError(
                f"{where}: {name} is stored as .{others[0].split('.', 1)[1]}, this code reads "
                f".{member.split('.', 1)[1]}: a shard of an older format; re-run preprocessing "
                f"(`just preprocess` rewrites the shards from the cache)")
        return None
    data = raw[member]
    if member.endswith(".npy"):
        return decode_npy(data)
    info = (meta.get("chunks") or {}).get(name)
    if info is None:
        raise ManifestError(f"{where}: {member} has no chunk table in the sample's .json")
    rows = ChunkedRows(data, info, f"{where}:{member}")
    if lazy and len(rows.offsets) > 2:
        return rows
    return np.asarray(rows)


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Every array of a raw sample, decoded whole, plus its ``json`` (tests and tools)."""
    where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
    meta = json.loads(bytes(raw["json"])) if not isinstance(raw["json"], dict) else raw["json"]
    out: dict[str, Any] = {"json": meta}
    for key in raw:
        if key.startswith("__") or key == "json":
            continue
        name = key.split(".", 1)[0]
        out[name] = decode_array(name, raw, meta, where, lazy=False)
    return out


def encode_chunks(arr: np.ndarray, rows: int, level: int) -> tuple[bytes, dict[str, Any]]:
    """An ``npy.zst`` member: zstd frames of ``rows`` consecutive rows each (``rows <= 0``: one
    frame), each a whole ``.npy``; and its ``chunks`` entry (frame byte offsets, len + 1)."""
    arr = np.ascontiguousarray(arr)
    if arr.ndim == 0:
        raise ValueError("npy.zst needs an array with a first axis")
    n = len(arr)
    step = rows if rows > 0 else max(1, n)
    cctx = zstandard.ZstdCompressor(level=level)  # writes the content size into each frame
    parts, offsets = [], [0]
    for i in range(0, n, step):
        part = cctx.compress(encode_npy(arr[i : i + step]))
        parts.append(part)
        offsets.append(offsets[-1] + len(part))
    return b"".join(parts), {"offsets": offsets, "rows": step, "shape": list(arr.shape),
                             "dtype": arr.dtype.name}


def chunk_rows(name: str, chunk_frames: int) -> int:
    """Rows per zstd frame of feature ``name`` (0: the whole array in one frame)."""
    spec = FEATURE_BY_NAME.get(name)
    chunk = spec.chunk if spec is not None else CHUNK_WHOLE
    return {CHUNK_WHOLE: 0, CHUNK_FRAMES: int(chunk_frames), CHUNK_ROW: 1}[chunk]


def sample_members(sample: dict[str, Any], chunk_frames: int = 8,
                   zstd_level: int = 19) -> list[tuple[str, bytes]]:
    """``{"__key__": k, "json": {...}, "latents": arr, ...}`` -> sorted (member name, bytes),
    each array in its contract encoding; the ``.json`` gets the ``chunks`` of the npy.zst ones."""
    key = sample["__key__"]
    if "/" in key or key.startswith(".") or "." in key:
        raise ValueError(f"bad sample key {key!r}: no '/', '.' allowed")
    members, chunks, meta = [], {}, None
    for name, value in sample.items():
        if name == "__key__":
            continue
        if name == "json":
            meta = value
            continue
        member = member_name(name)
        if member.endswith(".npy.zst"):
            data, chunks[name] = encode_chunks(np.asarray(value), chunk_rows(name, chunk_frames),
                                               zstd_level)
        else:
            data = encode_npy(np.asarray(value))
        members.append((f"{key}.{member}", data))
    if meta is not None:
        meta = {**meta, "chunks": dict(sorted(chunks.items()))}
        members.append((f"{key}.json", json.dumps(meta, sort_keys=True,
                                                  default=_json_default).encode()))
    return sorted(members)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def tar_bytes(samples: Iterable[list[tuple[str, bytes]]]) -> bytes:
    """A tar of the samples' (member name, bytes) lists, in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for members in samples:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class ShardWriter:
    """Packs samples into ``<out_dir>/<prefix>-NNNNNN.tar`` of about ``target_bytes`` each
    (encoded bytes: each sample is encoded as it is written)."""

    def __init__(self, out_dir: str, prefix: str = "train", target_bytes: int = 256 << 20,
                 split: str | None = None, start_index: int = 0, chunk_frames: int = 8,
                 zstd_level: int = 19):
        self.chunk_frames, self.zstd_level = int(chunk_frames), int(zstd_level)
        self.out_dir = out_dir
        self.prefix = prefix
        self.split = split or prefix
        self.target_bytes = int(target_bytes)
        self.index = start_index
        self.pending: list[list[tuple[str, bytes]]] = []  # each sample's encoded members
        self.pending_frames = 0
        self.pending_bytes = 0
        self.shards: list[ShardInfo] = []
        storage.makedirs(out_dir)

    def write(self, sample: dict[str, Any]) -> None:
        members = sample_members(sample, self.chunk_frames, self.zstd_level)
        size = sum(len(d) for _, d in members)
        if self.pending and self.pending_bytes + size > self.target_bytes:
            self.flush()
        self.pending.append(members)
        self.pending_frames += int(sample["json"].get("num_frames", 0))
        self.pending_bytes += size

    def flush(self) -> ShardInfo | None:
        if not self.pending:
            return None
        data = tar_bytes(self.pending)
        name = f"{self.prefix}-{self.index:06d}.tar"
        storage.atomic_write_bytes(storage.join(self.out_dir, name), data)
        info = ShardInfo(
            name=name,
            split=self.split,
            samples=len(self.pending),
            frames=self.pending_frames,
            bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        self.shards.append(info)
        self.index += 1
        self.pending, self.pending_bytes, self.pending_frames = [], 0, 0
        return info

    def close(self) -> list[ShardInfo]:
        self.flush()
        return self.shards


def write_manifest(out_dir: str, shards: list[ShardInfo], features: dict[str, Any],
                   stats: dict[str, Any], **extra: Any) -> str:
    """Write ``manifest.json`` (last, atomically). ``features``: name -> {shape, dtype,
    extractor, version, config_hash}; ``stats``: name -> {mean, std} for normalisation."""
    manifest = {
        "format_version": SHARD_FORMAT_VERSION,
        "shards": [asdict(s) for s in sorted(shards, key=lambda s: s.name)],
        "num_samples": sum(s.samples for s in shards),
        "num_frames": sum(s.frames for s in shards),
        "features": features,
        "stats": stats,
        **extra,
    }
    path = storage.join(out_dir, MANIFEST_NAME)
    storage.atomic_write_text(path, json.dumps(manifest, indent=1, sort_keys=True, default=_json_default))
    return path


def load_manifest(path: str) -> dict[str, Any]:
    """Read a manifest (local path or fsspec URL); shard URLs are resolved next to it."""
    try:
        manifest = json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found (run `just preprocess` first)") from None
    except (IsADirectoryError, NotADirectoryError):
        raise ManifestError(f"{path}: not a file (give the manifest.json that `just preprocess` "
                            "wrote)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: not a manifest (a JSON {type(manifest).__name__}, not an "
                            "object)")
    if manifest.get("format_version") != SHARD_FORMAT_VERSION:
        raise ManifestError(
            f"{path}: shard format {manifest.get('format_version')} but this code reads "
            f"{SHARD_FORMAT_VERSION}; re-run preprocessing on the same videos (`just preprocess`: "
            f"the shards are rewritten from the cache, no extractor runs again)"
        )
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("name"), str) for s in shards):
        raise ManifestError(f"{path}: 'shards' must be a list of shards with names; re-run "
                            "preprocessing")
    for name, feat in (manifest.get("features") or {}).items():
        enc = feat.get("encoding") if isinstance(feat, dict) else None
        if enc not in ENCODINGS:
            raise ManifestError(f"{path}: feature {name} has encoding {enc!r}; this code reads "
                                f"{', '.join(ENCODINGS)}")
    base = str(path).rsplit("/", 1)[0] if "/" in str(path) else "."
    for s in shards:
        s["url"] = ShardURL(storage.join(base, s["name"]), s.get("sha256"))
    return manifest


def check_shards_present(manifest: dict[str, Any], splits: tuple[str, ...] | None = None) -> None:
    """Every shard a manifest lists (of ``splits``, default all) exists: a missing one fails
    before a run starts rather than at its first batch. Contents are checked when read."""
    for s in manifest["shards"]:
        if (splits is None or s.get("split") in splits) and not storage.exists(s["url"]):
            raise ManifestError(f"{s['url']}: shard listed in the manifest is missing")


class ShardURL(str):
    """A shard's URL that remembers the manifest's sha256, so every reader that gets the URL
    from a manifest (directly or through ``split_urls``) checks the bytes: :class:`ShardFile`."""

    sha256: str | None

    def __new__(cls, url: str, sha256: str | None = None) -> ShardURL:
        obj = super().__new__(cls, url)
        obj.sha256 = sha256
        return obj

    def __reduce__(self):  # keep the digest across DataLoader worker processes
        return (ShardURL, (str(self), self.sha256))


class ShardFile:
    """One shard opened for reading: its bytes and its member table.

    A local shard is memory-mapped, so a reader that cuts a 24-frame window out of a 150-frame
    sample reads only those pages; other URLs are read whole. Before any member is used, the
    bytes are checked against the manifest's sha256 (a :class:`ShardURL` carries it), once per
    process and file version. The member table comes from the tar headers alone (``tarfile``
    walks them and seeks over the data); unsafe member names are refused."""

    def __init__(self, url: str, verified: Any = None):
        """``verified``: shards that another process of this run already checked (``url in
        verified``; checked ones are ``verified.add(url)``-ed), shared by DataLoader workers."""
        self.url = url
        try:
            self.buffer = _map_or_read(url)
        except FileNotFoundError:
            raise ManifestError(f"{url}: shard listed in the manifest is missing") from None
        want = getattr(url, "sha256", None)
        stamp = (str(url), want, len(self.buffer), _mtime(url))
        if stamp in _MEMBER_TABLES:  # opened before by this process: checked and indexed
            self.members = _MEMBER_TABLES[stamp]
            return
        if verified is not None and url in verified:
            _VERIFIED.add(stamp)
        if want and stamp not in _VERIFIED:  # hash a shard once per process, not on every pass
            check_sha256(url, self.buffer, want)
            _VERIFIED.add(stamp)
            if verified is not None:
                verified.add(url)
        self.members = member_table(url, self.buffer)
        if len(_MEMBER_TABLES) >= 1024:  # a bounded memo: drop the oldest
            _MEMBER_TABLES.pop(next(iter(_MEMBER_TABLES)))
        _MEMBER_TABLES[stamp] = self.members

    def member(self, offset: int, size: int) -> memoryview:
        """A member's bytes, without a copy."""
        return memoryview(self.buffer)[offset : offset + size]


def check_sha256(url: str, data: Any, want: str) -> None:
    """Raise :class:`ManifestError` naming ``url`` when ``data`` does not hash to ``want``."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != want:
        raise ManifestError(
            f"{url}: sha256 {digest[:12]}... does not match the manifest ({want[:12]}...); "
            f"the shard is corrupt or was replaced: refusing to read it")


def member_table(url: str, buffer: Any) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of a tar's regular files, in order, from its headers alone
    (``tarfile`` seeks over the data); unsafe names and truncated tars raise ManifestError."""
    members = []
    try:
        with tarfile.open(fileobj=_BufferReader(buffer), mode="r:") as tar:
            for info in tar:
                check_member_name(info.name, url)
                if info.isfile():
                    members.append((info.name, info.offset_data, info.size))
    except tarfile.TarError as e:
        raise ManifestError(f"{url}: not a readable tar ({e})") from None
    end = max((o + n for _, o, n in members), default=0)
    if end > len(buffer):
        raise ManifestError(f"{url}: truncated tar (a member ends at byte {end} of "
                            f"{len(buffer)})")
    return members


def _map_or_read(url: str) -> Any:
    fs, path = storage.fs_and_path(url)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                return b""
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    return storage.read_bytes(url)


class _BufferReader(io.RawIOBase):
    """A seekable, read-only file over a buffer, without copying it (for ``tarfile``)."""

    def __init__(self, buffer: Any):
        self.view = memoryview(buffer).cast("B")
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), len(self.view) - self.pos))
        b[:n] = self.view[self.pos : self.pos + n]
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: len(self.view)}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos


# (url, sha256, size, mtime) of shards whose digest this process has checked; a rewritten file
# gets a new size or mtime and is hashed again.
_VERIFIED: set[tuple] = set()
# the same key -> member table of that shard: a shard read again (the next pass) is not re-parsed
_MEMBER_TABLES: dict[tuple, list[tuple[str, int, int]]] = {}


def _mtime(url: str) -> Any:
    fs, path = storage.fs_and_path(url)
    try:
        info = fs.info(path)
    except (OSError, NotImplementedError):
        return None
    return info.get("mtime") or info.get("LastModified") or info.get("created")


def verify_shards(manifest: dict[str, Any]) -> None:
    """Check every shard's sha256 and member names; raise :class:`ManifestError` naming the shard."""
    for s in manifest["shards"]:  # always hashed: an explicit check, not a reader's memo
        data = storage.read_bytes(s["url"])
        check_sha256(s["url"], data, s["sha256"])
        member_table(s["url"], data)


def check_member_name(name: str, where: str = "") -> None:
    """Reject tar members that could escape a directory or are not regular sample files."""
    if name.startswith("/") or ".." in name.split("/") or "\\" in name:
        raise ManifestError(f"{where}: unsafe tar member {name!r} (absolute path or '..')")
    if name.endswith((".pyd", ".pickle", ".pkl", ".pth", ".pt")):
        raise ManifestError(f"{where}: tar member {name!r} is a pickle format; shards hold no pickle")
