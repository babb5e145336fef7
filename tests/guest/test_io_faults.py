"""A pool disk that starts failing in the middle of a backup and of a restore (dm-error).

The dir pool's disk is a dm-linear device over a loop device; the test swaps its table for
``error`` (``dmsetup suspend --nolockfs`` / ``load`` / ``resume``) after the first extents
went through. The operation must end with :class:`DeviceIOError` naming the pool file and
an offset (never an internal error), leave no generation behind, and once the disk is back
(table linear again, the pool remounted) the earlier generation must restore bit-exact.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockguard.core.vocab import GenerationKind
from blockguard.errors import DeviceIOError
from blockguard.storage.backup import run_backup
from blockguard.storage.manifest import MANIFEST_NAME, VolumeIdentity
from blockguard.storage.pool import dirgen
from blockguard.storage.pool.dirpool import MIN_DEVICE_SIZE, DirPool
from blockguard.storage.restore import restore_to_device, verify

pytestmark = pytest.mark.guest

MiB = 1 << 20
CHUNK = 64 << 10
SIZE = 8 * MiB
EXTENT = 1 * MiB  # several extents per copy, so the failure lands in the middle
DM_NAME = "bgioe-pooldisk"
#: libdevmapper makes the /dev/mapper node itself: there is no udev in the guest.
DM_ENV = {"DM_DISABLE_UDEV": "1", "LC_ALL": "C"}


def dmsetup(*args: str) -> str:
    return subprocess.run(
        ["dmsetup", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **DM_ENV},
    ).stdout


def sectors(dev: str) -> int:
    out = subprocess.run(
        ["blockdev", "--getsz", dev], check=True, capture_output=True, text=True, timeout=60
    )
    return int(out.stdout)


class FailingDisk:
    """A dm device over ``backing`` whose table can be switched to ``error`` and back."""

    def __init__(self, backing: str) -> None:
        self.backing = backing
        self.size = sectors(backing)
        dmsetup("create", DM_NAME, "--table", self.linear)
        self.path = f"/dev/mapper/{DM_NAME}"

    @property
    def linear(self) -> str:
        return f"0 {self.size} linear {self.backing} 0"

    def switch(self, table: str) -> None:
        # --nolockfs: no freeze of the pool's XFS, whose writer is in the middle of a copy.
        dmsetup("suspend", "--nolockfs", DM_NAME)
        dmsetup("load", DM_NAME, "--table", table)
        dmsetup("resume", DM_NAME)

    def fail(self) -> None:
        self.switch(f"0 {self.size} error")

    def heal(self) -> None:
        self.switch(self.linear)

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            dmsetup("resume", DM_NAME)
        dmsetup("remove", DM_NAME)


@pytest.fixture
def disk(loopdev) -> Iterator[FailingDisk]:
    d = FailingDisk(loopdev(MIN_DEVICE_SIZE, "pooldisk.img"))
    try:
        yield d
    finally:
        d.remove()


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(SIZE)).hexdigest()


def fill(path: str, seed: int) -> str:
    data = random.Random(seed).randbytes(SIZE)
    with open(path, "r+b") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def gen_dirs(mount_root: Path) -> list[str]:
    return sorted(p.name for p in mount_root.glob("iopool/area-0/volumes/vol0/*"))


def fail_after(
    monkeypatch: pytest.MonkeyPatch, cls: type, method: str, calls: int, disk: FailingDisk
) -> None:
    """Make ``disk`` fail once ``cls.method`` has run ``calls`` times (mid-operation)."""
    real = getattr(cls, method)
    seen = [0]

    def wrapper(self: object, *args: object) -> object:
        seen[0] += 1
        if seen[0] == calls + 1:
            disk.fail()
        return real(self, *args)

    monkeypatch.setattr(cls, method, wrapper)


def test_pool_disk_failing_mid_backup_and_mid_restore(
    disk: FailingDisk, loopdev, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mount_root = tmp_path / "mnt"
    vol = loopdev(SIZE, "vol.img")
    target = loopdev(SIZE, "target.img")
    ident = VolumeIdentity("vol0", SIZE, "test:1")
    pool = DirPool.create("iopool", disk.path, mount_root)
    try:
        first_sha = fill(vol, 1)
        first = run_backup(
            pool, ident, vol, GenerationKind.FULL, None, chunk_size=CHUNK, extent_bytes=EXTENT
        ).manifest

        # --- mid-backup -------------------------------------------------------------
        fill(vol, 2)
        with monkeypatch.context() as m:
            fail_after(m, dirgen.DirGenerationWriter, "write_chunks", 2, disk)
            with pytest.raises(DeviceIOError, match=r"I/O error on .*/vol0/.* at offset \d+"):
                run_backup(
                    pool,
                    ident,
                    vol,
                    GenerationKind.FULL,
                    None,
                    chunk_size=CHUNK,
                    extent_bytes=EXTENT,
                )
    finally:
        disk.heal()
        pool.close()
    # The disk is back: the pool, remounted, shows only the earlier generation (what the
    # failed backup left, without a manifest, is garbage that the open removes).
    pool = DirPool.open("iopool", [disk.path], mount_root)
    try:
        assert [m.generation_id for m in pool.generations("vol0")] == [first.generation_id]
        assert gen_dirs(mount_root) == [first.generation_id]
        assert (
            mount_root / "iopool/area-0/volumes/vol0" / first.generation_id / MANIFEST_NAME
        ).exists()
        verify(pool, "vol0", first.generation_id)

        # --- mid-restore --------------------------------------------------------------
        with monkeypatch.context() as m:
            fail_after(m, dirgen.DirGenerationReader, "read_chunks", 2, disk)
            with pytest.raises(DeviceIOError, match=r"I/O error on .*/image at offset \d+"):
                restore_to_device(pool, "vol0", first.generation_id, target, extent_bytes=EXTENT)
    finally:
        disk.heal()
        pool.close()
    pool = DirPool.open("iopool", [disk.path], mount_root)
    try:
        assert [m.generation_id for m in pool.generations("vol0")] == [first.generation_id]
        restore_to_device(pool, "vol0", first.generation_id, target, extent_bytes=EXTENT)
        assert sha256_of(target) == first_sha
    finally:
        pool.close()
