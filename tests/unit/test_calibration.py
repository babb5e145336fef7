"""From catalog samples to fitted terms: uncalibrated until enough samples, per device and mode."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from blockguard.core.catalog import Catalog, DeviceIdentity
from blockguard.core.restore_terms import PathTerms, RestoreShape
from blockguard.engine.calibration import calibration, copy_target_of
from blockguard.engine.settings import Settings

TRUE = PathTerms(fixed=0.2, per_generation=0.05, per_extent=0.001, per_byte=1e-8)
SHAPES = [
    RestoreShape(1, 512, 0, 32 << 20),
    RestoreShape(1, 1024, 0, 64 << 20),
    RestoreShape(5, 1024, 40, 64 << 20),
    RestoreShape(9, 1024, 80, 64 << 20),
    RestoreShape(4, 1024, 120, 64 << 20),
]


def _record(c: Catalog, shape: RestoreShape, mode: str = "copy", device: str = "/dev/sdb") -> None:
    c.record_path_sample(
        volume="",
        pool_device=device,
        mode=mode,
        source="drill",
        generations=shape.generations,
        chunks=shape.chunks,
        extents=shape.extents,
        nbytes=shape.nbytes,
        measured_seconds=TRUE.seconds(shape),
    )


def test_a_device_is_calibrated_per_mode_once_it_has_enough_samples(tmp_path: Path) -> None:
    with Catalog(tmp_path / "catalog.db") as c:
        cal = calibration(c, ["/dev/sdb"])
        assert cal.terms == {}
        assert cal.describe("/dev/sdb", "copy").startswith("uncalibrated: no drill or restore")
        for shape in SHAPES[:3]:
            _record(c, shape)
        cal = calibration(c, ["/dev/sdb"])
        assert cal.describe("/dev/sdb", "copy") == (
            "uncalibrated: 3 restore samples of /dev/sdb in copy mode, 4 needed to fit the model"
        )
        for shape in SHAPES[3:]:
            _record(c, shape)
        _record(c, SHAPES[0], device="/dev/sdc")  # another device's sample does not count
        cal = calibration(c, ["/dev/sdb", "/dev/sdc"])
        assert set(cal.terms) == {("/dev/sdb", "copy")}
        fitted = cal.terms["/dev/sdb", "copy"]
        for shape in SHAPES:
            assert fitted.seconds(shape) == pytest.approx(TRUE.seconds(shape), rel=0.01)
        assert cal.describe("/dev/sdb", "copy").startswith("calibrated from 5 restore samples")
        assert cal.describe("/dev/sdb", "swap-in").startswith("uncalibrated")


def test_an_undrilled_device_of_the_pool_borrows_the_drilled_ones_terms(tmp_path: Path) -> None:
    """A drill places its chain on one device of the pool; the others are not left
    uncalibrated, and a slower one is never estimated cheaper than the drilled one."""
    from blockguard.core.perftable import DeviceSpeed

    speeds = {
        "/dev/sdb": DeviceSpeed.uniform(200e6),
        "/dev/sdc": DeviceSpeed.uniform(100e6),  # half as fast: bytes cost twice
        "/dev/sdd": DeviceSpeed.uniform(400e6),  # faster: no cheaper than the drilled one
    }
    with Catalog(tmp_path / "catalog.db") as c:
        for shape in SHAPES:
            _record(c, shape)
        devices = sorted(speeds)
        assert set(calibration(c, devices).terms) == {("/dev/sdb", "copy")}
        cal = calibration(c, devices, speeds)
        drilled = cal.terms["/dev/sdb", "copy"]
        slow, fast = cal.terms["/dev/sdc", "copy"], cal.terms["/dev/sdd", "copy"]
        assert slow.per_byte == pytest.approx(2 * drilled.per_byte)
        assert slow.per_extent == pytest.approx(2 * drilled.per_extent)
        assert (slow.fixed, slow.per_generation) == (drilled.fixed, drilled.per_generation)
        assert fast == drilled
        assert cal.describe("/dev/sdc", "copy") == (
            "borrowed: calibrated from 5 restore samples of /dev/sdb in copy mode "
            "(same pool; bytes x2.00 by probed sequential reads, per-extent x2.00 by probed "
            "random reads)"
        )
        # Nothing to borrow in a mode no device was measured in.
        assert ("/dev/sdc", "swap-in") not in cal.terms


def test_a_high_latency_disk_that_borrows_pays_its_own_latency_per_extent(
    tmp_path: Path,
) -> None:
    """A disk as fast as the drilled one when streaming but 10x slower at scattered reads
    (a 20 ms disk beside a fast one) pays 10x the drilled per-extent cost, not the fast
    disk's; ``plan`` says the terms are borrowed and by what factors."""
    from blockguard.core.perftable import DeviceSpeed
    from blockguard.core.restore_model import Chain, StoredDelta, estimate_chain
    from blockguard.core.vocab import GenerationKind, RestoreMode
    from blockguard.engine.calibration import estimate_dict

    speeds = {
        "/dev/sdb": DeviceSpeed(500e6, 500e6, 100e6, 100e6),
        "/dev/sdd": DeviceSpeed(500e6, 500e6, 10e6, 10e6),
    }
    with Catalog(tmp_path / "catalog.db") as c:
        for shape in SHAPES:
            _record(c, shape, mode="swap-in")
        cal = calibration(c, sorted(speeds), speeds)
        drilled, slow = cal.terms["/dev/sdb", "swap-in"], cal.terms["/dev/sdd", "swap-in"]
        assert drilled.per_extent > 0
        assert slow.per_extent == pytest.approx(10 * drilled.per_extent)
        assert slow.per_byte == drilled.per_byte
        chain = Chain(
            64 << 20,
            "/dev/sdd",
            (StoredDelta(GenerationKind.INCREMENTAL, 0, "/dev/sdd", extents=100),),
        )
        estimate = estimate_chain(chain, speeds, RestoreMode.SWAP_IN, terms=cal.terms)
        assert estimate.breakdown.extents == pytest.approx(100 * 10 * drilled.per_extent)
        shown = estimate_dict(estimate, cal)
        assert shown["borrowed"] == {"from": "/dev/sdb", "bytes_scale": 1.0, "extent_scale": 10.0}
        assert shown["calibration"].startswith(
            "borrowed: calibrated from 5 restore samples of /dev/sdb"
        )
        assert "per-extent x10.00" in shown["calibration"]


def test_real_copy_restores_are_not_charged_their_target_writes_twice(tmp_path: Path) -> None:
    """A real copy restore measured its path and its target's writes; the model adds a copy's
    target writes to the fitted path. Fitted from drills (no writes) and real restores alike,
    the estimate of each real restore is what it took, not that plus its writes again."""
    from blockguard.core.perftable import DeviceSpeed
    from blockguard.core.restore_model import copy_write_cost
    from blockguard.core.vocab import RestoreMode, RestoreTarget
    from blockguard.engine.calibration import record_restore_sample
    from blockguard.storage.restore import RestoreResult

    target = DeviceSpeed.uniform(100e6)
    write = 1.0 / target.write(False)

    def real(shape: RestoreShape) -> float:  # the path, then the target's writes
        return TRUE.seconds(shape) + shape.nbytes * write

    with Catalog(tmp_path / "catalog.db") as c:
        for shape in SHAPES[:2]:
            _record(c, shape)  # drills: the read side only
        for shape in SHAPES[2:]:
            result = RestoreResult(
                "pg", "g", RestoreTarget.NEW_DEVICE, "/dev/sdz", ("g",) * shape.generations,
                shape.nbytes, shape.nbytes, real(shape), chunks=shape.chunks,
                extents=shape.extents,
            )  # fmt: skip
            record_restore_sample(
                c, "pg", "/dev/sdb", RestoreTarget.NEW_DEVICE, result, None, target
            )
        stored = c.path_samples("/dev/sdb", "copy")
        assert sorted(s.write_rate for s in stored) == [0.0, 0.0, 100e6, 100e6, 100e6]
        fitted = calibration(c, ["/dev/sdb"]).terms["/dev/sdb", "copy"]
        for shape in SHAPES[2:]:
            per_byte = fitted.per_byte + copy_write_cost(fitted, target, RestoreMode.COPY)
            estimate = fitted.breakdown(shape, per_byte).total
            assert estimate == pytest.approx(real(shape), rel=0.02)
        # A swap-in restore writes onto the pool's own snapshot: nothing is taken out.
        result = RestoreResult("pg", "g", RestoreTarget.SWAP_IN, "/dev/loop9", ("g",), 1, 1, 2.0)
        record_restore_sample(c, "pg", "/dev/sdb", RestoreTarget.SWAP_IN, result, None, target)
        (swap,) = c.path_samples("/dev/sdb", "swap-in")
        assert swap.write_rate == 0.0


def test_a_copy_target_is_the_pools_newest_drilled_scratch_rate_else_the_default(
    tmp_path: Path,
) -> None:
    """A copy's target writes are estimated at the write rate the newest drill of the pool
    (or of a volume on it) measured of its scratch space; before any (with only samples
    that wrote no scratch, real restores or other pools' samples), at ``default_speed``."""
    settings = Settings(tmp_path, tmp_path / "mnt", default_speed=8e6)
    with Catalog(tmp_path / "catalog.db") as c:
        for pool, disk, minor in (("p1", "/dev/sdb", 16), ("p2", "/dev/sdc", 32)):
            c.add_pool(pool, "dir", f"/srv/{pool}")
            c.add_pool_device(pool, disk, DeviceIdentity(8, minor, 1 << 30), capacity=1 << 30)
        pools = SimpleNamespace(catalog=c, settings=settings)

        def sample(device: str, rate: float, volume: str = "", mode: str = "copy") -> None:
            c.record_path_sample(
                volume=volume, pool_device=device, mode=mode, source="drill", generations=1,
                chunks=1, extents=0, nbytes=1 << 20, measured_seconds=0.1, write_rate=rate,
            )  # fmt: skip

        unmeasured = copy_target_of(pools, "p1")  # type: ignore[arg-type]
        assert unmeasured.measured is False and unmeasured.speed.write(False) == 8e6
        assert "no drill of pool p1" in unmeasured.source
        sample("/dev/sdb", 0.0)  # a drill that rehearsed its copies
        sample("/dev/sdb", 0.0, volume="db")  # a volume drill that did
        sample("/dev/sdb", 3e8, mode="swap-in")
        sample("/dev/sdc", 9e8)  # another pool's scratch
        c.record_path_sample(
            volume="db", pool_device="/dev/sdb", mode="copy", source="restore", generations=1,
            chunks=1, extents=0, nbytes=1 << 20, measured_seconds=0.1, write_rate=5e8,
        )  # fmt: skip
        assert copy_target_of(pools, "p1").measured is False  # type: ignore[arg-type]
        sample("/dev/sdb", 2e8)
        sample("/dev/sdb", 4e8)
        sample("/dev/sdb", 0.0)
        found = copy_target_of(pools, "p1")  # type: ignore[arg-type]
        assert found.measured is True and found.speed.write(False) == 4e8
        assert found.as_dict()["write_rate"] == 4e8
        assert "drill of pool p1 into scratch space on /dev/sdb" in found.source
        sample("/dev/sdb", 3e8, volume="db")  # a volume drill into the pool's scratch
        found = copy_target_of(pools, "p1")  # type: ignore[arg-type]
        assert found.speed.write(False) == 3e8 and "drill of volume db" in found.source


def test_a_device_with_a_read_floor_is_fitted_no_faster_than_it(tmp_path: Path) -> None:
    """Every byte a restore moves is read from the pool disk: a disk measured at 50 MB/s
    is fitted at least 20 ns/B, whatever its drill's restores ran at; one without a floor
    (not measured) is fitted as its samples say."""
    with Catalog(tmp_path / "catalog.db") as c:
        for device in ("/dev/sdb", "/dev/sdc"):
            for shape in SHAPES:
                _record(c, shape, device=device)
        cal = calibration(c, ["/dev/sdb", "/dev/sdc"], floors={"/dev/sdb": 1 / 50e6})
        assert cal.terms["/dev/sdb", "copy"].per_byte >= 1 / 50e6
        assert cal.terms["/dev/sdc", "copy"].per_byte == pytest.approx(TRUE.per_byte, rel=0.01)
