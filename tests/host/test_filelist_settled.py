"""A file group's list taken before a backup is checked after its copy: a file appended
to, replaced or removed since is named unsettled (restore-files refuses it); files left
alone are not. ext4 on a loop device (FIEMAP needs a real file system)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockguard.engine.filegroups import FileListCapture
from blockguard.storage.filemap import build_file_list
from tests.support.devices import LoopFactory

MiB = 1 << 20


@pytest.fixture
def mounted(loopdev: LoopFactory, tmp_path: Path) -> Iterator[Path]:
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 is not installed")
    dev = loopdev(32 * MiB, "ext4.img")
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, capture_output=True, timeout=120)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", dev, str(mnt)], check=True, timeout=60)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60)


def test_files_changed_after_the_list_are_unsettled(mounted: Path) -> None:
    d = mounted / "d"
    d.mkdir()
    for name in ("same", "appended", "replaced", "removed"):
        (d / name).write_bytes(name.encode() * 20_000)
    capture = FileListCapture("g", build_file_list(mounted, ["d"]))
    assert capture.settled().unsettled == ()

    with open(d / "appended", "ab") as f:
        f.write(b"more")
    (d / "replaced").unlink()
    (d / "replaced").write_bytes(b"replaced" * 20_000)  # same size, another inode
    (d / "removed").unlink()
    stored = capture.settled()
    assert sorted(stored.unsettled) == ["d/appended", "d/removed", "d/replaced"]
    assert stored.files is capture.files
