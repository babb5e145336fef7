"""The copy engine: moves chunks in large extents, overlapped, checksummed on the way.

Changed chunks are coalesced into extents of up to ``extent_bytes`` (8 MiB by default).
A reader thread fills page-aligned buffers (``O_DIRECT``-safe) with ``preadv``, hashes
each chunk with xxh3_64 and, when the item carries expected checksums, verifies them; the
calling thread writes the buffers out. A small fixed set of buffers bounds the memory and
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
    """Anything chunks can be read from: a device, a stored generation, a remote object."""

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


def copy_chunks(
    items: Iterable[CopyItem],
    sink: Sink,
    *,
    chunk_size: int,
    volume_size: int,
    progress: Progress | None = None,
    extent_bytes: int = DEFAULT_EXTENT_BYTES,
    readers: int = DEFAULT_READERS,
) -> int:
    """Copy every item to ``sink``, overlapping reads and writes; returns the bytes copied.

    ``readers`` threads read (and hash) items in parallel, which keeps several requests
    in flight for scattered small extents; the sink still receives the items strictly in
    their given order, from the calling thread. Items must have ``count * chunk_size <=
    extent_bytes``. The last chunk of the volume may be short: the views passed around
    are cut to the volume's end.

    :raises ChecksumMismatch: an item's data does not match its expected checksums.
    :raises BlockguardError: the copy was cancelled through ``progress``.
    """
    progress = progress or Progress()
    progress.start()
    free: queue.Queue[memoryview | None] = queue.Queue()
    for _ in range(readers + 2):
        free.put(memoryview(aligned_buffer(extent_bytes)))
    source = iter(items)
    take = threading.Lock()
    ready = threading.Condition()
    results: dict[int, tuple[CopyItem, memoryview, int, list[int]] | BaseException] = {}
    state = {"issued": 0, "finished": 0}
    stop = threading.Event()

    def read_one(item: CopyItem, buf: memoryview) -> tuple[CopyItem, memoryview, int, list[int]]:
        if progress.cancelled:
            raise BlockguardError(detail="the copy was cancelled")
        start = item.first * chunk_size
        nbytes = min(item.count * chunk_size, volume_size - start)
        if nbytes <= 0 or item.count * chunk_size > extent_bytes:
            raise EnvironmentProblem(detail=f"bad copy extent {item!r}")
        view = buf[:nbytes]
        item.source.read_chunks(item.first, view)
        digests = [
            xxhash.xxh3_64_intdigest(view[off : off + chunk_size])
            for off in range(0, nbytes, chunk_size)
        ]
        if item.expected is not None:
            for i, (got, want) in enumerate(zip(digests, item.expected, strict=True)):
                if got != want:
                    chunk = item.first + i
                    raise ChecksumMismatch(generation=item.owner(chunk), chunk=chunk)
        return item, buf, nbytes, digests

    def reader() -> None:
        try:
            while True:
                buf = free.get()
                if buf is None or stop.is_set():
                    return
                with take:
                    seq = state["issued"]
                    try:
                        item = next(source)
                    except StopIteration:
                        free.put(buf)
                        return
                    except BaseException as exc:  # the plan itself failed
                        state["issued"] += 1
                        with ready:
                            results[seq] = exc
                            ready.notify_all()
                        return
                    state["issued"] += 1
                try:
                    got: tuple[CopyItem, memoryview, int, list[int]] | BaseException
                    got = read_one(item, buf)
                except BaseException as exc:
                    got = exc
                with ready:
                    results[seq] = got
                    ready.notify_all()
                if isinstance(got, BaseException):
                    return
        finally:
            with ready:
                state["finished"] += 1
                ready.notify_all()

    threads = [
        threading.Thread(target=reader, name=f"blockguard-copy-reader-{n}", daemon=True)
        for n in range(readers)
    ]
    for t in threads:
        t.start()
    copied = 0
    try:
        seq = 0
        while True:
            with ready:
                while seq not in results and not (
                    state["finished"] == readers and seq >= state["issued"]
                ):
                    ready.wait()
                got = results.pop(seq, None)
            if got is None:
                break
            if isinstance(got, BaseException):
                raise got
            item, buf, nbytes, digests = got
            sink(item.first, buf[:nbytes], digests)
            copied += nbytes
            progress.advance(nbytes)
            free.put(buf)
            seq += 1
    finally:
        stop.set()
        for _ in threads:  # wake readers waiting for a buffer so that they see ``stop``
            free.put(None)
        for t in threads:
            t.join()
        progress.finish()
    return copied
