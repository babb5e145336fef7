"""The throughput probe against fio, throttled pool disks, write confinement, live figures.

Device tests use loop devices with ``--direct-io=on`` (so ``O_DIRECT`` reaches the backing
file and the page cache does not flatter either tool). The machine is shared and noisy, so
probe and fio are measured alternately, in back-to-back pairs, and the median of the pairs'
ratios is printed. No figure is compared with another: on a shared machine any speed
assertion flakes. The probe-vs-fio ratios are ``bench/bench_probe.py``'s to print.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest

from blockguard.core.objectives import RecoveryObjectives
from blockguard.core.perftable import (
    DeviceRole,
    DeviceSpeed,
    PerformanceTable,
    SpeedKind,
    Transport,
)
from blockguard.core.planner import plan_backup
from blockguard.core.units import GiB, MiB, format_rate
from blockguard.core.vocab import GenerationKind, RestoreMode
from blockguard.core.what_if import ChangeSets
from blockguard.errors import InvalidInput, NotABlockDevice
from blockguard.storage import cgroup
from blockguard.storage.blockdev import BlockDevice, aligned_buffer, device_rdev, sysfs_dir
from blockguard.storage.devinfo import describe_device, dm_layout, md_layout, raid_layout
from blockguard.storage.livestats import (
    LiveRates,
    LiveSampler,
    feed,
    kernel_name,
    observations,
)
from blockguard.storage.probe import WritableRegion, probe_device
from blockguard.storage.runner import Runner

SLOW_BPS = 20 * MiB
FAST_BPS = 200 * MiB


# --- helpers -------------------------------------------------------------------------


def fill(dev: str, seed: bytes = b"blockguard") -> None:
    """Write every byte once, so both tools read real data and overwrite allocated blocks."""
    block = 4 * MiB
    buf = aligned_buffer(block)
    buf[:] = hashlib.shake_256(seed).digest(block)
    with BlockDevice(dev, write=True, direct=True) as bd:
        for offset in range(0, bd.size - bd.size % block, block):
            bd.pwrite_all(memoryview(buf), offset)
        bd.flush()
    buf.close()


def digest(dev: str, start: int, end: int) -> str:
    """SHA-256 of ``[start, end)`` read with ``O_DIRECT`` (no stale page cache)."""
    h = hashlib.sha256()
    block = MiB
    buf = aligned_buffer(block)
    view = memoryview(buf)
    with BlockDevice(dev, direct=True) as bd:
        for offset in range(start, end, block):
            n = min(block, end - offset)
            assert bd.pread_into(view[:block], offset) == block
            h.update(view[:n])
    view.release()
    buf.close()
    return h.hexdigest()


def fio_rate(dev: str, rw: str, block: int, depth: int, duration: float, size: int) -> float:
    """fio's bytes/s for one test, configured like the probe: O_DIRECT, N psync threads.

    ``scramble_buffers=1`` (fio's default): fio then writes unique data, as the probe does
    (it stamps every 4 KiB block), so both measure what a device does with unique data. Run
    unscrambled, fio wrote one buffer over and over and measured 2.1 GiB/s against the
    probe's 1.5 in one clean-clone run (ratio 0.69); scrambled, the same case measured 0.99.
    Figures on this shared machine swing between runs; this remains the test most exposed.
    """
    argv = [
        "fio",
        "--name=probe-check",
        f"--filename={dev}",
        "--direct=1",
        f"--rw={rw}",
        f"--bs={block}",
        "--ioengine=psync",
        f"--numjobs={depth}",
        # Each job its own slice, so that no two requests in flight touch the same blocks,
        # as with the probe's shared cursor. Without it, N jobs read and write the same
        # offsets together, which the layers below serve faster (fio 3.0 GB/s vs 2.7 GB/s
        # with slices at qd4, measured).
        f"--size={size // depth // block * block}",
        f"--offset_increment={size // depth // block * block}",
        "--thread",
        "--group_reporting",
        "--time_based",
        f"--runtime={round(duration * 1000)}ms",  # fio truncates "0.75s" to 0
        "--output-format=json",
        "--scramble_buffers=1",
    ]
    result = Runner().run(argv, timeout=duration * 10 + 60)
    figures = json.loads(result.stdout)["jobs"][0]["write" if "write" in rw else "read"]
    # Not a speed check: fio must really have run for the duration, like the probe.
    assert figures["runtime"] >= duration * 1000 * 0.9, f"fio ran {figures['runtime']} ms"
    return float(figures["bw_bytes"])


def probe_rate(dev: str, kind: SpeedKind, depth: int, duration: float, **kw: object) -> float:
    result = probe_device(dev, kinds=[kind], depths=(depth,), duration=duration, **kw)  # type: ignore[arg-type]
    return result.rate(kind)


def need_fio() -> None:
    try:
        Runner().resolve("fio")
    except Exception:
        pytest.skip("fio is not installed")


# --- (1) probe vs fio on one loop device -----------------------------------------------


@pytest.mark.root
@pytest.mark.parametrize(
    ("kind", "rw"), [(SpeedKind.SEQ_READ, "read"), (SpeedKind.SEQ_WRITE, "write")]
)
def test_probe_and_fio_run_and_report_positive_figures(loopdev, kind: SpeedKind, rw: str) -> None:
    """Probe and fio (as the bench configures it) both run on one loop device and report
    positive figures. How close the two are is a measurement, not a test: a busy machine
    moved the ratio by 30%. ``bench/bench_probe.py`` prints it.
    """
    need_fio()
    size = 64 * MiB
    dev = loopdev(size, direct_io=True)
    fill(dev)
    duration = 0.3
    probe = probe_rate(dev, kind, 4, duration, writable=WritableRegion(0, size))
    fio = fio_rate(dev, rw, MiB, 4, duration, size)
    print(f"\n{kind.value} qd4: probe {format_rate(probe)} fio {format_rate(fio)}")
    assert probe > 0 and fio > 0


# --- (2) slow and fast pool disks, throttled by a cgroup -------------------------------


def _need_cgroup() -> cgroup.Support:
    support = cgroup.detect()
    if support.version is None:
        pytest.skip(f"no block-I/O throttling: {support.reason}")
    return support


@pytest.mark.root
def test_throttled_pool_disks_measured_and_planner_follows_the_figures(loopdev) -> None:
    """Two cgroup-throttled disks are probed, and the planner, fed those figures, places
    the data on the disk they say is faster. Which one that is, and how close fio comes,
    is printed only: speed assertions flake on a loaded machine."""
    need_fio()
    support = _need_cgroup()
    slow = loopdev(64 * MiB, name="slow.img", direct_io=True)
    fast = loopdev(64 * MiB, name="fast.img", direct_io=True)
    fill(slow)
    fill(fast)
    devno = {d: f"{os.major(device_rdev(d))}:{os.minor(device_rdev(d))}" for d in (slow, fast)}
    limits = {
        devno[slow]: cgroup.Limit(SLOW_BPS, SLOW_BPS),
        devno[fast]: cgroup.Limit(FAST_BPS, FAST_BPS),
    }
    chunk = 64 * 1024
    kw = {"chunk_size": chunk, "duration": 1.0, "depths": (1, 4)}
    with cgroup.throttled_cgroup(limits, support) as group:
        group_path = group.path
        assert group_path.is_dir()
        results = {
            d: group.call(probe_device, d, writable=WritableRegion(0, 64 * MiB), **kw)
            for d in (slow, fast)
        }
        # fio in the same group, at the depth the probe found best, for as long as one test.
        tests = results[slow].tests
        fio_slow = {
            kind: group.call(fio_rate, slow, rw, MiB, tests[kind].best.depth, 1.0, 64 * MiB)
            for kind, rw in ((SpeedKind.SEQ_READ, "read"), (SpeedKind.SEQ_WRITE, "write"))
        }
    assert not group_path.exists(), "the cgroup must be removed"

    speeds = {d: results[d].speed() for d in (slow, fast)}
    for d, name in ((slow, "slow"), (fast, "fast")):
        print(f"\n{name} {d}: {speeds[d].describe()}\n{results[d].describe()}")
    for kind, f in fio_slow.items():
        p = results[slow].rate(kind)
        print(f"throttled {kind.value}: probe {format_rate(p)} fio {format_rate(f)} {p / f:.2f}")
        assert p > 0 and f > 0
    for kind in SpeedKind:
        assert speeds[fast].get(kind) > 0 and speeds[slow].get(kind) > 0, kind
    # Throttled 10x apart they normally rank as named; if load inverted them, the planner
    # must follow the figures, not the names.
    if speeds[fast].seq_read < speeds[slow].seq_read:
        slow, fast = fast, slow

    # The planner, fed a table built from these measurements, moves the data to the faster
    # disk when only it meets the RTO, although the other one is the pool's first choice.
    table = PerformanceTable(
        describe_device(d).entry(speeds[d], DeviceRole.POOL) for d in (slow, fast)
    )
    ids = {d: describe_device(d).device_id for d in (slow, fast)}
    volume = 100 * GiB
    target = DeviceSpeed.uniform(100 * GiB)  # the restore target is never the bottleneck
    t_slow = volume / speeds[slow].seq_read
    t_fast = volume / speeds[fast].seq_read
    rto = timedelta(seconds=(t_slow * t_fast) ** 0.5)
    objectives = RecoveryObjectives(rto=rto, restore_mode=RestoreMode.COPY)
    decision = plan_backup(
        None,
        ChangeSets(0, 0, volume),
        table.speeds(DeviceRole.POOL),
        objectives,
        candidates=[ids[slow], ids[fast]],
        copy_target=target,
    )
    print(decision.describe())
    assert decision.method is GenerationKind.FULL
    assert decision.feasible
    assert decision.device_id == ids[fast]
    assert decision.estimate.seconds <= rto.total_seconds()


@pytest.mark.root
def test_cgroup_call_returns_raises_and_always_removes() -> None:
    support = _need_cgroup()
    with cgroup.throttled_cgroup({}, support) as group:
        path = group.path
        assert group.call(_own_cgroup).endswith(path.name)
        with pytest.raises(ValueError, match="from the child"):
            group.call(_fail)
    assert not path.exists()
    assert not _own_cgroup().endswith(path.name), "the caller must never be moved"


def _own_cgroup() -> str:
    """This process's group in the blkio hierarchy (v1) or the unified one (v2)."""
    lines = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
    for _, controllers, where in lines:
        if "blkio" in controllers.split(","):
            return where
    return next(where for _, controllers, where in lines if controllers == "")


def _fail() -> None:
    raise ValueError("from the child")


# --- (3) writes only where allowed; what sysfs says ----------------------------------


@pytest.mark.root
def test_writes_refused_without_region(loopdev) -> None:
    dev = loopdev(16 * MiB, direct_io=True)
    fill(dev)
    before = digest(dev, 0, 16 * MiB)
    for kind in (SpeedKind.SEQ_WRITE, SpeedKind.RAND_WRITE):
        with pytest.raises(InvalidInput, match="writable region"):
            probe_device(dev, kinds=[kind], duration=0.1, depths=(1,))
    reads = probe_device(dev, duration=0.1, depths=(1,))
    assert set(reads.tests) == {SpeedKind.SEQ_READ, SpeedKind.RAND_READ}
    assert reads.rate(SpeedKind.SEQ_READ) > 0
    with pytest.raises(InvalidInput, match=r"seq_write .* was not measured"):
        reads.speed()
    fallback = DeviceSpeed.uniform(1.0)
    speed = reads.speed(fallback)
    assert speed.seq_write == 1.0
    assert speed.seq_read == reads.rate(SpeedKind.SEQ_READ)
    assert digest(dev, 0, 16 * MiB) == before


@pytest.mark.root
def test_writes_stay_inside_region(loopdev) -> None:
    size = 64 * MiB
    dev = loopdev(size, direct_io=True)
    fill(dev)
    region = WritableRegion(16 * MiB, 16 * MiB)
    head, tail = digest(dev, 0, region.offset), digest(dev, region.end, size)
    inside = digest(dev, region.offset, region.end)
    result = probe_device(dev, writable=region, duration=0.3, depths=(1, 4), chunk_size=16384)
    assert set(result.tests) == set(SpeedKind)
    assert digest(dev, 0, region.offset) == head
    assert digest(dev, region.end, size) == tail
    assert digest(dev, region.offset, region.end) != inside, "the probe did write the region"
    assert result.speed().chunk_size == 16384


@pytest.mark.root
@pytest.mark.parametrize(
    "region",
    [
        WritableRegion(60 * MiB, 8 * MiB),  # past the end
        WritableRegion(4096 + 512, MiB),  # misaligned
        WritableRegion(0, 64 * 1024),  # smaller than a sequential request
        WritableRegion(-4096, MiB),
    ],
)
def test_bad_regions_refused_before_any_write(loopdev, region: WritableRegion) -> None:
    dev = loopdev(64 * MiB, direct_io=True)
    fill(dev)
    before = digest(dev, 0, 64 * MiB)
    with pytest.raises(InvalidInput, match="writable region"):
        probe_device(dev, writable=region, duration=0.1, depths=(1,))
    assert digest(dev, 0, 64 * MiB) == before


def test_probe_refuses_regular_files(tmp_path: Path) -> None:
    f = tmp_path / "image"
    f.write_bytes(b"\0" * MiB)
    with pytest.raises(NotABlockDevice):
        probe_device(f, duration=0.1, depths=(1,))


@pytest.mark.root
def test_describe_loop_device(loopdev, tmp_path: Path) -> None:
    dev = loopdev(48 * MiB, name="described.img", direct_io=True)
    desc = describe_device(dev)
    sysdir = sysfs_dir(device_rdev(dev))
    assert desc.transport is Transport.LOOP
    assert desc.capacity == 48 * MiB
    assert desc.rotational == ((sysdir / "queue" / "rotational").read_text().strip() == "1")
    assert desc.layout == "single"
    assert desc.kernel_name == Path(dev).name
    assert str(tmp_path / "described.img") in desc.device_id
    entry = desc.entry(DeviceSpeed.uniform(1e9))
    assert entry.transport is Transport.LOOP
    assert entry.capacity == 48 * MiB
    assert entry.role is DeviceRole.POOL


@pytest.mark.parametrize(
    ("table", "layout"),
    [
        ("0 2097152 linear 7:0 0\n", "linear"),
        ("0 4194304 striped 2 128 7:0 0 7:1 0\n", "striped 2"),
        ("0 2097152 mirror core 1 1024 2 7:0 0 7:1 0 1 handle_errors\n", "mirror 2"),
        ("0 4194304 raid raid5_ls 3 128 region_size 4096 3 - 7:0 - 7:1 - 7:2\n", "raid5 2D+1P"),
        ("0 4194304 raid raid6_zr 1 128 5 - 7:0 - 7:1 - 7:2 - 7:3 - 7:4\n", "raid6 3D+2P"),
        ("0 2097152 raid raid1 1 1024 2 - 7:0 - 7:1\n", "raid1 2 mirrors"),
        ("0 1000 linear 7:0 0\n1000 2000 striped 3 64 7:1 0 7:2 0 7:3 0\n", "linear+striped 3"),
        ("0 2097152 thin 253:4 1\n", "thin"),
        ("0 100 striped x\n", "striped"),
        ("", "dm"),
    ],
)
def test_dm_layout(table: str, layout: str) -> None:
    assert dm_layout(table) == layout


def test_md_and_raid_layouts() -> None:
    assert md_layout("raid5", 3) == "raid5 2D+1P"
    assert md_layout("raid6", 6) == "raid6 4D+2P"
    assert md_layout("raid1", 2) == "raid1 2 mirrors"
    assert md_layout("raid0", 4) == "raid0 4 stripes"
    assert md_layout("raid10", 4) == "raid10 4 disks"
    assert md_layout("linear", 2) == "linear 2 disks"
    assert raid_layout("raid4", 4) == "raid4 3D+1P"


# --- (4) live figures ------------------------------------------------------------------


@pytest.mark.root
def test_live_rates_match_a_write_loop(loopdev) -> None:
    dev = loopdev(128 * MiB, direct_io=True)
    block = MiB
    buf = aligned_buffer(block)
    buf[:] = os.urandom(block)
    view = memoryview(buf)
    sampler = LiveSampler(kernel_name(dev))
    written = 0
    with BlockDevice(dev, write=True, direct=True) as bd:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.5:
            bd.pwrite_all(view, written % (128 * MiB))
            written += block
            sampler.add_job_bytes(written=block)
        elapsed = time.monotonic() - t0
    rates = sampler.sample()
    view.release()
    buf.close()
    actual = written / elapsed
    # Rates are printed, not compared with the loop's own: a loaded machine skews either.
    print(f"\nwrote {format_rate(actual)}; {rates.describe()}")
    assert rates.disk_write > 0
    assert rates.job_write is not None and rates.job_write > 0
    assert rates.disk_read == 0 or rates.disk_read < rates.disk_write

    found = dict(observations(rates, scattered=False, min_utilization=0.0))
    assert set(found) == {SpeedKind.SEQ_WRITE}
    desc = describe_device(dev)
    table = PerformanceTable([desc.entry(DeviceSpeed.uniform(1.0))])
    entry = feed(table, desc.device_id, rates, scattered=False, min_utilization=0.0)
    assert entry is not None
    assert entry.speed.seq_write > 1.0
    assert entry.speed.seq_read == 1.0
    assert table.get(desc.device_id) == entry


class _FakeCounters:
    def __init__(self) -> None:
        self.read = self.write = self.busy = 0

    def __call__(self) -> dict[str, object]:
        from types import SimpleNamespace

        return {
            "sdz": SimpleNamespace(
                read_bytes=self.read, write_bytes=self.write, busy_time=self.busy
            )
        }


def test_live_sampler_rates_and_thresholds() -> None:
    counters = _FakeCounters()
    now = [100.0]
    sampler = LiveSampler("sdz", counters=counters, clock=lambda: now[0])
    counters.read, counters.write, counters.busy = 400 * MiB, 100 * MiB, 1800
    sampler.add_job_bytes(read=300 * MiB)
    now[0] += 2.0
    rates = sampler.sample()
    assert rates.interval == 2.0
    assert rates.disk_read == 200 * MiB
    assert rates.disk_write == 50 * MiB
    assert rates.job_read == 150 * MiB
    assert rates.utilization == pytest.approx(0.9)
    assert rates.read_rate == 150 * MiB  # the job's own figure wins
    # The job reported reads only, so it says nothing about writes.
    assert rates.job_write == 0.0
    assert dict(observations(rates, scattered=True)) == {SpeedKind.RAND_READ: 150 * MiB}

    # A mostly idle device was not the bottleneck: its rate says nothing about it.
    counters.read += 100 * MiB
    counters.busy += 200
    now[0] += 2.0
    idle = sampler.sample()
    assert idle.utilization == pytest.approx(0.1)
    assert observations(idle, scattered=False) == []
    # Too short an interval says nothing either.
    assert observations(LiveRates("sdz", 0.1, 1e9, 1e9, utilization=1.0), scattered=False) == []
    with pytest.raises(InvalidInput):
        sampler.add_job_bytes(read=-1)


def test_probe_settings_validated_before_opening() -> None:
    with pytest.raises(InvalidInput, match="chunk size"):
        probe_device("/nonexistent", chunk_size=3000)
    with pytest.raises(InvalidInput, match="duration"):
        probe_device("/nonexistent", duration=0)
    with pytest.raises(InvalidInput, match="queue depths"):
        probe_device("/nonexistent", depths=())
