"""The copy engine: moves chunks in large extents, overlapped, checksummed on the way.

Changed chunks are coalesced into extents of up to ``extent_bytes`` (8 MiB by default).
A reader thread fills page-aligned buffers (``O_DIRECT``-safe) with ``preadv``, hashes
each chunk with xxh3_64 and, when the item carries expected checksums, verifies them; the
calling thread writes the buffers out (or, for a sink of items that never overlap, a few
writer threads at once). A small fixed set of buffers bounds the memory and
makes the two sides run in parallel (``preadv``/``pwritev`` and xxhash release the GIL).
There is one system call per extent per side, never one per chunk.

Progress is a thread-safe object that the caller (a D-Bus Job, a CLI bar) reads while the
copy runs; its ``cancel()`` stops the copy at the next extent.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Protocol

import xxhash
from pyroaring import BitMap

from blockguard.errors import BlockguardError, ChecksumMismatch, EnvironmentProblem
from blockguard.storage.blockdev import BlockDevice, aligned_buffer

DEFAULT_EXTENT_BYTES = 8 << 20
DEFAULT_READERS = 2


class Progress:
    """Bytes done out of a total, with rate and ETA; safe to read from any thread."""

    def __init__(self, total: int = 0) -> None:
        self._lock = threading.Lock()
        self._total = total
        self._done = 0
        self._started: float | None = None
        self._finished: float | None = None
        self._cancel = threading.Event()

    def start(self, total: int | None = None) -> None:
        with self._lock:
            if total is not None:
                self._total = total
            if self._started is None:
                self._started = time.monotonic()

    def add_total(self, nbytes: int) -> None:
        with self._lock:
            self._total += nbytes

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self._done += nbytes

    def finish(self) -> None:
        with self._lock:
            self._finished = time.monotonic()

    def cancel(self) -> None:
        """Ask the running copy to stop; it raises at the next extent."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def bytes_done(self) -> int:
        with self._lock:
            return self._done

    @property
    def total(self) -> int:
        with self._lock:
            return self._total

    @property
    def elapsed(self) -> float:
        with self._lock:
            if self._started is None:
                return 0.0
            return (self._finished or time.monotonic()) - self._started

    @property
    def rate(self) -> float:
        """Bytes per second so far (0 before the first byte)."""
        elapsed = self.elapsed
        return self.bytes_done / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate; None while unknown."""
        rate = self.rate
        if rate <= 0:
            return None
        return max(0.0, (self.total - self.bytes_done) / rate)

    def snapshot(self) -> dict[str, float | int | None]:
        return {
            "bytes_done": self.bytes_done,
            "total": self.total,
            "rate": self.rate,
            "eta": self.eta,
        }


class ChunkSource(Protocol):
    """Anything chunks can be read from: a device, a stored generation, a remote object.

    A source may also have ``read_runs(runs)``, filling each ``(first chunk, view)`` of
    ascending disjoint runs (a stored generation's :meth:`GenerationReader.read_runs`):
    an item of several ``runs`` is then read by one call.
    """

    def read_chunks(self, first: int, view: memoryview) -> None:
        """Fill ``view`` with the data of the chunks starting at ``first`` (contiguous)."""


#: A sink receives the first chunk index, the data and one xxh3_64 per chunk.
Sink = Callable[[int, memoryview, Sequence[int]], None]


@dataclass(frozen=True)
class CopyItem:
    """One extent to copy: ``count`` chunks from ``first``, read from ``source``.

    :param expected: checksums to verify, one per chunk (None: only compute them).
    :param generation_id: named in a :class:`ChecksumMismatch`.
    """

    source: ChunkSource
    first: int
    count: int
    expected: Sequence[int] | None = None
    generation_id: str = "?"
    #: For an item gathered from several generations: ``(first chunk, generation id)``
    #: of each part, ascending; a mismatch names the part's generation.
    owners: tuple[tuple[int, str], ...] = ()
    #: For an item of several runs apart in the volume: their ``(first, count)``,
    #: ascending, read one after the other into one buffer (packed); ``first`` and
    #: ``count`` are then the first run's first chunk and the chunks of all runs.
    runs: tuple[tuple[int, int], ...] = ()

    def chunk_at(self, index: int) -> int:
        """The volume's chunk at position ``index`` of this item's data."""
        for first, count in self.runs:
            if index < count:
                return first + index
            index -= count
        return self.first + index

    def nbytes(self, chunk_size: int, volume_size: int) -> int:
        """The item's bytes: its chunks, the volume's last one possibly short."""
        last = self.runs[-1][0] + self.runs[-1][1] if self.runs else self.first + self.count
        return self.count * chunk_size - max(0, last * chunk_size - volume_size)

    def owner(self, chunk: int) -> str:
        """The generation that holds ``chunk`` of this item."""
        name = self.generation_id
        for first, generation_id in self.owners:
            if first > chunk:
                break
            name = generation_id
        return name


class DeviceSource:
    """Chunks read straight from a block device at ``chunk * chunk_size``."""

    def __init__(self, dev: BlockDevice, chunk_size: int) -> None:
        self.dev = dev
        self.chunk_size = chunk_size

    def read_chunks(self, first: int, view: memoryview) -> None:
        got = self.dev.pread_into(view, first * self.chunk_size)
        if got != len(view):
            raise EnvironmentProblem(
                detail=f"short read from {self.dev.path} at chunk {first}: {got} of {len(view)}"
            )


def device_sink(dev: BlockDevice, chunk_size: int) -> Sink:
    """A sink writing chunks to their own place on a block device."""

    def write(first: int, view: memoryview, _digests: Sequence[int]) -> None:
        dev.pwrite_all(view, first * chunk_size)

    return write


def discard_sink(first: int, view: memoryview, digests: Sequence[int]) -> None:
    """A sink for verification runs: the data is only hashed."""


def extents(chunks: BitMap | None, nchunks: int, max_count: int) -> Iterator[tuple[int, int]]:
    """Coalesce chunk indexes into runs ``(first, count)`` of at most ``max_count``.

    :param chunks: the chunks to cover; None means every chunk of the volume.
    """
    if chunks is None:
        for first in range(0, nchunks, max_count):
            yield first, min(max_count, nchunks - first)
        return
    start = prev = -2
    for c in chunks:
        if c >= nchunks:
            break
        if c == prev + 1 and c - start < max_count:
            prev = c
            continue
        if start >= 0:
            yield start, prev - start + 1
        start = prev = c
    if start >= 0:
        yield start, prev - start + 1


def batched(
    runs: Iterable[tuple[int, int]], max_count: int, max_runs: int
) -> Iterator[tuple[tuple[int, int], ...]]:
    """Group consecutive runs ``(first, count)`` into batches of at most ``max_count``
    chunks and ``max_runs`` runs (a run longer than ``max_count`` must not be given).

    A batch is one item of the copy engine: one reader's turn and one hand-over for
    many small scattered runs instead of one each.
    """
    batch: list[tuple[int, int]] = []
    chunks = 0
    for run in runs:
        if batch and (chunks + run[1] > max_count or len(batch) == max_runs):
            yield tuple(batch)
            batch, chunks = [], 0
        batch.append(run)
        chunks += run[1]
    if batch:
        yield tuple(batch)


def copy_chunks(
    items: Iterable[CopyItem],
    sink: Sink,
    *,
    chunk_size: int,
    volume_size: int,
    progress: Progress | None = None,
    extent_bytes: int = DEFAULT_EXTENT_BYTES,
    readers: int = DEFAULT_READERS,
    writers: int = 1,
) -> int:
    """Copy every item to ``sink``, overlapping reads and writes; returns the bytes copied.

    ``readers`` threads read (and hash) items in parallel, which keeps several requests
    in flight for scattered small extents; with one writer the sink receives the items
    strictly in their given order, from the calling thread (an item of several ``runs``:
    one call per run, in order). Items must have ``count * chunk_size <=
    extent_bytes``. The last chunk of the volume may be short: the views passed around
    are cut to the volume's end.

    :param writers: items written at once. Above 1 the sink is called from that many
        threads and items may land in any order: only for a sink writing each item to its
        own place (a device sink of items that do not overlap, e.g. a swap-in's scattered
        delta windows, which one at a time each waited for the last). Every write has
        finished (or failed) when this returns or raises.
    :raises ChecksumMismatch: an item's data does not match its expected checksums.
    :raises BlockguardError: the copy was cancelled through ``progress``.
    """
    if writers < 1:
        raise EnvironmentProblem(detail=f"copy writers {writers!r} must be at least 1")
    progress = progress or Progress()
    progress.start()

    def read(item: CopyItem, buf: memoryview) -> _Read:
        return _read_item(item, buf, chunk_size, volume_size, extent_bytes, progress)

    def write(item: CopyItem, buf: memoryview, nbytes: int, digests: list[int]) -> None:
        if item.runs:
            # Every sink's contract is contiguous chunks from ``first`` (a writer
            # that places or hashes chunks by index relies on it): one call per run.
            off = done = 0
            for first, count in item.runs:
                n = min(count * chunk_size, nbytes - off)
                sink(first, buf[off : off + n], digests[done : done + count])
                off, done = off + n, done + count
        else:
            sink(item.first, buf[:nbytes], digests)
        progress.advance(nbytes)
        ahead.recycle(buf)

    # Each writer in flight holds a buffer: the readers keep theirs.
    ahead = _ReadAhead(iter(items), read, readers, extent_bytes, spare=writers - 1)
    copied = 0
    pool = None if writers == 1 else ThreadPoolExecutor(writers, "blockguard-copy-writer")
    pending: set[Future[None]] = set()
    try:
        for item, buf, nbytes, digests in ahead.in_order():
            if pool is None:
                write(item, buf, nbytes, digests)
            else:
                if len(pending) >= writers:
                    done, pending = wait_futures(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        f.result()
                pending.add(pool.submit(write, item, buf, nbytes, digests))
            copied += nbytes
        for f in pending:
            f.result()
    finally:
        if pool is not None:
            # No write may still land once this returns (or raises).
            pool.shutdown(wait=True, cancel_futures=True)
        ahead.close()
        progress.finish()
    return copied


#: An item read: the item, its buffer, the bytes in it and one xxh3_64 per chunk.
_Read = tuple[CopyItem, memoryview, int, list[int]]


def _read_item(
    item: CopyItem,
    buf: memoryview,
    chunk_size: int,
    volume_size: int,
    extent_bytes: int,
    progress: Progress,
) -> _Read:
    """Read one item into ``buf``, hash its chunks and verify them if it says what to expect."""
    if progress.cancelled:
        raise BlockguardError(detail="the copy was cancelled")
    nbytes = item.nbytes(chunk_size, volume_size)
    if nbytes <= 0 or item.count * chunk_size > extent_bytes:
        raise EnvironmentProblem(detail=f"bad copy extent {item!r}")
    view = buf[:nbytes]
    if item.runs:
        parts: list[tuple[int, memoryview]] = []
        off = 0
        for first, count in item.runs:
            n = min(count * chunk_size, nbytes - off)
            parts.append((first, view[off : off + n]))
            off += n
        read_runs = getattr(item.source, "read_runs", None)
        if read_runs is not None:
            # A stored generation joins runs that are neighbours in its data (a delta's,
            # packed in chunk order) into one vectored read.
            read_runs(parts)
        else:
            for first, part in parts:
                item.source.read_chunks(first, part)
    else:
        item.source.read_chunks(item.first, view)
    digests = [
        xxhash.xxh3_64_intdigest(view[off : off + chunk_size])
        for off in range(0, nbytes, chunk_size)
    ]
    if item.expected is not None:
        for i, (got, want) in enumerate(zip(digests, item.expected, strict=True)):
            if got != want:
                chunk = item.chunk_at(i)
                raise ChecksumMismatch(generation=item.owner(chunk), chunk=chunk)
    return item, buf, nbytes, digests


class _ReadAhead:
    """Reader threads that take items in order, read them into a bounded set of buffers,
    and hand the results back in the items' order (a failure in its place)."""

    def __init__(
        self,
        source: Iterator[CopyItem],
        read: Callable[[CopyItem, memoryview], _Read],
        readers: int,
        extent_bytes: int,
        spare: int = 0,
    ) -> None:
        self._source = source
        self._read = read
        self._readers = readers
        self._free: queue.Queue[memoryview | None] = queue.Queue()
        for _ in range(readers + 2 + spare):
            self._free.put(memoryview(aligned_buffer(extent_bytes)))
        self._take = threading.Lock()
        self._ready = threading.Condition()
        self._results: dict[int, _Read | BaseException] = {}
        self._issued = 0
        self._finished = 0
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._reader, name=f"blockguard-copy-reader-{n}", daemon=True)
            for n in range(readers)
        ]
        for t in self._threads:
            t.start()

    def in_order(self) -> Iterator[_Read]:
        """The items read, in their order, until the source is exhausted.

        :raises BaseException: what reading an item (or the source itself) raised.
        """
        seq = 0
        while True:
            with self._ready:
                while seq not in self._results and not (
                    self._finished == self._readers and seq >= self._issued
                ):
                    self._ready.wait()
                got = self._results.pop(seq, None)
            if got is None:
                return
            if isinstance(got, BaseException):
                raise got
            yield got
            seq += 1

    def recycle(self, buf: memoryview) -> None:
        """Give a written buffer back to the readers."""
        self._free.put(buf)

    def close(self) -> None:
        """Stop the readers and wait for them."""
        self._stop.set()
        for _ in self._threads:  # wake readers waiting for a buffer so that they see stop
            self._free.put(None)
        for t in self._threads:
            t.join()

    def _publish(self, seq: int, got: _Read | BaseException) -> None:
        with self._ready:
            self._results[seq] = got
            self._ready.notify_all()

    def _reader(self) -> None:
        try:
            while True:
                buf = self._free.get()
                if buf is None or self._stop.is_set():
                    return
                with self._take:
                    seq = self._issued
                    try:
                        item = next(self._source)
                    except StopIteration:
                        self._free.put(buf)
                        return
                    except BaseException as exc:  # the plan itself failed
                        self._issued += 1
                        self._publish(seq, exc)
                        return
                    self._issued += 1
                try:
                    got: _Read | BaseException = self._read(item, buf)
                except BaseException as exc:
                    got = exc
                self._publish(seq, got)
                if isinstance(got, BaseException):
                    return
        finally:
            with self._ready:
                self._finished += 1
                self._ready.notify_all()
