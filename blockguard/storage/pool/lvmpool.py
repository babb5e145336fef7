# Over ~400 lines: a third of it is the layout contract (docstring); the rest is one class.
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
  has no LV. A delta that fits the spare made ahead (while the pool was idle) is written to
  it instead, under its name ``delta-<hex>`` (see :mod:`.lvmspare`: no ``lvcreate`` in
  the backup).
- ``cow-*``: linear LVs lent out as dm-snapshot exception stores (:meth:`cow_store`);
  ``s-*``: swap-in volumes (thin snapshots of a full) handed to the caller;
  ``bg-drill-scratch``: a restore drill's scratch space (:meth:`drill_scratch`).

The commit protocol: the generation directory is made and flock-ed (``.writing``) first,
then its LV is created and written, flushed (which also commits the thin pool's mappings),
then the checksums, then the manifest. A generation directory without a manifest whose
lock can be taken, a ``*.deleted`` directory (an interrupted removal; the rename is the
removal's commit point), a ``g*`` LV that no directory names, a ``cow-*`` LV that
nothing holds open and a drill's scratch LV are garbage, removed by :meth:`LvmPool.open`;
of the ``delta-*`` LVs no manifest names, one is kept as the spare, the others removed.

Every LVM command is confined to the pool's disks by a devices filter, so the pool can
never touch another disk. LVM does not scan LVs for PV labels (``scan_lvs = 0``, the
default), so a backup of a PV inside the pool is not mistaken for a PV.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from blockguard.errors import (
    AlreadyExists,
    BlockguardError,
    CommandFailed,
    CorruptMetadata,
    InvalidInput,
    NotFound,
    PoolSpaceLow,
)
from blockguard.storage.blockdev import BlockDevice, device_rdev, mounted_devnos
from blockguard.storage.lvm import Lvm
from blockguard.storage.manifest import (
    MANIFEST_NAME,
    Manifest,
    VolumeIdentity,
    check_name,
    crash_point,
)
from blockguard.storage.pool.base import (
    AlertCallback,
    GenerationSpec,
    PoolCapacity,
    PoolDevice,
    SpaceAlert,
    SwapInVolume,
)
from blockguard.storage.pool.diskstore import DiskStore
from blockguard.storage.pool.lvmgen import (
    LAYOUT_PACKED,
    LAYOUT_THIN,
    LvmGenerationWriter,
    lv_name_of,
)
from blockguard.storage.pool.lvmlend import COW_PREFIX, LvCowStore, LvLender, LvScratch
from blockguard.storage.pool.lvmspare import SpareArea, fits, is_area, spare_size_for
from blockguard.storage.pool.lvmvg import (
    EXTENT,
    META_LV,
    THIN_BLOCK,
    THIN_POOL,
    LvFacts,
    PoolVg,
    dm_name,
    round_up,
)
from blockguard.storage.pool.records import POOL_FILE, read_pool_file, write_pool_file
from blockguard.storage.pool.registration import DiskAdmission, DiskCheck, devno, wipe_if_forced
from blockguard.storage.pool.store import StoredData, StoredGenerationReader
from blockguard.storage.pool.thinspace import ThinShortfall
from blockguard.storage.runner import Runner, default_runner
from blockguard.storage.safety import SafetyGate

log = logging.getLogger(__name__)
POOL_FORMAT = "blockguard-lvm-pool"
MIN_DEVICE_SIZE = 128 << 20
GEN_PREFIX = "g"
_POOL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,54}")

__all__ = ["META_LV", "LvmPool"]


class LvmPool(DiskStore):
    """A pool in a VG; create with :meth:`create`, reopen with :meth:`open`."""

    kind = "lvm"
    can_clone_full = True
    can_lend_devices = True
    writer_class = LvmGenerationWriter

    min_device_size = MIN_DEVICE_SIZE

    @classmethod
    def check_pool_name(cls, name: str) -> None:
        # The VG is named after the pool: LVM's rules and length, not the catalog's.
        if not _POOL_NAME.fullmatch(name):
            raise InvalidInput(detail=f"lvm pool name {name!r} must be 1-55 of [A-Za-z0-9_.+-]")

    def _setup(self, devices: Sequence[str]) -> None:
        self.meta_dir = self.mount_root / self.name / "meta"
        self.lvm = Lvm(self.runner, devices)
        self.volume_group = PoolVg(self.name, self.lvm, self.runner)
        self.vg = self.volume_group.name
        self.lending = LvLender(self.volume_group)
        #: Deltas and COW stores go on this PV when it has room (a faster disk, say).
        self.preferred_device: str | None = None
        #: The delta area made ahead (see :mod:`.lvmspare`).
        self.spare = SpareArea(self.volume_group, lambda: self.preferred_device)
        #: volume -> bytes of its last delta with data made by this object (sizes the spare)
        self._last_delta: dict[str, int] = {}
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
        admission = DiskAdmission(gate, protected, force)
        checks = [pool._check_device(d, admission, devices) for d in devices]
        if pool.volume_group.exists_anywhere():
            raise AlreadyExists(what="volume group", name=pool.vg)
        pool.pool_uuid = str(uuid.uuid4())
        try:
            for check in checks:
                wipe_if_forced(check.path, check.has_data, run)
            pool.volume_group.provision(
                devices, sum(c.size for c in checks), thin_fraction, thin_device, pool._mkfs_meta
            )
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
            write_pool_file(pool.meta_dir, info)
        except BaseException:
            pool.destroy()
            raise
        return pool

    def _mkfs_meta(self, device: str) -> None:
        self.runner.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-L", "bgmeta", "-E",
                         # No lazy init: no writes behind our back after mkfs.
                         "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
                         device], timeout=300)  # fmt: skip

    def _attach(self, devices: Sequence[str]) -> None:
        """Activate and mount the metadata LV; check it describes this pool's VG.

        :raises NotFound: no VG of this pool on ``devices``.
        """
        self._mount_meta()
        info = read_pool_file(self.meta_dir, POOL_FORMAT, "lvm")
        if info.get("pool") != self.name or info.get("vg") != self.vg:
            raise CorruptMetadata(
                what=str(self.meta_dir / POOL_FILE),
                detail=f"it describes pool {info.get('pool')} in VG {info.get('vg')}",
            )
        self.pool_uuid = str(info.get("pool_uuid", ""))

    def close(self) -> None:
        """Unmount the metadata file system if this object mounted it (LVs stay active)."""
        if self._mounted_by_me:
            self.runner.run(["umount", str(self.meta_dir)], timeout=120)
            self._mounted_by_me = False

    def destroy(self) -> None:
        """Remove the pool and everything in it: VG, LVs, PV labels (no undo)."""
        self.volume_group.destroy()
        self._mounted_by_me = False

    def add_device(self, path: str, admission: DiskAdmission | None = None) -> PoolDevice:
        check = self._check_device(path, admission or DiskAdmission(), self.lvm.devices)
        wipe_if_forced(path, check.has_data, self.runner)
        self.volume_group.add_device(path)
        return next(d for d in self.devices() if d.path == path)

    def _check_device(self, path: str, admission: DiskAdmission, known: Sequence[str]) -> DiskCheck:
        # The pool's other disks (or those given with this one) count as its pool disks:
        # a disk given twice under two names, or with its own partition, is refused.
        return self._admit(path, admission, [d for d in known if d != path])

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

    # --- LVs and space ----------------------------------------------------------------

    def _lv_device(self, lv: str) -> str:
        """The verified device node of VG/LV, activating it when needed."""
        return self.volume_group.lv_device(lv)

    def _remove_lv(self, lv: str, *, thin: bool = False) -> None:
        self.volume_group.remove_lv(lv, thin=thin)

    def lv_devices(self, manifest: Manifest) -> list[str]:
        """The PVs a generation's data is allocated on (for a full: the thin pool's)."""
        lv = manifest.storage.get("lv")
        if not lv:
            return []  # an empty delta: no data, no lvs to ask
        if manifest.is_full:
            lv = f"{THIN_POOL}_tdata"
        return sorted(set(self.volume_group.devices_of(lv)))

    def devices(self) -> list[PoolDevice]:
        return [
            PoolDevice(path, devno(device_rdev(path)), size, f"{self.vg}:{path}")
            for path, (size, _) in sorted(self.volume_group.pv_free().items())
        ]

    def capacity(self) -> PoolCapacity:
        """Free = the VG's unallocated space + the thin pool's free data blocks (as the
        kernel counts them, not the thin LVs' sizes); the thin pool's data and metadata
        space are given apart too."""
        size, vg_free = self.volume_group.vg_space()
        thin = self.volume_group.thin_space()
        # The spare delta area is free space the pool lent itself: it gives way on need.
        free = vg_free + thin.data_free + self.spare.size
        return PoolCapacity(
            size, size - free, free,
            thin.data_total, thin.data_free, thin.meta_total, thin.meta_free,
        )  # fmt: skip

    def refuse_space(self, free: int, needed: int, volume: str | None, resource: str = "") -> None:
        """Alert (``resource``: the thin pool's ``data`` or ``metadata``; "" the VG) and
        raise.

        :raises PoolSpaceLow: always.
        """
        alert = SpaceAlert(self.name, free, needed, volume, resource)
        log.warning("%s", alert.message)
        if self.alert is not None:
            self.alert(alert)
        raise PoolSpaceLow(pool=self.name, free=free, needed=needed, resource=resource)

    def _admit_full(self, needed: int, volume: VolumeIdentity) -> None:
        """:raises PoolSpaceLow: the thin pool's data or metadata cannot take ``needed``
        bytes with its margin, even grown from the VG (after alerting)."""
        short = self._admit_thin(needed, volume.size)
        if short is not None:
            self.refuse_space(short.free, short.needed, volume.name, short.resource)

    def _admit_thin(self, needed: int, volume_size: int) -> ThinShortfall | None:
        """The thin pool's admission, the spare giving way when it falls short."""
        short = self.volume_group.admit_thin(needed, volume_size, self.preferred_device)
        if short is not None and self.spare.give_way():
            short = self.volume_group.admit_thin(needed, volume_size, self.preferred_device)
        return short

    def _vg_room(self, needed: int) -> int:
        """The VG's free bytes for a new LV of ``needed`` bytes, the spare giving way
        when they lack (a refusal is made on a fresh read)."""
        free = self.volume_group.vg_free_for(needed)
        if free < needed and self.spare.give_way():
            free = self.volume_group.space(fresh=True).free
        return free

    def _create_linear(self, lv: str, size: int) -> None:
        """A linear LV to be written over (no wiping, no zeroing), on the preferred PV
        when it has room."""
        self._vg_room(size)
        pvs = self.volume_group.place(size, self.preferred_device)
        self.volume_group.create_linear(lv, size, pvs, wipe=False, zero=False)

    # --- the delta area made ahead ----------------------------------------------------

    def prepare_ahead(self, volume: str, go_on: Callable[[], bool] = lambda: True) -> None:
        """Make the spare delta area the next delta of ``volume`` is likely to fit
        (sized on its last delta that stored anything, else 1 % of the volume), unless
        the spare there fits it already or the VG lacks the room. For when the pool is
        idle; ``go_on`` False (a job came) stops before the next LVM command."""
        last = self._last_delta.get(volume)
        if last is None:  # none written since the pool was opened: read the manifests
            gens = self.generations(volume)
            if not gens:
                return
            stored = [m.bytes_stored for m in gens if not m.is_full and m.storage.get("lv")]
            last = stored[-1] if stored else gens[-1].volume.size // 100
        if go_on():
            self.spare.make(spare_size_for(last), go_on)

    # --- garbage --------------------------------------------------------------------

    def collect_garbage(self) -> list[str]:
        """Remove uncommitted and half-removed generations, and stray LVs; keep one
        ``delta-*`` LV that no manifest names as the spare."""
        lvs = self.volume_group.lvs()
        gone: set[str] = set()

        def drop(gid: str, gen: Path) -> None:
            # A removal interrupted after its rename still has the manifest naming the LV.
            lv = lv_name_of(gid)
            try:
                data = (gen / MANIFEST_NAME).read_bytes()
                lv = Manifest.from_json(data, str(gen)).storage.get("lv") or lv
            except (OSError, BlockguardError):
                pass
            if lv in lvs and lv not in gone:
                self._remove_lv(lv)
                gone.add(lv)

        removed, seen = self._collect_generation_dirs(drop)
        named = {lv_name_of(gid) for gid in seen}
        for lv in lvs.values():
            stray_gen = lv.name.startswith(GEN_PREFIX) and lv.name not in named
            stray_cow = lv.name.startswith(COW_PREFIX) and not lv.is_open
            if (stray_gen or stray_cow) and lv.name not in gone:
                self._remove_lv(lv.name)
                removed.append(f"{self.vg}/{lv.name}")
        removed += self._sort_areas({n: f for n, f in lvs.items() if n not in gone})
        removed += self.remove_drill_scratch()
        if removed:
            log.info("pool %s: removed garbage %s", self.name, removed)
        return removed

    def _sort_areas(self, lvs: dict[str, LvFacts]) -> list[str]:
        """Keep one ``delta-*`` LV no manifest names as the spare, remove the others."""
        self.spare.forget()
        areas = [lv for lv in lvs.values() if is_area(lv.name)]
        if not areas:
            return []
        found = self.scan()
        if any(d.manifest is None for d in found.damaged):
            log.warning("pool %s: a manifest cannot be read: every delta-* LV stays", self.name)
            return []
        manifests = [*found.manifests, *(d.manifest for d in found.damaged if d.manifest)]
        return self.spare.sort_out(areas, {m.storage.get("lv") or "" for m in manifests})

    # --- generations: where the bytes live ------------------------------------------

    def _volume_roots(self) -> list[Path]:
        return [self.meta_dir / "volumes"]

    def _can_clone(self, source: Manifest) -> bool:
        return bool(source.storage.get("lv"))

    def _make_room(
        self, spec: GenerationSpec, source: Manifest | None
    ) -> tuple[Path, Manifest | None]:
        """Check the VG and, for a full, grow the thin pool to hold it."""
        volume, chunk_size, changed = spec.volume, spec.chunk_size, spec.changed or ()
        if spec.is_full:
            # A thin block is allocated whole however little of it a chunk covers.
            per_chunk = max(chunk_size, THIN_BLOCK)
            needed = volume.size if source is None else len(changed) * per_chunk
        else:
            needed = len(changed) * chunk_size
        needed = min(needed, round_up(volume.size, EXTENT))
        if not needed and not spec.is_full:
            # An empty delta (nothing changed) allocates nothing: no space to ask for.
            return self.meta_dir / "volumes", source
        if spec.is_full:
            self._admit_full(needed, volume)
        elif not fits(round_up(needed, EXTENT), self.spare.size):
            # A delta is a linear LV: only the VG's unallocated space can hold it.
            vg_free = self._vg_room(needed)
            if vg_free < needed:
                self.refuse_space(vg_free, needed, volume.name)
        return self.meta_dir / "volumes", source

    def _make_data(self, draft: Manifest, gen_dir: Path, source: Manifest | None) -> StoredData:
        """A thin LV for a full (a thin snapshot of ``source`` when given), a linear LV of
        the packed chunks for a delta (none for an empty delta)."""
        lv: str | None = lv_name_of(draft.generation_id)
        try:
            if draft.is_full and source is not None:
                self.lvm.snapshot(self.vg, source.storage["lv"], lv, activate=True)
                crash_point("after-clone")
            elif draft.is_full:
                self.lvm.create_thin(self.vg, THIN_POOL, lv, draft.volume.size)
            elif draft.changed:
                self._last_delta[draft.volume.name] = len(draft.changed) * draft.chunk_size
                lv = self._delta_lv(lv, round_up(len(draft.changed) * draft.chunk_size, EXTENT))
            else:
                lv = None
            crash_point("lv-created")
            device = self._lv_device(lv) if lv else None
            target = None
            if device is not None:
                target = BlockDevice(
                    device, write=True, direct=True, exclusive=True, pool=self.name
                )
        except BaseException:
            if lv and lv in self.volume_group.lvs():
                self._remove_lv(lv)
            raise
        storage = {"layout": LAYOUT_THIN if draft.is_full else LAYOUT_PACKED, "lv": lv}
        thin = draft.is_full
        drop = (lambda: self._remove_lv(lv, thin=thin)) if lv else None
        # A new thin LV maps no block: it reads zeros until written. Skipping its zero chunks
        # is safe only when a chunk covers whole thin blocks: a smaller chunk written into a
        # block leaves the rest of that block as the pool provisioned it, which is stale data
        # where the admin's lvm.conf turned thin_pool_zero off.
        zeroed = draft.is_full and source is None and draft.chunk_size % THIN_BLOCK == 0
        return StoredData(target, source, storage, drop, zeroed=zeroed)

    def _delta_lv(self, lv: str, size: int) -> str:
        """The spare delta area when it fits ``size`` bytes and is there, else a new
        linear LV ``lv``; returns the LV's name."""
        area = self.spare.claim(size)
        if area is not None:
            crash_point("area-claimed")
            try:
                self._lv_device(area)
                return area
            except (NotFound, CommandFailed):
                # Gone behind the pool's back (removed by hand): the delta needs an LV.
                log.warning("spare delta area %s/%s is gone", self.vg, area)
        self._create_linear(lv, size)
        return lv

    def _drop_data(self, manifest: Manifest) -> None:
        lv = manifest.storage.get("lv")
        if lv:
            self._remove_lv(lv, thin=manifest.storage.get("layout") == LAYOUT_THIN)

    def open_generation(self, manifest: Manifest) -> StoredGenerationReader:
        gen_dir = self._gen_dir(manifest.volume.name, manifest.generation_id)
        lv = manifest.storage.get("lv")
        source = BlockDevice(self._lv_device(lv), direct=True) if lv else None
        return StoredGenerationReader(manifest, gen_dir, source, "data volume")

    # --- swap-in and lent devices -----------------------------------------------------

    def swap_in(self, full: Manifest, label: str) -> SwapInVolume:
        """A thin snapshot of the full, active and writable: instant, whatever its size."""
        check_name(label, "swap-in label")
        if not full.is_full or not full.storage.get("lv"):
            raise InvalidInput(detail=f"generation {full.generation_id} is not a full")
        self._gen_dir(full.volume.name, full.generation_id)
        return self.lending.swap_in(full.storage["lv"], label)

    def swap_ins(self) -> list[str]:
        """Swap-in volumes on the pool (``VG/LV``), active or not."""
        return self.lending.swap_ins()

    def swap_in_devices(self) -> list[tuple[str, str]]:
        found = []
        for name in self.swap_ins():
            dm, mapper = dm_name(self.vg, name.split("/", 1)[1]), self.volume_group.dm
            found.append((name, mapper.node(dm) if mapper.info(dm) is not None else ""))
        return found

    def release_swap_in(self, name: str) -> None:
        if name not in self.swap_ins():
            raise NotFound(what="swap-in", name=name)
        self._remove_lv(name.split("/", 1)[1])

    def cow_store(self, size: int, label: str) -> LvCowStore:
        """A new linear LV of at least ``size`` bytes to hold a dm-snapshot's exceptions.

        :raises PoolSpaceLow: no room for it.
        """
        size = round_up(max(size, EXTENT), EXTENT)
        self.require_space(size)
        self._vg_room(size)
        return self.lending.cow_store(size, label, self.preferred_device)

    def lend_device(self, name: str, size: int, volume: str | None = None) -> str:
        self.require_space(size, volume)
        self._vg_room(size)
        return self.lending.lend(name, size)

    def lent_device(self, name: str) -> str:
        return self.lending.lent(name)

    def return_device(self, name: str) -> None:
        self.lending.give_back(name)

    def drill_scratch(self, size: int) -> LvScratch:
        """:raises PoolSpaceLow: the thin pool (or, without one, the VG) lacks the room."""
        size = round_up(max(size, EXTENT), EXTENT)
        if THIN_POOL in self.volume_group.lvs():
            short = self._admit_thin(size, size)
            if short is not None:
                self.refuse_space(short.free, short.needed, None, short.resource)
        else:
            self.require_space(size)
            self._vg_room(size)
        return self.lending.scratch(size, self.preferred_device)

    def remove_drill_scratch(self) -> list[str]:
        return self.lending.remove_scratch()
