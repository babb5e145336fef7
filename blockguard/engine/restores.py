"""Restore and verify jobs: checks done before a job exists, the work, what is learnt.

Every refusal (unknown generation; a target that is mounted, shares blocks with a pool
disk or another protected volume, holds data without force, is too small; in place
without force) is raised by :func:`check_restore`, through the daemon's safety gate,
before any job or catalog row is created. Each finished restore is recorded with its
measured duration and bytes next to the model's prediction (before correction), which is
what the probe-only model's correction learns from, and as a restore path sample with its
shape (generations read, chunks and extents written), which the fitted terms learn from.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, NoReturn

from blockguard.core import vocab
from blockguard.core.catalog import Catalog
from blockguard.core.damage import Damage, DamageCause
from blockguard.core.perftable import DeviceSpeed
from blockguard.core.restore_model import (
    Chain,
    RestoreEstimate,
    StoredDelta,
    estimate_chain,
)
from blockguard.core.vocab import GenerationKind, RestoreMode, RestoreTarget, TrackingKind
from blockguard.engine import ids
from blockguard.engine import service as svc
from blockguard.engine.calibration import calibration, copy_target_of, record_restore_sample
from blockguard.engine.events import EventHub
from blockguard.engine.jobbook import JobProgress
from blockguard.engine.jobs import ProgressReporter
from blockguard.engine.planning import correction_from
from blockguard.engine.pools import PoolRegistry, _block_device
from blockguard.engine.volumes import VolumeRegistry, is_detached
from blockguard.errors import (
    BlockguardError,
    ChecksumMismatch,
    CorruptMetadata,
    DataError,
    DeviceTooSmall,
    InvalidInput,
    NotABlockDevice,
    NotFound,
    VolumeDetached,
)
from blockguard.storage.blockdev import BlockDevice, device_rdev
from blockguard.storage.manifest import Manifest
from blockguard.storage.pool.base import PoolBackend
from blockguard.storage.restore import (
    RestoreResult,
    merged_deltas,
    restore_in_place,
    restore_to_device,
    runs,
    swap_in,
    verify,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestoreRequest:
    """A restore that passed every check.

    :param how: where the data goes.
    """

    volume: str
    manifest: Manifest
    how: RestoreTarget
    target: str
    pool: str


def find_generation(
    volumes: VolumeRegistry, volume: str, generation: str, *, reverify: bool = False
) -> Manifest:
    """The manifest of ``generation`` (``""``: the newest) of ``volume``, in any form
    :func:`~blockguard.engine.ids.resolve_generation` reads (``db@7``, ``latest~1``...).

    :param reverify: for a verify: a generation found corrupt by an earlier verify or
        restore may be read again (the damage may have been repaired or transient);
        damage the pool reports (its manifest, checksum array or data file) still refuses.
    :raises NotFound: no such volume or generation.
    :raises InvalidInput: the id is malformed or belongs to another volume.
    :raises AmbiguousGeneration: a prefix of more than one id.
    :raises CorruptMetadata: the generation or one it depends on is damaged.
    :raises ChecksumMismatch: a stored chunk of it was found damaged.
    """
    gens = volumes.scan(volume)
    # "" is the newest: when it is corrupt, say so rather than quietly take an older one.
    pool_id = ids.resolve_generation(volume, generation or "latest", gens.selectable())
    damage = gens.corrupt.get(pool_id)
    if damage is not None and not (reverify and damage.source in gens.found_on_use):
        error = gens.error(volume, pool_id)
        assert error is not None
        raise error
    for m in gens.manifests:
        if m.generation_id == pool_id:
            return m
    raise NotFound(what="generation", name=ids.public_id(volume, pool_id))


def damage_of(exc: BlockguardError, chain: list[str]) -> tuple[str, Damage] | None:
    """The chain member an error of a verify or restore blames, and its damage."""
    if isinstance(exc, ChecksumMismatch):
        culprit = str(exc.fields.get("generation", ""))
        chunk = exc.fields.get("chunk")
        cause, reason = DamageCause.CHECKSUM, f"chunk {chunk} does not match its checksum"
    elif isinstance(exc, CorruptMetadata):
        culprit = str(exc.fields.get("generation", ""))
        chunk, cause, reason = None, DamageCause.METADATA, exc.message
    elif isinstance(exc, DataError) and exc.fields.get("generation"):
        # A pack on a target that fails its authentication (TamperedPack), or one the
        # target's own check found rotten: the data the generation holds is unusable.
        culprit = str(exc.fields["generation"])
        chunk, cause, reason = None, DamageCause.METADATA, exc.message
    else:
        return None
    if culprit not in chain:
        return None
    return culprit, Damage(culprit, cause, reason, chunk if isinstance(chunk, int) else None)


def check_restore(
    volumes: VolumeRegistry,
    pools: PoolRegistry,
    volume: str,
    generation: str,
    mode: str,
    target: str,
    force: bool,
) -> RestoreRequest:
    """Every check of a restore request; changes nothing.

    :param mode: ``"copy"``, ``"swap-in"``, or ``""`` for the mode the volume's RTO refers
        to (its objectives' ``restore_mode``; copy for a volume without objectives).
    """
    vol = volumes.catalog.get_volume(volume)
    manifest = find_generation(volumes, volume, generation)
    assert vol.pool is not None
    if not mode:
        mode = volumes.restore_mode(volume).value
    if vocab.check_choice("restore mode", mode, vocab.RESTORE_MODES) == RestoreMode.SWAP_IN:
        if target:
            raise InvalidInput(detail="a swap-in restore makes its own device; give no target")
        return RestoreRequest(volume, manifest, RestoreTarget.SWAP_IN, "", vol.pool)
    if not isinstance(target, str):
        raise InvalidInput(detail=f"target {target!r} is not a path")
    if is_detached(vol) and not target:
        raise VolumeDetached(
            volume=volume, detail="it has no device to restore in place; give a target device"
        )
    original = not target or target == vol.device_path
    if not original:
        _block_device(target)
        try:
            original = device_rdev(target) == device_rdev(vol.device_path)
        except NotABlockDevice:
            # The volume's own device is gone: the target cannot be it.
            original = False
    gate = pools.gate()
    if original:
        if not force:
            raise InvalidInput(
                detail=f"restoring {volume} in place overwrites {vol.device_path}; it needs force"
            )
        # Its own device may be written (force was given), never what shares its blocks.
        gate.check_writable(
            vol.device_path, purpose="an in-place restore target", force=True, own_volume=volume
        )
        return RestoreRequest(volume, manifest, RestoreTarget.IN_PLACE, vol.device_path, vol.pool)
    gate.check_writable(target, purpose="a restore target", force=force)
    with BlockDevice(target) as dev:
        if dev.size < manifest.volume.size:
            raise DeviceTooSmall(path=target, size=dev.size, needed=manifest.volume.size)
    return RestoreRequest(volume, manifest, RestoreTarget.NEW_DEVICE, target, vol.pool)


def restore_estimate(
    pools: PoolRegistry,
    request: RestoreRequest,
    copy_target: DeviceSpeed,
    correction: float = 1.0,
) -> tuple[RestoreEstimate, RestoreEstimate, str]:
    """The model's estimate of this request: (as the planner sees it, the probe-only model
    before correction, the pool device holding the full)."""
    chain = pools.backend(request.pool).chain(request.volume, request.manifest.generation_id)
    device = {m.generation_id: pools.device_of(request.pool, m) for m in chain}
    full = chain[0]
    model = Chain(
        full.volume.size,
        device[full.generation_id],
        tuple(
            StoredDelta(
                GenerationKind(m.kind.value),
                m.bytes_stored,
                device[m.generation_id],
                extents=runs(m.changed),
            )
            for m in chain[1:]
        ),
        merged_deltas(chain),
    )
    speeds = pools.speeds(request.pool)
    pool_speeds = dict(speeds)
    for path in device.values():
        speeds.setdefault(path, copy_target)
    mode = request.how.mode
    cal = calibration(
        pools.catalog,
        sorted(set(device.values()) | set(speeds)),
        pool_speeds,
        pools.read_floors(request.pool),
    )
    planned = estimate_chain(model, speeds, mode, copy_target, correction, cal.terms)
    probe = estimate_chain(model, speeds, mode, copy_target)
    return planned, probe, device[full.generation_id]


def predicted_seconds(
    pools: PoolRegistry, request: RestoreRequest, copy_target: DeviceSpeed
) -> float:
    """The probe-only model's restore time for this request, before the learnt correction."""
    return restore_estimate(pools, request, copy_target)[1].predicted_seconds


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
    copy_target = copy_target_of(pools, request.pool).speed
    correction = correction_from(volumes.catalog.recent_restores(request.volume))
    planned, probe, full_device = restore_estimate(pools, request, copy_target, correction)
    predicted = probe.predicted_seconds
    pool = pools.backend(request.pool)
    gen_id = request.manifest.generation_id
    watch = JobProgress(progress)
    if request.how is not RestoreTarget.SWAP_IN:
        # Asked again when the job starts: a device may have been protected, mounted or
        # stacked on since the request was accepted.
        pools.gate().check_writable(
            request.target,
            purpose="an in-place restore target"
            if request.how is RestoreTarget.IN_PLACE
            else "a restore target",
            force=force or request.how is RestoreTarget.IN_PLACE,
            own_volume=request.volume if request.how is RestoreTarget.IN_PLACE else None,
        )
    try:
        result = _do_restore(request, volumes, pool, gen_id, watch, force)
    except (ChecksumMismatch, CorruptMetadata) as exc:
        _blame(volumes, pool, request.volume, request.manifest, exc)
    public = ids.public_id(request.volume, gen_id)
    _record(
        volumes.catalog,
        request,
        job_record,
        result,
        predicted,
        planned.seconds,
        full_device,
        copy_target,
    )
    with contextlib.suppress(BlockguardError):
        volumes.refresh(request.volume)
    events.emit(svc.RestoreFinished(request.volume, public, result.target))
    return {
        "generation": public,
        "number": request.manifest.sequence,
        "mode": request.how.value,
        "target": result.target,
        "bytes": result.bytes_written,
        "seconds": result.duration,
        # What the planner promised for this restore (the mode it restores in).
        "predicted_seconds": planned.seconds,
        "upper_seconds": planned.upper_seconds,
        "calibrated": planned.calibrated,
        "probe_predicted_seconds": predicted,
        "chain": [ids.public_id(request.volume, g) for g in result.chain],
    }


def _record(
    catalog: Catalog,
    request: RestoreRequest,
    job_record: str,
    result: RestoreResult,
    predicted: float,
    planned: float,
    full_device: str,
    copy_target: DeviceSpeed,
) -> None:
    """Keep a finished restore for the learnt correction and as a sample of its path."""
    gen_id = request.manifest.generation_id
    catalog.record_restore(
        request.volume,
        ids.catalog_id(request.volume, gen_id),
        method=request.manifest.kind.value,
        mode=request.how.value,
        bytes_restored=result.bytes_written,
        measured_seconds=result.duration,
        predicted_seconds=predicted,
        job=job_record,
    )
    record_restore_sample(
        catalog, request.volume, full_device, request.how, result, planned, copy_target
    )


def _do_restore(
    request: RestoreRequest,
    volumes: VolumeRegistry,
    pool: PoolBackend,
    gen_id: str,
    watch: JobProgress,
    force: bool,
) -> RestoreResult:
    if request.how is RestoreTarget.SWAP_IN:
        result = swap_in(pool, request.volume, gen_id, progress=watch)
    elif request.how is RestoreTarget.IN_PLACE:
        result = restore_in_place(
            pool, request.volume, gen_id, request.target, force=force, progress=watch
        )
        tracking = volumes.tracking.get(request.volume)
        if tracking is not None and tracking.backend != TrackingKind.SCAN:
            # Only the scan backend compares content; the others saw writes they cannot
            # attribute (era: they bypassed the era device).
            tracking.tracker.mark_unknown(f"restored in place from {gen_id}")
    else:
        result = restore_to_device(pool, request.volume, gen_id, request.target, progress=watch)
    return result


def run_verify(
    volume: str,
    manifest: Manifest,
    volumes: VolumeRegistry,
    pools: PoolRegistry,
    progress: ProgressReporter,
) -> dict[str, Any]:
    """The body of a verify job: re-read every stored chunk of the generation's whole
    restore chain (its full and every delta it needs).

    A damaged chunk or checksum array marks the generation that holds it corrupt (and
    with it every generation that depends on it); the error names that generation.
    """
    pool_name = volumes.catalog.get_volume(volume).pool
    assert pool_name is not None
    public = ids.public_id(volume, manifest.generation_id)
    pool = pools.backend(pool_name)
    try:
        result = verify(
            pool,
            volume,
            manifest.generation_id,
            whole_chain=True,
            progress=JobProgress(progress),
        )
    except (ChecksumMismatch, CorruptMetadata) as exc:
        _blame(volumes, pool, volume, manifest, exc)
    volumes.clear_corrupt(volume, list(result.chain))
    return {
        "generation": public,
        "number": manifest.sequence,
        "ok": True,
        "chunks": result.chunks,
        "bytes": result.bytes,
        "chain": [ids.public_id(volume, g) for g in result.chain],
    }


def _blame(
    volumes: VolumeRegistry,
    pool: PoolBackend,
    volume: str,
    manifest: Manifest,
    exc: ChecksumMismatch | CorruptMetadata,
) -> NoReturn:
    """Mark the chain member ``exc`` blames corrupt and raise the error, naming it."""
    try:
        chain = [m.generation_id for m in pool.chain(volume, manifest.generation_id)]
    except BlockguardError:
        chain = [manifest.generation_id]
    found = damage_of(exc, chain)
    if found is None:
        raise exc
    culprit, damage = found
    volumes.mark_corrupt(volume, culprit, damage)
    public = ids.public_id(volume, culprit)
    if isinstance(exc, ChecksumMismatch):
        raise ChecksumMismatch(generation=public, chunk=damage.chunk) from exc
    raise CorruptMetadata(
        what=f"generation {public}", detail=str(exc.fields.get("detail", exc)), generation=public
    ) from exc
