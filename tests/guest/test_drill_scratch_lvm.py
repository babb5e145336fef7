"""An lvm pool's restore-drill scratch space in the real kernel (issue 14).

The scratch is the thin LV ``bg-drill-scratch`` in the pool's thin pool: made for a drill,
judged by the safety gate as the pool's own scratch (and only so), written by the drill's
copy restores and probed for its write rate, removed afterwards. One a crash left is
removed when the pool is opened; an LV of a similar name (``bg-drill-scratch2``) is not.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from blockguard.errors import PoolDiskRefused
from blockguard.storage.drill import DRILL_VOLUME, run_drill
from blockguard.storage.pool.base import DRILL_SCRATCH
from blockguard.storage.pool.lvmpool import LvmPool
from blockguard.storage.pool.lvmvg import THIN_POOL
from blockguard.storage.runner import default_runner
from blockguard.storage.safety import SafetyGate
from tests.guest import test_lvmpool as lp
from tests.guest.test_lvmpool import lv_names, sh

pytestmark = pytest.mark.guest

# The pool fixtures of the lvm pool tests.
pool_disks, make_pool = lp.pool_disks, lp.make_pool

MiB = 1 << 20
DRILL_BYTES = 4 * MiB
SIMILAR = f"{DRILL_SCRATCH}2"


def _pool_of(lv: str, vg: str) -> str:
    return sh("lvm", "lvs", "--noheadings", "-o", "pool_lv", f"{vg}/{lv}").strip()


def test_scratch_lv_made_judged_used_removed_and_left_overs_collected(
    make_pool, pool_disks: list[str], tmp_path: Path
) -> None:
    pool = make_pool()
    gate = SafetyGate({}, {d: pool.name for d in pool_disks}, default_runner())

    # Made: a thin LV of the drill's size in the thin pool, a block device of that size.
    scratch = pool.drill_scratch(DRILL_BYTES)
    try:
        assert scratch.name == f"{pool.vg}/{DRILL_SCRATCH}"
        assert DRILL_SCRATCH in lv_names(pool.vg)
        assert _pool_of(DRILL_SCRATCH, pool.vg) == THIN_POOL
        assert scratch.size == DRILL_BYTES

        # Judged: on the pool's disks, so refused unless registered as this pool's scratch.
        with pytest.raises(PoolDiskRefused):
            gate.check_scratch(scratch.device, pool=pool.name, purpose="scratch")
        with pytest.raises(PoolDiskRefused):
            gate.adding(scratch={scratch.device: "other"}).check_scratch(
                scratch.device, pool=pool.name, purpose="scratch"
            )
        known = gate.adding(scratch={scratch.device: pool.name})
        known.check_scratch(scratch.device, pool=pool.name, purpose="scratch")

        # Used: the drill's copies restored into it, its write rate probed.
        result = run_drill(
            pool,
            volume_bytes=DRILL_BYTES,
            modes=("copy",),
            seed=7,
            repeats=1,
            copy_scratch=scratch.device,
            gate=known,
        )
        assert result.copy_scratch == scratch.device and result.copy_write_rate > 0
        assert result.samples and all(s.seconds > 0 for s in result.samples)
        assert pool.generations(DRILL_VOLUME) == []
    finally:
        scratch.release()
    # Removed.
    assert DRILL_SCRATCH not in lv_names(pool.vg)

    # Left by a crash: the LV of that exact name is garbage for the next open; a foreign
    # LV of a similar name is not.
    sh("lvm", "lvcreate", "-qq", "-y", "-V", "4m", "-T", f"{pool.vg}/{THIN_POOL}",
       "-n", DRILL_SCRATCH)  # fmt: skip
    sh("lvm", "lvcreate", "-qq", "-y", "-V", "4m", "-T", f"{pool.vg}/{THIN_POOL}",
       "-n", SIMILAR)  # fmt: skip
    pool.close()
    reopened = LvmPool.open(pool.name, pool_disks, tmp_path / "mnt")
    try:
        names = lv_names(reopened.vg)
        assert DRILL_SCRATCH not in names
        assert SIMILAR in names
        sh("lvm", "lvremove", "-qq", "-f", f"{reopened.vg}/{SIMILAR}")
    finally:
        reopened.close()
