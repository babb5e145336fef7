"""Pool space lent to a volume's tracking and point-in-time copies (lvm pools only).

- **dm-era metadata**: a linear LV ``era-<volume>`` in the pool's VG, of
  :func:`~blockguard.storage.tracking.era.era_metadata_size`. The era state records its
  path ``/dev/VG/LV``, which LVM keeps stable across reboots (a loop device over a file
  would change its number), so after a reboot the daemon activates the LV and the era
  tracker re-attaches to the same metadata. The pool's garbage collection leaves it alone
  (it removes only ``g*`` and unopened ``cow-*`` LVs).
- **exception stores** of dm-snapshots: ``cow-<volume>-<serial>`` LVs from the pool's
  :meth:`~PoolBackend.cow_store`, made for one backup and removed after it; one that a
  killed daemon left is collected when the pool is reopened (after the snapshot layers
  that held it open were undone).

Era tracking therefore needs an lvm pool: a ``dir`` pool has no block device to give
(the choice, documented: the lvm pool is the main backend where device-mapper exists).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from blockguard.core.vocab import PoolKind
from blockguard.errors import EnvironmentProblem
from blockguard.storage.pool.base import PoolBackend
from blockguard.storage.snapshot import CowStore
from blockguard.storage.tracking.era import era_metadata_size

log = logging.getLogger(__name__)

ERA_PREFIX = "era-"
MiB = 1 << 20
#: An exception store gets this share of the volume's size unless set (BLOCKGUARD_COW_SIZE).
COW_FRACTION = 0.25
COW_MIN = 4 * MiB
_LV_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]")

CowFactory = Callable[[int], CowStore]


def is_lvm(pool: PoolBackend) -> bool:
    return pool.kind == PoolKind.LVM


def era_lv_name(volume: str) -> str:
    return (ERA_PREFIX + _LV_UNSAFE.sub("_", volume))[:120]


def allocate_era_metadata(pool: PoolBackend, volume: str, volume_size: int, chunk: int) -> str:
    """A fresh metadata LV for ``volume``'s dm-era; returns its stable, verified path.

    An LV of that name left by an interrupted protect is replaced.

    :raises EnvironmentProblem: ``pool`` is not an lvm pool.
    :raises PoolSpaceLow: no room in the pool.
    """
    if not pool.can_lend_devices:
        raise EnvironmentProblem(
            detail=f"era tracking keeps its metadata on an lvm pool; pool {pool.name} is a "
            f"{pool.kind} pool: protect with the scan backend, or create an lvm pool"
        )
    lv = era_lv_name(volume)
    size = era_metadata_size(volume_size, chunk)
    release_era_metadata(pool, volume)
    try:
        return pool.lend_device(lv, size, volume)
    except BaseException:
        release_era_metadata(pool, volume)
        raise


def era_metadata_device(pool: PoolBackend, volume: str) -> str:
    """The metadata LV's path, activated if needed (after a reboot), verified."""
    return pool.lent_device(era_lv_name(volume))


def release_era_metadata(pool: PoolBackend, volume: str) -> None:
    """Remove ``volume``'s metadata LV if there is one (after the era target is gone)."""
    pool.return_device(era_lv_name(volume))


def cow_size(volume_size: int, configured: int) -> int:
    """The exception store's size: as configured, else a share of the volume."""
    if configured:
        return configured
    return max(COW_MIN, -(-int(volume_size * COW_FRACTION) // MiB) * MiB)


def cow_factory(pool: PoolBackend, label: str) -> CowFactory | None:
    """Makes the exception store of one point-in-time copy on pool space (None: the pool
    cannot lend block space; the backup then reads the live volume)."""
    if not pool.can_lend_devices:
        return None
    return lambda size: pool.cow_store(size, _LV_UNSAFE.sub("_", label))
