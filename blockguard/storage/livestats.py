"""Live throughput figures during real backups and restores.

A :class:`LiveSampler` watches one device while a job runs: the kernel's per-disk counters
(``psutil.disk_io_counters(perdisk=True)``, i.e. ``/proc/diskstats``) and the bytes the job
itself reports having read and written. :meth:`LiveSampler.sample` returns the rates over the
interval since the previous sample, and :func:`observations` turns them into figures for
:meth:`PerformanceTable.observe`.

A rate observed while the device was mostly idle says how fast the job went, not how fast
the device can go (the job may have waited on the other device, on hashing or on the
network), so figures are offered only for intervals where the device was busy most of the
time and enough bytes moved to mean something. The kernel's counters include other load on
the device; the job's own count does not, so it is preferred when given.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psutil

from blockguard.core.perftable import PerformanceEntry, PerformanceTable, SpeedKind
from blockguard.core.units import MiB, format_rate
from blockguard.errors import InvalidInput, NotFound
from blockguard.storage.blockdev import device_rdev, sysfs_dir

#: Below this, an interval's rate is dominated by start-up and rounding.
MIN_INTERVAL = 0.5
MIN_BYTES = 16 * MiB
#: Fraction of the interval the device must have been busy for its rate to count as what the
#: device can do (``busy_time`` from the kernel's ``io_ticks``).
MIN_UTILIZATION = 0.5


def kernel_name(path: str | os.PathLike[str]) -> str:
    """The kernel's name of a block device path (``/dev/mapper/vg-lv`` -> ``dm-3``)."""
    return sysfs_dir(device_rdev(path)).name


@dataclass(frozen=True)
class DiskCounters:
    """One reading of a disk's cumulative counters."""

    read_bytes: int
    write_bytes: int
    busy_ms: int | None
    at: float


@dataclass(frozen=True)
class LiveRates:
    """Rates over one interval.

    :param device: the kernel name watched.
    :param interval: seconds.
    :param disk_read: bytes/s read from the device (all processes).
    :param disk_write: bytes/s written to the device (all processes).
    :param job_read: bytes/s the job reported reading, ``None`` if it reported nothing.
    :param job_write: bytes/s the job reported writing, ``None`` if it reported nothing.
    :param utilization: fraction of the interval the device was busy, if known.
    """

    device: str
    interval: float
    disk_read: float
    disk_write: float
    job_read: float | None = None
    job_write: float | None = None
    utilization: float | None = None

    @property
    def read_rate(self) -> float:
        """The job's own read rate when it reported one, else the device's."""
        return self.job_read if self.job_read is not None else self.disk_read

    @property
    def write_rate(self) -> float:
        """The job's own write rate when it reported one, else the device's."""
        return self.job_write if self.job_write is not None else self.disk_write

    def describe(self) -> str:
        util = f", busy {self.utilization:.0%}" if self.utilization is not None else ""
        job = ""
        if self.job_read is not None or self.job_write is not None:
            job = (
                f"; job r/w {format_rate(self.job_read or 0.0)} / "
                f"{format_rate(self.job_write or 0.0)}"
            )
        return (
            f"{self.device} over {self.interval:.1f}s: r/w {format_rate(self.disk_read)} / "
            f"{format_rate(self.disk_write)}{job}{util}"
        )


CounterSource = Callable[[], Mapping[str, Any]]


def _psutil_counters() -> Mapping[str, Any]:
    return psutil.disk_io_counters(perdisk=True, nowrap=True) or {}


class LiveSampler:
    """Samples one device's counters and a job's own byte counts.

    :param device: kernel name (see :func:`kernel_name`).
    :param counters: per-disk counter source (psutil by default; replaceable in tests).
    :param clock: monotonic clock.
    :raises NotFound: if the kernel has no counters for ``device``.
    """

    def __init__(
        self,
        device: str,
        *,
        counters: CounterSource = _psutil_counters,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device = device
        self._counters = counters
        self._clock = clock
        self._lock = threading.Lock()
        self._job_read = 0
        self._job_written = 0
        self._job_reported = False
        self._last = self._read()

    def _read(self) -> DiskCounters:
        stats = self._counters().get(self.device)
        if stats is None:
            raise NotFound(what="disk counters of device", name=self.device)
        busy = getattr(stats, "busy_time", None)
        return DiskCounters(
            int(stats.read_bytes),
            int(stats.write_bytes),
            int(busy) if busy is not None else None,
            self._clock(),
        )

    def add_job_bytes(self, read: int = 0, written: int = 0) -> None:
        """Count bytes the job moved on this device (safe from any thread)."""
        if read < 0 or written < 0:
            raise InvalidInput(detail=f"job byte counts must be >= 0, got {read}, {written}")
        with self._lock:
            self._job_read += read
            self._job_written += written
            self._job_reported = True

    def sample(self) -> LiveRates:
        """Rates since the previous sample (or since construction); starts a new interval."""
        now = self._read()
        with self._lock:
            job_read, job_written, reported = (
                self._job_read,
                self._job_written,
                self._job_reported,
            )
            self._job_read = self._job_written = 0
            self._job_reported = False
        last, self._last = self._last, now
        interval = now.at - last.at
        if interval <= 0:
            return LiveRates(self.device, 0.0, 0.0, 0.0)
        utilization = None
        if now.busy_ms is not None and last.busy_ms is not None:
            utilization = min(1.0, max(0.0, (now.busy_ms - last.busy_ms) / 1000 / interval))
        return LiveRates(
            device=self.device,
            interval=interval,
            disk_read=max(0, now.read_bytes - last.read_bytes) / interval,
            disk_write=max(0, now.write_bytes - last.write_bytes) / interval,
            job_read=job_read / interval if reported else None,
            job_write=job_written / interval if reported else None,
            utilization=utilization,
        )


def observations(
    rates: LiveRates,
    *,
    scattered: bool,
    min_interval: float = MIN_INTERVAL,
    min_bytes: int = MIN_BYTES,
    min_utilization: float = MIN_UTILIZATION,
) -> list[tuple[SpeedKind, float]]:
    """The figures an interval says something about, as ``(kind, bytes/s)``.

    :param rates: one sample.
    :param scattered: the job's requests were random at chunk size (else sequential).
    :param min_interval: shorter intervals say nothing.
    :param min_bytes: fewer bytes in a direction say nothing about it.
    :param min_utilization: a less busy device was not the bottleneck: no figures.
    """
    if rates.interval < min_interval:
        return []
    if rates.utilization is not None and rates.utilization < min_utilization:
        return []
    found: list[tuple[SpeedKind, float]] = []
    read_kind = SpeedKind.RAND_READ if scattered else SpeedKind.SEQ_READ
    write_kind = SpeedKind.RAND_WRITE if scattered else SpeedKind.SEQ_WRITE
    for kind, rate in ((read_kind, rates.read_rate), (write_kind, rates.write_rate)):
        if rate > 0 and rate * rates.interval >= min_bytes:
            found.append((kind, rate))
    return found


def feed(
    table: PerformanceTable,
    device_id: str,
    rates: LiveRates,
    *,
    scattered: bool,
    at: datetime | None = None,
    **thresholds: Any,
) -> PerformanceEntry | None:
    """Blend an interval's figures into the table entry of ``device_id``.

    :param thresholds: passed to :func:`observations`.
    :returns: the updated entry, or ``None`` if the interval said nothing.
    :raises NotFound: if the device has no entry.
    """
    entry = None
    when = at or datetime.now(UTC)
    for kind, rate in observations(rates, scattered=scattered, **thresholds):
        entry = table.observe(device_id, kind, rate, when)
    return entry
