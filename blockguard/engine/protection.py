"""Protect a device as a volume, and stop protecting it: the checks that decide, then
the tracker, catalog row and pool record that do it (each undone if a later step fails)."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from typing import Any

from blockguard.core import vocab
from blockguard.core.catalog import DeviceIdentity, Volume
from blockguard.core.vocab import TrackingKind
from blockguard.engine import poolspace
from blockguard.engine import service as svc
from blockguard.engine.planning import clean_given
from blockguard.engine.tracking import VolumeTracking, choose_backend
from blockguard.engine.volumes import DETACHED, VolumeRegistry, detached_path, is_detached
from blockguard.errors import AlreadyExists, BlockguardError, InvalidInput
from blockguard.storage.blockdev import BlockDevice
from blockguard.storage.devidentity import device_key
from blockguard.storage.pool.base import PoolBackend
from blockguard.storage.tracking import DEFAULT_CHUNK_SIZE, check_protectable, validate_chunk_size

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _ProtectPlan:
    """A checked protect request: where the volume goes and how it is tracked.

    :param existing: the detached volume being re-attached, or None for a new one.
    """

    name: str
    device: str
    chunk: int
    size: int
    identity: DeviceIdentity
    pool: str
    pool_backend: PoolBackend
    backend: str
    existing: Volume | None


def protect(volumes: VolumeRegistry, request: svc.ProtectRequest) -> svc.VolumeInfo:
    """Protect ``request.device`` as volume ``request.name``, or re-attach it to the
    detached volume of that name.

    Everything is checked before anything is created: a refusal leaves no volume.
    """
    device, name = request.device, request.name
    vocab.check_name("volume", name)
    chunk = DEFAULT_CHUNK_SIZE if request.chunk_size is None else request.chunk_size
    validate_chunk_size(chunk)
    if not isinstance(device, str) or not device.startswith("/"):
        raise InvalidInput(detail=f"device {device!r} must be an absolute path")
    stored = clean_given(request.objectives) if request.objectives else None
    with volumes.lock:
        plan = _protect_plan(volumes, request, chunk)
        tracking, era_metadata = _start_tracking(volumes, plan)
        try:
            _record_protected(volumes, plan, stored)
        except BaseException:
            if plan.existing is not None:
                volumes.catalog.update_volume(
                    name,
                    device_path=plan.existing.device_path,
                    identity=plan.existing.identity,
                    chunk_size=plan.existing.chunk_size,
                    tracker_backend=plan.existing.tracker_backend,
                )
            tracking.remove()
            if era_metadata is not None:
                poolspace.release_era_metadata(plan.pool_backend, name)
            raise
        volumes.tracking[name] = tracking
        volumes.sync_generations(name)
        info = volumes.refresh(name)
    log.info(
        "protecting %s as %s (%s tracking)", device, name, plan.backend, extra={"VOLUME": name}
    )
    return info


def _protect_plan(volumes: VolumeRegistry, request: svc.ProtectRequest, chunk: int) -> _ProtectPlan:
    """Check a protect request and decide its pool and tracking backend (changes nothing).

    :raises AlreadyExists: ``name`` is protected already.
    :raises InvalidInput: no pool, or a detached volume asked onto another pool.
    """
    device, name, backend, pool = request.device, request.name, request.backend, request.pool
    existing = next((v for v in volumes.catalog.list_volumes() if v.name == name), None)
    if existing is not None and not is_detached(existing):
        raise AlreadyExists(what="volume", name=name)
    if not volumes.pools.names():
        raise InvalidInput(detail="there is no pool to back up into; create one first")
    if existing is not None and existing.pool is not None:
        # Re-attaching keeps the volume on the pool that holds its generations.
        if pool is not None and pool != existing.pool:
            raise InvalidInput(
                detail=f"volume {name} has its generations on pool {existing.pool}, not {pool}"
            )
        pool = existing.pool
    if pool is not None:
        volumes.pools.require_known(pool)
    protected = [v.device_path for v in volumes.catalog.list_volumes() if not is_detached(v)]
    size = check_protectable(
        device, volumes.pools.device_paths(), protected, chunk, gate=volumes.pools.gate()
    )
    # What the asked backend needs of the kernel is checked before the space it
    # needs on a pool: the error then names the real cause.
    choose_backend(device, backend, volumes.cmd, era_space=True)
    if existing is None or existing.pool is None:
        pool = volumes.place(size, pool)
    assert pool is not None
    pool_backend = volumes.pools.backend(pool)
    chosen = choose_backend(device, backend, volumes.cmd, era_space=poolspace.is_lvm(pool_backend))
    with BlockDevice(device) as dev:
        ident = dev.identity
    return _ProtectPlan(
        name=name,
        device=device,
        chunk=chunk,
        size=size,
        # What the device is, not only where it is now: an import finds it by this.
        identity=DeviceIdentity(ident.major, ident.minor, size, device_key(device).stable),
        pool=pool,
        pool_backend=pool_backend,
        backend=chosen,
        existing=existing,
    )


def _start_tracking(
    volumes: VolumeRegistry, plan: _ProtectPlan
) -> tuple[VolumeTracking, str | None]:
    """Create the volume's tracker (and its era metadata on an lvm pool).

    :returns: the tracker and the era metadata device, if one was allocated.
    """
    directory = volumes.directory(plan.name)
    if directory.exists() and plan.name not in volumes.tracking:
        # Tracker state of a volume the catalog forgot (a lost catalog, an import):
        # its references name nothing any more; the new tracker starts afresh.
        log.warning("removing stale tracker state %s", directory)
        shutil.rmtree(directory)
    era_metadata = None
    if plan.backend == TrackingKind.ERA:
        era_metadata = poolspace.allocate_era_metadata(
            plan.pool_backend, plan.name, plan.size, plan.chunk
        )
    try:
        tracking = VolumeTracking.create(
            directory,
            plan.device,
            plan.backend,
            plan.chunk,
            volumes.cmd,
            era_metadata=era_metadata,
        )
    except BaseException:
        if era_metadata is not None:
            poolspace.release_era_metadata(plan.pool_backend, plan.name)
        raise
    return tracking, era_metadata


def _record_protected(
    volumes: VolumeRegistry, plan: _ProtectPlan, stored: dict[str, Any] | None
) -> None:
    """The catalog row (new, or the detached one re-attached) and the pool's record."""
    if plan.existing is None:
        volumes.catalog.add_volume(
            plan.name,
            plan.device,
            plan.identity,
            chunk_size=plan.chunk,
            tracker_backend=plan.backend,
            pool=plan.pool,
            objectives=stored,
        )
    else:
        # Re-attach: the generations stay; a fresh tracker, so the next backup is a full.
        volumes.catalog.update_volume(
            plan.name,
            device_path=plan.device,
            identity=plan.identity,
            chunk_size=plan.chunk,
            tracker_backend=plan.backend,
        )
        if stored:
            volumes.catalog.update_volume(
                plan.name, objectives={**plan.existing.objectives, **stored}
            )
    volumes.write_record(plan.name)


def unprotect(volumes: VolumeRegistry, name: str, delete_generations: bool = False) -> None:
    """Stop tracking ``name``.

    Without ``delete_generations`` a volume that has generations becomes detached
    (they stay listed, restorable and under retention); one without generations is
    forgotten. With it, its generations are deleted from the pool (newest first, so
    an interruption never breaks a chain), then its record and its catalog rows.
    """
    with volumes.lock:
        vol = volumes.catalog.get_volume(name)
        backend = None
        if vol.pool is not None:
            try:
                backend = volumes.pools.backend(vol.pool)
            except BlockguardError as exc:
                # Deleting: the catalog rows go; what the disks hold cannot be reached.
                log.warning("pool %s of %s is unavailable: %s", vol.pool, name, exc)
        manifests = [] if backend is None else backend.generations(name)
        if delete_generations and backend is not None:
            for m in reversed(manifests):
                backend.remove_generation(name, m.generation_id)
            backend.remove_volume_record(name)
        # An unavailable pool still holds what the catalog lists: keep it too.
        listed = backend is None and bool(volumes.catalog.list_generations(name))
        held = bool(manifests) or listed
        keep = held and not delete_generations
        if keep:
            volumes.catalog.update_volume(
                name, device_path=detached_path(name), tracker_backend=DETACHED
            )
        else:
            volumes.catalog.remove_volume(name, drop_generations=True)
            if backend is not None:
                backend.remove_volume_record(name)
        tracking = volumes.tracking.pop(name, None)
        if tracking is not None:
            tracking.remove()
        if vol.tracker_backend == TrackingKind.ERA and backend is not None:
            try:
                poolspace.release_era_metadata(backend, name)
            except BlockguardError as exc:
                log.warning("era metadata of %s stays on pool %s: %s", name, vol.pool, exc)
        volumes.cache.pop(name, None)
        volumes.lost.pop(name, None)
        volumes.last_due.pop(name, None)
        if keep:
            volumes.sync_generations(name)
            volumes.retain_detached(name)
            volumes.refresh(name)
    if not keep:
        volumes.events.emit(svc.VolumeRemoved(name))
    log.info(
        "%s %s",
        "detached" if keep else "unprotected",
        name,
        extra={"VOLUME": name},
    )
