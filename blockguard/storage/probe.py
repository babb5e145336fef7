"""The project's own fio-style throughput probe.

:func:`probe_device` measures a block device the way fio does with ``direct=1``: ``O_DIRECT``
on page-aligned buffers, a fixed duration per test, several queue depths. A queue depth of
N is N threads each doing synchronous ``preadv``/``pwritev`` (they release the GIL, so the
kernel sees N requests in flight, like fio's ``psync`` engine with ``numjobs=N``). Sequential
tests use 1 MiB requests at one shared, advancing offset, so the device sees one stream in
order however many threads issue it; random tests use the volume's chunk size at aligned
offsets drawn uniformly. Each figure is the best over the depths tried.

Writes destroy data, so the probe writes only inside a :class:`WritableRegion` that the
caller vouches is unused (free pool space). Without one it measures reads only, and asking
it for a write figure is an error, never a silent default.

:func:`~blockguard.storage.devinfo.describe_device` fills in the rest of a
performance-table row.
"""

from __future__ import annotations

import array
import contextlib
import os
import random
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from blockguard.core.perftable import (
    DEFAULT_CHUNK_SIZE,
    DeviceSpeed,
    SpeedKind,
)
from blockguard.core.units import KiB, MiB, format_rate, format_size
from blockguard.errors import InvalidInput
from blockguard.storage.blockdev import BlockDevice, aligned_buffer

#: Request size of the sequential tests (the performance table's definition).
SEQ_BLOCK = MiB
DEFAULT_DURATION = 2.0
DEFAULT_DEPTHS = (1, 2, 4, 8)
#: Climbing to the next depth stops once it gains less than this: the device is saturated,
#: and the remaining depths would only cost time.
SATURATION_GAIN = 1.10
#: Pattern written by write tests: random bytes, so that compressing or zero-detecting
#: devices (thin pools, VDO, SSD controllers) cannot make writes look faster than real data.
_PATTERN_SEED = 0x5EED
_STAMP_STRIDE = 4 * KiB // 8  # 8-byte words per 4 KiB block

WRITE_KINDS = frozenset({SpeedKind.SEQ_WRITE, SpeedKind.RAND_WRITE})
READ_KINDS = (SpeedKind.SEQ_READ, SpeedKind.RAND_READ)
ALL_KINDS = (SpeedKind.SEQ_READ, SpeedKind.SEQ_WRITE, SpeedKind.RAND_READ, SpeedKind.RAND_WRITE)


@dataclass(frozen=True)
class WritableRegion:
    """A byte range of a device whose contents the caller vouches nobody needs.

    :param offset: first byte; a multiple of 4 KiB.
    :param length: bytes; a multiple of 4 KiB, at least one request of each write test.
    """

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class DepthResult:
    """One test at one queue depth."""

    depth: int
    nbytes: int
    ios: int
    seconds: float

    @property
    def rate(self) -> float:
        """Bytes per second."""
        return self.nbytes / self.seconds if self.seconds > 0 else 0.0

    @property
    def iops(self) -> float:
        return self.ios / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class TestResult:
    """One kind of test (e.g. sequential read) at every depth tried."""

    kind: SpeedKind
    block_size: int
    depths: tuple[DepthResult, ...]

    @property
    def best(self) -> DepthResult:
        """The depth with the highest throughput (what the table records)."""
        return max(self.depths, key=lambda d: d.rate)

    @property
    def rate(self) -> float:
        return self.best.rate

    def describe(self) -> str:
        per_depth = ", ".join(f"qd{d.depth} {format_rate(d.rate)}" for d in self.depths)
        return (
            f"{self.kind.value} @{format_size(self.block_size)}: {format_rate(self.rate)} "
            f"(best qd{self.best.depth}; {per_depth})"
        )


@dataclass(frozen=True)
class ProbeResult:
    """What a probe run measured.

    :param path: the device probed.
    :param chunk_size: request size of the random tests.
    :param tests: the tests run, by kind (writes are absent without a writable region).
    """

    path: str
    chunk_size: int
    tests: Mapping[SpeedKind, TestResult] = field(default_factory=dict)

    def rate(self, kind: SpeedKind) -> float:
        """The best throughput of one kind, bytes/s.

        :raises InvalidInput: if that kind was not measured.
        """
        try:
            return self.tests[SpeedKind(kind)].rate
        except KeyError:
            raise InvalidInput(
                detail=f"{kind} of {self.path} was not measured "
                f"(measured: {', '.join(k.value for k in self.tests) or 'nothing'})"
            ) from None

    def speed(self, fallback: DeviceSpeed | None = None) -> DeviceSpeed:
        """The figures as a :class:`DeviceSpeed`.

        :param fallback: where to take the figures that were not measured from (e.g. the
            existing table entry when only reads could be measured).
        :raises InvalidInput: if a figure was not measured and there is no fallback.
        """
        figures: dict[str, float] = {}
        for kind in ALL_KINDS:
            if kind in self.tests:
                figures[kind.value] = self.tests[kind].rate
            elif fallback is not None:
                figures[kind.value] = fallback.get(kind)
            else:
                self.rate(kind)  # raises, naming what is missing
        return DeviceSpeed(**figures, chunk_size=self.chunk_size)

    def describe(self) -> str:
        return "\n".join(t.describe() for t in self.tests.values())


def probe_device(
    path: str | os.PathLike[str],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    writable: WritableRegion | None = None,
    kinds: Iterable[SpeedKind] | None = None,
    duration: float = DEFAULT_DURATION,
    depths: Iterable[int] = DEFAULT_DEPTHS,
    stop_at_saturation: bool = True,
    expect_rdev: int | None = None,
) -> ProbeResult:
    """Measure a device's sequential and random throughput.

    :param path: the block device.
    :param chunk_size: request size of the random tests (the volume's chunk size).
    :param writable: the only range write tests may touch; ``None``: no writes at all.
    :param kinds: which tests to run; default: all four with ``writable``, reads without.
    :param duration: seconds per test and depth.
    :param depths: queue depths to try, ascending.
    :param stop_at_saturation: stop climbing depths once a step gains less than 10%.
    :param expect_rdev: refuse the path if it is not this device.
    :raises InvalidInput: a write test without a writable region, a bad region or setting.
    :raises NotABlockDevice: the path is not (the expected) block device.
    """
    path = os.fspath(path)
    if kinds is None:
        wanted = list(ALL_KINDS if writable is not None else READ_KINDS)
    else:
        wanted = [SpeedKind(k) for k in kinds]
    writes = [k for k in wanted if k in WRITE_KINDS]
    if writes and writable is None:
        raise InvalidInput(
            detail=f"refusing to measure {', '.join(k.value for k in writes)} on {path}: "
            "write tests destroy data and need a writable region of unused space "
            "(WritableRegion) that the caller vouches for"
        )
    if not (4 * KiB <= chunk_size <= 16 * MiB) or chunk_size & (chunk_size - 1):
        raise InvalidInput(detail=f"probe chunk size {chunk_size} is not a power of two >= 4 KiB")
    if not duration > 0:
        raise InvalidInput(detail=f"probe duration {duration!r} must be positive")
    depth_list = sorted(set(depths))
    if not depth_list or depth_list[0] < 1:
        raise InvalidInput(detail=f"queue depths {depths!r} must be integers >= 1")

    tests: dict[SpeedKind, TestResult] = {}
    with BlockDevice(path, write=bool(writes), direct=True, expect_rdev=expect_rdev) as dev:
        whole = WritableRegion(0, dev.size - dev.size % (4 * KiB))
        if writable is not None and writes:
            _check_region(writable, dev, max(SEQ_BLOCK, chunk_size), path)
        for kind in wanted:
            block = SEQ_BLOCK if kind in (SpeedKind.SEQ_READ, SpeedKind.SEQ_WRITE) else chunk_size
            region = writable if kind in WRITE_KINDS else whole
            assert region is not None  # checked above: writes have a region
            if region.length < block:
                raise InvalidInput(
                    detail=f"{path} is too small to probe: {region.length} bytes, "
                    f"need {block} for {kind.value}"
                )
            results: list[DepthResult] = []
            for depth in depth_list:
                result = run_test(dev, kind, block, region, depth, duration)
                if (
                    stop_at_saturation
                    and results
                    and result.rate < max(r.rate for r in results) * SATURATION_GAIN
                ):
                    results.append(result)
                    break
                results.append(result)
            tests[kind] = TestResult(kind, block, tuple(results))
    return ProbeResult(path, chunk_size, tests)


def _check_region(region: WritableRegion, dev: BlockDevice, block: int, path: str) -> None:
    align = max(4 * KiB, dev.logical_block_size)
    if region.offset < 0 or region.length <= 0:
        raise InvalidInput(detail=f"writable region {region} of {path} is empty or negative")
    if region.offset % align or region.length % align:
        raise InvalidInput(detail=f"writable region {region} of {path} is not {align}-aligned")
    if region.end > dev.size:
        raise InvalidInput(
            detail=f"writable region {region} ends past the end of {path} ({dev.size} bytes)"
        )
    if region.length < block:
        raise InvalidInput(
            detail=f"writable region {region} of {path} is smaller than one request ({block})"
        )


class _SequentialCursor:
    """One stream of requests in order, shared by the threads of a sequential test."""

    def __init__(self, region: WritableRegion, block: int) -> None:
        self._lock = threading.Lock()
        self._start = region.offset
        self._count = region.length // block
        self._block = block
        self._next = 0

    def take(self) -> int:
        with self._lock:
            index = self._next
            self._next = (index + 1) % self._count
        return self._start + index * self._block


def run_test(
    dev: BlockDevice,
    kind: SpeedKind,
    block: int,
    region: WritableRegion,
    depth: int,
    duration: float,
) -> DepthResult:
    """One test: ``depth`` threads issuing ``block``-sized requests for ``duration`` seconds.

    Every request lies entirely inside ``region`` (the caller checked it for writes).

    :param dev: the device, opened with ``O_DIRECT`` (and for writing, for write kinds).
    :param kind: which test.
    :param block: request size, a multiple of 4 KiB.
    :param region: where requests may go.
    :param depth: number of threads, i.e. requests in flight.
    :param duration: seconds.
    """
    kind = SpeedKind(kind)
    write = kind in WRITE_KINDS
    sequential = kind in (SpeedKind.SEQ_READ, SpeedKind.SEQ_WRITE)
    cursor = _SequentialCursor(region, block)
    slots = region.length // block
    totals = [0] * depth
    counts = [0] * depth
    finished = [0.0] * depth
    errors: list[BaseException] = []
    start_gate = threading.Barrier(depth + 1)
    pattern = random.Random(_PATTERN_SEED).randbytes(block) if write else b""

    def worker(index: int) -> None:
        buf = aligned_buffer(block)
        view = memoryview(buf)
        words = view.cast("Q")
        try:
            if write:
                view[:] = pattern
            rng = random.Random(index * 7919 + block)
            io = os.pwritev if write else os.preadv
            fd = dev.fd
            done = ios = 0
            start_gate.wait()
            deadline = started_at[0] + duration
            while time.monotonic() < deadline:
                offset = (
                    cursor.take() if sequential else region.offset + rng.randrange(slots) * block
                )
                if write:
                    # Stamp every 4 KiB block with its offset and a write count, as fio's
                    # scramble_buffers does: no two writes carry the same data, so a
                    # deduplicating or compare-before-write device cannot skip any.
                    stamp = (((ios * depth + index) & 0xFFFF) << 48) | offset
                    words[::_STAMP_STRIDE] = array.array("Q", range(stamp, stamp + block, 4096))
                n = io(fd, [view], offset)
                if n != block:
                    raise OSError(f"short {'write' if write else 'read'} at {offset}: {n}")
                done += n
                ios += 1
            totals[index] = done
            counts[index] = ios
            finished[index] = time.monotonic()
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)
            start_gate.abort()
        finally:
            words.release()
            view.release()
            buf.close()

    started_at = [0.0]
    threads = [
        threading.Thread(target=worker, args=(i,), name=f"probe-{kind.value}-{i}", daemon=True)
        for i in range(depth)
    ]
    for t in threads:
        t.start()
    started_at[0] = time.monotonic()
    with contextlib.suppress(threading.BrokenBarrierError):
        start_gate.wait()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    # The last request started before the deadline ends after it; count until it did.
    elapsed = max(finished) - started_at[0]
    return DepthResult(depth, sum(totals), sum(counts), elapsed)
