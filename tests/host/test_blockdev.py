"""The verified-open rule, on real loop devices."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blockguard.errors import NotABlockDevice
from blockguard.storage.blockdev import BlockDevice, aligned_buffer, in_use_reasons, sync_written


def test_regular_file_is_refused_and_not_written(tmp_path: Path) -> None:
    f = tmp_path / "not-a-device"
    f.write_bytes(b"x" * 4096)
    with pytest.raises(NotABlockDevice, match=r"not-a-device is not a block device.*regular file"):
        BlockDevice(f, write=True)
    assert f.read_bytes() == b"x" * 4096


def test_missing_path_is_refused_and_never_created(tmp_path: Path) -> None:
    missing = tmp_path / "mapper-node-that-udev-never-made"
    with pytest.raises(NotABlockDevice, match="does not exist"):
        BlockDevice(missing, write=True)
    assert not missing.exists()


def test_wrong_device_is_refused(loopdev) -> None:
    a, b = loopdev(1 << 20), loopdev(1 << 20)
    with pytest.raises(NotABlockDevice, match="expected"):
        BlockDevice(a, expect_rdev=os.stat(b).st_rdev)


def test_direct_io_roundtrip(loopdev) -> None:
    dev = loopdev(4 << 20)
    buf = aligned_buffer(1 << 20)
    buf[:] = os.urandom(1 << 20)
    with BlockDevice(dev, write=True, direct=True) as bd:
        assert bd.size == 4 << 20
        bd.pwrite_all(memoryview(buf), 1 << 20)
        bd.flush()
        back = aligned_buffer(1 << 20)
        assert bd.pread_into(memoryview(back), 1 << 20) == 1 << 20
    assert back[:] == buf[:]


def test_in_use_reasons_names_mount_and_lvm_label(loopdev, tmp_path: Path) -> None:
    import subprocess

    dev = loopdev(32 << 20)
    assert in_use_reasons(dev) == []
    lazy_off = "lazy_itable_init=0,lazy_journal_init=0"
    subprocess.run(["mkfs.ext4", "-q", "-E", lazy_off, dev], check=True, timeout=60)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", dev, str(mnt)], check=True, timeout=60)
    try:
        assert any(f"mounted on {mnt}" in r for r in in_use_reasons(dev))
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=60)
    pv = loopdev(8 << 20)
    with BlockDevice(pv, write=True) as bd:
        bd.pwrite_all(b"\0" * 512 + b"LABELONE" + b"\0" * 504, 0)
    assert "it is an LVM physical volume" in in_use_reasons(pv)


def test_sync_written_puts_a_mounted_file_systems_cached_writes_on_the_device(
    loopdev, tmp_path: Path
) -> None:
    import subprocess

    dev = loopdev(32 << 20)
    lazy_off = "lazy_itable_init=0,lazy_journal_init=0"
    subprocess.run(["mkfs.ext4", "-q", "-E", lazy_off, dev], check=True, timeout=60)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", dev, str(mnt)], check=True, timeout=60)
    try:
        marker = os.urandom(64 << 10)
        (mnt / "f").write_bytes(marker)  # in the page cache, not fsynced
        sync_written(dev)
        with BlockDevice(dev, direct=True) as d:
            buf = aligned_buffer(32 << 20)
            d.pread_into(memoryview(buf), 0)
            assert marker in bytes(buf), "the file's data is not on the device"
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=60)
