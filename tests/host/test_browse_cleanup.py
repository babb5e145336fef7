"""The cleanup of a recorded browse mount touches only what is still its own: a file
system mounted at the recorded mount point from another device stays mounted, and a loop
device now bound to another file stays attached (a restarted daemon may find the names of
a stale record reused by someone else)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from blockguard.storage.browse import MountRecord, loop_backing_file, mounted_at, teardown
from blockguard.storage.runner import default_runner
from tests.support.devices import MiB


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
