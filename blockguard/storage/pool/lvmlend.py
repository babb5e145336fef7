"""LVs an ``lvm`` pool lends out: swap-in volumes, exception stores, lent devices.

- ``s-*``: swap-in volumes, thin snapshots of a full handed to the caller (instant,
  whatever the size);
- ``cow-*``: linear LVs lent as dm-snapshot exception stores for one backup; one that
  nothing holds open is garbage for the pool's collection;
- ``bg-drill-scratch``: a restore drill's scratch space (a thin LV in the thin pool, a
  linear LV without one), removed after the drill and, left by a crash, at ``open``;
- any other name: a device lent for good (dm-era metadata), whose ``/dev/VG/LV`` path
  stays the same across reboots (a loop device over a file would not).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from blockguard.errors import Busy, NotABlockDevice
from blockguard.storage.blockdev import BlockDevice
from blockguard.storage.pool.base import DRILL_SCRATCH, ScratchSpace, SwapInVolume
from blockguard.storage.pool.lvmvg import THIN_POOL, PoolVg

log = logging.getLogger(__name__)

COW_PREFIX = "cow-"
SWAP_PREFIX = "s-"
_LV_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]")


def lv_label(prefix: str, label: str) -> str:
    """An LV name of ``prefix`` and ``label`` (unsafe characters replaced, cut to fit)."""
    return (prefix + _LV_UNSAFE.sub("_", label))[:120]


class LvmSwapIn(SwapInVolume):
    """A thin snapshot of a full, active: ``image`` is ``VG/LV``."""

    def __init__(self, device: str, image: str, remove: Callable[[str, bool], None]) -> None:
        super().__init__(device, image)
        self._remove = remove

    def release(self, *, keep_image: bool = False) -> None:
        """Remove the LV (or, with ``keep_image``, only deactivate it)."""
        assert self.image is not None
        self._remove(self.image, keep_image)


class LvCowStore:
    """A linear LV of the pool lent out as a dm-snapshot exception store.

    :param device: verified device node; ``release()`` removes the LV.
    """

    def __init__(self, device: str, lv: str, size: int, remove: Callable[[str], None]) -> None:
        self.device = device
        self.lv = lv
        self.size = size
        self._remove = remove
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._remove(self.lv)
            self._released = True


class LvScratch(ScratchSpace):
    """A drill's scratch LV: ``name`` is ``VG/LV``; ``release()`` removes the LV."""

    def __init__(self, device: str, name: str, size: int, remove: Callable[[str], None]) -> None:
        super().__init__(device, name, size)
        self._remove = remove

    def release(self) -> None:
        self._remove(self.name.split("/", 1)[1])


class LvLender:
    """Makes and takes back the LVs a pool lends (the pool checks its space first)."""

    def __init__(self, vg: PoolVg) -> None:
        self.vg = vg

    def swap_in(self, origin: str, label: str) -> LvmSwapIn:
        """A writable, active thin snapshot of LV ``origin``.

        :raises Busy: a swap-in of that label exists.
        """
        lv = lv_label(SWAP_PREFIX, label)
        if lv in self.vg.lvs():
            raise Busy(what=f"swap-in volume {self.vg.name}/{lv}", reason="it already exists")
        self.vg.lvm.snapshot(self.vg.name, origin, lv, activate=True)
        try:
            device = self.vg.lv_device(lv)
        except BaseException:
            self.vg.remove_lv(lv)
            raise
        return LvmSwapIn(device, f"{self.vg.name}/{lv}", self._release_swap)

    def _release_swap(self, image: str, keep: bool) -> None:
        lv = image.split("/", 1)[1]
        if keep:
            self.vg.lvm.deactivate(self.vg.name, lv)
        else:
            self.vg.remove_lv(lv)

    def swap_ins(self) -> list[str]:
        """Swap-in volumes (``VG/LV``), active or not."""
        return sorted(f"{self.vg.name}/{n}" for n in self.vg.lvs() if n.startswith(SWAP_PREFIX))

    def cow_store(self, size: int, label: str, preferred: str | None) -> LvCowStore:
        """A new linear LV of ``size`` bytes (whole extents) on the preferred PV when it
        has room, for a dm-snapshot's exceptions."""
        lv = lv_label(COW_PREFIX, label)
        pvs = self.vg.place(size, preferred)
        self.vg.create_linear(lv, size, pvs, wipe=False, zero=False)
        try:
            device = self.vg.lv_device(lv)
            with BlockDevice(device) as dev:
                size = dev.size
        except BaseException:
            self.vg.remove_lv(lv)
            raise
        return LvCowStore(device, lv, size, self.vg.remove_lv)

    def scratch(self, size: int, preferred: str | None) -> LvScratch:
        """A drill's scratch LV of ``size`` bytes: thin in the thin pool (where the fulls
        are), linear on the preferred PV when the VG has no thin pool. A left-over of that
        name is removed first (drills of a pool run one at a time)."""
        self.remove_scratch()
        if THIN_POOL in self.vg.lvs():
            self.vg.lvm.create_thin(self.vg.name, THIN_POOL, DRILL_SCRATCH, size)
        else:
            pvs = self.vg.place(size, preferred)
            self.vg.create_linear(DRILL_SCRATCH, size, pvs, wipe=False, zero=False)
        try:
            device = self.vg.lv_device(DRILL_SCRATCH)
            with BlockDevice(device) as dev:
                size = dev.size
        except BaseException:
            self.vg.remove_lv(DRILL_SCRATCH)
            raise
        return LvScratch(device, f"{self.vg.name}/{DRILL_SCRATCH}", size, self.vg.remove_lv)

    def remove_scratch(self) -> list[str]:
        """Remove the LV named exactly :data:`DRILL_SCRATCH` if there is one and nothing
        holds it open (an open one is left, logged: the pool must still open)."""
        found = self.vg.lvs().get(DRILL_SCRATCH)
        if found is None:
            return []
        if found.is_open:
            log.warning("%s/%s is open: not removed", self.vg.name, DRILL_SCRATCH)
            return []
        self.vg.remove_lv(DRILL_SCRATCH)
        return [f"{self.vg.name}/{DRILL_SCRATCH}"]

    def lend(self, name: str, size: int) -> str:
        """A linear LV ``name`` (signatures wiped, start zeroed); its stable path."""
        self.vg.lvm.create_linear(self.vg.name, name, size, wipe=True, zero=True)
        return self.lent(name)

    def lent(self, name: str) -> str:
        """The verified ``/dev/VG/LV`` of lent LV ``name``, activated if needed."""
        path = f"/dev/{self.vg.name}/{name}"
        try:
            with BlockDevice(path):
                return path
        except NotABlockDevice:
            log.info("activating %s", path)
        self.vg.lvm.activate(self.vg.name, name)
        with BlockDevice(path):
            return path

    def give_back(self, name: str) -> None:
        """Remove lent LV ``name`` if it exists."""
        if self.vg.lvm.exists(self.vg.name, name):
            self.vg.lvm.remove_lv(self.vg.name, name)
