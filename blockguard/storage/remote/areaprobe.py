"""A target area's own performance, measured on the target (issue 11: the seed's volume
management program 117 reports "what it allocated with its performance").

A target's area is a directory on a file system (the standalone serve's ``--root``). Its
speeds are measured with the project's probe (:func:`~blockguard.storage.probe.run_test`,
the same tests, request sizes and depths as a pool disk's) on a scratch file in the area,
not on the block device under it: the device holds other data, and a file measures what
the serve will really get (the file system included). The scratch file is written whole
first, so reads read the disk, and removed afterwards.

The figures are kept in the area (``AREA/.area-probe.json``), so a probe runs once per
area, not once per connection: again only when the file is missing, unreadable, older
than ``max_age``, or the area now lives on another device.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from blockguard.core import vocab
from blockguard.core.perftable import DEFAULT_CHUNK_SIZE, DeviceSpeed, SpeedKind
from blockguard.core.units import MiB
from blockguard.errors import BlockguardError, InvalidInput
from blockguard.storage.manifest import write_atomic
from blockguard.storage.probe import ALL_KINDS, SEQ_BLOCK, TestResult, WritableRegion, run_test

log = logging.getLogger(__name__)

CACHE = ".area-probe.json"
LOCK = ".area-probe.lock"
SCRATCH = ".area-probe.tmp"
CACHE_FORMAT = 1
#: Figures older than this are measured again (disks age, areas move).
DEFAULT_MAX_AGE = 30 * 86400.0
DEFAULT_DURATION = 1.0
DEFAULT_DEPTHS = (1, 4)
#: The scratch file: at most this, at most a quarter of the free space.
DEFAULT_SIZE = 64 * MiB
MIN_SIZE = 4 * MiB


@dataclass(frozen=True)
class AreaReport:
    """One area as the target's ``areas`` answer reports it.

    Speeds in bytes/s (``None``: not measured, e.g. too little free space to probe);
    ``disk`` is ``ssd``, ``hdd`` or ``unknown``; ``layout`` how the area stores (``dir``).
    """

    name: str
    total: int
    free: int
    layout: str = "dir"
    disk: str = "unknown"
    seq_read: float | None = None
    seq_write: float | None = None
    rand_read: float | None = None
    rand_write: float | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    measured_at: float | None = None

    @property
    def speed(self) -> DeviceSpeed | None:
        """The measured figures, or ``None`` when any is missing."""
        figures = (self.seq_read, self.seq_write, self.rand_read, self.rand_write)
        if any(f is None or f <= 0 for f in figures):
            return None
        return DeviceSpeed(*figures, chunk_size=self.chunk_size)  # type: ignore[arg-type]  # checked above

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: Any) -> AreaReport:
        """An area from an ``areas`` answer; :raises ValueError: one that does not fit."""
        if not isinstance(value, dict):
            raise ValueError(f"an area is not an object: {value!r:.60}")
        name = value.get("name")
        if not isinstance(name, str):
            raise ValueError("an area without a name")
        try:
            vocab.check_name("target area", name)
        except InvalidInput as exc:
            raise ValueError(str(exc)) from None
        counts = {k: value.get(k) for k in ("total", "free", "chunk_size")}
        for key, n in counts.items():
            if type(n) is not int or n < 0:
                raise ValueError(f"area {name}: {key} is {n!r:.40}")
        speeds: dict[str, float | None] = {}
        for key in ("seq_read", "seq_write", "rand_read", "rand_write", "measured_at"):
            n = value.get(key)
            if n is not None and (isinstance(n, bool) or not isinstance(n, int | float) or n < 0):
                raise ValueError(f"area {name}: {key} is {n!r:.40}")
            speeds[key] = None if n is None else float(n)
        text = {k: value.get(k, "") for k in ("layout", "disk")}
        if not all(isinstance(t, str) and len(t) <= 40 and t.isprintable() for t in text.values()):
            raise ValueError(f"area {name}: a bad layout or disk type")
        return cls(name=name, **counts, **text, **speeds)  # type: ignore[arg-type]  # checked above


def disk_type(st_dev: int) -> str:
    """``ssd``, ``hdd`` or ``unknown`` for the device a file system is on (sysfs)."""
    sys_dir = Path(f"/sys/dev/block/{os.major(st_dev)}:{os.minor(st_dev)}")
    for queue in (sys_dir / "queue", sys_dir / ".." / "queue"):
        with contextlib.suppress(OSError):
            return "hdd" if (queue / "rotational").read_text().strip() == "1" else "ssd"
    return "unknown"


class _ScratchFile:
    """What :func:`run_test` needs of a device: an open fd."""

    def __init__(self, fd: int) -> None:
        self.fd = fd


def _open_direct(path: Path) -> int:
    """The scratch file for the tests: ``O_DIRECT`` where the file system has it (tmpfs
    has not: there the page cache is the area's speed anyway)."""
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(path, flags | os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return os.open(path, flags)


def probe_area(
    root: Path,
    *,
    size: int = DEFAULT_SIZE,
    duration: float = DEFAULT_DURATION,
    depths: Iterable[int] = DEFAULT_DEPTHS,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> DeviceSpeed | None:
    """Measure the four figures on a scratch file in ``root`` (removed afterwards).

    :returns: ``None`` when the area has too little free space for a scratch file.
    :raises OSError: the file system failed (the caller reports the area unmeasured).
    """
    st = os.statvfs(root)
    free = st.f_bavail * st.f_frsize
    length = min(size, free // 4) // MiB * MiB
    if length < max(MIN_SIZE, SEQ_BLOCK, chunk_size):
        log.warning("area %s: %d bytes free, too little to probe", root, free)
        return None
    scratch = root / SCRATCH
    scratch.unlink(missing_ok=True)
    try:
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            # Written whole (random: a compressing file system must not shortcut it), so
            # reads read blocks of the disk, not holes.
            block = os.urandom(MiB)
            for offset in range(0, length, MiB):
                os.pwrite(fd, block, offset)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, length, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        fd = _open_direct(scratch)
        try:
            dev = _ScratchFile(fd)
            region = WritableRegion(0, length)
            tests = {}
            for kind in ALL_KINDS:
                sequential = kind in (SpeedKind.SEQ_READ, SpeedKind.SEQ_WRITE)
                request = SEQ_BLOCK if sequential else chunk_size
                results = tuple(
                    run_test(dev, kind, request, region, depth, duration)  # type: ignore[arg-type]  # only .fd is used
                    for depth in sorted(set(depths))
                )
                tests[kind] = TestResult(kind, request, results)
        finally:
            os.close(fd)
    finally:
        scratch.unlink(missing_ok=True)
    return DeviceSpeed(**{k.value: tests[k].rate for k in ALL_KINDS}, chunk_size=chunk_size)


@contextlib.contextmanager
def _probe_lock(root: Path) -> Iterator[None]:
    """One probe per area at a time: two connections arriving together wait for one."""
    fd = os.open(root / LOCK, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _speed_figures(
    root: Path, name: str, st_dev: int, max_age: float, duration: float, size: int, clock: Any
) -> dict[str, Any]:
    """The area's kept figures, measured now when none are kept (or they are stale);
    empty when the probe failed.

    :raises OSError: the probe lock could not be taken.
    """
    figures: dict[str, Any] = {}
    with _probe_lock(root):
        now = clock()
        cached = _cached(root, st_dev, now, max_age)
        if cached is None:
            try:
                speed = probe_area(root, duration=duration, size=size)
            except (OSError, BlockguardError) as exc:
                log.warning("area %s: probe failed: %s", name, exc)
                speed = None
            if speed is not None:
                cached = _figures(st_dev, speed, now)
                try:
                    write_atomic(root / CACHE, json.dumps(cached).encode())
                except OSError as exc:  # a full area: measured again next time
                    log.warning("area %s: cannot keep its probe: %s", name, exc)
        if cached is not None:
            figures = {
                k: cached[k]
                for k in ("seq_read", "seq_write", "rand_read", "rand_write", "chunk_size")
            }
            figures["measured_at"] = cached["measured_at"]
    return figures


def _cached(root: Path, st_dev: int, now: float, max_age: float) -> dict[str, Any] | None:
    try:
        st = os.lstat(root / CACHE)
        if not stat.S_ISREG(st.st_mode):
            return None
        found = json.loads((root / CACHE).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(found, dict) or found.get("format") != CACHE_FORMAT:
        return None
    measured = found.get("measured_at")
    if not isinstance(measured, int | float) or not 0 <= now - measured <= max_age:
        return None
    if found.get("st_dev") != st_dev:
        return None  # the area moved to another device: its old figures say nothing
    return found


def keep_area_speed(root: Path, speed: DeviceSpeed, measured_at: float) -> dict[str, Any]:
    """Keep ``speed`` as the figures of the area ``root`` (what a probe does when done;
    an administrator or a test may give known figures the same way).

    :raises OSError: they could not be written.
    """
    kept = _figures(os.stat(root).st_dev, speed, measured_at)
    write_atomic(root / CACHE, json.dumps(kept).encode())
    return kept


def _figures(st_dev: int, speed: DeviceSpeed, measured_at: float) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "st_dev": st_dev,
        "measured_at": measured_at,
        "seq_read": speed.seq_read,
        "seq_write": speed.seq_write,
        "rand_read": speed.rand_read,
        "rand_write": speed.rand_write,
        "chunk_size": speed.chunk_size,
    }


def area_report(
    root: Path,
    name: str,
    *,
    max_age: float = DEFAULT_MAX_AGE,
    duration: float = DEFAULT_DURATION,
    size: int = DEFAULT_SIZE,
    clock: Any = time.time,
) -> AreaReport:
    """``root`` as an area: its space now and its speeds (cached, or measured now).

    A failed probe reports the area unmeasured (logged), never fails the answer: the
    client then plans with the link alone, as for a target that reports no areas.
    """
    vocab.check_name("target area", name)
    st = os.statvfs(root)
    st_dev = os.stat(root).st_dev
    try:
        figures = _speed_figures(root, name, st_dev, max_age, duration, size, clock)
    except OSError as exc:  # the lock (an area the serve may not write): unmeasured
        log.warning("area %s: cannot probe it: %s", name, exc)
        figures = {}
    return AreaReport(
        name=name,
        total=st.f_blocks * st.f_frsize,
        free=st.f_bavail * st.f_frsize,
        disk=disk_type(st_dev),
        **figures,
    )
