"""Restore and verify jobs: checks done before a job exists, the work, what is learnt.

Every refusal (unknown generation, a target that is mounted, a pool disk, another
protected volume, too small; in place without force) is raised by :func:`check_restore`
before any job or catalog row is created. Each finished restore is recorded with its
measured duration and bytes next to the model's prediction (before correction), which is
what the restore-time model's correction learns from.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from blockguard.core.objectives import RestoreMode
from blockguard.core.perftable import DeviceSpeed
from blockguard.core.restore_model import BackupMethod, Chain, StoredDelta, estimate_chain
from blockguard.daemon import service as svc
from blockguard.daemon.engine import ids
from blockguard.daemon.engine.events import EventHub
from blockguard.daemon.engine.jobbook import JobProgress
from blockguard.daemon.engine.pools import PoolRegistry, _block_device
from blockguard.daemon.engine.volumes import VolumeRegistry
from blockguard.daemon.jobs import ProgressReporter
from blockguard.errors import (
    BlockguardError,
    ChecksumMismatch,
    DeviceInUse,
    DeviceTooSmall,
    InvalidInput,
    NotFound,
)
from blockguard.storage.blockdev import BlockDevice, device_rdev, in_use_reasons
from blockguard.storage.manifest import Manifest
from blockguard.storage.restore import restore_in_place, restore_to_device, swap_in, verify

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestoreRequest:
    """A restore that passed every check.

    :param how: ``new-device``, ``in-place`` or ``swap-in``.
    """

    volume: str
    manifest: Manifest
    how: str
    target: str
    pool: str


def find_generation(volumes: VolumeRegistry, volume: str, generation: str) -> Manifest:
    """The manifest of ``generation`` (``""``: the newest) of ``volume``.

    :raises NotFound: no such volume or generation.
    :raises InvalidInput: the id is malformed or belongs to another volume.
    """
    manifests = volumes.manifests(volume)
    if not generation:
        if not manifests:
            raise NotFound(what="generation of volume", name=volume)
        return manifests[-1]
    owner, pool_id = ids.split_public_id(generation)
    if owner != volume:
        raise InvalidInput(detail=f"generation {generation} belongs to volume {owner}")
    for m in manifests:
        if m.generation_id == pool_id:
            return m
    raise NotFound(what="generation", name=generation)


def check_restore(
    volumes: VolumeRegistry,
    pools: PoolRegistry,
    volume: str,
    generation: str,
    mode: str,
    target: str,
    force: bool,
) -> RestoreRequest:
    """Every check of a restore request; changes nothing."""
    vol = volumes.catalog.get_volume(volume)
    manifest = find_generation(volumes, volume, generation)
    assert vol.pool is not None
    if mode == "swap-in":
        if target:
            raise InvalidInput(detail="a swap-in restore makes its own device; give no target")
        return RestoreRequest(volume, manifest, "swap-in", "", vol.pool)
    if mode != "copy":
        raise InvalidInput(detail=f"restore mode {mode!r} is not copy or swap-in")
    if not isinstance(target, str):
        raise InvalidInput(detail=f"target {target!r} is not a path")
    original = not target or target == vol.device_path
    if not original:
        _block_device(target)
        with contextlib.suppress(BlockguardError):
            original = device_rdev(target) == device_rdev(vol.device_path)
    if original:
        if not force:
            raise InvalidInput(
                detail=f"restoring {volume} in place overwrites {vol.device_path}; it needs force"
            )
        if reasons := in_use_reasons(vol.device_path):
            raise DeviceInUse(path=vol.device_path, reason="; ".join(reasons))
        return RestoreRequest(volume, manifest, "in-place", vol.device_path, vol.pool)
    rdev = device_rdev(target)
    for path in pools.device_paths():
        with contextlib.suppress(BlockguardError):
            if device_rdev(path) == rdev:
                raise DeviceInUse(path=target, reason="it is a pool disk")
    for other in volumes.catalog.list_volumes():
        with contextlib.suppress(BlockguardError):
            if device_rdev(other.device_path) == rdev:
                raise DeviceInUse(path=target, reason=f"it is protected volume {other.name}")
    if reasons := in_use_reasons(target):
        raise DeviceInUse(path=target, reason="; ".join(reasons))
    with BlockDevice(target) as dev:
        if dev.size < manifest.volume.size:
            raise DeviceTooSmall(path=target, size=dev.size, needed=manifest.volume.size)
    return RestoreRequest(volume, manifest, "new-device", target, vol.pool)


def predicted_seconds(
    pools: PoolRegistry, request: RestoreRequest, copy_target: DeviceSpeed
) -> float:
    """The model's restore time for this request, before the learnt correction."""
    chain = pools.backend(request.pool).chain(request.volume, request.manifest.generation_id)
    device = {m.generation_id: pools.device_of(request.pool, m) for m in chain}
    full = chain[0]
    model = Chain(
        full.volume.size,
        device[full.generation_id],
        tuple(
            StoredDelta(BackupMethod(m.kind.value), m.bytes_stored, device[m.generation_id])
            for m in chain[1:]
        ),
    )
    speeds = pools.speeds(request.pool)
    for path in device.values():
        speeds.setdefault(path, copy_target)
    mode = RestoreMode.SWAP_IN if request.how == "swap-in" else RestoreMode.COPY
    return estimate_chain(model, speeds, mode, copy_target).predicted_seconds


def run_restore(
    request: RestoreRequest,
    volumes: VolumeRegistry,
    pools: PoolRegistry,
    events: EventHub,
    progress: ProgressReporter,
    job_record: str,
    force: bool,
) -> dict[str, Any]:
    """The body of a restore job."""
    copy_target = DeviceSpeed.uniform(volumes.settings.default_speed)
    predicted = predicted_seconds(pools, request, copy_target)
    pool = pools.backend(request.pool)
    gen_id = request.manifest.generation_id
    watch = JobProgress(progress)
    if request.how == "swap-in":
        result = swap_in(pool, request.volume, gen_id, progress=watch)
    elif request.how == "in-place":
        result = restore_in_place(
            pool, request.volume, gen_id, request.target, force=force, progress=watch
        )
        tracking = volumes.tracking.get(request.volume)
        if tracking is not None and tracking.backend != "scan":
            # Only the scan backend compares content; the others saw writes they cannot
            # attribute (era: they bypassed the era device).
            tracking.tracker.mark_unknown(f"restored in place from {gen_id}")
    else:
        result = restore_to_device(pool, request.volume, gen_id, request.target, progress=watch)
    public = ids.public_id(request.volume, gen_id)
    volumes.catalog.record_restore(
        request.volume,
        ids.catalog_id(request.volume, gen_id),
        method=request.manifest.kind.value,
        mode=request.how,
        bytes_restored=result.bytes_written,
        measured_seconds=result.duration,
        predicted_seconds=predicted,
        job=job_record,
    )
    with contextlib.suppress(BlockguardError):
        volumes.refresh(request.volume)
    events.emit(svc.RestoreFinished(request.volume, public, result.target))
    return {
        "generation": public,
        "mode": request.how,
        "target": result.target,
        "bytes": result.bytes_written,
        "seconds": result.duration,
        "predicted_seconds": predicted,
        "chain": [ids.public_id(request.volume, g) for g in result.chain],
    }


def run_verify(
    volume: str,
    manifest: Manifest,
    volumes: VolumeRegistry,
    pools: PoolRegistry,
    progress: ProgressReporter,
) -> dict[str, Any]:
    """The body of a verify job: re-read every stored chunk of one generation."""
    pool_name = volumes.catalog.get_volume(volume).pool
    assert pool_name is not None
    public = ids.public_id(volume, manifest.generation_id)
    try:
        result = verify(
            pools.backend(pool_name), volume, manifest.generation_id, progress=JobProgress(progress)
        )
    except ChecksumMismatch:
        volumes.corrupt.add(public)
        with contextlib.suppress(BlockguardError):
            volumes.refresh(volume)
        raise
    if public in volumes.corrupt:
        volumes.corrupt.discard(public)
        with contextlib.suppress(BlockguardError):
            volumes.refresh(volume)
    return {"generation": public, "ok": True, "chunks": result.chunks, "bytes": result.bytes}
