"""The cleanup of a recorded browse mount touches only what is still its own: a file
system mounted at the recorded mount point from another device stays mounted, and a loop
device now bound to another file stays attached (a restarted daemon may find the names of
a stale record reused by someone else)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from blockguard.storage.browse import (
    MountRecord,
    boot_id,
    loop_backing_file,
    loop_diskseq,
    mounted_at,
    teardown,
)
from blockguard.storage.fuse import FuseFile
from blockguard.storage.runner import default_runner
from tests.support.devices import MiB
from tests.timeouts import scaled


def test_teardown_leaves_what_is_not_ours(loopdev: Callable[..., str], tmp_path: Path) -> None:
    other_loop = loopdev(8 * MiB, "other.img")
    point = tmp_path / "point"
    point.mkdir()
    fuse_dir = tmp_path / "fuse"
    fuse_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "bgtest", str(point)], check=True)
    try:
        record = MountRecord(
            name="x",
            volume="db",
            pool="p1",
            generation="db@g",
            chain=("g",),
            mountpoint=str(point),
            fuse_dir=str(fuse_dir),
            loop=other_loop,
            fstype="ext4",
        )
        teardown(record, default_runner())
        assert mounted_at(str(point)) == ("tmpfs", "bgtest")
        assert loop_backing_file(other_loop) == str(tmp_path / "other.img")
        assert not fuse_dir.exists()  # ours, empty: removed
    finally:
        subprocess.run(["umount", str(point)], check=False, timeout=60)


def test_teardown_finds_its_loop_by_identity_not_path(tmp_path: Path) -> None:
    """A record saved before its loop device (a kill between losetup and the save) finds
    it by the image's device and inode, also once the FUSE mount is detached and sysfs
    names the backing file just "/image"; a record of another boot touches nothing."""
    data = bytes(range(256)) * 4096
    fuse_dir = tmp_path / "fuse"
    fuse_dir.mkdir()
    server = FuseFile(fuse_dir, "image", len(data), lambda at, size: data[at : at + size])
    server.start()
    loop, seq = "", None
    try:
        st = os.stat(fuse_dir / "image")
        loop = subprocess.run(
            ["losetup", "--find", "--show", "--read-only", str(fuse_dir / "image")],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
        seq = loop_diskseq(loop)
        subprocess.run(["umount", "-l", str(fuse_dir)], check=True, timeout=60)
        assert loop_backing_file(loop) == "/image"
        record = MountRecord(
            name="x",
            volume="db",
            pool="p1",
            generation="db@g",
            chain=("g",),
            mountpoint=str(tmp_path / "point"),
            fuse_dir=str(fuse_dir),
            boot="another boot",
            image_dev=f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}",
            image_ino=st.st_ino,
        )
        teardown(record, default_runner())
        assert loop_diskseq(loop) == seq
        teardown(replace(record, boot=boot_id()), default_runner())
        assert loop_diskseq(loop) is None
        assert server.stop(timeout=scaled(30))  # the loop let go: the kernel ended the FUSE
    finally:
        if loop and seq is not None and loop_diskseq(loop) == seq:
            subprocess.run(["losetup", "-d", loop], check=False, timeout=60)
        server.stop(timeout=scaled(30))
