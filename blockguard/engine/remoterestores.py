"""Restores from a backup target (issue 11): ``restore V@GEN --from ID --target DEV``.

The generation is one the catalog knows the target committed (recorded by a transfer,
or by ``target import`` on a new host), so the volume need not be protected here. Every
refusal (no such target or generation, a device that is protected, a pool disk, mounted
or too small) is raised by :func:`check_remote_restore` before a job exists. The
estimate is the restore model's for the target's chain, the target's speeds being the
link's (``min(area, link)``) and the writes this host's copy target; the job's result
carries it (``predicted_seconds``) next to the measured ``seconds``, as a local
restore's does. Each finished restore is kept as a restore path sample of the target
(device ``target:ID``, copy mode), as a local restore is of its pool device: once there
are enough, the estimate is the terms fitted to them (the link's round trips, its real
rate down, the decryption) instead of the registration's link figures. Unlike a local
copy, whose reads and target writes take about their sum (``copy_write_cost``), a
restore over a link writes while it waits for the link: its samples keep the whole time,
writes included, and the fitted estimate adds none (only a target slower than the copy
target they were taken with would add its extra). A pack that
fails its authentication (``TamperedPack``) stops the restore and marks the generation
that holds it damaged on the target, so every host that lists the target sees it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from blockguard.core.catalog import Catalog, RemoteGenerationRow
from blockguard.core.perftable import DeviceSpeed
from blockguard.core.restore_model import Chain, RestoreEstimate, StoredDelta, estimate_chain
from blockguard.core.vocab import GenerationKind, RestoreMode, RestoreTarget
from blockguard.engine import ids
from blockguard.engine.calibration import calibration, copy_target_of, record_restore_sample
from blockguard.engine.jobbook import JobProgress
from blockguard.engine.jobs import ProgressReporter
from blockguard.engine.pools import PoolRegistry
from blockguard.engine.remoteplan import link_speed, target_device
from blockguard.engine.restores import damage_of
from blockguard.engine.targets import TargetRegistry
from blockguard.errors import (
    BlockguardError,
    ChecksumMismatch,
    CorruptMetadata,
    DataError,
    DeviceTooSmall,
    InvalidInput,
    NotFound,
)
from blockguard.storage.blockdev import BlockDevice
from blockguard.storage.restore import restore_to_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteRestoreRequest:
    """A restore from a target that passed every check.

    :param chain: the target's generations it reads, its full first.
    """

    volume: str
    target_id: str
    device: str
    chain: tuple[RemoteGenerationRow, ...]

    @property
    def generation_id(self) -> str:
        return self.chain[-1].generation


def chain_of(
    rows: list[RemoteGenerationRow], generation_id: str
) -> tuple[RemoteGenerationRow, ...]:
    """The rows a restore of ``generation_id`` reads, its full first.

    :raises NotFound: a link of the chain is not recorded.
    """
    by_id = {r.generation: r for r in rows}
    chain = [by_id[generation_id]]
    while chain[-1].kind != GenerationKind.FULL.value:
        link = chain[-1].parent or chain[-1].base
        if link is None or link not in by_id:
            raise NotFound(what="generation on the target", name=f"{chain[-1].volume}@{link}")
        chain.append(by_id[link])
    return tuple(reversed(chain))


def check_remote_restore(
    catalog: Catalog,
    pools: PoolRegistry,
    volume: str,
    generation: str,
    target_id: str,
    device: str,
    force: bool,
) -> RemoteRestoreRequest:
    """Every check of a restore from a target; changes nothing."""
    catalog.get_target(target_id)
    rows = catalog.list_remote_generations(target_id, volume)
    if not rows:
        raise NotFound(
            what=f"generation on target {target_id} (`blockguardctl target import "
            f"{target_id}` lists what it holds)",
            name=volume,
        )
    numbered = [(r.generation, n) for n, r in enumerate(rows, 1)]
    gid = ids.resolve_generation(volume, generation or "latest", numbered)
    chain = chain_of(rows, gid)
    if not isinstance(device, str) or not device:
        raise InvalidInput(detail="a restore from a target needs the device to write: --target DEV")
    pools.gate().check_writable(device, purpose="a restore target", force=force)
    size = chain[-1].volume_size
    with BlockDevice(device) as dev:
        if dev.size < size:
            raise DeviceTooSmall(path=device, size=dev.size, needed=size)
    return RemoteRestoreRequest(volume, target_id, device, chain)


def copy_speed(
    catalog: Catalog, pools: PoolRegistry, volume: str, default_speed: float
) -> DeviceSpeed:
    """The write speed a restore of ``volume`` from a target assumes for its device: its
    pool's copy target when it is protected here, else ``default_speed``."""
    with contextlib.suppress(NotFound):
        pool = catalog.get_volume(volume).pool
        if pool is not None:
            return copy_target_of(pools, pool).speed
    return DeviceSpeed.uniform(default_speed)


def remote_estimate(
    catalog: Catalog, pools: PoolRegistry, request: RemoteRestoreRequest, default_speed: float
) -> RestoreEstimate:
    """The model's time for this restore: the target's chain over the link (its speeds
    as measured at registration, refined by transfers), written at this host's
    copy-target speed; with the terms fitted to the target's restore samples once it
    has enough of them."""
    link, _ = link_speed(catalog, request.target_id, default_speed)
    where = target_device(request.target_id)
    full = request.chain[0]
    model = Chain(
        full.volume_size,
        where,
        tuple(
            StoredDelta(GenerationKind(r.kind), r.bytes_stored, where, extents=r.extents)
            for r in request.chain[1:]
        ),
    )
    copy = copy_speed(catalog, pools, request.volume, default_speed)
    # The samples hold this host's writes (see the module): the terms say so.
    terms = {
        key: dataclasses.replace(fitted, write_rate=copy.write(False))
        for key, fitted in calibration(catalog, [where]).terms.items()
    }
    return estimate_chain(model, {where: link}, RestoreMode.COPY, copy, terms=terms)


def run_remote_restore(
    request: RemoteRestoreRequest,
    targets: TargetRegistry,
    pools: PoolRegistry,
    estimate: RestoreEstimate,
    progress: ProgressReporter,
    force: bool,
) -> dict[str, Any]:
    """The body of a restore job from a target."""
    volume, gid = request.volume, request.generation_id
    public = ids.public_id(volume, gid)
    log.info(
        "restore of %s from target %s onto %s: estimated %.1fs",
        public,
        request.target_id,
        request.device,
        estimate.seconds,
    )
    # Asked again when the job starts: the device may have been taken meanwhile.
    pools.gate().check_writable(request.device, purpose="a restore target", force=force)
    with targets.remote_pool(request.target_id) as remote:
        try:
            result = restore_to_device(
                remote, volume, gid, request.device, progress=JobProgress(progress)
            )
        except (ChecksumMismatch, CorruptMetadata, DataError) as exc:
            _mark_on_target(remote, request, exc)
            raise
    try:
        # No copy target: the sample is the whole time, writes included (see the module).
        record_restore_sample(
            pools.catalog,
            volume,
            target_device(request.target_id),
            RestoreTarget.NEW_DEVICE,
            result,
            estimate.seconds,
        )
    except BlockguardError as exc:  # the device is restored; only the sample is lost
        log.error("cannot record the restore from target %s: %s", request.target_id, exc)
    return {
        "generation": public,
        "mode": RestoreMode.COPY.value,
        "target": request.device,
        "from_target": request.target_id,
        "bytes": result.bytes_written,
        "seconds": result.duration,
        "predicted_seconds": estimate.seconds,
        "upper_seconds": estimate.upper_seconds,
        "calibrated": estimate.calibrated,
        "chain": [ids.public_id(volume, g) for g in result.chain],
    }


def _mark_on_target(remote: Any, request: RemoteRestoreRequest, exc: BlockguardError) -> None:
    """Mark the generation ``exc`` blames damaged on the target (seen by every host)."""
    found = damage_of(exc, [r.generation for r in request.chain])
    if found is None:
        return
    culprit, damage = found
    try:
        if not remote.mark_damaged(request.volume, culprit, damage.reason, damage.chunk):
            # An object-store target keeps no damage markers yet (docs/design/s3.md).
            log.error(
                "generation %s on target %s is damaged (%s); the target cannot record it",
                culprit,
                request.target_id,
                damage.reason,
            )
            return
        log.error(
            "generation %s on target %s marked damaged: %s",
            culprit,
            request.target_id,
            damage.reason,
        )
    except BlockguardError as mark_exc:
        log.error("cannot mark %s damaged on target %s: %s", culprit, request.target_id, mark_exc)
