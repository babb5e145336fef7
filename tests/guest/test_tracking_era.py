"""dm-era tracking against the real kernel: exact sets, restarts, re-creation, loss."""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroaring import BitMap

from blockguard.errors import TrackingLost
from blockguard.storage.blockdev import BlockDevice
from blockguard.storage.dm import DeviceMapper
from blockguard.storage.tracking.era import EraTracker
from tests.guest.workload import random_writes

pytestmark = pytest.mark.guest

CHUNK = 64 * 1024
SIZE = 16 << 20


@pytest.fixture
def trackers() -> Iterator[list[EraTracker]]:
    made: list[EraTracker] = []
    yield made
    dm = DeviceMapper()
    for t in made:
        try:
            t.detach()
        except Exception:
            for name in (t._s.era_name, t._s.inner_name):
                if name and name.startswith("blockguard-"):
                    dm.remove(name)


def run_rounds(tracker: EraTracker, rng: random.Random, rounds: int) -> None:
    """Several rounds and references; each reference's set must EQUAL what was written."""
    expected: dict[str, BitMap] = {}
    for rnd in range(rounds):
        ref = f"r{rnd}"
        tracker.add_reference(ref)
        expected[ref] = BitMap()
        written = random_writes(tracker.device, SIZE, CHUNK, rng, rng.randrange(5, 40))
        for bm in expected.values():
            bm |= written
        if rnd == 2:
            tracker.drop_reference("r1")
            del expected["r1"]
        got = tracker.changed_many(list(expected))
        for name, bm in expected.items():
            assert got[name].chunks == bm, f"round {rnd}, reference {name}"
    assert tracker.state().is_exact


def test_era_stacked_exact_sets_restart_and_recreation(loopdev, tmp_path: Path, trackers) -> None:
    rng = random.Random(int(os.environ.get("BLOCKGUARD_SEED", "1")))
    vol, meta = loopdev(SIZE), loopdev(8 << 20)
    t = EraTracker.protect(vol, meta, tmp_path / "st", CHUNK, name="vol1")
    trackers.append(t)
    run_rounds(t, rng, 4)

    # A daemon restart: the kernel kept tracking; the state comes back from disk.
    t2 = EraTracker.open(tmp_path / "st")
    trackers[:] = [t2]
    assert t2.references() == t.references()
    t2.add_reference("before-restart")
    w = random_writes(t2.device, SIZE, CHUNK, rng, 20)
    assert t2.changed("before-restart").chunks == w

    # The era device removed and re-created on its metadata: tracking continues.
    t2.detach()
    t3 = EraTracker.open(tmp_path / "st")
    trackers[:] = [t3]
    w |= random_writes(t3.device, SIZE, CHUNK, rng, 20)
    assert t3.state().is_exact
    assert t3.changed("before-restart").chunks == w


def test_era_write_while_detached_makes_state_unknown(loopdev, tmp_path: Path, trackers) -> None:
    vol, meta = loopdev(SIZE), loopdev(8 << 20)
    t = EraTracker.protect(vol, meta, tmp_path / "st", CHUNK, name="vol2")
    trackers.append(t)
    t.add_reference("last-backup")
    t.detach()
    with BlockDevice(vol, write=True, direct=False) as raw:
        raw.pwrite_all(b"x" * 4096, 5 * CHUNK)
        raw.flush()
    t2 = EraTracker.open(tmp_path / "st")
    trackers[:] = [t2]
    state = t2.state()
    assert not state.is_exact and "while not under dm-era" in state.reason
    with pytest.raises(TrackingLost, match="not under dm-era"):
        t2.changed("last-backup")
    t2.add_reference("after-full")  # a new reference (after a full backup) is exact again
    w = random_writes(t2.device, SIZE, CHUNK, random.Random(5), 10)
    assert t2.changed("after-full").chunks == w


def lvm(*args: str) -> str:
    return subprocess.run(["lvm", *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def thick_lv(loopdev) -> Iterator[str]:
    pv = loopdev(64 << 20)
    lvm("pvcreate", "-qq", pv)
    lvm("vgcreate", "-qq", "bgera", pv)
    lvm("lvcreate", "-qq", "-L", f"{SIZE >> 20}M", "-n", "data", "bgera")
    try:
        yield "/dev/bgera/data"
    finally:
        subprocess.run(["lvm", "vgremove", "-ff", "-y", "bgera"], capture_output=True)
        subprocess.run(["lvm", "pvremove", "-ff", "-y", pv], capture_output=True)


def test_era_interposed_on_lv_keeps_path_and_detects_lvm_reload(
    thick_lv: str, loopdev, tmp_path: Path, trackers
) -> None:
    before = os.stat(thick_lv).st_rdev
    meta = loopdev(8 << 20)
    t = EraTracker.protect(thick_lv, meta, tmp_path / "st", CHUNK)
    trackers.append(t)
    assert t.device == thick_lv and os.stat(thick_lv).st_rdev == before
    assert DeviceMapper().table("bgera-data").split()[2] == "era"
    run_rounds(t, random.Random(7), 3)

    # An LVM command that reloads the LV's table takes dm-era away: detected.
    lvm("lvchange", "--refresh", "bgera/data")
    state = t.state()
    assert not state.is_exact and "replaced" in state.reason
    with pytest.raises(TrackingLost):
        t.changed("r0")


def test_direct_metadata_reader_equals_era_invalidate_on_live_device(
    loopdev, tmp_path: Path, trackers
) -> None:
    """The tracker reads dm-era metadata directly; the upstream tool must agree, per era."""
    import time

    vol, meta = loopdev(SIZE), loopdev(8 << 20)
    t = EraTracker.protect(vol, meta, tmp_path / "st", CHUNK, name="vol3")
    trackers.append(t)
    rng = random.Random(23)
    for rnd in range(4):
        t.add_reference(f"r{rnd}")
        random_writes(t.device, SIZE, CHUNK, rng, 25)
    t0 = time.perf_counter()
    direct = t.changed_many(t.references())
    assert t.changed_many([]) == {}  # nothing asked, nothing read (a daemon start did this)
    t_direct = time.perf_counter() - t0
    t0 = time.perf_counter()
    for ref, era in t._s.references.items():
        assert direct[ref].chunks == t.written_since_by_tool(era), ref
    t_tool = time.perf_counter() - t0
    print(f"direct reader {t_direct:.3f} s for 4 references; era_invalidate {t_tool:.3f} s")
