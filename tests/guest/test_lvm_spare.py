"""The lvm pool's delta area made ahead, in the real kernel: the next delta that fits it is
written to it with no LV made in the backup, restores bit-exact, and is never taken for a
spare again; a spare counts as free space and gives way when the space is wanted; the
next open keeps one spare of those a crash left and removes the others.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
from pyroaring import BitMap

from blockguard.core.vocab import GenerationKind
from blockguard.storage.backup import run_backup
from blockguard.storage.blockdev import BlockDevice
from blockguard.storage.manifest import VolumeIdentity
from blockguard.storage.pool.base import GenerationSpec
from blockguard.storage.pool.lvmgen import lv_name_of
from blockguard.storage.pool.lvmpool import LvmPool
from blockguard.storage.pool.lvmspare import AREA_PREFIX
from blockguard.storage.restore import restore_to_device, verify
from tests.guest import test_lvmpool as lp
from tests.guest.test_lvmpool import lv_names, sh
from tests.guest.workload import random_writes

pytestmark = pytest.mark.guest
pool_disks, make_pool = lp.pool_disks, lp.make_pool

MiB = 1 << 20
CHUNK = 64 << 10
SIZE = 8 * MiB


def sha_of(dev: str) -> str:
    with BlockDevice(dev) as d:
        return hashlib.sha256(os.pread(d.fd, SIZE, 0)).hexdigest()


def areas(vg: str) -> set[str]:
    return {n for n in lv_names(vg) if n.startswith(AREA_PREFIX)}


def test_spare_is_taken_restores_is_counted_and_sorted_out(
    make_pool, loopdev, tmp_path: Path
) -> None:
    pool = make_pool("spare")
    disks = [d.path for d in pool.devices()]
    vol, target = loopdev(SIZE, "vol.img"), loopdev(SIZE, "target.img")
    ident = VolumeIdentity("vol", SIZE)
    rng = random.Random(16)
    random_writes(vol, SIZE, CHUNK, rng, 40)
    full = run_backup(pool, ident, vol, "full", None, chunk_size=CHUNK).manifest

    # Made ahead: an LV of its own, and free space all the same.
    free = pool.capacity().free
    pool.prepare_ahead("vol")
    spare = pool.spare.name
    assert spare is not None and spare in areas(pool.vg)
    assert pool.capacity().free == free
    pool.prepare_ahead("vol")  # it fits already: kept, nothing made
    assert pool.spare.name == spare and areas(pool.vg) == {spare}

    # The next delta that fits is written to it: no LV made, bytes restored equal.
    changed = random_writes(vol, SIZE, CHUNK, rng, 3)  # at most 12 chunks: the 1 MiB spare
    before = lv_names(pool.vg)
    inc = run_backup(pool, ident, vol, "incremental", changed, chunk_size=CHUNK,
                     parent_id=full.generation_id).manifest  # fmt: skip
    assert inc.storage["lv"] == spare
    assert lv_names(pool.vg) == before
    assert pool.spare.name is None
    verify(pool, "vol", inc.generation_id)
    restore_to_device(pool, "vol", inc.generation_id, target)
    assert sha_of(target) == sha_of(vol)

    # A delta far larger than the spare gets an LV of its own; the spare stays.
    pool.prepare_ahead("vol")
    spare2 = pool.spare.name
    assert spare2 is not None and spare2 != spare
    big = random_writes(vol, SIZE, CHUNK, rng, 200)
    diff = run_backup(pool, ident, vol, "differential", big | changed, chunk_size=CHUNK,
                      base_id=full.generation_id).manifest  # fmt: skip
    assert diff.storage["lv"] == lv_name_of(diff.generation_id)
    assert pool.spare.name == spare2 and areas(pool.vg) == {spare, spare2}

    # Garbage of a crash: a writer that took the spare and died, and a second spare.
    dead = pool.begin_generation(GenerationSpec(
        ident, GenerationKind.INCREMENTAL, CHUNK, BitMap([1, 5, 9]),
        parent_id=diff.generation_id,
    ))  # fmt: skip
    assert dead.lv == spare2
    dead.data.target.close()  # type: ignore[union-attr]
    os.close(dead._lock_fd)  # type: ignore[attr-defined]
    dead._lock_fd = -1  # type: ignore[attr-defined]
    extra = f"{AREA_PREFIX}extra"
    sh("lvm", "lvcreate", "-qq", "-y", "-Wn", "-Zn", "-L", "3m", "-n", extra, pool.vg)
    pool.close()

    pool = LvmPool.open("spare", disks, tmp_path / "mnt")
    try:
        # The larger of the two is the spare; the generation's area is no spare.
        assert pool.spare.name == extra
        assert areas(pool.vg) == {spare, extra}
        assert [m.generation_id for m in pool.generations("vol")] == [
            full.generation_id, inc.generation_id, diff.generation_id,
        ]  # fmt: skip

        # Removing the generation removes its area, not the spare.
        pool.remove_generation("vol", inc.generation_id)
        assert areas(pool.vg) == {extra}
        restore_to_device(pool, "vol", diff.generation_id, target)
        assert sha_of(target) == sha_of(vol)

        # Wanted space: the spare gives way rather than a refusal.
        _, vg_free = pool.volume_group.vg_space(fresh=True)
        store = pool.cow_store(vg_free + pool.spare.size, "wanted")
        try:
            assert pool.spare.name is None and areas(pool.vg) == set()
        finally:
            store.release()
    finally:
        pool.close()


def test_retention_removes_generations_areas_never_the_spare(make_pool, loopdev) -> None:
    """Deltas written to spares are removed by retention with their generation; the
    spare there at the time stays the spare, counted free, and restores stay exact."""
    pool = make_pool("keep")
    vol, target = loopdev(SIZE, "vol.img"), loopdev(SIZE, "target.img")
    ident = VolumeIdentity("vol", SIZE)
    rng = random.Random(7)
    random_writes(vol, SIZE, CHUNK, rng, 40)
    base = run_backup(pool, ident, vol, "full", None, chunk_size=CHUNK).manifest
    in_areas: set[str] = set()
    spots = rng.sample(range(SIZE // CHUNK), 6)  # each differential: these chunks, anew
    for _ in range(4):
        pool.prepare_ahead("vol")
        with BlockDevice(vol, write=True) as dev:
            for c in spots:
                os.pwrite(dev.fd, rng.randbytes(CHUNK), c * CHUNK)
            os.fsync(dev.fd)
        changed = BitMap(spots)
        m = run_backup(pool, ident, vol, "differential", changed, chunk_size=CHUNK,
                       base_id=base.generation_id, keep=2).manifest  # fmt: skip
        assert m.storage["lv"].startswith(AREA_PREFIX)
        in_areas.add(m.storage["lv"])
        pool.prepare_ahead("vol")  # the spare of the next one, made before retention runs
        spare = pool.spare.name
        assert spare is not None and spare not in in_areas
        named = {g.storage.get("lv") for g in pool.generations("vol")}
        # Retention kept 2 generations: their areas, the spare, nothing else.
        assert areas(pool.vg) == (named & in_areas) | {spare}
        assert spare not in named
    latest = pool.generations("vol")[-1]
    restore_to_device(pool, "vol", latest.generation_id, target)
    assert sha_of(target) == sha_of(vol)
