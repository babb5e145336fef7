"""Restore drills of volumes (issue 14): is the RTO promise still kept?

A volume whose objectives ask for drills (``drill``; weekly by default with an RTO) has
its newest generation restored, when due, in the mode its RTO refers to (swap-in into a
clone on its pool, read back and released; copy into scratch space on its pool, read back
and removed — or, when the pool lacks the room besides the next backup's, the copy's read
side alone), every chunk checked against its stored checksum, and timed
(:mod:`blockguard.storage.voldrill`). The drill is a job of the volume (one job per volume
at a time, so never while its backup runs). Its timing is stored like a real restore's:
a restore path sample (the fitted terms learn from it) and a measured restore (the
probe-only model's correction learns from it).

The last drill of each volume (when, ok or failed and why, measured vs predicted, the RTO
it was held against) is what ``status`` and the volume's ``LastDrill`` show; it is read
back from the job history after a restart. A drill that took longer than the RTO, or
could not restore or verify the generation, raises the one-shot alert
``drill-missed-rto`` or ``drill-failed`` (:mod:`blockguard.engine.alerts`). Its
measurement also bounds the plan: a chain that contains the drilled one restores no
quicker than the drill measured (:func:`floors_of`), so the next backup is one whose
restore fits.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from blockguard.core.health import AlertKind
from blockguard.core.units import format_duration
from blockguard.core.vocab import RestoreTarget
from blockguard.engine import ids
from blockguard.engine.alerts import AlertCenter
from blockguard.engine.calibration import copy_target_of
from blockguard.engine.drillbook import FAILED, OK, STOPPED, DrillRecord, drill_mode
from blockguard.engine.jobbook import JobBook, JobProgress
from blockguard.engine.jobs import Job, JobKind, ProgressReporter
from blockguard.engine.planning import correction_from, parse_given
from blockguard.engine.pools import PoolRegistry
from blockguard.engine.restores import (
    RestoreRequest,
    _blame,
    find_generation,
    restore_estimate,
)
from blockguard.engine.scratch import scratch_space
from blockguard.errors import BlockguardError, ChecksumMismatch, CorruptMetadata
from blockguard.storage.voldrill import VOLUME_DRILL_LABEL, drill_volume

if TYPE_CHECKING:
    from blockguard.engine.volumes import VolumeRegistry

log = logging.getLogger(__name__)


def run_volume_drill(
    volume: str,
    volumes: VolumeRegistry,
    pools: PoolRegistry,
    watch: JobProgress,
    job_record: str,
    started: float,
) -> dict[str, Any]:
    """The body of a volume drill job; returns the drill's record as the job's result.

    :raises ChecksumMismatch: a stored chunk of the chain is damaged (the generation that
        holds it is marked corrupt).
    :raises DrillMismatch: the restored bytes differ from the stored checksums.
    """
    if watch.cancelled:  # stopped for a restore while it was queued
        raise BlockguardError(detail="the drill was cancelled before it began")
    vol = volumes.catalog.get_volume(volume)
    assert vol.pool is not None
    manifest = find_generation(volumes, volume, "")
    given = volumes.objectives_of(volume)
    given.pop("group", None)
    objectives = parse_given(given)
    mode = drill_mode(objectives)
    rto = 0.0 if objectives is None or objectives.rto is None else objectives.rto.total_seconds()
    request = RestoreRequest(
        volume,
        manifest,
        RestoreTarget.SWAP_IN if mode == "swap-in" else RestoreTarget.NEW_DEVICE,
        "",
        vol.pool,
    )
    copy_target = copy_target_of(pools, vol.pool).speed
    correction = correction_from(volumes.catalog.recent_restores(volume))
    planned, probe, full_device = restore_estimate(pools, request, copy_target, correction)
    backend = pools.backend(vol.pool)
    try:
        with contextlib.ExitStack() as stack:
            scratch = None
            if mode == "copy":
                # A real copy into scratch space on the pool, if it has room besides the
                # next backup's; else the copy's reads alone.
                reserve = backend.next_backup_estimate(volume)
                size = manifest.volume.size
                scratch = stack.enter_context(scratch_space(pools, vol.pool, size, reserve))
            found = drill_volume(
                backend,
                volume,
                manifest.generation_id,
                mode,
                label=f"{VOLUME_DRILL_LABEL}{job_record.replace('-', '')[:16]}",
                progress=watch,
                read_delay=volumes.settings.drill_read_delay,
                copy_scratch=scratch,
                gate=pools.gate() if scratch else None,
            )
    except (ChecksumMismatch, CorruptMetadata) as exc:
        _blame(volumes, backend, volume, manifest, exc)
    result = found.restore
    measured = result.duration
    public = ids.public_id(volume, manifest.generation_id)
    volumes.catalog.record_path_sample(
        volume=volume,
        pool_device=full_device,
        mode=request.how.mode.value,
        source="drill",
        generations=len(result.chain),
        chunks=result.chunks,
        extents=result.extents,
        nbytes=result.bytes_read,
        measured_seconds=measured,
        predicted_seconds=planned.seconds,
        # A copy into scratch wrote at this rate: the fit takes those writes out again.
        write_rate=found.write_rate,
    )
    volumes.catalog.record_restore(
        volume,
        ids.catalog_id(volume, manifest.generation_id),
        method=manifest.kind.value,
        mode=request.how.value,
        bytes_restored=result.bytes_written,
        measured_seconds=measured,
        predicted_seconds=probe.predicted_seconds,
        job=job_record,
    )
    problem = ""
    if rto and measured > rto:
        problem = (
            f"the restore of {public} took {format_duration(measured)}, more than the RTO "
            f"{format_duration(rto)} (predicted {format_duration(planned.seconds)}, upper "
            f"{format_duration(planned.upper_seconds)})"
        )
    record = DrillRecord(
        at=started,
        result=FAILED if problem else OK,
        problem=problem,
        measured_seconds=measured,
        predicted_seconds=planned.seconds,
        upper_seconds=planned.upper_seconds,
        rto_seconds=rto,
        mode=mode,
        generation=public,
        chain=tuple(result.chain),
        verified_bytes=found.verified_bytes,
    )
    return {**record.as_dict(), "volume": volume, "verify_seconds": found.verify_seconds}


def start_volume_drill(
    volume: str, volumes: VolumeRegistry, pools: PoolRegistry, jobs: JobBook, alerts: AlertCenter
) -> Job:
    """Submit the restore drill of ``volume`` as a job of the volume.

    :raises Busy: a job of the volume is queued or running.
    :raises NotFound: no such volume, or it has no generation to drill.
    :raises CorruptMetadata: its newest generation is known to be damaged.
    """
    vol = volumes.catalog.get_volume(volume)
    jobs.reserve(volume)
    try:
        manifest = find_generation(volumes, volume, "")
    except BaseException:
        jobs.release(volume)
        raise
    started = time.time()
    volumes.drills.submitted(volume)

    def work(progress: ProgressReporter, record: str) -> dict[str, Any]:
        watch = JobProgress(progress)
        volumes.drills.running(volume, watch)
        try:
            result = run_volume_drill(volume, volumes, pools, watch, record, started)
        except BlockguardError as exc:
            if watch.cancelled:
                why = f"stopped for a restore of the volume ({exc.message})"
                finished(volumes, alerts, volume, DrillRecord(started, STOPPED, why))
            else:
                finished(volumes, alerts, volume, DrillRecord(started, FAILED, exc.message))
            raise
        except Exception as exc:
            problem = f"internal error: {type(exc).__name__}"
            finished(volumes, alerts, volume, DrillRecord(started, FAILED, problem))
            raise
        finally:
            volumes.drills.ended(volume)
        drill = DrillRecord.from_result(result)
        if drill is not None:
            finished(volumes, alerts, volume, drill)
        return result

    try:
        return jobs.submit(
            JobKind.DRILL,
            volume,
            volume,
            work,
            pool=vol.pool,
            generation=ids.catalog_id(volume, manifest.generation_id),
            reserved=True,
        )
    except BaseException:
        volumes.drills.ended(volume)
        raise


def finished(volumes: VolumeRegistry, alerts: AlertCenter, volume: str, drill: DrillRecord) -> None:
    """Keep a drill's record, raise the alert if it failed, and plan the volume again
    (the drill's measurement bounds the next backup's method)."""
    volumes.drills.set(volume, drill)
    if drill.result == FAILED:
        message = f"volume {volume}: restore drill failed: {drill.problem}"
        details = {
            "generation": drill.generation,
            "mode": drill.mode,
            "measured_seconds": drill.measured_seconds,
            "predicted_seconds": drill.predicted_seconds,
            "upper_seconds": drill.upper_seconds,
            "rto_seconds": drill.rto_seconds,
        }
        log.warning(
            "%s",
            message,
            extra={"VOLUME": volume, **{f"DRILL_{k.upper()}": v for k, v in details.items()}},
        )
        # Measured: the restore ran and was timed, so it missed the RTO; else it could not
        # restore or verify the generation.
        missed = drill.measured_seconds >= 0
        kind = AlertKind.DRILL_MISSED_RTO if missed else AlertKind.DRILL_FAILED
        alerts.fire(kind, volume, message, details)
    elif drill.result == STOPPED:
        log.info("volume %s: restore drill %s", volume, drill.problem, extra={"VOLUME": volume})
    else:
        log.info(
            "volume %s: restore drill ok, %.2fs (predicted %.2fs, RTO %.0fs)",
            volume,
            drill.measured_seconds,
            drill.predicted_seconds,
            drill.rto_seconds,
            extra={"VOLUME": volume, "DRILL_RESULT": drill.result},
        )
    with contextlib.suppress(BlockguardError):
        volumes.refresh(volume)
