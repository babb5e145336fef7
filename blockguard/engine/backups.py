"""One backup of one volume: point in time, plan, copy, move the tracker, retention.

The backup reads a point-in-time copy while the volume stays online (see
:mod:`blockguard.storage.snapshot`): a thin snapshot for thin volumes; a dm-snapshot
with its exception store on the lvm pool for era-tracked volumes and for plain dm
volumes (thick LVs) under scan tracking. Where there is no device-mapper (this host), or
the pool is a ``dir`` pool, a scan-tracked device is read as it is, so the generation is
crash-consistent only if the caller quiesces the volume (unmounts it, freezes its file
system, or stops the writers) for the duration of the backup.

For scan tracking the new reference's chunk hashes are computed while the chunks are
copied (the copy engine's own checksums are xxh3_64, the tracker's xxh3_128, so the
written chunks are hashed once more in memory) and merged with the reference the
change set was relative to: no second read of the volume.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from pyroaring import BitMap

from blockguard.core.restore_model import BackupMethod
from blockguard.engine import ids, poolspace
from blockguard.engine import service as svc
from blockguard.engine.events import EventHub
from blockguard.engine.jobbook import JobProgress
from blockguard.engine.jobs import ProgressReporter
from blockguard.engine.planning import decide
from blockguard.engine.pools import PoolRegistry
from blockguard.engine.tracking import LAST_BACKUP, LAST_FULL, VolumeTracking
from blockguard.engine.volumes import VolumeRegistry
from blockguard.errors import BlockguardError, InvalidInput, TrackingLost
from blockguard.storage.backup import apply_retention_after_commit, run_backup
from blockguard.storage.blockdev import BlockDevice
from blockguard.storage.manifest import GenerationKind, Manifest, VolumeIdentity, crash_point
from blockguard.storage.pool.base import GenerationWriter, PoolBackend
from blockguard.storage.snapshot import backup_point_in_time
from blockguard.storage.tracking import DIGEST_SIZE, ChunkHashes, chunk_digest
from blockguard.storage.tracking.base import chunk_count

log = logging.getLogger(__name__)


class _HashingWriter:
    """A generation writer that also keeps the tracker's hash of every chunk written."""

    def __init__(
        self, inner: GenerationWriter, hashes: bytearray, written: BitMap, chunk: int, delay: float
    ) -> None:
        self._inner = inner
        self._hashes = hashes
        self._written = written
        self._chunk = chunk
        self._delay = delay

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def write_chunks(self, first: int, view: memoryview, digests: Sequence[int]) -> None:
        self._inner.write_chunks(first, view, digests)
        size = self._chunk
        for i, offset in enumerate(range(0, len(view), size)):
            at = (first + i) * DIGEST_SIZE
            self._hashes[at : at + DIGEST_SIZE] = chunk_digest(view[offset : offset + size])
        self._written.add_range(first, first + -(-len(view) // size))
        if self._delay:
            time.sleep(self._delay)  # test hook: a slow backup that can be killed midway

    def __enter__(self) -> _HashingWriter:
        self._inner.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.__exit__(*exc)


class _HashingPool:
    """The pool as ``run_backup`` sees it, handing out :class:`_HashingWriter`s."""

    def __init__(self, inner: PoolBackend, hashes: bytearray, chunk: int, delay: float) -> None:
        self._inner = inner
        self.hashes = hashes
        self.written = BitMap()
        self._chunk = chunk
        self._delay = delay

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def begin_generation(self, *args: Any, **kwargs: Any) -> _HashingWriter:
        writer = self._inner.begin_generation(*args, **kwargs)
        return _HashingWriter(writer, self.hashes, self.written, self._chunk, self._delay)


def back_up(
    name: str,
    volumes: VolumeRegistry,
    pools: PoolRegistry,
    events: EventHub,
    progress: ProgressReporter,
    serial: int,
    delay: float,
    *,
    full: bool = False,
) -> dict[str, Any]:
    """Take one backup of volume ``name`` (the body of a backup job).

    :param full: take a full whatever the planner would choose (``backup --full``).

    The point in time comes first; the change sets and the planner's choice are taken
    after it (for era and thin they then include writes made since, a harmless superset;
    scan compares the copy itself). A copy whose exception store filled fails the job
    with SnapshotOverflow; nothing is committed and the volume is not affected.
    """
    vol = volumes.catalog.get_volume(name)
    assert vol.pool is not None
    tracking: VolumeTracking | None = volumes.tracking.get(name)
    if tracking is None:
        raise TrackingLost(volume=name, reason=volumes.lost.get(name, "no tracker"))
    pool = pools.backend(vol.pool)
    with BlockDevice(vol.device_path) as dev:
        size, rdev = dev.size, dev.rdev
    cow = poolspace.cow_factory(pool, f"{name}-{serial}")
    point = tracking.begin_point(
        vol.device_path, serial, cow, poolspace.cow_size(size, volumes.settings.cow_size)
    )
    try:
        inputs = volumes.inputs(name, source=point.source)
        decision = decide(inputs)
        if full and decision.method is not BackupMethod.FULL:
            decision = dataclasses.replace(
                decision,
                method=BackupMethod.FULL,
                reasons=("a full was asked for", *decision.reasons),
            )
        if inputs.lost_reason:
            events.emit(svc.TrackingLost(name, inputs.lost_reason))
        if not decision.feasible:
            events.emit(svc.ObjectiveInfeasible(name, decision.reasons[-1]))
        kind = decision.method
        view = inputs.view
        changed: BitMap | None = None
        base_id = parent_id = None
        ref_role = None
        if kind is BackupMethod.FULL:
            # After corruption the full is read from the volume alone: a clone of the
            # newest full would carry a damaged chunk of it into the new chain.
            if (
                inputs.full_required is None
                and view.newest_full is not None
                and LAST_FULL in inputs.sets
            ):
                changed, ref_role = inputs.sets[LAST_FULL].chunks, LAST_FULL
                base_id = view.newest_full.generation_id
        elif kind is BackupMethod.DIFFERENTIAL:
            assert view.newest_full is not None
            changed, ref_role = inputs.sets[LAST_FULL].chunks, LAST_FULL
            base_id = view.newest_full.generation_id
        else:
            assert view.newest is not None
            changed, ref_role = inputs.sets[LAST_BACKUP].chunks, LAST_BACKUP
            parent_id = empty_parent(view.newest) if not changed else view.newest.generation_id
        with BlockDevice(point.source) as dev:
            if dev.size != size:
                raise InvalidInput(detail=f"{point.source} has {dev.size} bytes, {name} {size}")
        nchunks = chunk_count(size, vol.chunk_size)
        base = None
        if ref_role is not None:
            trusted = tracking.roles()[ref_role].ref
            stored = tracking.stored_hashes(trusted)
            base = None if stored is None else stored.digests
        hashes = bytearray(base) if base is not None else bytearray(nchunks * DIGEST_SIZE)
        proxy = _HashingPool(pool, hashes, vol.chunk_size, delay)
        if decision.device_id and hasattr(pool, "preferred_device"):
            pool.preferred_device = decision.device_id  # the planner's disk for the delta
        keep = inputs.keep
        ident = VolumeIdentity(name, size, f"{os.major(rdev)}:{os.minor(rdev)}")
        args: dict[str, Any] = {
            "chunk_size": vol.chunk_size,
            "base_id": base_id,
            "parent_id": parent_id,
            "progress": JobProgress(progress),
            # Retention runs after the tracker moved too (below): a backup that fails
            # before then must not have removed older generations.
            "keep": None,
        }
        if point.copy is not None:
            # Checks the copy is still valid after the copy; commits it (era: its era
            # becomes the reference) only then.
            result = backup_point_in_time(point.copy, proxy, ident, kind.value, changed, **args)  # type: ignore[arg-type]
        else:
            result = run_backup(proxy, ident, point.source, kind.value, changed, **args)  # type: ignore[arg-type]
        complete = base is not None or len(proxy.written) == nchunks
        new_hashes = ChunkHashes(vol.chunk_size, size, hashes) if complete else None
        try:
            crash_point("before-tracker-commit")
            tracking.commit_point(
                point, result.manifest.generation_id, kind is BackupMethod.FULL, new_hashes
            )
        except BaseException:
            # The tracker did not move to the new generation: withdraw it, so that a
            # failed job leaves the pool as it found it.
            withdraw(pool, name, result.manifest.generation_id)
            raise
    except BaseException:
        tracking.abort_point(point)
        raise
    tracking.end_point(point)
    # Committed: from here on nothing fails the backup; problems are warnings.
    gen = ids.public_id(name, result.manifest.generation_id)
    warnings = list(result.warnings)
    retention = apply_retention_after_commit(pool, name, keep, warnings)
    freed = [] if retention is None else retention.freed_ids
    for step in (volumes.sync_generations, volumes.refresh):
        try:
            step(name)
        except BlockguardError as exc:
            warnings.append(f"{step.__name__} failed: {exc}")
            log.error("after backup %s: %s", gen, warnings[-1], extra={"VOLUME": name})
    events.emit(svc.BackupFinished(name, gen, kind.value, result.bytes_copied))
    log.info(
        "backup of %s: %s %s, %d bytes in %.2fs; retention freed %s",
        name,
        kind.value,
        gen,
        result.bytes_copied,
        result.duration,
        freed or "nothing",
        extra={"VOLUME": name, "GENERATION": gen},
    )
    return {
        "generation": gen,
        "number": result.manifest.sequence,
        "method": kind.value,
        "bytes": result.bytes_copied,
        "seconds": result.duration,
        "reasons": list(decision.reasons),
        "feasible": decision.feasible,
        "freed": [ids.public_id(name, g) for g in freed],
        "warnings": warnings,
    }


def empty_parent(newest: Manifest) -> str:
    """The parent of an incremental that changed nothing.

    Its content is its parent's, so an incremental after an empty one may as well build
    on the last one that stored something: then empty incrementals never depend on each
    other, and retention (which does not count them) can drop all but the newest.
    """
    if newest.kind is GenerationKind.INCREMENTAL and not newest.changed and newest.parent_id:
        return newest.parent_id
    return newest.generation_id


def withdraw(pool: PoolBackend, volume: str, generation_id: str) -> None:
    """Remove a committed generation of a backup that failed after its commit."""
    try:
        pool.remove_generation(volume, generation_id)
    except BlockguardError as exc:
        log.error(
            "backup of %s failed after commit and %s could not be removed: %s",
            volume,
            generation_id,
            exc,
            extra={"VOLUME": volume},
        )
