"""The ``lvm`` pool backend: a volume group on the pool disks with a thin pool.

Layout of pool ``NAME`` (VG ``bg_NAME``, 1 MiB extents, on the pool disks as PVs):

- ``meta``: a small linear LV with ext4, mounted at ``MOUNT_ROOT/NAME/meta``. It is the
  self-describing part of the pool: ``pool.json`` (format, pool name and uuid, VG name)
  and, per generation, ``volumes/VOLUME/GENERATION_ID/`` with ``checksums.xxh3`` and
  ``manifest.json`` — written last, atomically (write, fsync, rename, fsync of the
  directory), exactly as in the ``dir`` pool. The manifest's ``storage`` names the LV.
- ``tpool``: a thin pool (64 KiB blocks, error when full instead of queueing I/O) that
  holds the fulls. A full is a thin LV ``g<GENERATION_ID>`` of the volume's size; a new
  full is a thin snapshot of the previous full (instant, shares every block) on which
  only the chunks changed since then are written — the seed's "only the changed part
  from the original, the rest from the previous full".
- deltas (differentials and incrementals): a linear LV ``g<GENERATION_ID>`` holding the
  changed chunks packed in chunk order (a chunk's slot is its rank in the manifest's
  changed set), allocated on a chosen PV: :attr:`LvmPool.preferred_device` (for example
  the faster disk), else the PV with the most free space. A delta with no changed chunk
  has no LV.
- ``cow-*``: linear LVs lent out as dm-snapshot exception stores (:meth:`cow_store`);
  ``s-*``: swap-in volumes (thin snapshots of a full) handed to the caller.

The commit protocol: the generation directory is made and flock-ed (``.writing``) first,
then its LV is created and written, flushed (which also commits the thin pool's mappings),
then the checksums, then the manifest. A generation directory without a manifest whose
lock can be taken, a ``*.deleted`` directory (an interrupted removal; the rename is the
removal's commit point), a ``g*`` LV that no directory names and a ``cow-*`` LV that
nothing holds open are garbage, removed by :meth:`LvmPool.open`.

Every LVM command is confined to the pool's disks by a devices filter, so the pool can
never touch another disk. LVM does not scan LVs for PV labels (``scan_lvs = 0``, the
default), so a backup of a PV inside the pool is not mistaken for a PV.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyroaring import BitMap

from blockguard.errors import (
    AlreadyExists,
    Busy,
    CommandFailed,
    CorruptMetadata,
    InvalidInput,
    NotFound,
    PoolSpaceLow,
)
from blockguard.storage.blockdev import BlockDevice, device_rdev, mounted_devnos
from blockguard.storage.dm import DeviceMapper
from blockguard.storage.lvm import Lvm
from blockguard.storage.manifest import (
    MANIFEST_NAME,
    GenerationKind,
    Manifest,
    VolumeIdentity,
    check_chunk_size,
    check_name,
    crash_point,
    fsync_dir,
    new_generation_id,
    write_atomic,
)
from blockguard.storage.pool.base import (
    RECORDS_DIR,
    AlertCallback,
    FreedGeneration,
    GenerationReader,
    GenerationWriter,
    PoolBackend,
    PoolCapacity,
    PoolDevice,
    PoolScan,
    SwapInVolume,
    file_problem,
    manifests_of,
    remove_damage_record,
    scan_generation_dirs,
    write_damage_record,
)
from blockguard.storage.pool.dirgen import CHECKSUMS, LOCK, writer_alive
from blockguard.storage.pool.label import VG_TAG
from blockguard.storage.pool.lvmgen import (
    LvCowStore,
    LvmGenerationReader,
    LvmGenerationWriter,
    LvmSwapIn,
    lock_generation_dir,
    lv_name_of,
)
from blockguard.storage.pool.registration import DiskCheck, check_disk, devno, legacy_gate
from blockguard.storage.runner import Runner, default_runner
from blockguard.storage.safety import SafetyGate

log = logging.getLogger(__name__)
POOL_FILE = "pool.json"
POOL_FORMAT = "blockguard-lvm-pool"
META_LV = "meta"
THIN_POOL = "tpool"
EXTENT = 1 << 20
THIN_BLOCK = 64 << 10
MIN_DEVICE_SIZE = 128 << 20
META_MIN = 32 << 20
DELETED = ".deleted"
GEN_PREFIX = "g"
COW_PREFIX = "cow-"
SWAP_PREFIX = "s-"
#: Grow the thin pool's metadata above this use (percent).
THIN_META_LIMIT = 75.0
_POOL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,54}")
_LV_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]")


def vg_name(pool: str) -> str:
    return f"bg_{pool}"


def dm_name(vg: str, lv: str) -> str:
    """The device-mapper name LVM gives VG/LV (dashes doubled)."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


@dataclass(frozen=True)
class _Lv:
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
class _Space:
    vg_size: int
    vg_free: int
    thin_size: int
    thin_free: int
    thin_meta_percent: float


class LvmPool(PoolBackend):
    """A pool in a VG; create with :meth:`create`, reopen with :meth:`open`."""

    kind = "lvm"
    can_clone_full = True

    def __init__(
        self,
        name: str,
        devices: Sequence[str],
        mount_root: str | os.PathLike[str],
        runner: Runner,
        alert: AlertCallback | None,
    ) -> None:
        if not _POOL_NAME.fullmatch(name):
            raise InvalidInput(detail=f"lvm pool name {name!r} must be 1-55 of [A-Za-z0-9_.+-]")
        super().__init__(name, alert)
        self.vg = vg_name(name)
        self.mount_root = Path(mount_root)
        self.meta_dir = self.mount_root / name / "meta"
        self.runner = runner
        self.lvm = Lvm(runner, devices)
        self.dm = DeviceMapper(runner)
        self.pool_uuid = ""
        #: Deltas and COW stores go on this PV when it has room (a faster disk, say).
        self.preferred_device: str | None = None
        self.damaged: list[str] = []
        self._mounted_by_me = False

    # --- creation, opening, removal ---------------------------------------------------

    @classmethod
    def create(
        cls,
        name: str,
        devices: Sequence[str],
        mount_root: str | os.PathLike[str],
        *,
        protected: Sequence[str] = (),
        force: bool = False,
        thin_fraction: float = 0.5,
        thin_device: str | None = None,
        runner: Runner | None = None,
        alert: AlertCallback | None = None,
        gate: SafetyGate | None = None,
    ) -> LvmPool:
        """Register ``devices`` as a new pool: PVs, VG, metadata LV and thin pool.

        Every disk is checked before anything is written; a failure half-way removes
        what was made.

        :param thin_fraction: share of the VG given to the thin pool at first (it grows
            from the VG's free space when a full needs it).
        :param thin_device: the PV the thin pool (the fulls) is allocated on.
        :param gate: the daemon's safety gate (else one knowing only ``protected``).
        :raises DeviceInUse: a disk is in use or holds data (without ``force``); the
            subclasses name a protected volume, pool disk or pool label in its family.
        :raises DeviceTooSmall: a disk is below :data:`MIN_DEVICE_SIZE`.
        :raises AlreadyExists: a VG of the pool's name exists.
        """
        check_name(name, "pool name")
        if not devices:
            raise InvalidInput(detail="a pool needs at least one disk")
        run = runner or default_runner()
        pool = cls(name, devices, mount_root, run, alert)
        checks = [pool._check_device(d, protected, force, list(devices), gate) for d in devices]
        # Unfiltered on purpose: a VG of this name on any disk would clash.
        if run.run(["lvm", "vgs", pool.vg], timeout=60, check=False).returncode == 0:
            raise AlreadyExists(what="volume group", name=pool.vg)
        pool.pool_uuid = str(uuid.uuid4())
        try:
            for check in checks:
                pool._wipe_if_forced(check.path, check.has_data)
            pool.lvm.lvm("pvcreate", "-qq", "-y", *devices)
            pool.lvm.lvm("vgcreate", "-qq", "-y", "-s", f"{EXTENT}b", "--addtag", VG_TAG,
                         pool.vg, *devices)  # fmt: skip
            total = sum(c.size for c in checks)
            meta_size = max(META_MIN, _round_up(total // 256, EXTENT))
            first = thin_device or devices[0]
            pool.lvm.lvm("lvcreate", "-qq", "-y", "-Wy", "-L", f"{meta_size}b", "-n", META_LV,
                         pool.vg, first)  # fmt: skip
            meta_dev = pool._lv_device(META_LV)
            run.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-L", "bgmeta", "-E",
                     # No lazy init: no writes behind our back after mkfs.
                     "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
                     meta_dev], timeout=300)  # fmt: skip
            _, vg_free = pool._vg_space()
            if thin_device:
                vg_free = pool._pv_free()[thin_device][1]
            thin = int(vg_free * thin_fraction)
            # dm-thin needs ~64 bytes of metadata per block; LVM keeps a spare copy.
            tmeta = max(4 << 20, _round_up(thin // THIN_BLOCK * 128, EXTENT))
            thin = min(thin, vg_free - 2 * tmeta - EXTENT) // EXTENT * EXTENT
            pool.lvm.lvm(
                "lvcreate", "-qq", "-y", "--type", "thin-pool", "-L", f"{thin}b",
                "--poolmetadatasize", f"{tmeta}b", "-c", f"{THIN_BLOCK}b", "-n", THIN_POOL,
                pool.vg, *([thin_device] if thin_device else []),
            )  # fmt: skip
            # Out of space, a thin pool queues writes for a minute by default; a backup
            # should fail at once instead (and never stall anything else).
            pool.lvm.lvm("lvchange", "-qq", "--errorwhenfull", "y", f"{pool.vg}/{THIN_POOL}")
            pool._mount_meta()
            (pool.meta_dir / "volumes").mkdir(exist_ok=True)
            info = {
                "format": POOL_FORMAT,
                "format_version": 1,
                "pool": name,
                "pool_uuid": pool.pool_uuid,
                "vg": pool.vg,
                "created": time.time(),
            }
            write_atomic(pool.meta_dir / POOL_FILE, json.dumps(info, indent=1).encode())
        except BaseException:
            pool.destroy()
            raise
        return pool

    @classmethod
    def open(
        cls,
        name: str,
        devices: Sequence[str],
        mount_root: str | os.PathLike[str],
        *,
        runner: Runner | None = None,
        alert: AlertCallback | None = None,
        collect: bool = True,
    ) -> LvmPool:
        """Open an existing pool: activate and mount its metadata, remove garbage.

        :param collect: remove garbage (``pool import`` does not: it changes nothing).
        :raises NotFound: no VG of this pool on ``devices``.
        :raises CorruptMetadata: the metadata file system does not describe this pool.
        """
        pool = cls(name, devices, mount_root, runner or default_runner(), alert)
        try:
            pool._mount_meta()
            info = _read_pool_file(pool.meta_dir)
            if info.get("pool") != name or info.get("vg") != pool.vg:
                raise CorruptMetadata(
                    what=str(pool.meta_dir / POOL_FILE),
                    detail=f"it describes pool {info.get('pool')} in VG {info.get('vg')}",
                )
            pool.pool_uuid = str(info.get("pool_uuid", ""))
            if collect:
                pool.collect_garbage()
        except BaseException:
            pool.close()
            raise
        return pool

    def close(self) -> None:
        """Unmount the metadata file system if this object mounted it (LVs stay active)."""
        if self._mounted_by_me:
            self.runner.run(["umount", str(self.meta_dir)], timeout=120)
            self._mounted_by_me = False

    def destroy(self) -> None:
        """Remove the pool and everything in it: VG, LVs, PV labels (no undo)."""
        mnt = mounted_devnos()
        meta = dm_name(self.vg, META_LV)
        info = self.dm.info(meta)
        if info is not None and f"{info.major}:{info.minor}" in mnt:
            self.runner.run(["umount", mnt[f"{info.major}:{info.minor}"]], timeout=120)
        self._mounted_by_me = False
        self.runner.run(["lvm", "vgremove", *self.lvm.config_args(), "-ff", "-y", self.vg],
                        timeout=300, check=False)  # fmt: skip
        if self.lvm.devices:
            self.runner.run(["lvm", "pvremove", *self.lvm.config_args(), "-ff", "-y",
                             *self.lvm.devices], timeout=300, check=False)  # fmt: skip

    def add_device(
        self,
        path: str,
        *,
        protected: Sequence[str] = (),
        force: bool = False,
        gate: SafetyGate | None = None,
    ) -> PoolDevice:
        check = self._check_device(path, protected, force, self.lvm.devices, gate)
        self._wipe_if_forced(path, check.has_data)
        self.lvm.devices.append(path)
        try:
            self.lvm.lvm("pvcreate", "-qq", "-y", path)
            self.lvm.lvm("vgextend", "-qq", self.vg, path)
        except BaseException:
            self.lvm.devices.remove(path)
            raise
        return next(d for d in self.devices() if d.path == path)

    def _check_device(
        self,
        path: str,
        protected: Sequence[str],
        force: bool,
        known: Sequence[str],
        gate: SafetyGate | None,
    ) -> DiskCheck:
        # The pool's other disks (or those given with this one) count as its pool disks:
        # a disk given twice under two names, or with its own partition, is refused.
        others = {d: self.name for d in known if d != path}
        base = gate if gate is not None else legacy_gate(protected, self.runner)
        return check_disk(
            path, gate=base.adding(pool_disks=others), min_size=MIN_DEVICE_SIZE, force=force
        )

    def _wipe_if_forced(self, path: str, has_data: Sequence[str]) -> None:
        if has_data:
            log.warning("overwriting %s (forced): %s", path, "; ".join(has_data))
            self.runner.run(["wipefs", "-a", "-q", path], timeout=60)
            self.runner.run(["partx", "-d", path], timeout=60, check=False)

    def _mount_meta(self) -> None:
        dev = self._lv_device(META_LV)
        existing = mounted_devnos().get(devno(device_rdev(dev)))
        if existing is not None:
            self.meta_dir = Path(existing)
            return
        self.meta_dir.mkdir(parents=True, exist_ok=True)
        self.runner.run(
            ["mount", "-t", "ext4", "-o", "noatime,nodev,nosuid,noexec", dev, str(self.meta_dir)],
            timeout=120,
        )
        self._mounted_by_me = True

    # --- LVs ------------------------------------------------------------------------

    def _lvs(self) -> dict[str, _Lv]:
        out = self.lvm.lvm(
            "lvs", "-a", "--noheadings", "--nosuffix", "--units", "b", "--separator", "|",
            "-o", "lv_name,lv_size,lv_attr,devices,data_percent,metadata_percent", self.vg,
        )  # fmt: skip
        found: dict[str, _Lv] = {}
        for line in out.splitlines():
            f = [x.strip() for x in line.split("|")]
            if len(f) < 6:
                continue
            name = f[0].strip("[]")
            devs = tuple(d.split("(")[0].strip("[]") for d in f[3].split(",") if d)
            if name in found:  # one row per segment
                devs = found[name].devices + devs
            found[name] = _Lv(
                name,
                int(f[1]),
                f[2],
                devs,
                float(f[4]) if f[4] else None,
                float(f[5]) if f[5] else None,
            )
        return found

    def _lv_device(self, lv: str) -> str:
        """The verified device node of VG/LV, activating it when needed."""
        name = dm_name(self.vg, lv)
        if self.dm.info(name) is None:
            try:
                self.lvm.lvm("lvchange", "-qq", "-ay", "-K", f"{self.vg}/{lv}")
            except CommandFailed:
                self._vg_space()  # NotFound names the VG and the disks when it is missing
                raise
        return self.dm.node(name)

    def _remove_lv(self, lv: str) -> None:
        try:
            self.lvm.lvm("lvremove", "-qq", "-f", f"{self.vg}/{lv}")
        except CommandFailed:
            if lv in self._lvs():
                raise

    def lv_devices(self, manifest: Manifest) -> list[str]:
        """The PVs a generation's data is allocated on (for a full: the thin pool's)."""
        lvs = self._lvs()
        lv = manifest.storage.get("lv")
        if not lv:
            return []
        if manifest.is_full:
            lv = f"{THIN_POOL}_tdata"
        return sorted(set(lvs[lv].devices)) if lv in lvs else []

    # --- space ----------------------------------------------------------------------

    def _vg_space(self) -> tuple[int, int]:
        res = self.runner.run(
            ["lvm", "vgs", *self.lvm.config_args(), "--noheadings", "--nosuffix", "--units", "b",
             "--separator", "|", "-o", "vg_size,vg_free", self.vg],
            timeout=120, check=False,
        )  # fmt: skip
        if res.returncode != 0 or not res.stdout.strip():
            raise NotFound(what="volume group", name=f"{self.vg} on {', '.join(self.lvm.devices)}")
        size, free = res.stdout.strip().split("|")
        return int(size), int(free)

    def _pv_free(self) -> dict[str, tuple[int, int]]:
        """PV path -> (size, free bytes)."""
        out = self.lvm.lvm(
            "pvs", "--noheadings", "--nosuffix", "--units", "b", "--separator", "|",
            "-o", "pv_name,vg_name,pv_size,pv_free",
        )  # fmt: skip
        found: dict[str, tuple[int, int]] = {}
        for line in out.splitlines():
            f = [x.strip() for x in line.split("|")]
            if len(f) == 4 and f[1] == self.vg:
                found[f[0]] = (int(f[2]), int(f[3]))
        return found

    def devices(self) -> list[PoolDevice]:
        return [
            PoolDevice(path, devno(device_rdev(path)), size, f"{self.vg}:{path}")
            for path, (size, _) in sorted(self._pv_free().items())
        ]

    def _space(self) -> _Space:
        """The VG's and the thin pool's space, in one lvs call."""
        out = self.lvm.lvm(
            "lvs", "--noheadings", "--nosuffix", "--units", "b", "--separator", "|", "-o",
            "vg_size,vg_free,lv_size,data_percent,metadata_percent", f"{self.vg}/{THIN_POOL}",
        )  # fmt: skip
        f = [x.strip() for x in out.strip().split("|")]
        size, used = int(f[2]), float(f[3] or 0.0)
        return _Space(int(f[0]), int(f[1]), size, int(size * (1 - used / 100)), float(f[4] or 0))

    def capacity(self) -> PoolCapacity:
        """Free = the VG's unallocated space + what the thin pool has not used."""
        sp = self._space()
        free = sp.vg_free + sp.thin_free
        return PoolCapacity(sp.vg_size, sp.vg_size - free, free)

    def _ensure_thin_room(self, needed: int, sp: _Space) -> None:
        """Grow the thin pool (data, and metadata above its limit) from the VG's free space.

        :raises PoolSpaceLow: the VG cannot give what is missing.
        """
        margin = max(16 << 20, sp.thin_size // 20)
        missing = needed + margin - sp.thin_free
        if missing > 0:
            grow = _round_up(missing, EXTENT)
            if sp.vg_free < grow:
                raise PoolSpaceLow(
                    pool=self.name, free=sp.thin_free + sp.vg_free, needed=needed + margin
                )
            where = [self.preferred_device] if self.preferred_device else []
            self.lvm.lvm("lvextend", "-qq", "-L", f"+{grow}b", f"{self.vg}/{THIN_POOL}", *where)
        if sp.thin_meta_percent >= THIN_META_LIMIT:
            meta = self._lvs().get(f"{THIN_POOL}_tmeta")
            grow = _round_up(meta.size if meta else 4 << 20, EXTENT)
            self.lvm.lvm(
                "lvextend", "-qq", "--poolmetadatasize", f"+{grow}b", f"{self.vg}/{THIN_POOL}"
            )

    def _place(self, needed: int) -> list[str]:
        """The PV a new linear LV goes on: the preferred one if it has room, else the
        emptiest; [] (anywhere in the VG) when no single PV holds it.

        :raises PoolSpaceLow: the VG cannot hold it at all.
        """
        pvs = self._pv_free()
        pref = self.preferred_device
        if pref and pref in pvs and pvs[pref][1] >= needed:
            return [pref]
        if pvs:
            best = max(pvs, key=lambda p: pvs[p][1])
            if pvs[best][1] >= needed:
                return [best]
        free = sum(f for _, f in pvs.values())
        if free < needed:
            raise PoolSpaceLow(pool=self.name, free=free, needed=needed)
        return []

    # --- garbage --------------------------------------------------------------------

    def collect_garbage(self) -> list[str]:
        """Remove uncommitted and half-removed generations, and stray LVs."""
        removed: list[str] = []
        lvs = self._lvs()
        named: set[str] = set()
        for vol in _subdirs(self.meta_dir / "volumes"):
            for gen in _subdirs(vol):
                gid = gen.name.removesuffix(DELETED)
                named.add(lv_name_of(gid))
                committed = (gen / MANIFEST_NAME).exists() and not gen.name.endswith(DELETED)
                if committed:
                    for stray in (gen / LOCK, gen / f".{MANIFEST_NAME}.tmp"):
                        if stray.exists() and not writer_alive(gen):
                            stray.unlink(missing_ok=True)
                    continue
                if writer_alive(gen):
                    continue
                if lv_name_of(gid) in lvs:
                    self._remove_lv(lv_name_of(gid))
                shutil.rmtree(gen, ignore_errors=True)
                removed.append(str(gen))
            if removed:
                fsync_dir(vol)
        for lv in lvs.values():
            stray_gen = lv.name.startswith(GEN_PREFIX) and lv.name not in named
            stray_cow = lv.name.startswith(COW_PREFIX) and not lv.is_open
            if stray_gen or stray_cow:
                self._remove_lv(lv.name)
                removed.append(f"{self.vg}/{lv.name}")
        if removed:
            log.info("pool %s: removed garbage %s", self.name, removed)
        return removed

    # --- generations ----------------------------------------------------------------

    def generations(self, volume: str | None = None) -> list[Manifest]:
        return manifests_of(self.scan(volume))

    def scan(self, volume: str | None = None) -> PoolScan:
        root = self.meta_dir / "volumes"
        found = scan_generation_dirs([root / volume] if volume else _subdirs(root), _files_problem)
        self.damaged = [str(root / d.volume / d.generation_id) for d in found.damaged]
        return found

    def mark_damaged(
        self, volume: str, generation_id: str, reason: str, chunk: int | None = None
    ) -> bool:
        write_damage_record(self._gen_dir(volume, generation_id), reason, chunk)
        return True

    def clear_damaged(self, volume: str, generation_id: str) -> None:
        remove_damage_record(self._gen_dir(volume, generation_id))

    def _gen_dir(self, volume: str, generation_id: str) -> Path:
        check_name(volume, "volume name")
        check_name(generation_id, "generation id")
        d = self.meta_dir / "volumes" / volume / generation_id
        if not (d / MANIFEST_NAME).exists():
            raise NotFound(what="generation", name=f"{volume}/{generation_id}")
        return d

    def begin_generation(
        self,
        volume: VolumeIdentity,
        kind: GenerationKind,
        chunk_size: int,
        changed: BitMap | None,
        *,
        base_id: str | None,
        parent_id: str | None,
        clone_from: str | None = None,
    ) -> GenerationWriter:
        check_chunk_size(chunk_size)
        if kind is not GenerationKind.FULL and changed is None:
            raise InvalidInput(detail=f"a {kind} generation needs its changed-chunk set")
        source: Manifest | None = None
        if kind is GenerationKind.FULL and clone_from and changed is not None:
            source = self.manifest(volume.name, clone_from)
            if (
                not source.is_full
                or source.volume.size != volume.size
                or source.chunk_size != chunk_size
                or not source.storage.get("lv")
            ):
                source = None
        # A thin block is allocated whole however little of it a chunk covers.
        per_chunk = max(chunk_size, THIN_BLOCK) if kind is GenerationKind.FULL else chunk_size
        if kind is GenerationKind.FULL:
            needed = volume.size if source is None else len(changed or ()) * per_chunk
        else:
            needed = len(changed or ()) * chunk_size
        needed = min(needed, _round_up(volume.size, EXTENT))
        sp = self._space()
        if sp.vg_free + sp.thin_free < needed:
            self.require_space(needed, volume.name)  # alerts and raises
        if kind is GenerationKind.FULL:
            self._ensure_thin_room(needed, sp)
        draft = Manifest(
            generation_id=new_generation_id(),
            volume=volume,
            chunk_size=chunk_size,
            kind=kind,
            base_id=None if kind is GenerationKind.FULL else base_id,
            parent_id=None if kind is GenerationKind.FULL else parent_id,
            changed=BitMap() if changed is None else BitMap(changed),
            created=time.time(),
            sequence=self.next_sequence(volume.name),
            cloned_from=source.generation_id if source is not None else None,
        )
        if kind is GenerationKind.FULL and source is None:
            draft = draft.with_(changed=BitMap(range(draft.chunks)))
        gen_dir = self.meta_dir / "volumes" / volume.name / draft.generation_id
        new_volume_dir = not gen_dir.parent.exists()
        lock_fd = lock_generation_dir(gen_dir)
        lv: str | None = lv_name_of(draft.generation_id)
        try:
            if kind is GenerationKind.FULL and source is not None:
                self.lvm.lvm("lvcreate", "-qq", "-y", "-s", "-kn",
                             f"{self.vg}/{source.storage['lv']}", "-n", lv)  # fmt: skip
                crash_point("after-clone")
            elif kind is GenerationKind.FULL:
                self.lvm.lvm("lvcreate", "-qq", "-y", "-V", f"{volume.size}b",
                             "-T", f"{self.vg}/{THIN_POOL}", "-n", lv)  # fmt: skip
            elif draft.changed:
                size = _round_up(len(draft.changed) * chunk_size, EXTENT)
                self.lvm.lvm("lvcreate", "-qq", "-y", "-Wn", "-Zn", "-L", f"{size}b", "-n", lv,
                             self.vg, *self._place(size))  # fmt: skip
            else:
                lv = None
            crash_point("lv-created")
            device = self._lv_device(lv) if lv else None
        except BaseException:
            if lv and lv in self._lvs():
                self._remove_lv(lv)
            shutil.rmtree(gen_dir, ignore_errors=True)
            os.close(lock_fd)
            raise
        return LvmGenerationWriter(
            draft,
            source,
            gen_dir,
            lock_fd,
            lv,
            device,
            self._remove_lv,
            new_volume_dir,
            pool=self.name,
        )

    def open_generation(self, manifest: Manifest) -> GenerationReader:
        gen_dir = self._gen_dir(manifest.volume.name, manifest.generation_id)
        lv = manifest.storage.get("lv")
        return LvmGenerationReader(manifest, gen_dir, self._lv_device(lv) if lv else None)

    def remove_generation(self, volume: str, generation_id: str) -> FreedGeneration:
        gens = self.generations(volume)
        target = next((m for m in gens if m.generation_id == generation_id), None)
        if target is None:
            raise NotFound(what="generation", name=f"{volume}/{generation_id}")
        users = [m.generation_id for m in gens if generation_id in (m.parent_id, m.base_id)]
        if users:
            raise Busy(
                what=f"generation {generation_id}", reason=f"{', '.join(users)} depend on it"
            )
        gen = self._gen_dir(volume, generation_id)
        doomed = gen.with_name(gen.name + DELETED)
        # The rename is the removal's commit point; the next open finishes the rest.
        os.rename(gen, doomed)
        fsync_dir(gen.parent)
        crash_point("remove-renamed")
        lv = target.storage.get("lv")
        if lv:
            self._remove_lv(lv)
        shutil.rmtree(doomed)
        return FreedGeneration(generation_id, target.kind.value, target.bytes_stored)

    # --- swap-in and exception stores -------------------------------------------------

    def swap_in(self, full: Manifest, label: str) -> SwapInVolume:
        """A thin snapshot of the full, active and writable: instant, whatever its size."""
        check_name(label, "swap-in label")
        if not full.is_full or not full.storage.get("lv"):
            raise InvalidInput(detail=f"generation {full.generation_id} is not a full")
        self._gen_dir(full.volume.name, full.generation_id)
        lv = (SWAP_PREFIX + _LV_UNSAFE.sub("_", label))[:120]
        if lv in self._lvs():
            raise Busy(what=f"swap-in volume {self.vg}/{lv}", reason="it already exists")
        self.lvm.lvm("lvcreate", "-qq", "-y", "-s", "-kn", f"{self.vg}/{full.storage['lv']}",
                     "-n", lv)  # fmt: skip
        try:
            device = self._lv_device(lv)
        except BaseException:
            self._remove_lv(lv)
            raise
        return LvmSwapIn(device, f"{self.vg}/{lv}", self._release_swap)

    def _release_swap(self, image: str, keep: bool) -> None:
        lv = image.split("/", 1)[1]
        if keep:
            self.lvm.lvm("lvchange", "-qq", "-an", f"{self.vg}/{lv}")
        else:
            self._remove_lv(lv)

    def record_dirs(self) -> list[Path]:
        return [self.meta_dir / RECORDS_DIR]

    def volume_dirs(self, volume: str) -> list[Path]:
        return [self.meta_dir / "volumes" / volume]

    def swap_ins(self) -> list[str]:
        """Swap-in volumes on the pool (``VG/LV``), active or not."""
        return sorted(f"{self.vg}/{n}" for n in self._lvs() if n.startswith(SWAP_PREFIX))

    def swap_in_devices(self) -> list[tuple[str, str]]:
        found = []
        for name in self.swap_ins():
            dm = dm_name(self.vg, name.split("/", 1)[1])
            found.append((name, self.dm.node(dm) if self.dm.info(dm) is not None else ""))
        return found

    def release_swap_in(self, name: str) -> None:
        if name not in self.swap_ins():
            raise NotFound(what="swap-in", name=name)
        self._remove_lv(name.split("/", 1)[1])

    def cow_store(self, size: int, label: str) -> LvCowStore:
        """A new linear LV of at least ``size`` bytes to hold a dm-snapshot's exceptions.

        :raises PoolSpaceLow: no room for it.
        """
        lv = (COW_PREFIX + _LV_UNSAFE.sub("_", label))[:120]
        size = _round_up(max(size, EXTENT), EXTENT)
        self.require_space(size)
        self.lvm.lvm("lvcreate", "-qq", "-y", "-Wn", "-Zn", "-L", f"{size}b", "-n", lv, self.vg,
                     *self._place(size))  # fmt: skip
        try:
            device = self._lv_device(lv)
            with BlockDevice(device) as dev:
                size = dev.size
        except BaseException:
            self._remove_lv(lv)
            raise
        return LvCowStore(device, lv, size, self._remove_lv)


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.is_symlink())
    except FileNotFoundError:
        return []


def _read_pool_file(meta: Path) -> dict[str, object]:
    try:
        info = json.loads((meta / POOL_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CorruptMetadata(what=str(meta / POOL_FILE), detail=str(exc)) from None
    if not isinstance(info, dict) or info.get("format") != POOL_FORMAT:
        raise CorruptMetadata(what=str(meta / POOL_FILE), detail="not a blockguard lvm pool")
    return info


def _files_problem(gen: Path, m: Manifest) -> str | None:
    """The checksum array on the metadata file system (the data LV is checked on use)."""
    return file_problem(
        gen / m.storage.get("checksums", CHECKSUMS),
        "checksum array",
        8 * m.checksum_count,
        exact=True,
    )
