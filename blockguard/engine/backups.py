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
import time
from collections.abc import Sequence
from dataclasses import dataclass
from os import major, minor
from typing import Any

from pyroaring import BitMap

from blockguard.core.planner import PlanDecision
from blockguard.core.retention import RetentionPolicy
from blockguard.core.vocab import GenerationKind, devno
from blockguard.engine import filegroups, ids, poolspace
from blockguard.engine import service as svc
from blockguard.engine.events import EventHub
from blockguard.engine.jobbook import JobProgress
from blockguard.engine.jobs import ProgressReporter
from blockguard.engine.planning import PlanInputs, decide
from blockguard.engine.pools import PoolRegistry
from blockguard.engine.tracking import LAST_BACKUP, LAST_FULL, PointInTime, VolumeTracking
from blockguard.engine.volumes import VolumeRegistry
from blockguard.errors import BlockguardError, InvalidInput, TrackingLost
from blockguard.storage.backup import BackupResult, apply_retention_after_commit, run_backup
from blockguard.storage.blockdev import BlockDevice
from blockguard.storage.devidentity import device_key
from blockguard.storage.manifest import Manifest, VolumeIdentity, crash_point
from blockguard.storage.pool.base import GenerationSpec, GenerationWriter, PoolBackend
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

    def begin_generation(self, spec: GenerationSpec) -> _HashingWriter:
        writer = self._inner.begin_generation(spec)
        return _HashingWriter(writer, self.hashes, self.written, self._chunk, self._delay)


@dataclass(frozen=True)
class _Basis:
    """What a backup of the planned kind is relative to.

    :param changed: the chunks to copy (None: every chunk).
    :param ref_role: the tracker's reference the change set is relative to.
    """

    changed: BitMap | None = None
    base_id: str | None = None
    parent_id: str | None = None
    ref_role: str | None = None


def basis_of(kind: GenerationKind, inputs: PlanInputs) -> _Basis:
    """Decide what a backup of ``kind`` copies and builds on (changes nothing)."""
    view = inputs.view
    if kind is GenerationKind.FULL:
        # After corruption the full is read from the volume alone: a clone of the
        # newest full would carry a damaged chunk of it into the new chain.
        clonable = view.newest_full is not None and LAST_FULL in inputs.sets
        if inputs.full_required is None and clonable:
            assert view.newest_full is not None
            return _Basis(
                inputs.sets[LAST_FULL].chunks,
                base_id=view.newest_full.generation_id,
                ref_role=LAST_FULL,
            )
        return _Basis()
    if kind is GenerationKind.DIFFERENTIAL:
        assert view.newest_full is not None
        return _Basis(
            inputs.sets[LAST_FULL].chunks,
            base_id=view.newest_full.generation_id,
            ref_role=LAST_FULL,
        )
    assert view.newest is not None
    changed = inputs.sets[LAST_BACKUP].chunks
    parent_id = empty_parent(view.newest) if not changed else view.newest.generation_id
    return _Basis(changed, parent_id=parent_id, ref_role=LAST_BACKUP)


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
    scan compares the copy itself). Except when a thin volume did not change since its
    last backup (see :func:`_unchanged`): then the point is that moment, the generation
    an empty incremental, and no snapshot is made. A copy whose exception store filled
    fails the job with SnapshotOverflow; nothing is committed and the volume is not
    affected.
    """
    vol = volumes.catalog.get_volume(name)
    assert vol.pool is not None
    tracking: VolumeTracking | None = volumes.tracking.get(name)
    if tracking is None:
        raise TrackingLost(volume=name, reason=volumes.lost.get(name, "no tracker"))
    pool = pools.backend(vol.pool)
    with BlockDevice(vol.device_path) as dev:
        size, rdev = dev.size, dev.rdev
    key = _key_of(vol.device_path)
    if vol.identity.serial and key != vol.identity.serial:
        # Loop and dm numbers are handed out again (a reboot, loop devices set up in
        # another order): what is at the path now may be another disk altogether.
        raise TrackingLost(
            volume=name,
            reason=f"{vol.device_path} is not the device it was protected on "
            f"(recorded {vol.identity.serial}, now {key or 'no identity'}); nothing was "
            f"backed up. If it is the right one, unprotect {name} (its generations stay) "
            "and protect the device again",
        )
    group_warnings: list[str] = []
    # File groups' lists come first: FIEMAP_FLAG_SYNC writes their files' dirty pages,
    # so the point in time (a snapshot, or the scan of the device) holds the bytes the
    # lists map; what changes after is found when they are stored (docs/design/
    # filegroups.md "The point in time of a file list").
    captured = filegroups.capture_lists(volumes.catalog, name, group_warnings)
    unchanged = None if full else _unchanged(name, vol.device_path, volumes, tracking)
    if unchanged is not None:
        point, inputs, decision = unchanged
    else:
        cow = poolspace.cow_factory(pool, f"{name}-{serial}")
        point = tracking.begin_point(
            vol.device_path, serial, cow, poolspace.cow_size(size, volumes.settings.cow_size)
        )
    try:
        if unchanged is None:
            inputs = volumes.inputs(name, source=point.source)
            decision = decide(inputs)
        if full and decision.method is not GenerationKind.FULL:
            decision = dataclasses.replace(
                decision,
                method=GenerationKind.FULL,
                reasons=("a full was asked for", *decision.reasons),
            )
        if inputs.lost_reason:
            events.emit(svc.TrackingLost(name, inputs.lost_reason))
        if not decision.feasible:
            events.emit(svc.ObjectiveInfeasible(name, decision.reasons[-1]))
        kind = decision.method
        basis = basis_of(kind, inputs)
        with BlockDevice(point.source) as dev:
            if dev.size != size:
                raise InvalidInput(detail=f"{point.source} has {dev.size} bytes, {name} {size}")
        if decision.device_id and hasattr(pool, "preferred_device"):
            pool.preferred_device = decision.device_id  # the planner's disk for the delta
        # The manifest says which device the generation was copied from: its key when it
        # has one (see storage.devidentity), else its number.
        ident = VolumeIdentity(name, size, key or devno(rdev))
        result, new_hashes = _copy(
            pool, tracking, point, ident, kind, basis, vol.chunk_size, progress, delay
        )
        try:
            crash_point("before-tracker-commit")
            tracking.commit_point(
                point, result.manifest.generation_id, kind is GenerationKind.FULL, new_hashes
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
    filegroups.store_lists(pool, name, result.manifest.generation_id, captured, group_warnings)
    _keep_key(volumes, name, rdev, key)
    result = dataclasses.replace(result, warnings=(*result.warnings, *group_warnings))
    return _after_commit(name, volumes, pool, events, inputs.keep, decision, result)


def _unchanged(
    name: str, device: str, volumes: VolumeRegistry, tracking: VolumeTracking
) -> tuple[PointInTime, PlanInputs, PlanDecision] | None:
    """A backup's point, inputs and decision when the volume did not change since its
    last backup and the planner wants an incremental: an empty one, with no snapshot
    taken (thin tracking; :meth:`VolumeTracking.begin_unchanged`). None otherwise: the
    backup takes its point-in-time copy as usual (having spent one look at the pool's
    metadata, which :meth:`VolumeTracking.may_be_unchanged` keeps for volumes that
    may well be unchanged)."""
    if not tracking.may_be_unchanged(device):
        return None
    tracking.begin_unchanged(device)
    inputs = volumes.inputs(name, source=device)
    decision = decide(inputs)
    since = inputs.sets.get(LAST_BACKUP)
    if decision.method is not GenerationKind.INCREMENTAL or since is None or since.chunks:
        log.debug(
            "backup of %s: %s planned, %s chunks changed: a snapshot is taken",
            name,
            decision.method.value,
            "unknown" if since is None else len(since.chunks),
            extra={"VOLUME": name},
        )
        return None
    return tracking.unchanged_point(device), inputs, decision


def _key_of(path: str) -> str | None:
    try:
        return device_key(path).stable
    except BlockguardError as exc:
        log.warning("cannot tell the identity of %s: %s", path, exc)
        return None


def _keep_key(volumes: VolumeRegistry, name: str, rdev: int, key: str | None) -> None:
    """Record the device key of a volume protected before keys were recorded, in the
    catalog and in its record on the pool, once it has been backed up from that device:
    an import then recognises the device (see :mod:`.importing`), where a record without
    a key leaves a loop, dm or md volume detached."""
    with volumes.lock:
        ident = volumes.catalog.get_volume(name).identity
        if ident.serial or key is None or (ident.major, ident.minor) != (major(rdev), minor(rdev)):
            return
        try:
            volumes.catalog.update_volume(name, identity=dataclasses.replace(ident, serial=key))
            volumes.write_record(name)
        except BlockguardError as exc:
            log.warning("cannot record the identity of %s: %s", name, exc, extra={"VOLUME": name})
            return
    log.info("volume %s: its device is recorded as %s", name, key, extra={"VOLUME": name})


def _copy(
    pool: PoolBackend,
    tracking: VolumeTracking,
    point: PointInTime,
    ident: VolumeIdentity,
    kind: GenerationKind,
    basis: _Basis,
    chunk_size: int,
    progress: ProgressReporter,
    delay: float,
) -> tuple[BackupResult, ChunkHashes | None]:
    """Copy the point in time into a new generation, hashing the chunks for the tracker.

    :returns: the committed generation, and the chunk hashes of the new reference when
        they are complete (every chunk hashed now or merged onto the stored ones).
    """
    nchunks = chunk_count(ident.size, chunk_size)
    base = None
    if basis.ref_role is not None:
        stored = tracking.stored_hashes(tracking.roles()[basis.ref_role].ref)
        base = None if stored is None else stored.digests
    hashes = bytearray(base) if base is not None else bytearray(nchunks * DIGEST_SIZE)
    proxy = _HashingPool(pool, hashes, chunk_size, delay)
    args: dict[str, Any] = {
        "chunk_size": chunk_size,
        "base_id": basis.base_id,
        "parent_id": basis.parent_id,
        "progress": JobProgress(progress),
        # Retention runs after the tracker moved too (in _after_commit): a backup that
        # fails before then must not have removed older generations.
        "keep": None,
    }
    if point.copy is not None:
        # Checks the copy is still valid after the copy; commits it (era: its era
        # becomes the reference) only then.
        result = backup_point_in_time(point.copy, proxy, ident, kind.value, basis.changed, **args)  # type: ignore[arg-type]
    else:
        result = run_backup(proxy, ident, point.source, kind.value, basis.changed, **args)  # type: ignore[arg-type]
    complete = base is not None or len(proxy.written) == nchunks
    return result, (ChunkHashes(chunk_size, ident.size, hashes) if complete else None)


def _after_commit(
    name: str,
    volumes: VolumeRegistry,
    pool: PoolBackend,
    events: EventHub,
    keep: RetentionPolicy,
    decision: PlanDecision,
    result: BackupResult,
) -> dict[str, Any]:
    """Retention, catalog refresh, event and log of a committed backup; its job result.

    Nothing here fails the backup: problems become warnings.
    """
    gen = ids.public_id(name, result.manifest.generation_id)
    kind = decision.method
    warnings = list(result.warnings)
    retention = apply_retention_after_commit(pool, name, keep, warnings)
    freed = [] if retention is None else retention.freed_ids
    for step in (volumes.sync_generations, volumes.refresh):
        try:
            step(name)
        except BlockguardError as exc:
            warnings.append(f"{step.__name__} failed: {exc}")
            log.error("after backup %s: %s", gen, warnings[-1], extra={"VOLUME": name})
    empty = not result.manifest.is_full and not result.manifest.changed
    events.emit(
        svc.BackupFinished(name, gen, kind.value, result.bytes_copied, not (empty and not freed))
    )
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
        "notes": [
            f"retention kept {ids.public_id(name, g)}: it is in use by {who}"
            for g, who in ({} if retention is None else retention.kept).items()
        ],
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
