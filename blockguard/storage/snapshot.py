"""Point-in-time copies of a volume that stays online: the source a backup reads.

(One thing at ~450 lines: point-in-time copies behind one interface, and their crash recovery.)

Two kinds, one interface (:class:`PointInTime`):

- **thin volumes**: a :class:`~.tracking.thin.ThinTracker` reference *is* a thin snapshot;
  :class:`ThinPointInTime` takes one and reads from it. It cannot overflow (its blocks
  are the thin pool's), and its change set against an earlier reference is exact.
- **everything else** (era-tracked volumes, stacked or interposed, and plain dm volumes):
  :class:`DmSnapshotPointInTime` puts a dm-snapshot under the volume's top dm device,
  with its exception store (COW) on pool space (:meth:`LvmPool.cow_store` or
  :class:`LoopCowStore` on a directory). While the top device is suspended (I/O
  quiesced and flushed): a ``snapshot-origin`` layer over the data device is created and
  suspended, the ``snapshot`` is created, the origin resumed — a snapshot-origin learns
  the snapshot's chunk size when it resumes; created in the other order, bios spanning
  several chunks would copy out only their first one — and the top device's table is
  reloaded to go through the origin layer; resuming the top activates it. For an era
  device the top table is the era target with its origin replaced (the resume starts
  the new era that is the reference boundary); for a plain dm device its table moves
  to ``blockguard-pit-<top>-i`` and the top becomes a snapshot-origin of that.

If the exception store fills, the kernel invalidates the persistent snapshot: writes to
the volume go on (never blocked), reads of the snapshot fail. :func:`backup_point_in_time`
turns that into :class:`~blockguard.errors.SnapshotOverflow`, removing a generation that
may have raced the invalidation; releasing the point in time puts the top table back
and removes every layer. :func:`recover_stale_points_in_time` does the same, from the
kernel's state alone, for layers a killed process left behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from abc import ABC, abstractmethod
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from pyroaring import BitMap

from blockguard.core.retention import RetentionPolicy
from blockguard.core.vocab import GenerationKind, devno
from blockguard.errors import BlockguardError, InvalidInput, SnapshotOverflow
from blockguard.storage.backup import BackupResult, apply_retention_after_commit, run_backup
from blockguard.storage.blockdev import BlockDevice, aligned_buffer, device_rdev
from blockguard.storage.copyengine import DEFAULT_EXTENT_BYTES, Progress
from blockguard.storage.dm import DeviceMapper
from blockguard.storage.manifest import VolumeIdentity
from blockguard.storage.pool.base import PoolBackend
from blockguard.storage.runner import Runner, default_runner
from blockguard.storage.tracking.base import ChangeSet
from blockguard.storage.tracking.era import EraTracker
from blockguard.storage.tracking.thin import ThinTracker

log = logging.getLogger(__name__)
PREFIX = "blockguard-pit-"
#: dm-snapshot chunk: the unit copied to the exception store on a first write.
DEFAULT_COW_CHUNK = 8 << 10
#: Targets whose table may be loaded twice (the plain-volume interposition needs it).
_DUPLICABLE = {"linear", "striped", "zero", "error"}


class CowStore(Protocol):
    """Space for a dm-snapshot's exceptions: a device that ``release()`` gives back."""

    device: str
    size: int

    def release(self) -> None: ...


class PointInTime(ABC):
    """A frozen view of a volume while it stays online; release it when done.

    :ivar volume: the volume's path (what users write to).
    :ivar source: the device a backup reads (its content does not change).
    """

    def __init__(self, volume: str, source: str) -> None:
        self.volume = volume
        self.source = source
        self.committed = False

    @abstractmethod
    def valid(self) -> bool:
        """False once the copy can no longer be trusted (its exception store filled)."""

    def check(self) -> None:
        """:raises SnapshotOverflow: the copy was invalidated."""
        if not self.valid():
            raise SnapshotOverflow(volume=self.volume)

    @abstractmethod
    def changed_since(self, reference: str) -> ChangeSet:
        """Chunks that may differ between tracker reference ``reference`` and this copy
        (exact for thin; a superset — writes since the copy included — for era)."""

    @abstractmethod
    def commit(self) -> None:
        """Make this point the tracker's new reference (after its backup committed)."""

    @abstractmethod
    def release(self) -> None:
        """Remove what the copy holds; idempotent. An uncommitted reference is dropped."""

    def __enter__(self) -> PointInTime:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


class ThinPointInTime(PointInTime):
    """A thin snapshot taken as tracker reference ``name``; it is the backup's source."""

    def __init__(self, tracker: ThinTracker, name: str) -> None:
        tracker.add_reference(name, active=True)
        try:
            source = tracker.reference_device(name)
        except BaseException:
            tracker.drop_reference(name)
            raise
        super().__init__(tracker.volume, source)
        self.tracker = tracker
        self.name = name
        self._released = False

    def valid(self) -> bool:
        return True

    def changed_since(self, reference: str) -> ChangeSet:
        return self.tracker.changed_between(reference, self.name)

    def commit(self) -> None:
        self.committed = True

    def release(self) -> None:
        if not self._released:
            self._released = True
            if not self.committed:
                self.tracker.drop_reference(self.name)


class DmSnapshotPointInTime(PointInTime):
    """A dm-snapshot interposed under ``device``'s top dm device; see the module docstring.

    :param device: the volume: an era tracker's device, or any dm device of linear
        segments (an LVM thick LV, say).
    :param cow: the exception store; released with the copy unless ``keep_cow`` (a
        store kept for the volume's next copy: its header is wiped at each use).
    :param tracker: the era tracker of ``device``, if any; ``name`` then becomes its
        reference at :meth:`commit`.
    :raises InvalidInput: ``device`` is not a dm device, or its table cannot be moved.
    """

    def __init__(
        self,
        device: str,
        cow: CowStore,
        *,
        tracker: EraTracker | None = None,
        name: str | None = None,
        chunk_size: int = DEFAULT_COW_CHUNK,
        keep_cow: bool = False,
        runner: Runner | None = None,
    ) -> None:
        self.dm = DeviceMapper(runner or default_runner())
        self.cow = cow
        self.keep_cow = keep_cow
        self.tracker = tracker
        self.name = name
        self._chunk_sectors = chunk_size // 512
        self._made: list[str] = []
        self._top_reloaded = False
        self._released = False
        try:
            top = self.dm.name_of(device_rdev(device))
            if top is None:
                raise InvalidInput(detail=f"{device} is not a device-mapper device")
            self.top = top
            self.original_table = self.dm.table(top)
            source = self._take(device)
        except BaseException:
            self._unwind()
            raise
        super().__init__(device, source)

    def _take(self, device: str) -> str:
        lines = self.original_table.splitlines()
        first = lines[0].split()
        sectors = sum(int(line.split()[1]) for line in lines)
        era = self.tracker is not None
        if era:
            if len(lines) != 1 or first[2] != "era":
                raise InvalidInput(detail=f"{device} ({self.top}) has no dm-era table")
        elif not {line.split()[2] for line in lines} <= _DUPLICABLE:
            raise InvalidInput(
                detail=f"{device} ({self.top}) has a {first[2]} table; a point-in-time copy "
                "of it needs an era or thin tracker"
            )
        _zero_header(self.cow.device)
        chunk = self._chunk_sectors
        origin_name, snap_name = f"{PREFIX}{self.top}-o", f"{PREFIX}{self.top}-s"
        with self._quiesced():
            if era:
                data = first[4]
                origin = _devno_of(self._create(origin_name, f"0 {sectors} snapshot-origin {data}"))
                new_top = " ".join([*first[:4], origin, *first[5:]])
            else:
                data = _devno_of(self._create(f"{PREFIX}{self.top}-i", self.original_table))
                origin_name, new_top = self.top, f"0 {sectors} snapshot-origin {data}"
            if origin_name != self.top:
                self.dm.suspend(origin_name)
            try:
                cow = _devno_of(self.cow.device)
                snap = self._create(snap_name, f"0 {sectors} snapshot {data} {cow} P {chunk}")
            finally:
                if origin_name != self.top:
                    self.dm.resume(origin_name)
            self.dm.reload(self.top, new_top)
            self._top_reloaded = True
        self.snapshot_name = snap_name
        return snap

    def _quiesced(self) -> contextlib.AbstractContextManager[None]:
        """Suspend the top device for the body (through the era tracker when there is one,
        so that its resume is the reference era)."""
        if self.tracker is not None:
            return self.tracker.point_in_time()
        return _Suspended(self.dm, self.top)

    def _create(self, name: str, table: str) -> str:
        if self.dm.exists(name):
            raise InvalidInput(detail=f"{name} exists: another point-in-time copy of {self.top}")
        path = self.dm.create(name, table)
        self._made.append(name)
        return path

    def valid(self) -> bool:
        if self._released:
            return False
        return snapshot_valid(self.dm, self.snapshot_name)

    def changed_since(self, reference: str) -> ChangeSet:
        if self.tracker is None:
            raise InvalidInput(detail=f"{self.volume} has no change tracker")
        return self.tracker.changed(reference)

    def commit(self) -> None:
        if self.tracker is not None and self.name:
            self.tracker.commit_reference(self.name, replace=True)
        self.committed = True

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._unwind()

    def _unwind(self) -> None:
        if self._top_reloaded:
            _reload_live(self.dm, self.top, self.original_table)
            self._top_reloaded = False
        for name in reversed(self._made):
            self.dm.remove(name)
        self._made.clear()
        if not self.keep_cow:
            self.cow.release()


class _Suspended:
    def __init__(self, dm: DeviceMapper, name: str) -> None:
        self.dm, self.name = dm, name

    def __enter__(self) -> None:
        self.dm.suspend(self.name)

    def __exit__(self, *_: object) -> None:
        self.dm.resume(self.name)


class LoopCowStore:
    """An exception store in a file (a ``dir`` pool's directory), through a loop device.

    The file is fully allocated, so a pool running out of space cannot fail the
    snapshot half-way.
    """

    def __init__(self, directory: str | os.PathLike[str], size: int, label: str,
                 runner: Runner | None = None) -> None:  # fmt: skip
        self.run = runner or default_runner()
        self.path = Path(directory) / f"cow-{label}.img"
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)
        try:
            self.device = self._attach()
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        self.size = size
        self._released = False

    def _attach(self) -> str:
        # Direct I/O keeps the store out of the page cache; file systems without
        # O_DIRECT (tmpfs) refuse it, and then buffered is what there is.
        for extra in (["--direct-io=on"], []):
            res = self.run.run(
                ["losetup", "--find", "--show", *extra, str(self.path)], timeout=60, check=not extra
            )
            if res.returncode == 0:
                return res.stdout.strip()
        raise AssertionError("unreachable: the last attempt raises")

    def release(self) -> None:
        if not self._released:
            self.run.run(["losetup", "-d", self.device], timeout=60)
            self.path.unlink(missing_ok=True)
            self._released = True


def snapshot_valid(dm: DeviceMapper, name: str) -> bool:
    """A dm-snapshot's status is ``<used>/<total> <metadata>`` while valid, and
    ``Invalid`` (or ``Overflow``, ``Merge failed``) once it is not."""
    fields = dm.status(name).split()
    return len(fields) > 3 and fields[2] == "snapshot" and "/" in fields[3]


def point_in_time(
    device: str,
    *,
    name: str,
    tracker: ThinTracker | EraTracker | None = None,
    cow: CowStore | None = None,
    runner: Runner | None = None,
) -> PointInTime:
    """The right kind of point-in-time copy for ``device`` (see the module docstring).

    :param name: the tracker reference this point becomes.
    :param cow: the exception store (needed unless ``tracker`` is a thin tracker).
    """
    if isinstance(tracker, ThinTracker):
        return ThinPointInTime(tracker, name)
    if cow is None:
        raise InvalidInput(detail=f"a point-in-time copy of {device} needs an exception store")
    return DmSnapshotPointInTime(device, cow, tracker=tracker, name=name, runner=runner)


def backup_point_in_time(
    pit: PointInTime,
    pool: PoolBackend,
    volume: VolumeIdentity,
    kind: GenerationKind | str,
    changed: BitMap | None,
    *,
    chunk_size: int,
    base_id: str | None = None,
    parent_id: str | None = None,
    keep: int | RetentionPolicy | None = None,
    progress: Progress | None = None,
    extent_bytes: int = DEFAULT_EXTENT_BYTES,
) -> BackupResult:
    """:func:`~.backup.run_backup` from ``pit``, then :meth:`PointInTime.commit`.

    :raises SnapshotOverflow: the copy was invalidated during the backup; nothing was
        committed (a generation that raced the invalidation is removed again).
    """
    pit.check()
    try:
        result = run_backup(
            pool, volume, pit.source, kind, changed, chunk_size=chunk_size, base_id=base_id,
            parent_id=parent_id, progress=progress, extent_bytes=extent_bytes,
        )  # fmt: skip
    except (BlockguardError, OSError) as exc:
        if not pit.valid():
            raise SnapshotOverflow(volume=volume.name) from exc
        raise
    if not pit.valid():
        # Reads that were under way when the store filled may have seen new data.
        pool.remove_generation(volume.name, result.manifest.generation_id)
        raise SnapshotOverflow(volume=volume.name)
    pit.commit()
    warnings = list(result.warnings)
    retention = apply_retention_after_commit(pool, volume.name, keep, warnings)
    return replace(result, retention=retention, warnings=tuple(warnings))


def recover_stale_points_in_time(runner: Runner | None = None) -> list[str]:
    """Undo dm-snapshot layers that a killed process left: each top device gets its own
    table back, then the layers go. Works from the kernel's state alone.

    :returns: the top devices put back.
    """
    dm = DeviceMapper(runner or default_runner())
    names = [n for n in dm.names() if n.startswith(PREFIX)]
    tops = sorted({m.group(1) for n in names if (m := re.fullmatch(rf"{PREFIX}(.+)-[ois]", n))})
    restored: list[str] = []
    for top in tops:
        snap, origin, inner = (f"{PREFIX}{top}-{s}" for s in "soi")
        if dm.exists(top) and dm.exists(snap):
            table = dm.table(top)
            fields = table.split()
            data = dm.table(snap).split()[3]  # "0 N snapshot DATA COW P CHUNK"
            if fields[2] == "era" and dm.exists(origin):
                _reload_live(dm, top, " ".join([*fields[:4], data, *fields[5:]]))
            elif fields[2] == "snapshot-origin" and dm.exists(inner):
                _reload_live(dm, top, dm.table(inner))
        for name in (snap, origin, inner):
            dm.remove(name)
        restored.append(top)
    if restored:
        log.warning("removed stale point-in-time layers under %s", restored)
    return restored


def _reload_live(dm: DeviceMapper, name: str, table: str) -> None:
    dm.suspend(name)
    try:
        dm.reload(name, table)
    finally:
        dm.resume(name)


def _devno_of(path: str) -> str:
    rdev = device_rdev(path)
    return devno(rdev)


def _zero_header(device: str) -> None:
    """A fresh exception store: a stale header would bring back old exceptions."""
    buf = aligned_buffer(4096)
    with BlockDevice(device, write=True, direct=True) as dev:
        dev.pwrite_all(memoryview(buf), 0)
        dev.flush()
