"""The ``dir`` pool backend: XFS with reflink on each pool disk, for hosts without dm.

Each disk is one *area*: its own XFS (``mkfs.xfs -m reflink=1``) mounted under
``MOUNT_ROOT/POOL/area-N``, with ``pool.json`` naming the pool. Generations live in
``volumes/VOLUME/GENERATION_ID/``:

- a full is ``image`` (the volume's bytes at their own offsets); a new full is a FICLONE
  of the previous full's image (instant, shares extents) with the changed chunks written
  over it;
- a differential or incremental is ``chunks``: the changed chunks packed in chunk order,
  so that a chunk's slot is its rank in the changed set stored in the manifest;
- ``checksums.xxh3`` and, committed last, ``manifest.json``.

A generation being written holds an flock on its ``.writing`` file; a directory with no
manifest whose lock can be taken is garbage and ``open`` removes it, as it removes
``*.deleted`` directories left by an interrupted removal.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from pyroaring import BitMap

from blockguard.errors import (
    Busy,
    CorruptMetadata,
    EnvironmentProblem,
    InvalidInput,
    NotFound,
)
from blockguard.storage.blockdev import device_rdev, mounted_devnos
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
from blockguard.storage.pool.dirgen import (
    CHECKSUMS,
    DATA_FULL,
    LOCK,
    DirGenerationReader,
    DirGenerationWriter,
    clone_file,
    writer_alive,
)
from blockguard.storage.pool.label import dir_label
from blockguard.storage.pool.registration import check_disk, devno, legacy_gate
from blockguard.storage.runner import Runner, default_runner
from blockguard.storage.safety import SafetyGate

log = logging.getLogger(__name__)
POOL_FILE = "pool.json"
POOL_FORMAT = "blockguard-dir-pool"
#: mkfs.xfs refuses file systems under 300 MB.
MIN_DEVICE_SIZE = 320 << 20
DELETED = ".deleted"


class DirPool(PoolBackend):
    """A pool of XFS areas; create with :meth:`create`, reopen with :meth:`open`."""

    kind = "dir"
    can_clone_full = True

    def __init__(
        self, name: str, mount_root: Path, runner: Runner, alert: AlertCallback | None
    ) -> None:
        super().__init__(name, alert)
        self.mount_root = Path(mount_root)
        self.runner = runner
        self.pool_uuid = ""
        self._areas: list[tuple[PoolDevice, Path]] = []
        self._mounted_by_me: list[Path] = []
        self.damaged: list[str] = []

    # --- creation and opening -------------------------------------------------------

    @classmethod
    def create(
        cls,
        name: str,
        device: str,
        mount_root: str | os.PathLike[str],
        *,
        protected: Sequence[str] = (),
        force: bool = False,
        runner: Runner | None = None,
        alert: AlertCallback | None = None,
        gate: SafetyGate | None = None,
    ) -> DirPool:
        """Register ``device`` as a new pool (mkfs + mount); its XFS gets the pool label.

        :param gate: the daemon's safety gate (else one knowing only ``protected``).
        :raises DeviceInUse: the disk is in use or holds data (without ``force``); the
            subclasses name a protected volume, pool disk or pool label in its family.
        :raises DeviceTooSmall: below :data:`MIN_DEVICE_SIZE`.
        """
        check_name(name, "pool name")
        pool = cls(name, Path(mount_root), runner or default_runner(), alert)
        pool.pool_uuid = str(uuid.uuid4())
        pool._format_area(device, 0, protected=protected, force=force, gate=gate)
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
    ) -> DirPool:
        """Open an existing pool: mount its areas (unless mounted) and remove garbage.

        :param collect: remove the garbage of interrupted writes (``pool import`` does
            not: it changes nothing on the pool).
        :raises CorruptMetadata: a device does not carry this pool.
        """
        check_name(name, "pool name")
        pool = cls(name, Path(mount_root), runner or default_runner(), alert)
        try:
            for index, device in enumerate(devices):
                mnt = pool._mount_area(device, index)
                info = _read_pool_file(mnt)
                if info["pool"] != name or (pool.pool_uuid and info["pool_uuid"] != pool.pool_uuid):
                    raise CorruptMetadata(
                        what=f"pool area on {device}", detail=f"it belongs to pool {info['pool']}"
                    )
                pool.pool_uuid = info["pool_uuid"]
                pool._areas.append((pool._device(device, mnt), mnt))
            if collect:
                pool.collect_garbage()
        except BaseException:
            pool.close()
            raise
        return pool

    def add_device(
        self,
        path: str,
        *,
        protected: Sequence[str] = (),
        force: bool = False,
        gate: SafetyGate | None = None,
    ) -> PoolDevice:
        return self._format_area(
            path, len(self._areas), protected=protected, force=force, gate=gate
        )

    def _format_area(
        self,
        device: str,
        index: int,
        *,
        protected: Sequence[str],
        force: bool,
        gate: SafetyGate | None,
    ) -> PoolDevice:
        known = {d.path: self.name for d, _ in self._areas}
        base = gate if gate is not None else legacy_gate(protected, self.runner)
        check = check_disk(
            device, gate=base.adding(pool_disks=known), min_size=MIN_DEVICE_SIZE, force=force
        )
        if check.has_data:
            log.warning("overwriting %s (forced): %s", device, "; ".join(check.has_data))
            self.runner.run(["wipefs", "-a", "-q", device], timeout=60)
            self.runner.run(["partx", "-d", device], timeout=60, check=False)
        argv = ["mkfs.xfs", "-q", "-m", "reflink=1", "-L", dir_label(self.name)]
        self.runner.run([*argv, *(["-f"] if force else []), device], timeout=300)
        mnt = self._mount_area(device, index)
        (mnt / "volumes").mkdir(exist_ok=True)
        info = {
            "format": POOL_FORMAT,
            "format_version": 1,
            "pool": self.name,
            "pool_uuid": self.pool_uuid,
            "area": f"area-{index}",
            "created": time.time(),
        }
        write_atomic(mnt / POOL_FILE, json.dumps(info, indent=1).encode())
        dev = self._device(device, mnt)
        self._areas.append((dev, mnt))
        return dev

    def _mount_area(self, device: str, index: int) -> Path:
        rdev = device_rdev(device)
        existing = mounted_devnos().get(devno(rdev))
        if existing is not None:
            return Path(existing)
        mnt = self.mount_root / self.name / f"area-{index}"
        mnt.mkdir(parents=True, exist_ok=True)
        self.runner.run(
            ["mount", "-t", "xfs", "-o", "noatime,nodev,nosuid,noexec", device, str(mnt)],
            timeout=120,
        )
        self._mounted_by_me.append(mnt)
        return mnt

    def _device(self, path: str, mnt: Path) -> PoolDevice:
        rdev = device_rdev(path)
        st = os.statvfs(mnt)
        return PoolDevice(path, devno(rdev), st.f_blocks * st.f_frsize, str(mnt))

    def close(self) -> None:
        """Unmount the areas this object mounted."""
        while self._mounted_by_me:
            mnt = self._mounted_by_me.pop()
            self.runner.run(["umount", str(mnt)], timeout=120)
        self._areas.clear()

    # --- space ----------------------------------------------------------------------

    def devices(self) -> list[PoolDevice]:
        return [d for d, _ in self._areas]

    def capacity(self) -> PoolCapacity:
        total = free = 0
        for _, mnt in self._areas:
            st = os.statvfs(mnt)
            total += st.f_blocks * st.f_frsize
            free += st.f_bavail * st.f_frsize
        return PoolCapacity(total, total - free, free)

    def _area_free(self, mnt: Path) -> int:
        st = os.statvfs(mnt)
        return st.f_bavail * st.f_frsize

    # --- garbage --------------------------------------------------------------------

    def collect_garbage(self) -> list[str]:
        """Remove uncommitted and half-deleted generations; returns what was removed."""
        removed: list[str] = []
        for _, mnt in self._areas:
            for vol in _subdirs(mnt / "volumes"):
                for gen in _subdirs(vol):
                    if gen.name.endswith(DELETED) or not (gen / MANIFEST_NAME).exists():
                        if writer_alive(gen):
                            continue
                        shutil.rmtree(gen, ignore_errors=True)
                        removed.append(str(gen))
                    else:
                        for stray in (gen / LOCK, gen / f".{MANIFEST_NAME}.tmp"):
                            if stray.exists() and not writer_alive(gen):
                                stray.unlink(missing_ok=True)
                if removed:
                    fsync_dir(vol)
        if removed:
            log.info("removed uncommitted generations: %s", removed)
        return removed

    # --- generations ----------------------------------------------------------------

    def generations(self, volume: str | None = None) -> list[Manifest]:
        return manifests_of(self.scan(volume))

    def scan(self, volume: str | None = None) -> PoolScan:
        vols = [
            vol
            for _, mnt in self._areas
            for vol in ([mnt / "volumes" / volume] if volume else _subdirs(mnt / "volumes"))
        ]
        found = scan_generation_dirs(vols, _files_problem)
        self.damaged = [
            str(self._damaged_dir(d.volume, d.generation_id))
            for d in found.damaged
            if d.manifest is None
        ]
        return found

    def _damaged_dir(self, volume: str, generation_id: str) -> Path:
        for _, mnt in self._areas:
            d = mnt / "volumes" / volume / generation_id
            if d.exists():
                return d
        return Path(volume, generation_id)

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
        for _, mnt in self._areas:
            d = mnt / "volumes" / volume / generation_id
            if (d / MANIFEST_NAME).exists():
                return d
        raise NotFound(what="generation", name=f"{volume}/{generation_id}")

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
            ):
                source = None
        if not self._areas:
            raise EnvironmentProblem(detail=f"pool {self.name} has no devices")
        # A clone shares the source's extents: only the changed chunks need new space.
        changed_count: int | None = None
        if changed is not None and (kind is not GenerationKind.FULL or source is not None):
            changed_count = len(changed)
        needed = self.estimate_bytes(volume, changed_count, chunk_size)
        area = max((mnt for _, mnt in self._areas), key=self._area_free)
        if source is not None:
            src_area = self._gen_dir(volume.name, source.generation_id).parents[2]
            if self._area_free(src_area) >= needed:
                area = src_area
            else:
                source = None
                needed = volume.size
        self.require_space(needed, volume.name)
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
        )
        gen_dir = area / "volumes" / volume.name / draft.generation_id
        src_image = None
        if source is not None:
            src_dir = self._gen_dir(volume.name, source.generation_id)
            if src_dir.parents[2] == area:
                src_image = src_dir / source.storage.get("data", DATA_FULL)
            else:
                source = None
        return DirGenerationWriter(draft, gen_dir, source, src_image, pool=self.name)

    def open_generation(self, manifest: Manifest) -> GenerationReader:
        return DirGenerationReader(
            manifest, self._gen_dir(manifest.volume.name, manifest.generation_id), pool=self.name
        )

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
        # The rename is the commit point of a removal: afterwards the generation is gone
        # for every reader, and an interrupted rmtree is finished by the next open.
        os.rename(gen, doomed)
        fsync_dir(gen.parent)
        crash_point("remove-renamed")
        shutil.rmtree(doomed)
        return FreedGeneration(generation_id, target.kind.value, target.bytes_stored)

    def swap_in(self, full: Manifest, label: str) -> SwapInVolume:
        check_name(label, "swap-in label")
        if not full.is_full:
            raise InvalidInput(detail=f"generation {full.generation_id} is not a full")
        src = self._gen_dir(full.volume.name, full.generation_id)
        area = src.parents[2]
        (area / "swapin").mkdir(exist_ok=True)
        image = area / "swapin" / f"{label}.img"
        if image.exists():
            raise Busy(what=f"swap-in image {image}", reason="it already exists")
        clone_file(src / full.storage.get("data", DATA_FULL), image)
        try:
            dev = self.runner.run(
                ["losetup", "--find", "--show", "--direct-io=on", str(image)], timeout=60
            ).stdout.strip()
        except BaseException:
            image.unlink(missing_ok=True)
            raise
        return DirSwapIn(dev, str(image), self.runner)

    def record_dirs(self) -> list[Path]:
        return [mnt / RECORDS_DIR for _, mnt in self._areas]

    def volume_dirs(self, volume: str) -> list[Path]:
        return [mnt / "volumes" / volume for _, mnt in self._areas]

    def swap_ins(self) -> list[str]:
        """Swap-in images that exist on the pool (attached or not)."""
        return sorted(str(p) for _, mnt in self._areas for p in (mnt / "swapin").glob("*.img"))

    def _loops_of(self, image: str) -> list[str]:
        # "/dev/loop5: [2049]:131 (/srv/area/swapin/db-x.img)", one line per loop device.
        listing = self.runner.run(["losetup", "-j", image], timeout=60).stdout
        return [line.split(":", 1)[0] for line in listing.splitlines() if ":" in line]

    def swap_in_devices(self) -> list[tuple[str, str]]:
        return [(image, ", ".join(self._loops_of(image))) for image in self.swap_ins()]

    def release_swap_in(self, name: str) -> None:
        if name not in self.swap_ins():
            raise NotFound(what="swap-in", name=name)
        for loop in self._loops_of(name):
            self.runner.run(["losetup", "-d", loop], timeout=60)
        Path(name).unlink(missing_ok=True)


class DirSwapIn(SwapInVolume):
    def __init__(self, device: str, image: str, runner: Runner) -> None:
        super().__init__(device, image)
        self.runner = runner

    def release(self, *, keep_image: bool = False) -> None:
        self.runner.run(["losetup", "-d", self.device], timeout=60)
        if not keep_image and self.image:
            Path(self.image).unlink(missing_ok=True)


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.is_symlink())
    except FileNotFoundError:
        return []


def _files_problem(gen: Path, m: Manifest) -> str | None:
    """A committed generation's data and checksum files, as its manifest describes them."""
    if m.is_full:
        data_min = m.volume.size
    else:
        data_min = 0 if not m.changed else (len(m.changed) - 1) * m.chunk_size + 1
    return file_problem(gen / m.storage.get("data", DATA_FULL), "data file", data_min) or (
        file_problem(
            gen / m.storage.get("checksums", CHECKSUMS),
            "checksum array",
            8 * m.checksum_count,
            exact=True,
        )
    )


def _read_pool_file(mnt: Path) -> dict[str, str]:
    try:
        info = json.loads((mnt / POOL_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CorruptMetadata(what=str(mnt / POOL_FILE), detail=str(exc)) from None
    if not isinstance(info, dict) or info.get("format") != POOL_FORMAT:
        raise CorruptMetadata(what=str(mnt / POOL_FILE), detail="not a blockguard dir pool")
    return info
