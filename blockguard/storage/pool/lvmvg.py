"""The volume group of an ``lvm`` pool: provisioning, LVs, space and placement.

A pool ``NAME`` is VG ``bg_NAME`` (1 MiB extents) on the pool disks, with ``meta`` (a
small linear LV with ext4: the pool's self-description and generation directories) and
``tpool`` (a thin pool, 64 KiB blocks, failing writes at once when full) that holds the
fulls. Every command goes through :class:`~blockguard.storage.lvm.Lvm`, confined to the
pool's disks.

The VG's space (one ``pvs`` that reports the VG's figures too) and where each LV lies are
kept between jobs: the VG is the pool's own, so they change only by the pool's commands,
which drop or update them (:attr:`Lvm.allocation_changed`). A kept figure only ever says
yes: a refusal (no room) is made on a fresh read, so space freed behind the pool's back
is seen when it matters; a command that fails drops them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from blockguard.errors import BlockguardError, CommandFailed, NotFound, PoolSpaceLow
from blockguard.storage.blockdev import mounted_devnos
from blockguard.storage.dm import DeviceMapper
from blockguard.storage.lvm import LV_CREATED, LV_REMOVED, THIN_REMOVED, Lvm
from blockguard.storage.pool.label import VG_TAG
from blockguard.storage.pool.thinspace import (
    ThinShortfall,
    ThinSpace,
    data_margin,
    meta_margin,
    metadata_needed,
    read_thin_space,
    thin_shortfall,
)
from blockguard.storage.runner import Runner

META_LV = "meta"
THIN_POOL = "tpool"
EXTENT = 1 << 20
THIN_BLOCK = 64 << 10
META_MIN = 32 << 20
#: Grow the thin pool's metadata above this use (percent), ahead of need.
THIN_META_LIMIT = 75.0


def vg_name(pool: str) -> str:
    return f"bg_{pool}"


def dm_name(vg: str, lv: str) -> str:
    """The device-mapper name LVM gives VG/LV (dashes doubled)."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


@dataclass(frozen=True)
class LvFacts:
    name: str
    size: int
    attr: str
    devices: tuple[str, ...]
    data_percent: float | None
    metadata_percent: float | None

    @property
    def is_open(self) -> bool:
        return len(self.attr) > 5 and self.attr[5] == "o"


@dataclass(frozen=True)
class VgSpace:
    """The VG's size and free bytes, and each PV's: path -> (size, free bytes)."""

    size: int
    free: int
    pvs: dict[str, tuple[int, int]] = field(default_factory=dict)

    def allocated(self, pv: str, size: int) -> VgSpace:
        """The space after ``size`` bytes were allocated on ``pv``."""
        pvs = dict(self.pvs)
        pv_size, pv_free = pvs[pv]
        pvs[pv] = (pv_size, pv_free - size)
        return VgSpace(self.size, self.free - size, pvs)


class PoolVg:
    """The VG of pool ``pool`` on ``lvm.devices``.

    :param pool: the pool's name (named in :class:`PoolSpaceLow`).
    """

    def __init__(self, pool: str, lvm: Lvm, runner: Runner) -> None:
        self.pool = pool
        self.name = vg_name(pool)
        self.lvm = lvm
        self.runner = runner
        self.dm = DeviceMapper(runner)
        self._lock = threading.Lock()
        #: bumped by every command that changed the VG's allocation: a read that started
        #: before one is not kept
        self._changes = 0
        self._space: VgSpace | None = None
        self._devices_of: dict[str, tuple[str, ...]] = {}
        lvm.allocation_changed = self._allocation_changed

    def _allocation_changed(self, effect: str, target: str) -> None:
        with self._lock:
            self._changes += 1
            if effect == THIN_REMOVED:
                # Its blocks go back to the thin pool: the VG's space and every other
                # LV's place stay as they were.
                self._devices_of.pop(target.rsplit("/", 1)[-1], None)
                return
            self._space = None
            if effect == LV_REMOVED:
                self._devices_of.pop(target.rsplit("/", 1)[-1], None)
            elif effect != LV_CREATED:  # a new LV moves no other; an extend does
                self._devices_of.clear()

    # --- provisioning -------------------------------------------------------------------

    def exists_anywhere(self) -> bool:
        """A VG of this name is on some disk (not only the pool's: it would clash)."""
        return Lvm(self.runner).vg_exists(self.name)

    def provision(
        self,
        devices: Sequence[str],
        total: int,
        thin_fraction: float,
        thin_device: str | None,
        make_meta_fs: Callable[[str], None],
    ) -> None:
        """PVs, the VG, the metadata LV (``make_meta_fs`` formats its device) and the
        thin pool. The caller removes a half-made VG (:meth:`destroy`)."""
        self.lvm.create_pvs(*devices)
        self.lvm.create_vg(self.name, devices, EXTENT, VG_TAG)
        meta_size = max(META_MIN, round_up(total // 256, EXTENT))
        self.lvm.create_linear(
            self.name, META_LV, meta_size, [thin_device or devices[0]], wipe=True
        )
        make_meta_fs(self.lv_device(META_LV))
        _, vg_free = self.vg_space()
        if thin_device:
            vg_free = self.pv_free()[thin_device][1]
        thin = int(vg_free * thin_fraction)
        # dm-thin needs ~64 bytes of metadata per block; LVM keeps a spare copy.
        tmeta = max(4 << 20, round_up(thin // THIN_BLOCK * 128, EXTENT))
        thin = min(thin, vg_free - 2 * tmeta - EXTENT) // EXTENT * EXTENT
        pvs = [thin_device] if thin_device else []
        self.lvm.create_thin_pool(self.name, THIN_POOL, thin, tmeta, THIN_BLOCK, pvs)
        # Out of space, a thin pool queues writes for a minute by default; a backup
        # should fail at once instead (and never stall anything else).
        self.lvm.error_when_full(self.name, THIN_POOL)

    def destroy(self) -> None:
        """Unmount the metadata file system, remove the VG and the PV labels (no undo)."""
        mnt = mounted_devnos()
        info = self.dm.info(dm_name(self.name, META_LV))
        if info is not None and f"{info.major}:{info.minor}" in mnt:
            self.runner.run(["umount", mnt[f"{info.major}:{info.minor}"]], timeout=120)
        self.lvm.remove_vg_and_pvs(self.name)

    def add_device(self, path: str) -> None:
        self.lvm.devices.append(path)
        try:
            self.lvm.create_pvs(path)
            self.lvm.extend_vg(self.name, path)
        except BaseException:
            self.lvm.devices.remove(path)
            raise

    # --- LVs ----------------------------------------------------------------------------

    def lvs(self) -> dict[str, LvFacts]:
        """Every LV of the VG (hidden ones too) by name."""
        with self._lock:
            seen = self._changes
        rows = self.lvm.lvs(
            "lv_name,lv_size,lv_attr,devices,data_percent,metadata_percent",
            self.name,
            all_lvs=True,
        )
        found: dict[str, LvFacts] = {}
        for f in rows:
            if len(f) < 6:
                continue
            name = f[0].strip("[]")
            devs = tuple(d.split("(")[0].strip("[]") for d in f[3].split(",") if d)
            if name in found:  # one row per segment
                devs = found[name].devices + devs
            found[name] = LvFacts(
                name,
                int(f[1]),
                f[2],
                devs,
                float(f[4]) if f[4] else None,
                float(f[5]) if f[5] else None,
            )
        with self._lock:
            if self._changes == seen:
                self._devices_of = {name: lv.devices for name, lv in found.items()}
        return found

    def devices_of(self, lv: str) -> tuple[str, ...]:
        """The PVs LV ``lv`` lies on (kept: an LV does not move unless the pool grows
        it); () for no such LV."""
        with self._lock:
            known = self._devices_of.get(lv)
        if known is not None:
            return known
        facts = self.lvs().get(lv)
        return facts.devices if facts is not None else ()

    def create_linear(
        self, lv: str, size: int, pvs: Sequence[str], *, wipe: bool, zero: bool | None = None
    ) -> None:
        """A linear LV of ``size`` bytes (whole extents) on ``pvs`` (anywhere in the VG
        when empty); on one PV, the kept space and placement are updated, not dropped."""
        size = round_up(size, EXTENT)
        with self._lock:
            known, seen = self._space, self._changes
        try:
            self.lvm.create_linear(self.name, lv, size, pvs, wipe=wipe, zero=zero)
        except CommandFailed as exc:
            # The room was decided on a kept figure: when the space went behind the
            # pool's back, say so as the refusal it is.
            try:
                fresh = self.space(fresh=True)
            except BlockguardError:
                raise exc from None  # the failed lvcreate is the news, not the re-read
            free = fresh.pvs.get(pvs[0], (0, 0))[1] if len(pvs) == 1 else fresh.free
            if free < size:
                raise PoolSpaceLow(pool=self.pool, free=free, needed=size) from exc
            raise
        if len(pvs) != 1:
            return
        with self._lock:
            if self._changes != seen + 1:
                return  # another command came between: what it did is unknown
            self._devices_of[lv] = (pvs[0],)
            if known is not None and pvs[0] in known.pvs:
                self._space = known.allocated(pvs[0], size)

    def lv_device(self, lv: str) -> str:
        """The verified device node of VG/LV, activating it when needed."""
        name = dm_name(self.name, lv)
        try:
            # Active with its node in place (LVM makes it): no dmsetup call at all.
            return self.dm.node(name)
        except NotFound:
            pass
        try:
            self.lvm.activate(self.name, lv, ignore_skip=True)
        except CommandFailed:
            self.space(fresh=True)  # NotFound names the VG and the disks when it is missing
            raise
        return self.dm.node(name)

    def remove_lv(self, lv: str, *, thin: bool = False) -> None:
        """:param thin: ``lv`` is a thin LV of the pool (the VG's space is kept)."""
        try:
            self.lvm.remove_lv(self.name, lv, thin=thin)
        except CommandFailed:
            if lv in self.lvs():
                raise

    # --- space --------------------------------------------------------------------------

    def space(self, *, fresh: bool = False) -> VgSpace:
        """The VG's and its PVs' size and free bytes: kept, unless ``fresh`` or the pool
        changed the VG since they were read.

        :raises NotFound: no such VG on the pool's disks.
        """
        with self._lock:
            if self._space is not None and not fresh:
                return self._space
            seen = self._changes
        rows = self.lvm.pvs("pv_name,vg_name,pv_size,pv_free,vg_size,vg_free", check=False)
        mine = [f for f in rows or () if len(f) == 6 and f[1] == self.name]
        if not mine:
            raise NotFound(
                what="volume group", name=f"{self.name} on {', '.join(self.lvm.devices)}"
            )
        space = VgSpace(
            int(mine[0][4]), int(mine[0][5]), {f[0]: (int(f[2]), int(f[3])) for f in mine}
        )
        with self._lock:
            if self._changes == seen:
                self._space = space
        return space

    def vg_space(self, *, fresh: bool = False) -> tuple[int, int]:
        """(size, free bytes) of the VG (see :meth:`space`).

        :raises NotFound: no such VG on the pool's disks.
        """
        space = self.space(fresh=fresh)
        return space.size, space.free

    def vg_free_for(self, needed: int) -> int:
        """The VG's free bytes, read again when the kept figure is below ``needed``: a
        refusal is never made on a kept figure."""
        free = self.space().free
        return free if free >= needed else self.space(fresh=True).free

    def pv_free(self, *, fresh: bool = False) -> dict[str, tuple[int, int]]:
        """PV path -> (size, free bytes); {} when the VG is not there."""
        try:
            return dict(self.space(fresh=fresh).pvs)
        except NotFound:
            return {}

    def thin_space(self) -> ThinSpace:
        """The thin pool's data and metadata space from its ``-tpool`` device (dmsetup,
        no LVM scan); the pool is activated first when it is not active."""
        base = dm_name(self.name, THIN_POOL)
        names = (f"{base}-tpool", base)
        space = read_thin_space(self.dm, names)
        if space is None:
            self.lvm.activate(self.name, THIN_POOL, ignore_skip=True)
            space = read_thin_space(self.dm, names)
        if space is None:
            raise NotFound(what="active thin pool", name=f"{self.name}/{THIN_POOL}")
        return space

    def grow_thin(self, data: int, meta: int, preferred: str | None) -> bool:
        """Grow the thin pool's data by ``data`` and its metadata by ``meta`` bytes (0:
        not that one) from the VG's free space; False (nothing done) when the VG lacks it."""
        data, meta = round_up(data, EXTENT), round_up(meta, EXTENT)
        vg_free = self.vg_free_for(data + 2 * meta)
        # LVM keeps a spare metadata LV of the same size: growing metadata costs twice.
        if data + 2 * meta > vg_free:
            return False
        try:
            if data:
                self.lvm.extend(self.name, THIN_POOL, data, [preferred] if preferred else [])
            if meta:
                self.lvm.extend_pool_metadata(self.name, THIN_POOL, meta)
        except CommandFailed:
            # Decided on a kept figure: the VG's space may have gone behind the pool's back.
            if data + 2 * meta > self.space(fresh=True).free:
                return False
            raise
        return True

    def admit_thin(
        self, needed: int, volume_size: int, preferred: str | None
    ) -> ThinShortfall | None:
        """Decide whether a write of ``needed`` bytes into a thin LV of a ``volume_size``
        volume fits the thin pool's data AND metadata with their margins, growing either
        from the VG's free space when it lacks; None when it fits, else what lacks."""
        space = self.thin_space()
        short = thin_shortfall(space, needed, volume_size)
        if short is not None and space.writable:
            # A little over the lack: the margins grow with the pool.
            lack_data = needed + data_margin(space) - space.data_free
            lack_meta = (
                metadata_needed(needed, volume_size, space.data_block)
                + meta_margin(space)
                - space.meta_free
            )
            grow_data = lack_data * 21 // 20 + EXTENT if lack_data > 0 else 0
            grow_meta = lack_meta * 21 // 20 + EXTENT if lack_meta > 0 else 0
            if self.grow_thin(grow_data, grow_meta, preferred):
                short = thin_shortfall(self.thin_space(), needed, volume_size)
        elif short is None and space.meta_percent >= THIN_META_LIMIT:
            # Ahead of need: a VG without the room is no refusal yet.
            self.grow_thin(0, space.meta_total, None)
        return short

    def place(self, needed: int, preferred: str | None) -> list[str]:
        """The PV a new linear LV goes on: ``preferred`` if it has room, else the
        emptiest; [] (anywhere in the VG) when no single PV holds it.

        :raises PoolSpaceLow: the VG cannot hold it at all.
        """
        pvs = self.pv_free()
        for attempt in range(2):
            if attempt:  # no single PV held it by the kept figures: read them again
                pvs = self.pv_free(fresh=True)
            if preferred and preferred in pvs and pvs[preferred][1] >= needed:
                return [preferred]
            if pvs:
                best = max(pvs, key=lambda p: pvs[p][1])
                if pvs[best][1] >= needed:
                    return [best]
        free = sum(f for _, f in pvs.values())
        if free < needed:
            raise PoolSpaceLow(pool=self.pool, free=free, needed=needed)
        return []
