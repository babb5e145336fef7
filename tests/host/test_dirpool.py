"""The dir pool: registration refusals, reopening, garbage, capacity and the space alert."""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroaring import BitMap

from blockguard.core.vocab import GenerationKind
from blockguard.errors import (
    Busy,
    DeviceInUse,
    DeviceTooSmall,
    PoolDiskRefused,
    PoolSpaceLow,
    ProtectedDevice,
)
from blockguard.storage.backup import run_backup
from blockguard.storage.manifest import MANIFEST_NAME, VolumeIdentity
from blockguard.storage.pool.base import GenerationSpec, SpaceAlert
from blockguard.storage.pool.dirpool import DirPool
from blockguard.storage.pool.gendir import creating
from blockguard.storage.pool.registration import DiskAdmission
from tests.fsutil import frozen

MiB = 1 << 20
POOL_SIZE = 512 * MiB
CHUNK = 64 << 10
#: ext4 made without lazy init: no background writes behind a before/after hash.
LAZY_OFF = "lazy_itable_init=0,lazy_journal_init=0"


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout


def head_sha(dev: str) -> str:
    with open(dev, "rb") as f:
        return hashlib.sha256(f.read(4 * MiB)).hexdigest()


def mounts_under(root: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(root))]


@pytest.fixture
def partitioned(tmp_path: Path) -> Iterator[str]:
    """A loop device with a partition table and one partition (``losetup -P``)."""
    img = tmp_path / "parted.img"
    with open(img, "wb") as f:
        f.truncate(POOL_SIZE)
    # An MBR with one Linux partition at 1 MiB, 64 MiB long (what `sfdisk` would write;
    # written by hand so that the test needs no fdisk package).
    entry = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 2048, 64 * MiB // 512)
    with open(img, "r+b") as f:
        f.seek(446)
        f.write(entry + bytes(48) + b"\x55\xaa")
    dev = run("losetup", "--find", "--show", "-P", str(img)).strip()
    try:
        # This host's kernel does not parse MBRs (CONFIG_MSDOS_PARTITION is off); partx
        # adds the partitions from user space with BLKPG, as a udev-less host would.
        if not Path(f"/sys/class/block/{os.path.basename(dev)}p1").exists():
            run("partx", "-a", dev)
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=60)


def assert_refused(
    dev: str, mount_root: Path, match: str, error: type[Exception] = DeviceInUse, **kw: object
) -> None:
    before = head_sha(dev)
    with pytest.raises(error, match=match):
        DirPool.create("p", dev, mount_root, **kw)  # type: ignore[arg-type]
    assert head_sha(dev) == before, "a refused registration changed the disk"
    assert mounts_under(mount_root) == []
    assert not (mount_root / "p" / "area-0" / "pool.json").exists()


def test_refuses_mounted_disk(loopdev, tmp_path: Path) -> None:
    dev = loopdev(POOL_SIZE)
    run("mkfs.ext4", "-q", "-E", LAZY_OFF, dev)
    mnt = tmp_path / "elsewhere"
    mnt.mkdir()
    run("mount", dev, str(mnt))
    try:
        with frozen(mnt):  # no journal writes behind the hash (tests/fsutil.py)
            assert_refused(dev, tmp_path / "root", f"in use: it is mounted on {mnt}", force=True)
    finally:
        run("umount", str(mnt))


def test_refuses_partitioned_disk_unless_forced(partitioned: str, tmp_path: Path) -> None:
    part = os.path.basename(partitioned) + "p1"
    assert_refused(partitioned, tmp_path / "root", rf"it has partitions \({part}\).*force")
    pool = DirPool.create("p", partitioned, tmp_path / "root", force=True)
    try:
        assert pool.capacity().total > 300 * MiB
        assert not Path(f"/sys/class/block/{part}").exists()  # the kernel forgot them
    finally:
        pool.close()


def test_refuses_disk_with_mounted_partition_even_forced(partitioned: str, tmp_path: Path) -> None:
    part = partitioned + "p1"
    run("mkfs.ext4", "-q", "-E", LAZY_OFF, part)
    mnt = tmp_path / "partmnt"
    mnt.mkdir()
    run("mount", part, str(mnt))
    try:
        with frozen(mnt):  # no journal writes behind the hash (tests/fsutil.py)
            assert_refused(
                partitioned,
                tmp_path / "root",
                f"its partition .*p1 is mounted on {mnt}",
                force=True,
            )
    finally:
        run("umount", str(mnt))


def test_refuses_lvm_physical_volume_unless_forced(loopdev, tmp_path: Path) -> None:
    dev = loopdev(POOL_SIZE)
    with open(dev, "r+b") as f:  # an LVM2 label: "LABELONE" in sector 1
        f.seek(512)
        f.write(b"LABELONE" + bytes(24) + b"LVM2 001")
    assert_refused(dev, tmp_path / "root", "it is an LVM physical volume.*force")
    DirPool.create("p", dev, tmp_path / "root", force=True).close()


def test_refuses_disk_with_filesystem_unless_forced(loopdev, tmp_path: Path) -> None:
    dev = loopdev(POOL_SIZE)
    run("mkfs.ext4", "-q", "-E", LAZY_OFF, dev)
    assert_refused(dev, tmp_path / "root", "it contains a ext4 signature.*force")


def test_refuses_protected_volume_even_forced(loopdev, tmp_path: Path) -> None:
    dev = loopdev(POOL_SIZE)
    assert_refused(
        dev,
        tmp_path / "root",
        f"it is {dev}, the device of protected volume",
        ProtectedDevice,
        protected=[dev],
        force=True,
    )


def test_refuses_too_small_disk(loopdev, tmp_path: Path) -> None:
    dev = loopdev(64 * MiB)
    assert_refused(dev, tmp_path / "root", "too small", DeviceTooSmall, force=True)


@pytest.fixture
def pool(loopdev, tmp_path: Path) -> Iterator[DirPool]:
    p = DirPool.create("p", loopdev(POOL_SIZE, "pool.img"), tmp_path / "root")
    try:
        yield p
    finally:
        p.close()


def test_reopen_after_close_keeps_generations(pool: DirPool, loopdev, tmp_path: Path) -> None:
    vol = loopdev(8 * MiB)
    m = run_backup(pool, VolumeIdentity("v", 8 * MiB), vol, "full", None, chunk_size=CHUNK)
    devices = [d.path for d in pool.devices()]
    pool.close()
    assert mounts_under(tmp_path / "root") == []
    again = DirPool.open("p", devices, tmp_path / "root")
    try:
        assert [g.generation_id for g in again.generations()] == [m.manifest.generation_id]
        assert again.volumes() == ["v"]
    finally:
        again.close()


def test_open_removes_uncommitted_but_not_live_writers(pool: DirPool, loopdev) -> None:
    vol = loopdev(8 * MiB)
    ident = VolumeIdentity("v", 8 * MiB)
    run_backup(pool, ident, vol, "full", None, chunk_size=CHUNK)
    area = Path(pool.devices()[0].area)
    dead = area / "volumes" / "v" / "20200101T000000.000000Z-deadbeef"
    dead.mkdir()
    (dead / "image").write_bytes(b"x" * 4096)
    # A writer killed between its mkdir and its lock file: an empty directory, just made.
    # Nothing of this process is creating it, so it is garbage at once (a reopen within
    # seconds of the kill, as after a quick daemon restart, must not keep it).
    empty = area / "volumes" / "v" / "20200101T000000.000002Z-0badf00d"
    empty.mkdir()
    # One this process's writer is creating right now (mkdir done, lock not yet held).
    creating_now = area / "volumes" / "v" / "20200101T000000.000003Z-c0ffee00"
    half_removed = area / "volumes" / "v" / "20200101T000000.000001Z-00000000.deleted"
    half_removed.mkdir()
    (half_removed / MANIFEST_NAME).write_text("{}")
    live = pool.begin_generation(GenerationSpec(ident, GenerationKind.FULL, CHUNK))
    with live, creating(creating_now):
        creating_now.mkdir()
        removed = pool.collect_garbage()
        assert sorted(removed) == sorted([str(dead), str(empty), str(half_removed)])
        assert live.dir.exists() and creating_now.exists()
        assert len(pool.generations("v")) == 1
    assert not live.dir.exists()  # left without commit: aborted


def test_corrupt_manifest_is_reported_not_deleted(pool: DirPool, loopdev) -> None:
    vol = loopdev(8 * MiB)
    m = run_backup(pool, VolumeIdentity("v", 8 * MiB), vol, "full", None, chunk_size=CHUNK)
    path = pool._gen_dir("v", m.manifest.generation_id) / MANIFEST_NAME
    path.write_text(path.read_text().replace('"bytes_stored": ', '"bytes_stored": 1'))
    assert pool.generations("v") == []
    assert pool.damaged == [str(path.parent)]
    pool.collect_garbage()
    assert path.exists()


def test_add_device_grows_capacity(pool: DirPool, loopdev) -> None:
    before = pool.capacity()
    dev = pool.add_device(loopdev(POOL_SIZE, "second.img"))
    after = pool.capacity()
    assert len(pool.devices()) == 2 and dev.area.endswith("area-1")
    assert after.total > before.total + 300 * MiB
    with pytest.raises(PoolDiskRefused, match=f"it is {dev.path}, a disk of pool p"):
        pool.add_device(dev.path, DiskAdmission(force=True))


def test_space_alert_and_refusal(loopdev, tmp_path: Path) -> None:
    alerts: list[SpaceAlert] = []
    dev = loopdev(POOL_SIZE, "pool.img")
    pool = DirPool.create("p", dev, tmp_path / "root", alert=alerts.append)
    try:
        big = loopdev(1024 * MiB, "big.img")  # sparse: larger than the pool
        with pytest.raises(PoolSpaceLow, match=r"pool p has \d+ bytes free"):
            run_backup(pool, VolumeIdentity("big", 1024 * MiB), big, "full", None, chunk_size=CHUNK)
        assert alerts and alerts[0].needed == 1024 * MiB and alerts[0].volume == "big"
        assert pool.generations() == []
        assert pool.check_space(1) is None
    finally:
        pool.close()


def test_removal_refuses_a_generation_others_depend_on(pool: DirPool, loopdev) -> None:
    vol = loopdev(8 * MiB)
    ident = VolumeIdentity("v", 8 * MiB)
    full = run_backup(pool, ident, vol, "full", None, chunk_size=CHUNK).manifest
    incr = run_backup(
        pool, ident, vol, "incremental", BitMap([1]), chunk_size=CHUNK, parent_id=full.generation_id
    ).manifest
    with pytest.raises(Busy, match=incr.generation_id):
        pool.remove_generation("v", full.generation_id)
    freed = pool.remove_generation("v", incr.generation_id)
    assert freed.bytes == CHUNK
    pool.remove_generation("v", full.generation_id)
    assert pool.generations("v") == []
    with contextlib.suppress(FileNotFoundError):
        assert list((Path(pool.devices()[0].area) / "volumes" / "v").iterdir()) == []
