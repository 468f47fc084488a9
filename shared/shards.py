"""WebDataset shards and their manifest: the only way training sees preprocessed data.

A shard is a plain POSIX tar readable with ``tar`` and ``webdataset``. Each sample is a group of
members ``<key>.json`` and ``<key>.<feature>.npy`` (``np.save`` with ``allow_pickle=False``).
Tars are written deterministically (sorted members, zero mtimes/uids) so that the same samples
give the same bytes, and atomically (temp name, then rename). ``manifest.json`` is written last.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import tarfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from . import storage
from .contract import SHARD_FORMAT_VERSION
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
    head = mv[:start].tobytes()
    if head not in _NPY_HEADERS:  # samples of a dataset repeat a few headers: parse each once
        fp = io.BytesIO(head)
        version = np.lib.format.read_magic(fp)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        if len(_NPY_HEADERS) > 4096:
            _NPY_HEADERS.clear()
        _NPY_HEADERS[head] = read_header(fp)
    shape, fortran, dtype = _NPY_HEADERS[head]
    if dtype.hasobject:
        raise ValueError("the .npy array holds Python objects: a pickle, refused (allow_pickle=False)")
    count = int(np.prod(shape, dtype=np.int64))
    if len(mv) - start < count * dtype.itemsize:
        raise ValueError(f".npy array truncated: {len(mv) - start} data bytes for shape {shape} "
                         f"{dtype}")
    arr = np.frombuffer(mv, dtype=dtype, count=count, offset=start)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


_NPY_HEADERS: dict[bytes, tuple] = {}  # .npy header bytes -> (shape, fortran_order, dtype)


def sample_members(sample: dict[str, Any]) -> list[tuple[str, bytes]]:
    """``{"__key__": k, "json": {...}, "latents": arr, ...}`` -> sorted (member name, bytes)."""
    key = sample["__key__"]
    if "/" in key or key.startswith(".") or "." in key:
        raise ValueError(f"bad sample key {key!r}: no '/', '.' allowed")
    members = []
    for name, value in sample.items():
        if name == "__key__":
            continue
        if name == "json":
            data = json.dumps(value, sort_keys=True, default=_json_default).encode()
            members.append((f"{key}.json", data))
        else:
            members.append((f"{key}.{name}.npy", encode_npy(np.asarray(value))))
    return sorted(members)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def tar_bytes(samples: Iterable[dict[str, Any]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for name, data in sample_members(sample):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class ShardWriter:
    """Packs samples into ``<out_dir>/<prefix>-NNNNNN.tar`` of about ``target_bytes`` each."""

    def __init__(self, out_dir: str, prefix: str = "train", target_bytes: int = 256 << 20,
                 split: str | None = None, start_index: int = 0):
        self.out_dir = out_dir
        self.prefix = prefix
        self.split = split or prefix
        self.target_bytes = int(target_bytes)
        self.index = start_index
        self.pending: list[dict[str, Any]] = []
        self.pending_bytes = 0
        self.shards: list[ShardInfo] = []
        storage.makedirs(out_dir)

    def write(self, sample: dict[str, Any]) -> None:
        size = sum(np.asarray(v).nbytes for k, v in sample.items() if k not in ("__key__", "json"))
        if self.pending and self.pending_bytes + size > self.target_bytes:
            self.flush()
        self.pending.append(sample)
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
            frames=int(sum(s["json"].get("num_frames", 0) for s in self.pending)),
            bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        self.shards.append(info)
        self.index += 1
        self.pending, self.pending_bytes = [], 0
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
            f"{SHARD_FORMAT_VERSION}; re-run preprocessing"
        )
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("name"), str) for s in shards):
        raise ManifestError(f"{path}: 'shards' must be a list of shards with names; re-run "
                            "preprocessing")
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
