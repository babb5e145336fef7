"""An lvm pool's thin pool filled by someone else: the space the pool reports is the thin
pool's own (from its dmsetup status), and a full that would not fit is refused with a
named error and an alert, leaving the pool as it was.
"""

from __future__ import annotations

import random

import pytest

from blockguard.errors import PoolSpaceLow
from blockguard.storage.backup import run_backup
from blockguard.storage.manifest import VolumeIdentity
from blockguard.storage.pool.base import SpaceAlert
from blockguard.storage.pool.lvmvg import THIN_POOL, dm_name
from blockguard.storage.pool.thinspace import DATA, data_block_of, parse_thin_status
from tests.guest.test_lvmpool import (  # noqa: F401 - fixtures pytest finds by name
    lv_names,
    make_pool,
    pool_disks,
    sh,
)
from tests.guest.workload import random_writes

pytestmark = pytest.mark.guest

MiB = 1 << 20
CHUNK = 64 << 10
SIZE = 8 * MiB


def thin_status(vg: str) -> tuple[str, int]:
    """The thin-pool target's status line and data block size (LVM puts the target on
    ``-tpool`` once the pool has thin LVs, and may put an unused pool's on the pool LV)."""
    base = dm_name(vg, THIN_POOL)
    for name in (f"{base}-tpool", base):
        table = sh("dmsetup", "table", name, check=False)
        if table.split()[2:3] == ["thin-pool"]:
            return sh("dmsetup", "status", name).strip(), data_block_of(table)
    raise AssertionError(f"no thin-pool target for {vg}: {sh('dmsetup', 'table')}")


def test_thin_pool_filled_by_another_lv_refuses_a_full_naming_data(make_pool, loopdev) -> None:  # noqa: F811 - the fixture
    alerts: list[SpaceAlert] = []
    pool = make_pool(alert=alerts.append, thin_fraction=0.05)
    vg = pool.vg
    # What the pool reports is what the kernel's status line says.
    line, block = thin_status(vg)
    real = parse_thin_status(line, block)
    cap = pool.capacity()
    assert (cap.thin_data_total, cap.thin_meta_total) == (real.data_total, real.meta_total)
    assert cap.thin_meta_free == real.meta_free > 0
    # Someone else takes the VG's free space and nearly all of the thin pool's data.
    sh("lvm", "lvcreate", "-qq", "-y", "-l", "100%FREE", "-n", "hog", vg)
    sh("lvm", "lvcreate", "-qq", "-y", "-V", f"{real.data_total}b", "-T", f"{vg}/{THIN_POOL}",
       "-n", "admin")  # fmt: skip
    fill = (real.data_total - 4 * MiB) // MiB
    sh("dd", "if=/dev/urandom", f"of=/dev/mapper/{dm_name(vg, 'admin')}", "bs=1M",
       f"count={fill}", "oflag=direct", "conv=fsync")  # fmt: skip
    before, _ = thin_status(vg)
    full = parse_thin_status(before, block)
    assert full.data_free <= 4 * MiB
    assert pool.capacity().thin_data_free == full.data_free
    lvs_before = lv_names(vg)

    vol = loopdev(SIZE, "vol.img")
    random_writes(vol, SIZE, CHUNK, random.Random(1), 20)
    with pytest.raises(PoolSpaceLow, match="thin pool's data has") as err:
        run_backup(pool, VolumeIdentity("vol", SIZE), vol, "full", None, chunk_size=CHUNK)
    assert err.value.fields["resource"] == DATA
    assert err.value.fields["free"] == full.data_free
    assert alerts and alerts[-1].resource == DATA and alerts[-1].volume == "vol"
    # Nothing changed: no generation, no LV, not one more thin block mapped.
    assert pool.generations("vol") == []
    assert lv_names(vg) == lvs_before
    after = parse_thin_status(thin_status(vg)[0], block)
    assert after.data_used_blocks == full.data_used_blocks
    sh("lvm", "lvremove", "-qq", "-y", f"{vg}/admin", f"{vg}/hog")
