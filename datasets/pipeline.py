"""WebDataset pipelines over a manifest's shards (open_clip style), with an exact data position.

Training stream (:class:`TrainLoader`): shard list -> per-pass deterministic shard shuffle (seed,
epoch, pass), or resampling with replacement -> split by node and worker (by shard when there are
enough shards, else by sample index) -> tar members (fsspec opener, member names checked) ->
deterministic sample shuffle buffer -> view (window cutting, seeded per item) -> batches of
``batch_size`` built inside the worker (one T per batch). Decoding knows only ``.npy``
(``allow_pickle=False``), ``.npy.zst`` (zstd frames of such ``.npy`` chunks) and ``.json``.

Epochs have a fixed length in batches (``epoch_samples`` or the split's sample count, rounded up
to a multiple of the worker count); every worker yields exactly its share and its stream never
runs dry (it starts another pass), so the DataLoader's round-robin order is strict.

Data position: (epoch, batches handed out in the epoch). On resume, physical worker ``p`` plays
logical worker ``(p + K) % n`` (K = batches already consumed) and skips the batches that logical
worker had produced; the skip reads tar members and the small ``.json`` only, never the arrays.
The batch order after resume is the same as without the interruption, with or without worker
processes (the worker count itself is part of the data order: keep it when resuming).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import logging
import math
import queue
import random
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tariterators

from dwm.shared.shards import ManifestError, ShardFile, load_manifest

from .views import View, collate, collate_packed, sample_meta, unpack_batch

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# raw samples from shards
# ---------------------------------------------------------------------------------------------
def split_urls(manifest: dict[str, Any], split: str) -> list[str]:
    return [s["url"] for s in manifest["shards"] if split in ("all", s["split"])]


def split_samples(manifest: dict[str, Any], split: str) -> int:
    return sum(int(s["samples"]) for s in manifest["shards"] if split in ("all", s["split"]))


def iter_tar_samples(url: str, verified: Any = None) -> Iterator[dict[str, Any]]:
    """Samples of one shard: ``{"__key__", "__url__", "json": bytes, "<name>.npy": memoryview,
    ...}``. Opened through fsspec (local paths, file://, memory://, s3://, ...).

    Array members are zero-copy views of the shard (memory-mapped when local), so a sample
    waiting in the shuffle buffer costs no memory and a view that cuts a window out of it reads
    only the window (:func:`dwm.shared.shards.decode_npy` for raw members, the window's zstd
    chunks for compressed ones: :class:`dwm.shared.shards.ChunkedRows`). The shard is checked against the
    manifest's sha256 before any sample of it is used (:class:`~dwm.shared.shards.ShardFile`)."""
    shard = ShardFile(url, verified)
    files = ({"fname": name, "__url__": url,
              "data": bytes(shard.member(off, size)) if name.endswith(".json")
              else shard.member(off, size)}
             for name, off, size in shard.members)
    yield from tariterators.group_by_keys(files)


def _rng(*parts: Any) -> random.Random:
    return random.Random("-".join(str(p) for p in parts))  # str seeds are hashed stably (sha512)


def shuffle_buffer(samples: Iterator[dict], bufsize: int, rng: random.Random) -> Iterator[dict]:
    """Deterministic shuffle buffer (same input + same rng -> same order)."""
    if bufsize <= 1:
        yield from samples
        return
    buf: list[dict] = []
    for s in samples:
        if len(buf) < bufsize:
            buf.append(s)
            continue
        i = rng.randrange(len(buf))
        buf[i], s = s, buf[i]
        yield s
    rng.shuffle(buf)
    yield from buf


@dataclass
class StreamSpec:
    urls: list[str]
    seed: int = 0
    resampled: bool = False
    shuffle_buffer: int = 64
    shuffle_shards: bool = True
    verified: Any = None  # VerifiedShards shared by the workers of a run, or None


class VerifiedShards:
    """The shards some process of this run has checked against the manifest's sha256: one byte
    per shard in shared memory, so that the DataLoader workers hash each shard once between
    them (a worker that meets a shard for the first time on a later pass does not hash it
    again). Created before the workers start; they inherit it."""

    def __init__(self, urls: list[str]):
        self.index = {str(u): i for i, u in enumerate(urls)}
        self.flags = torch.multiprocessing.get_context().RawArray("B", max(1, len(urls)))

    def __contains__(self, url: object) -> bool:
        i = self.index.get(str(url))
        return i is not None and bool(self.flags[i])

    def add(self, url: str) -> None:
        i = self.index.get(str(url))
        if i is not None:
            self.flags[i] = 1


def worker_stream(spec: StreamSpec, epoch: int, wid: int, total: int,
                  infinite: bool = True) -> Iterator[dict[str, Any]]:
    """Raw samples seen by global worker ``wid`` of ``total`` in ``epoch``; disjoint across
    workers within a pass. Infinite: passes repeat (pass counter in the seed)."""
    urls = list(spec.urls)
    if not urls:
        raise ManifestError("no shards to read for this split")
    for pass_ in range(10**9):
        got = 0
        if spec.resampled:  # open_clip's ResampledShards: draws with replacement, never ends
            rng = _rng(spec.seed, epoch, "resample", wid, pass_)
            shards = (rng.choice(urls) for _ in iter(int, 1))
            stream = (s for url in shards for s in iter_tar_samples(url, spec.verified))
        else:
            order = list(urls)
            if spec.shuffle_shards:
                _rng(spec.seed, epoch, "shards", pass_).shuffle(order)
            if len(order) >= total:
                stream = (s for url in order[wid::total]
                          for s in iter_tar_samples(url, spec.verified))
            else:  # fewer shards than workers: everyone reads all, keeps every total-th sample
                stream = (s for i, s in enumerate(x for url in order
                                                  for x in iter_tar_samples(url, spec.verified))
                          if i % total == wid)
        buf_rng = _rng(spec.seed, epoch, "samples", wid, pass_)
        for s in shuffle_buffer(stream, spec.shuffle_buffer, buf_rng):
            got += 1
            yield s
        if got == 0:
            raise ManifestError(
                f"worker {wid}/{total} got no samples from {len(urls)} shard(s) in a full pass"
            )
        if not infinite:
            return


# ---------------------------------------------------------------------------------------------
# the training dataset (every epoch of a run, from a start position)
# ---------------------------------------------------------------------------------------------
class RunDataset(IterableDataset):
    """Yields this rank's batches from (``start_epoch``, ``start_batch``) on, epoch after epoch.

    One DataLoader serves the whole run: workers are started once (not at every epoch), so a
    shard's sha256 is checked once per run (:class:`VerifiedShards`), and the epoch boundary
    costs no restart. Each
    worker plays one logical worker for the whole run; since every epoch has a multiple of the
    worker count of batches, the round-robin order carries across epochs unchanged."""

    def __init__(self, spec: StreamSpec, view: View, batch_size: int, batches_per_epoch: int,
                 start_epoch: int = 0, start_batch: int = 0, rank: int = 0, world_size: int = 1,
                 length_fn: Callable[[int], int | None] | None = None, max_rejects: int = 10000,
                 float_images: bool = False, block_returns: list | None = None):
        self.max_rejects = int(max_rejects)
        self.block_returns = block_returns  # per worker: ids of blocks the main process freed
        self.spec, self.view, self.batch_size = spec, view, int(batch_size)
        self.batches_per_epoch = int(batches_per_epoch)
        self.start_epoch, self.start_batch = int(start_epoch), int(start_batch)
        self.rank, self.world_size = int(rank), int(world_size)
        self.length_fn = length_fn
        self.float_images = bool(float_images)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        n, phys = (info.num_workers, info.id) if info is not None else (1, 0)
        if self.batches_per_epoch % n:
            raise ValueError(f"batches_per_epoch={self.batches_per_epoch} is not a multiple of "
                             f"num_workers={n}")
        K = self.start_batch
        logical = (phys + K) % n  # rotation keeps the round-robin order exact after a resume
        done = K // n + (1 if logical < K % n else 0)
        pool = None
        if info is not None and self.block_returns:
            pool = BlockPool(phys, self.block_returns[phys])
        for epoch in itertools.count(self.start_epoch):
            yield from self._epoch(epoch, logical, n, done if epoch == self.start_epoch else 0,
                                   pool)

    def _epoch(self, epoch: int, logical: int, n: int, done: int,
               pool: BlockPool | None = None) -> Iterator[dict[str, Any]]:
        per_worker = self.batches_per_epoch // n
        wid, total = self.rank * n + logical, self.world_size * n
        stream = worker_stream(self.spec, epoch, wid, total)
        batch_offset = epoch * self.batches_per_epoch  # global index of this epoch's batch 0
        item_index = 0
        for j in range(per_worker):
            global_batch = batch_offset + j * n + logical
            length = self.length_fn(global_batch) if self.length_fn is not None else None
            items = []
            rejected = 0
            broken = 0  # samples in a row that failed to decode: all broken must not spin forever
            while len(items) < self.batch_size:
                raw = next(stream)
                if rejected > self.max_rejects:
                    raise ManifestError(
                        f"view {self.view.name}: no usable sample in {rejected} samples in a row "
                        f"(e.g. stage A needs samples with has_audio=true)")
                try:
                    meta = sample_meta(raw)
                except Exception as e:  # unreadable json: say which, keep going
                    log.warning("skipping sample: %s", e)
                    continue
                if not self.view.accepts(meta):
                    rejected += 1
                    continue
                rejected = 0
                idx = item_index
                item_index += 1
                if j < done:  # resume: count it, do not decode it
                    items.append(None)
                    continue
                rng = np.random.default_rng([self.spec.seed, epoch, wid, idx])
                try:
                    items.append(self.view.make_item(raw, rng, length))
                    broken = 0
                except (ManifestError, MemoryError):
                    raise
                except Exception as e:  # a broken sample is named and skipped, never stops training
                    # (its index stays consumed; a resume across it can shift by one item)
                    log.warning("skipping sample %s:%s: %s", raw.get("__url__"),
                                raw.get("__key__"), e)
                    broken += 1
                    if broken > self.max_rejects:
                        raise ManifestError(
                            f"view {self.view.name}: {broken} samples in a row could not be used; "
                            f"the last, {raw.get('__url__')}:{raw.get('__key__')}: {e}") from None
            if j < done:
                continue
            batch = collate_packed(items, self.float_images, pool)
            if length is not None:
                batch["seq_len"] = int(length)
            yield batch


class BlockPool:
    """A worker's shared-memory blocks for packed batches, reused once the main process has
    given them back.

    A fresh shared-memory block costs far more than private memory (for a 6 MB stage-C batch
    here: ~9 ms to create, fill and free, against ~1 ms): the kernel zeroes its pages and frees
    them again for every batch. A block's id comes back only when the main process has freed
    every tensor viewing it (:meth:`TrainLoader._receive`), so a block is never rewritten while
    anything reads it."""

    def __init__(self, worker: int, returns: Any):
        self.worker, self.returns = worker, returns
        self.blocks: dict[int, torch.Tensor] = {}
        self.free: list[int] = []

    def take(self, nbytes: int) -> tuple[tuple[int, int], torch.Tensor]:
        """((worker, block id), a 1-D uint8 shared tensor of at least ``nbytes``)."""
        while not self.returns.empty():
            self.free.append(self.returns.get())
        for i, bid in enumerate(self.free):
            if self.blocks[bid].numel() >= nbytes:
                self.free.pop(i)
                return (self.worker, bid), self.blocks[bid]
        for bid in self.free:  # too small for this batch (e.g. T grew): let it go
            del self.blocks[bid]
        self.free.clear()
        bid = max(self.blocks, default=-1) + 1
        size = nbytes + nbytes // 4  # headroom: batch sizes vary a little (curriculum T)
        self.blocks[bid] = torch.empty(0, dtype=torch.uint8).set_(
            torch.UntypedStorage._new_shared(size), 0, (size,))
        return (self.worker, bid), self.blocks[bid]


@dataclass
class DataPosition:
    """Where the training stream is: saved with every checkpoint, restored exactly."""

    epoch: int = 0
    batch: int = 0  # batches handed to the training loop in this epoch
    seed: int = 0
    batches_per_epoch: int = 0
    num_workers: int = 0  # part of the data order (samples are split across workers)

    def state_dict(self) -> dict[str, int]:
        return asdict(self)


def _round_up(x: int, m: int) -> int:
    return int(math.ceil(x / m) * m)


class TrainLoader:
    """Endless iterator of training batches over epochs, with :meth:`state_dict` /
    :meth:`load_state_dict` for an exact data position."""

    def __init__(self, manifest: dict[str, Any] | str, view: View, batch_size: int, *,
                 split: str = "train", seed: int = 0, num_workers: int = 0,
                 pin_memory: bool = False, prefetch_factor: int = 2, resampled: bool = False,
                 epoch_samples: int = 0, shuffle_buffer: int = 64, rank: int = 0,
                 world_size: int = 1, length_fn: Callable[[int], int | None] | None = None,
                 float_images: bool = False):
        """``float_images``: the workers turn the uint8 image-like tensors into float32 in
        [0, 1] (right when the step runs on the CPU, where the main process would otherwise do
        it inside the step's data time; on a GPU keep uint8: 4x less to copy to the device)."""
        if isinstance(manifest, str):
            manifest = load_manifest(manifest)
        urls = split_urls(manifest, split)
        if not urls:
            raise ManifestError(f"the manifest lists no shards of split {split!r}")
        self.spec = StreamSpec(urls, seed=seed, resampled=resampled, shuffle_buffer=shuffle_buffer,
                               verified=VerifiedShards(urls) if num_workers > 0 else None)
        self.view, self.batch_size = view, int(batch_size)
        self.num_workers = max(0, int(num_workers))
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self.prefetch_factor = prefetch_factor
        self.rank, self.world_size = rank, world_size
        self.length_fn = length_fn
        self.float_images = bool(float_images)
        self.split_size = split_samples(manifest, split)
        samples = int(epoch_samples) or self.split_size
        per_rank = max(1, samples // (self.batch_size * world_size))
        self.position = DataPosition(
            seed=seed, num_workers=self.num_workers,
            batches_per_epoch=_round_up(per_rank, max(1, self.num_workers)))

    @property
    def batches_per_epoch(self) -> int:
        return self.position.batches_per_epoch

    def state_dict(self) -> dict[str, int]:
        return self.position.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("seed", self.position.seed)) != self.position.seed:
            log.warning("data seed changed from %s to %s on resume: the data order differs",
                        state.get("seed"), self.position.seed)
        if int(state.get("num_workers", self.num_workers)) != self.num_workers:
            log.warning("num_workers changed from %s to %s on resume: the data order differs from "
                        "the interrupted run", state.get("num_workers"), self.num_workers)
        if int(state.get("batches_per_epoch", self.batches_per_epoch)) != self.batches_per_epoch:
            raise ValueError(
                f"cannot restore the data position: the epoch had {state['batches_per_epoch']} "
                f"batches, now {self.batches_per_epoch} (batch size, workers or data changed)"
            )
        self.position.epoch, self.position.batch = int(state["epoch"]), int(state["batch"])

    def _receive(self, packed: dict[str, Any]) -> dict[str, Any]:
        """A worker's packed batch -> the batch. A pooled block goes back to its worker when
        the last tensor viewing it here is freed (torch keeps one Python object per storage,
        so a finalizer on it fires exactly then); a pinned batch is already a copy."""
        block = packed.pop("__block__", None)
        if block is not None:
            worker, bid = block
            give_back = functools.partial(self.block_returns[worker].put, bid)
            buf = packed["__packed__"]
            if buf.is_pinned():
                give_back()
            else:
                weakref.finalize(buf.untyped_storage(), give_back).atexit = False
            del buf
        return unpack_batch(packed)

    def _run_loader(self) -> DataLoader:
        pos = self.position
        # one return channel per worker, created anew with each DataLoader (its workers too)
        self.block_returns = ([torch.multiprocessing.get_context().SimpleQueue()
                               for _ in range(self.num_workers)] if self.num_workers else None)
        ds = RunDataset(self.spec, self.view, self.batch_size, pos.batches_per_epoch,
                        start_epoch=pos.epoch, start_batch=pos.batch, rank=self.rank,
                        world_size=self.world_size, length_fn=self.length_fn,
                        max_rejects=3 * self.split_size + self.spec.shuffle_buffer + 16,
                        float_images=self.float_images, block_returns=self.block_returns)
        kw: dict[str, Any] = {}
        if self.num_workers > 0:
            kw["prefetch_factor"] = self.prefetch_factor
        # own generator: creating the iterator must not draw from the global torch RNG (which the
        # checkpoint restores), or a resumed run would see different dropout than a straight one
        gen = torch.Generator().manual_seed(self.position.seed + pos.epoch)
        return DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, generator=gen, collate_fn=_as_is, **kw)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.position.batch >= self.batches_per_epoch:
            self.position.epoch += 1
            self.position.batch = 0
        batches = (self._receive(b) for b in self._run_loader())
        if self.num_workers > 0:  # receive ahead, in a thread (with no workers: all in-line)
            batches = BackgroundBatches(batches, depth=self.prefetch_factor)
        try:
            for batch in batches:
                if self.position.batch >= self.batches_per_epoch:  # it opens the next epoch
                    self.position.epoch += 1
                    self.position.batch = 0
                self.position.batch += 1  # counts what the training loop got, not what was
                yield batch               # received ahead: a resume regenerates the rest
                del batch  # hold no reference while the consumer steps (see BackgroundBatches)
        finally:
            if isinstance(batches, BackgroundBatches):
                batches.close()


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader's per-batch conversion: none (batches are built in the dataset; torch's
    default would walk every nested list and dict of each batch again)."""
    return batch


class BackgroundBatches:
    """Pulls batches from the DataLoader in a thread of this process, ahead of the consumer.

    Receiving a batch from a worker costs the main process a few ms (unpickling, fetching the
    shared-memory block from the worker, mapping it); here that happens while the step computes,
    and the training loop only takes a ready batch off a local queue (on a GPU, the DataLoader's
    pin-memory thread plays the same part). Errors from the workers are re-raised to the
    consumer, in order.

    Freeing a batch unmaps its shared-memory block (about 2 ms for 5 MB here): handed-out
    batches are kept and dropped by the thread, so where the consumer drops its own reference
    before asking for the next batch, no free lands in its data wait."""

    def __init__(self, batches: Iterator[dict[str, Any]], depth: int = 2):
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self.handed_out: queue.SimpleQueue = queue.SimpleQueue()
        _RECEIVERS.add(self)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(batches,), daemon=True,
                                       name="dwm-batch-receiver")
        self.thread.start()

    def _run(self, batches: Iterator[dict[str, Any]]) -> None:
        try:
            for batch in batches:
                # here, after receiving (ms after the consumer took the last batch), it steps
                self._drop_handed_out()
                if not self._put(("batch", batch)):
                    return
                del batch
            self._put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(("error", e))

    def _put(self, item: tuple[str, Any]) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _drop_handed_out(self) -> None:
        """Drop the batches handed out before the newest one (it may still be in use)."""
        while self.handed_out.qsize() > 1:
            self.handed_out.get()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            kind, value = self.queue.get()
            if kind == "error":
                raise value
            if kind == "end":
                return
            self.handed_out.put(value)
            yield value
            del value

    def close(self, timeout: float = 30.0) -> None:
        """Stop receiving and wait for the thread to end (after the batch it may be waiting
        for), dropping the DataLoader and its workers."""
        self.stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout)


_RECEIVERS: weakref.WeakSet[BackgroundBatches] = weakref.WeakSet()


@atexit.register
def _close_receivers() -> None:
    # a receiver thread still inside torch when the interpreter finalises aborts the process
    # ("terminate called without an active exception"): end them first
    for receiver in list(_RECEIVERS):
        receiver.close(timeout=10.0)


# ---------------------------------------------------------------------------------------------
# validation: one ordered pass, no shuffling
# ---------------------------------------------------------------------------------------------
def eval_batches(manifest: dict[str, Any] | str, view: View, batch_size: int, *,
                 split: str = "val", max_batches: int = 0, seed: int = 0) -> list[dict[str, Any]]:
    """Batches of one ordered pass over ``split`` (falls back to train with a warning when the
    manifest has no such split). The same call always returns the same batches."""
    if isinstance(manifest, str):
        manifest = load_manifest(manifest)
    urls = split_urls(manifest, split)
    if not urls and split != "train":
        log.warning("the manifest has no %r shards: validating on the train split", split)
        urls = split_urls(manifest, "train")
    batches, items, idx = [], [], 0
    for url in urls:
        for raw in iter_tar_samples(url):
            if not view.accepts(sample_meta(raw)):
                continue
            items.append(view.make_item(raw, np.random.default_rng([seed, idx])))
            idx += 1
            if len(items) == batch_size:
                batches.append(collate(items))
                items = []
                if max_batches and len(batches) >= max_batches:
                    return batches
    if items:
        batches.append(collate(items))
    return batches
