"""Device keys of real loop devices: the backing file, not the number, tells them apart."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from blockguard.storage.devidentity import device_key, find_device
from tests.support.devices import LoopFactory, MiB


def test_a_loop_key_is_its_backing_file_and_is_found_under_another_number(
    loopdev: LoopFactory, tmp_path: Path
) -> None:
    dev = loopdev(4 * MiB, "a.img")
    other = loopdev(4 * MiB, "b.img")
    backing = tmp_path / "a.img"
    st = os.stat(backing)
    key = device_key(dev)
    assert key.stable is not None
    assert key.stable.startswith(f"loop:{backing}#{st.st_ino}:"), key
    assert key.stable.endswith("@0")
    assert not key.numbered_by_hardware
    assert str(backing) in key.shown and dev in key.shown
    assert device_key(other).stable != key.stable
    assert find_device(key.stable) == dev

    # The same file under another number has the same key; the old number, given to a
    # file re-created at the same path, has another (a new inode).
    subprocess.run(["losetup", "-d", dev], check=True, timeout=30)
    loopdev.devices.remove(dev)
    moved = loopdev(4 * MiB, "c.img")  # takes a number (maybe dev's) before a.img returns
    again = subprocess.run(
        ["losetup", "--find", "--show", str(backing)],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()
    loopdev.devices.append(again)
    assert device_key(again).stable == key.stable
    assert find_device(key.stable) == again
    assert device_key(moved).stable != key.stable

    subprocess.run(["losetup", "-d", again], check=True, timeout=30)
    loopdev.devices.remove(again)
    backing.unlink()
    recreated = loopdev(4 * MiB, "a.img")  # ext4 may well give it a.img's old inode
    assert device_key(recreated).stable != key.stable
    assert find_device(key.stable) is None
