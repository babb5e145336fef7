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

A restore drill's scratch space is ``bg-drill-scratch.img`` at the top of an area: a sparse
file attached to a loop device (direct I/O, so that its writes reach the file system as a
real target's reach its disk). ``open`` detaches and deletes one a crash left.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from blockguard.errors import (
    Busy,
    CorruptMetadata,
    EnvironmentProblem,
    InvalidInput,
    NotFound,
    PoolSpaceLow,
)
from blockguard.storage.blockdev import device_rdev, mounted_devnos
from blockguard.storage.manifest import (
    Manifest,
    check_name,
)
from blockguard.storage.pool.base import (
    DRILL_SCRATCH,
    AlertCallback,
    GenerationSpec,
    PoolCapacity,
    PoolDevice,
    ScratchSpace,
    SwapInVolume,
)
from blockguard.storage.pool.dirgen import (
    DATA_FULL,
    DirGenerationReader,
    DirGenerationWriter,
    clone_file,
    make_data_file,
)
from blockguard.storage.pool.diskstore import DiskStore
from blockguard.storage.pool.gendir import file_problem
from blockguard.storage.pool.label import dir_label
from blockguard.storage.pool.records import read_pool_file, write_pool_file
from blockguard.storage.pool.registration import DiskAdmission, devno, wipe_if_forced
from blockguard.storage.pool.store import StoredData
from blockguard.storage.runner import Runner, default_runner
from blockguard.storage.safety import SafetyGate

log = logging.getLogger(__name__)
POOL_FORMAT = "blockguard-dir-pool"
#: mkfs.xfs refuses file systems under 300 MB.
MIN_DEVICE_SIZE = 320 << 20
#: The drill's scratch file at the top of an area.
SCRATCH_FILE = f"{DRILL_SCRATCH}.img"


class DirPool(DiskStore):
    """A pool of XFS areas; create with :meth:`create`, reopen with :meth:`open`."""

    kind = "dir"
    can_clone_full = True
    writer_class = DirGenerationWriter

    min_device_size = MIN_DEVICE_SIZE

    def _setup(self, devices: Sequence[str]) -> None:
        # Areas are mounted and listed by create and open (``_attach``), not here.
        self._areas: list[tuple[PoolDevice, Path]] = []
        self._mounted_by_me: list[Path] = []

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
        pool = cls(name, [device], mount_root, runner or default_runner(), alert)
        pool.pool_uuid = str(uuid.uuid4())
        pool._format_area(device, 0, DiskAdmission(gate, protected, force))
        return pool

    def _attach(self, devices: Sequence[str]) -> None:
        for index, device in enumerate(devices):
            mnt = self._mount_area(device, index)
            info = read_pool_file(mnt, POOL_FORMAT, "dir")
            if info["pool"] != self.name or (
                self.pool_uuid and info["pool_uuid"] != self.pool_uuid
            ):
                raise CorruptMetadata(
                    what=f"pool area on {device}", detail=f"it belongs to pool {info['pool']}"
                )
            self.pool_uuid = info["pool_uuid"]
            self._areas.append((self._device(device, mnt), mnt))

    def add_device(self, path: str, admission: DiskAdmission | None = None) -> PoolDevice:
        return self._format_area(path, len(self._areas), admission or DiskAdmission())

    def _format_area(self, device: str, index: int, admission: DiskAdmission) -> PoolDevice:
        check = self._admit(device, admission, [d.path for d, _ in self._areas])
        wipe_if_forced(device, check.has_data, self.runner)
        argv = ["mkfs.xfs", "-q", "-m", "reflink=1", "-L", dir_label(self.name)]
        self.runner.run([*argv, *(["-f"] if admission.force else []), device], timeout=300)
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
        write_pool_file(mnt, info)
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
        """Remove uncommitted and half-deleted generations and a drill's left-over
        scratch file; returns what was removed."""
        removed, _ = self._collect_generation_dirs()
        removed += self.remove_drill_scratch()
        if removed:
            log.info("removed uncommitted generations: %s", removed)
        return removed

    # --- generations: where the bytes live ------------------------------------------

    def _volume_roots(self) -> list[Path]:
        return [mnt / "volumes" for _, mnt in self._areas]

    def _make_room(
        self, spec: GenerationSpec, source: Manifest | None
    ) -> tuple[Path, Manifest | None]:
        """The area with the most free space, or the source full's area when the clone
        fits there (a reflink cannot cross file systems)."""
        if not self._areas:
            raise EnvironmentProblem(detail=f"pool {self.name} has no devices")
        volume = spec.volume
        # A clone shares the source's extents: only the changed chunks need new space.
        changed_count: int | None = None
        if spec.changed is not None and (not spec.is_full or source is not None):
            changed_count = len(spec.changed)
        needed = self.estimate_bytes(volume, changed_count, spec.chunk_size)
        area = max((mnt for _, mnt in self._areas), key=self._area_free)
        if source is not None:
            src_area = self._gen_dir(volume.name, source.generation_id).parents[2]
            if self._area_free(src_area) >= needed:
                area = src_area
            else:
                source = None
                needed = volume.size
        self.require_space(needed, volume.name)
        return area / "volumes", source

    def _make_data(self, draft: Manifest, gen_dir: Path, source: Manifest | None) -> StoredData:
        src_image = None
        if source is not None:
            src_dir = self._gen_dir(draft.volume.name, source.generation_id)
            src_image = src_dir / source.storage.get("data", DATA_FULL)
        return make_data_file(draft, gen_dir, source, src_image, self.name)

    def _data_problem(self, gen: Path, manifest: Manifest) -> str | None:
        m = manifest
        if m.is_full:
            data_min = m.volume.size
        else:
            data_min = 0 if not m.changed else (len(m.changed) - 1) * m.chunk_size + 1
        return file_problem(gen / m.storage.get("data", DATA_FULL), "data file", data_min)

    def open_generation(self, manifest: Manifest) -> DirGenerationReader:
        return DirGenerationReader(
            manifest, self._gen_dir(manifest.volume.name, manifest.generation_id), pool=self.name
        )

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
        return DirSwapIn(self._attach_image(image), str(image), self.runner)

    def _attach_image(self, image: Path) -> str:
        """Attach ``image`` (a file this pool just made) to a free loop device; the
        image is removed when that fails, so a failed attach leaves nothing behind."""
        try:
            return self.runner.run(
                ["losetup", "--find", "--show", "--direct-io=on", str(image)], timeout=60
            ).stdout.strip()
        except BaseException:
            image.unlink(missing_ok=True)
            raise

    def _drop_image(self, image: str) -> None:
        """Detach every loop device bound to ``image``, then remove it."""
        for loop in self._loops_of(image):
            self.runner.run(["losetup", "-d", loop], timeout=60)
        Path(image).unlink(missing_ok=True)

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
        self._drop_image(name)

    # --- a restore drill's scratch space -------------------------------------------

    def drill_scratch(self, size: int) -> ScratchSpace:
        """A sparse file of ``size`` bytes in the area with the most room, on a loop device.

        :raises PoolSpaceLow: no area can hold it.
        """
        if not self._areas:
            raise EnvironmentProblem(detail=f"pool {self.name} has no devices")
        self.remove_drill_scratch()
        area = max((mnt for _, mnt in self._areas), key=self._area_free)
        if self._area_free(area) < size:
            raise PoolSpaceLow(pool=self.name, free=self._area_free(area), needed=size)
        image = area / SCRATCH_FILE
        fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        scratch = DirScratch(self._attach_image(image), str(image), size, self.runner)
        try:
            device_rdev(scratch.device)
        except BaseException:
            scratch.release()
            raise
        return scratch

    def remove_drill_scratch(self) -> list[str]:
        removed = []
        for _, mnt in self._areas:
            image = mnt / SCRATCH_FILE
            if not image.exists():
                continue
            self._drop_image(str(image))
            removed.append(str(image))
        if removed:
            log.info("pool %s: removed drill scratch %s", self.name, removed)
        return removed


class DirScratch(ScratchSpace):
    """A drill's scratch file on a loop device; released by the device it attached."""

    def __init__(self, device: str, image: str, size: int, runner: Runner) -> None:
        super().__init__(device, image, size)
        self.runner = runner

    def release(self) -> None:
        self.runner.run(["losetup", "-d", self.device], timeout=60)
        Path(self.name).unlink(missing_ok=True)


class DirSwapIn(SwapInVolume):
    def __init__(self, device: str, image: str, runner: Runner) -> None:
        super().__init__(device, image)
        self.runner = runner

    def release(self, *, keep_image: bool = False) -> None:
        self.runner.run(["losetup", "-d", self.device], timeout=60)
        if not keep_image and self.image:
            Path(self.image).unlink(missing_ok=True)
