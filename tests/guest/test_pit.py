"""Point-in-time copies in the real kernel: dm-snapshot under dm-era (stacked) and under a
plain LV, recovery of layers left by a killed process, and an exception store that fills
during a backup."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from pyroaring import BitMap

from blockguard.errors import SnapshotOverflow
from blockguard.storage.blockdev import BlockDevice, aligned_buffer
from blockguard.storage.copyengine import Progress
from blockguard.storage.manifest import VolumeIdentity
from blockguard.storage.snapshot import (
    DmSnapshotPointInTime,
    LoopCowStore,
    backup_point_in_time,
    recover_stale_points_in_time,
)
from blockguard.storage.tracking.era import EraTracker
from tests.guest import test_lvmpool as lp
from tests.guest.test_lvmpool import CHUNK, SIZE, VOLVG, lv_names, pit_layers, sh, sha256_of

pytestmark = pytest.mark.guest
# The pool and volume fixtures of the lvm pool tests.
pool_disks, make_pool, volvg, era_volume = lp.pool_disks, lp.make_pool, lp.volvg, lp.era_volume
MiB = 1 << 20


def write_span(path: str, offset: int, data: bytes) -> None:
    """One O_DIRECT write (a single bio spanning many snapshot chunks)."""
    buf = aligned_buffer(len(data))
    buf[:] = data
    with BlockDevice(path, write=True, direct=True) as dev:
        dev.pwrite_all(memoryview(buf), offset)
        dev.flush()


def read_span(path: str, offset: int, length: int) -> bytes:
    buf = aligned_buffer(length)
    with BlockDevice(path, direct=True) as dev:
        dev.pread_into(memoryview(buf), offset)
    return bytes(buf)


def touched(offset: int, length: int) -> BitMap:
    return BitMap(range(offset // CHUNK, (offset + length - 1) // CHUNK + 1))


def test_pit_under_stacked_era_and_plain_lv(loopdev, volvg: str, tmp_path: Path) -> None:
    rng = random.Random(3)
    # Stacked era over a loop device.
    vol = loopdev(SIZE, "vol.img")
    t = EraTracker.protect(vol, loopdev(8 * MiB, "meta.img"), tmp_path / "era", CHUNK, name="pv")
    try:
        era_table = sh("dmsetup", "table", "blockguard-era-pv")
        write_span(t.device, 0, rng.randbytes(SIZE))
        before = sha256_of(t.device)
        with DmSnapshotPointInTime(
            t.device, LoopCowStore(tmp_path, 8 * MiB, "era"), tracker=t, name="p1"
        ) as pit:
            assert sha256_of(pit.source) == before
            # Multi-chunk bios: every chunk they cover must be copied out, not the first.
            write_span(t.device, MiB + 4096, rng.randbytes(512 << 10))
            write_span(t.device, 5 * MiB, rng.randbytes(1 << 20))
            assert sha256_of(t.device) != before
            assert sha256_of(pit.source) == before
            pit.commit()
        assert pit_layers() == [] and sh("dmsetup", "table", "blockguard-era-pv") == era_table
        # The reference is the copy's point: the writes after it, exactly.
        assert t.changed("p1").chunks == touched(MiB + 4096, 512 << 10) | touched(5 * MiB, MiB)
        assert t.state().is_exact
    finally:
        t.detach()

    # A plain thick LV (no tracker): its table moves under a snapshot-origin and back.
    sh("lvm", "lvcreate", "-qq", "-y", "-L", f"{SIZE >> 20}M", "-n", "plain", volvg)
    lv = f"/dev/{volvg}/plain"
    table = sh("dmsetup", "table", f"{volvg}-plain")
    write_span(lv, 0, rng.randbytes(SIZE))
    before = sha256_of(lv)
    cow = LoopCowStore(tmp_path, 8 * MiB, "plain")
    with DmSnapshotPointInTime(lv, cow, keep_cow=True) as pit:
        write_span(lv, 3 * MiB, rng.randbytes(2 * MiB))
        assert sha256_of(pit.source) == before and sha256_of(lv) != before
    assert pit_layers() == [] and sh("dmsetup", "table", f"{volvg}-plain") == table
    # Layers left by a killed process are undone from the kernel's state.
    after = sha256_of(lv)
    stale = DmSnapshotPointInTime(lv, cow, keep_cow=True)
    write_span(lv, 5 * MiB, rng.randbytes(MiB))
    expected = sha256_of(lv)
    assert sha256_of(stale.source) == after
    del stale
    assert recover_stale_points_in_time() == [f"{volvg}-plain"]
    assert pit_layers() == [] and sh("dmsetup", "table", f"{volvg}-plain") == table
    assert sha256_of(lv) == expected
    cow.release()


class WriteOnFirstExtent(Progress):
    """Writes ``data`` to the volume when the first extent of the backup is done."""

    def __init__(self, path: str, offset: int, data: bytes) -> None:
        super().__init__()
        self.path, self.offset, self.data = path, offset, data
        self.done = False

    def advance(self, nbytes: int) -> None:
        super().advance(nbytes)
        if not self.done:
            self.done = True
            write_span(self.path, self.offset, self.data)


def test_exception_store_overflow_aborts_backup_cleanly(make_pool, era_volume: EraTracker) -> None:
    pool = make_pool()
    t = era_volume
    top_table = sh("dmsetup", "table", f"{VOLVG}-data")
    write_span(t.device, 0, os.urandom(SIZE))
    new_data = os.urandom(4 * MiB)  # far more than a 1 MiB store holds
    progress = WriteOnFirstExtent(t.device, 4 * MiB, new_data)
    ident = VolumeIdentity("vol", SIZE)
    with (
        DmSnapshotPointInTime(t.device, pool.cow_store(MiB, "vol"), tracker=t, name="p") as pit,
        pytest.raises(SnapshotOverflow, match="snapshot of vol filled up; the backup was aborted"),
    ):
        backup_point_in_time(
            pit, pool, ident, "full", None, chunk_size=CHUNK, progress=progress, extent_bytes=MiB
        )
    assert progress.done, "the volume was not written during the backup"
    # Aborted and cleaned: nothing committed, no generation LV, no copy layers, the era
    # table back on its origin, the reference not taken, tracking still exact.
    assert pool.generations("vol") == []
    assert not (pool.meta_dir / "volumes" / "vol").exists() or not any(
        (pool.meta_dir / "volumes" / "vol").iterdir()
    )
    assert {n for n in lv_names(pool.vg) if n.startswith(("g", "cow-"))} == set()
    assert pit_layers() == []
    assert sh("dmsetup", "table", f"{VOLVG}-data") == top_table
    assert "p" not in t.references() and t.state().is_exact
    # Writes were never blocked: they all landed, and the volume is still writable.
    assert read_span(t.device, 4 * MiB, len(new_data)) == new_data
    more = os.urandom(MiB)
    write_span(t.device, 0, more)
    assert read_span(t.device, 0, MiB) == more
