"""Calibrating the restore-time model: drills, samples of real restores, fitted terms.

A drill (:mod:`blockguard.storage.drill`) runs as a job when a pool is created or extended,
when a volume is protected, and on request (``Drill``); each of its timed restores, and
every real restore, is stored in the catalog as a restore path sample with its shape. The
planner's terms are fitted from the recent samples of each pool device and restore mode
(:func:`blockguard.core.restore_terms.fit_terms`); a pool device and mode without enough
samples is "uncalibrated" and planned with the probe-only model — unless another device
of the same pool was drilled: a drill places its synthetic chain on one device of the
pool, so the others borrow its terms, never cheaper than the drilled device's: the bytes
term scaled by the two devices' probed sequential read speeds, the per-extent term by
their probed random reads at the chunk size (a slow, high-latency disk pays each scattered
extent its own latency; copied unscaled, a 20 ms disk borrowing a fast disk's 0.5 ms per
extent was under-estimated). ``plan`` says which terms were borrowed, from where, and by
what factors.

A pool drill restores its copies into scratch space on the pool (:mod:`.scratch`), whose
probed write rate is kept with each copy sample: the fit takes those writes out of the
path, and the model adds a copy's target writes back at that measured rate
(:func:`copy_target_of`) instead of the default target speed (``default_speed``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from blockguard.core.catalog import Catalog, PathSampleRecord
from blockguard.core.perftable import DeviceSpeed
from blockguard.core.restore_model import RestoreEstimate, copy_write_cost
from blockguard.core.restore_terms import (
    FIT_WINDOW,
    MIN_SAMPLES,
    PathSample,
    PathTerms,
    RestoreShape,
    fit_terms,
)
from blockguard.core.units import format_rate
from blockguard.core.vocab import RESTORE_MODES, RestoreMode, RestoreTarget
from blockguard.engine.jobs import ProgressReporter
from blockguard.engine.pools import PoolRegistry
from blockguard.engine.scratch import scratch_space
from blockguard.engine.settings import Settings
from blockguard.storage.drill import DrillResult, run_drill
from blockguard.storage.restore import RestoreResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    """The fitted terms of some pool devices, with how many samples each had."""

    terms: dict[tuple[str, str], PathTerms] = field(default_factory=dict)
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    #: (device, mode) -> (the drilled device whose terms it borrowed, bytes scale,
    #: per-extent scale)
    borrowed: dict[tuple[str, str], tuple[str, float, float]] = field(default_factory=dict)

    def describe(self, device: str, mode: str) -> str:
        """``calibrated (N samples)`` or why not, for ``plan``."""
        n = self.counts.get((device, mode), 0)
        if (device, mode) in self.borrowed:
            donor, scale, extent_scale = self.borrowed[device, mode]
            return (
                f"borrowed: calibrated from {self.counts.get((donor, mode), 0)} restore samples "
                f"of {donor} in {mode} mode (same pool; bytes x{scale:.2f} by probed "
                f"sequential reads, per-extent x{extent_scale:.2f} by probed random reads)"
            )
        if (device, mode) in self.terms:
            return f"calibrated from {n} restore samples of {device} in {mode} mode"
        if n == 0:
            return f"uncalibrated: no drill or restore has measured {device} in {mode} mode"
        return (
            f"uncalibrated: {n} restore samples of {device} in {mode} mode, "
            f"{MIN_SAMPLES} needed to fit the model"
        )


#: A real copy restore's own path is never taken as less than this share of what it
#: measured, however fast the target write rate assumed for it says its writes were.
MIN_PATH_SHARE = 0.1


def path_seconds(record: PathSampleRecord) -> float:
    """What a sample measured of the restore path the terms describe.

    A real copy restore wrote its target, and the model adds a copy's target writes to the
    fitted path (:func:`~blockguard.core.restore_model.copy_write_cost`): fitted as measured,
    those writes would be counted twice, in the terms and again on top. They are taken out
    as the model adds them back (bytes / the write rate it assumed, kept with the sample),
    so that fit + writes reproduces what the restore took.
    """
    measured = record.measured_seconds
    if record.write_rate <= 0:
        return measured
    return max(MIN_PATH_SHARE * measured, measured - record.bytes / record.write_rate)


def samples_of(records: Iterable[PathSampleRecord]) -> list[PathSample]:
    return [
        PathSample(RestoreShape(r.generations, r.chunks, r.extents, r.bytes), path_seconds(r))
        for r in records
    ]


@functools.lru_cache(maxsize=64)
def _fit(samples: tuple[PathSample, ...], min_per_byte: float = 0.0) -> PathTerms | None:
    # Plans are recomputed on every volume change; the samples change far less often.
    return fit_terms(samples, min_per_byte=min_per_byte)


def calibration(
    catalog: Catalog,
    devices: Sequence[str],
    speeds: Mapping[str, DeviceSpeed] | None = None,
    floors: Mapping[str, float] | None = None,
) -> Calibration:
    """Fit the terms of each of ``devices`` in each mode from its recent samples.

    :param speeds: probed speeds of ``devices`` when they are one pool's: a device without
        enough samples then borrows the terms of the one with the most (see the module).
    :param floors: least seconds per byte of a restore reading each device (1 / its
        measured sequential read rate, :meth:`~.pools.PoolRegistry.read_floors`); a
        device without one is fitted without a floor.
    """
    terms: dict[tuple[str, str], PathTerms] = {}
    counts: dict[tuple[str, str], int] = {}
    for device in devices:
        for mode in RESTORE_MODES:
            records = catalog.path_samples(device, mode, FIT_WINDOW)
            counts[device, mode] = len(records)
            fitted = _fit(tuple(samples_of(records)), (floors or {}).get(device, 0.0))
            if fitted is not None:
                terms[device, mode] = fitted
    borrowed: dict[tuple[str, str], tuple[str, float, float]] = {}
    for device in devices:
        for mode in RESTORE_MODES:
            donors = [d for d in devices if (d, mode) in terms and d in (speeds or {})]
            if (device, mode) in terms or speeds is None or device not in speeds or not donors:
                continue
            donor = max(donors, key=lambda d, mode=mode: counts[d, mode])
            scale = _slower_by(speeds[donor].read(False), speeds[device].read(False))
            # Random reads at the chunk size: the probe's figure of each scattered read's
            # latency (its ratio is the latencies' at the same request size and depth).
            extent_scale = _slower_by(speeds[donor].read(True), speeds[device].read(True))
            fitted = terms[donor, mode]
            terms[device, mode] = dataclasses.replace(
                fitted,
                per_byte=fitted.per_byte * scale,
                per_extent=fitted.per_extent * extent_scale,
            )
            borrowed[device, mode] = (donor, scale, extent_scale)
    return Calibration(terms, counts, borrowed)


def _slower_by(donor_rate: float, own_rate: float) -> float:
    """How many times slower a borrower is than its donor (at least 1: never cheaper)."""
    return max(1.0, donor_rate / own_rate) if own_rate > 0 else 1.0


def estimate_dict(estimate: RestoreEstimate, cal: Calibration) -> dict[str, Any]:
    """An estimate as ``plan`` and ``volume show`` give it."""
    mode = estimate.mode.value
    found: dict[str, Any] = {
        "seconds": estimate.seconds,
        "upper_seconds": estimate.upper_seconds,
        "calibrated": estimate.calibrated,
        "calibration": cal.describe(estimate.device_id, mode),
        "mode": mode,
        "device": estimate.device_id,
        "breakdown": estimate.breakdown.as_dict(),
    }
    fitted = cal.terms.get((estimate.device_id, mode))
    if fitted is not None:
        found["terms"] = fitted.as_dict()
    if (estimate.device_id, mode) in cal.borrowed:
        donor, scale, extent_scale = cal.borrowed[estimate.device_id, mode]
        found["borrowed"] = {"from": donor, "bytes_scale": scale, "extent_scale": extent_scale}
    return found


@dataclass(frozen=True)
class CopyTarget:
    """The target speed a copy restore's estimate assumes, and where it comes from.

    :param measured: True when a drill measured it (its scratch space on the pool).
    """

    speed: DeviceSpeed
    measured: bool
    source: str

    def as_dict(self) -> dict[str, Any]:
        """For ``plan``: ``write_rate`` (bytes/s), ``measured`` and ``source``."""
        return {
            "write_rate": self.speed.write(False),
            "measured": self.measured,
            "source": self.source,
        }


def copy_target_of(pools: PoolRegistry, pool: str) -> CopyTarget:
    """The newest write rate a drill of ``pool`` or of a volume on it measured of the
    pool's scratch space, else the default target speed (``default_speed``)."""
    newest: PathSampleRecord | None = None
    for dev in pools.catalog.list_pool_devices(pool):
        for record in pools.catalog.path_samples(
            dev.device_path, RestoreMode.COPY.value, FIT_WINDOW
        ):
            # Drills of the pool and of its volumes into its scratch; never real restores,
            # whose rate is the one they assumed.
            if record.source == "drill" and record.write_rate > 0:
                if newest is None or (record.at, record.seq) > (newest.at, newest.seq):
                    newest = record
                break
    if newest is None:
        rate = pools.settings.default_speed
        return CopyTarget(
            DeviceSpeed.uniform(rate),
            False,
            f"default {format_rate(rate)}: no drill of pool {pool} has written scratch space",
        )
    drill = f"volume {newest.volume}" if newest.volume else f"pool {pool}"
    return CopyTarget(
        DeviceSpeed.uniform(newest.write_rate),
        True,
        f"{format_rate(newest.write_rate)} measured by the restore drill of {drill} into "
        f"scratch space on {newest.pool_device}",
    )


def record_restore_sample(
    catalog: Catalog,
    volume: str,
    device: str,
    how: RestoreTarget,
    result: RestoreResult,
    predicted: float | None,
    copy_target: DeviceSpeed | None = None,
) -> None:
    """Store a real restore as a sample of its full's pool device and mode.

    :param copy_target: the target speed the estimate assumed for a copy's writes (see
        :func:`path_seconds`); None: the model adds none.
    """
    writes = copy_write_cost(PathTerms(), copy_target, how.mode)
    catalog.record_path_sample(
        volume=volume,
        pool_device=device,
        mode=how.mode.value,
        source="restore",
        generations=len(result.chain),
        chunks=result.chunks,
        extents=result.extents,
        nbytes=result.bytes_read,
        measured_seconds=result.duration,
        predicted_seconds=predicted,
        write_rate=1.0 / writes if writes > 0 else 0.0,
    )


def record_drill(
    catalog: Catalog, pools: PoolRegistry, pool: str, result: DrillResult
) -> list[dict[str, Any]]:
    """Store a drill's samples (volume ""), each with what the model predicted before;
    copies restored into scratch space keep its measured write rate (see the module)."""
    devices = {}
    for sample in result.samples:
        key = sample.full.generation_id
        if key not in devices:
            devices[key] = pools.device_of(pool, sample.full)
    before = calibration(catalog, sorted(set(devices.values())), floors=pools.read_floors(pool))
    scratch = DeviceSpeed.uniform(result.copy_write_rate) if result.copy_write_rate > 0 else None
    rows = []
    for sample in result.samples:
        device = devices[sample.full.generation_id]
        shape = RestoreShape(sample.generations, sample.chunks, sample.extents, sample.nbytes)
        mode = RestoreMode(sample.mode)
        wrote = scratch is not None and mode is RestoreMode.COPY
        fitted = before.terms.get((device, sample.mode))
        predicted = None
        if fitted is not None:
            writes = copy_write_cost(fitted, scratch, mode) if wrote else 0.0
            predicted = fitted.seconds(shape) + writes * sample.nbytes
        catalog.record_path_sample(
            volume="",
            pool_device=device,
            mode=sample.mode,
            source="drill",
            generations=sample.generations,
            chunks=sample.chunks,
            extents=sample.extents,
            nbytes=sample.nbytes,
            measured_seconds=sample.seconds,
            predicted_seconds=predicted,
            write_rate=result.copy_write_rate if wrote else 0.0,
        )
        rows.append(
            {
                "shape": sample.shape,
                "mode": sample.mode,
                "device": device,
                "generations": sample.generations,
                "extents": sample.extents,
                "bytes": sample.nbytes,
                "seconds": sample.seconds,
                "predicted_seconds": -1.0 if predicted is None else predicted,
            }
        )
    return rows


def run_drill_job(
    pool: str, pools: PoolRegistry, settings: Settings, progress: ProgressReporter
) -> dict[str, Any]:
    """The body of a drill job: drill the pool (its copies into scratch space on it), store
    the samples, report the terms."""
    from blockguard.engine.jobbook import JobProgress

    backend = pools.backend(pool)
    with scratch_space(pools, pool, settings.drill_bytes) as scratch:
        result = run_drill(
            backend,
            volume_bytes=settings.drill_bytes,
            progress=JobProgress(progress),
            copy_scratch=scratch,
            # Built now: it knows the scratch device as the pool's own.
            gate=pools.gate(),
        )
    rows = record_drill(pools.catalog, pools, pool, result)
    devices = sorted({r["device"] for r in rows})
    after = calibration(pools.catalog, devices, floors=pools.read_floors(pool))
    return {
        "pool": pool,
        "samples": rows,
        "seconds": result.duration,
        "copy_scratch": result.copy_scratch,
        "copy_write_rate": result.copy_write_rate,
        "terms": {
            f"{device} {mode}": after.terms[device, mode].as_dict()
            for device in devices
            for mode in RESTORE_MODES
            if (device, mode) in after.terms
        },
    }
