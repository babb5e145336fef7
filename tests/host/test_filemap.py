"""The file list of a group, read with FIEMAP from a real file system on a loop device
(ext4 and XFS): every file rebuilt from the volume's bytes at its extents (holes and
unwritten extents as zeros) equals the file as the file system reads it — written,
appended, sparse, preallocated and partly written, hard-linked, in subdirectories; its
metadata is listed; bad paths are named and nothing is listed."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockguard.errors import InvalidInput, NotFound
from blockguard.storage.filemap import FileEntry, build_file_list
from tests.support.devices import LoopFactory

MiB = 1 << 20
FILESYSTEMS = {
    "ext4": (["mkfs.ext4", "-q", "-F"], []),
    "xfs": (["mkfs.xfs", "-q", "-f"], []),
}


@pytest.fixture(params=sorted(FILESYSTEMS))
def mounted(request: pytest.FixtureRequest, loopdev: LoopFactory, tmp_path: Path) -> Iterator:
    mkfs, options = FILESYSTEMS[request.param]
    if shutil.which(mkfs[0]) is None:
        pytest.skip(f"{mkfs[0]} is not installed")
    dev = loopdev(300 * MiB, f"{request.param}.img")
    subprocess.run([*mkfs, dev], check=True, capture_output=True, timeout=120)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", *options, dev, str(mnt)], check=True, timeout=60)
    try:
        yield dev, mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60)


def populate(root: Path, rng: random.Random) -> None:
    (root / "etc").mkdir()
    (root / "etc" / "app.conf").write_bytes(rng.randbytes(5000))
    os.chmod(root / "etc" / "app.conf", 0o640)
    os.chown(root / "etc" / "app.conf", 1234, 5678)
    os.setxattr(root / "etc" / "app.conf", "user.origin", b"deploy-42")
    with open(root / "etc" / "log", "wb") as f:
        f.write(rng.randbytes(3 * MiB + 17))
    with open(root / "etc" / "log", "ab") as f:  # appended later, maybe elsewhere
        f.write(rng.randbytes(MiB))
    with open(root / "sparse", "wb") as f:
        f.truncate(16 * MiB)
        f.seek(5 * MiB + 4096)
        f.write(rng.randbytes(200_000))
    with open(root / "prealloc", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 8 * MiB)
        f.seek(MiB)
        f.write(rng.randbytes(300_000))
    os.link(root / "etc" / "log", root / "log.hardlink")
    (root / "data").mkdir()
    for n in range(20):
        (root / "data" / f"f{n:02d}").write_bytes(rng.randbytes(rng.randrange(1, 400_000)))
    os.symlink("etc/app.conf", root / "conf")
    (root / "empty").write_bytes(b"")


def rebuilt(dev: str, entry: FileEntry) -> bytes:
    data = bytearray(entry.size)
    with open(dev, "rb", buffering=0) as volume:
        for ext in entry.extents:
            if ext.zeros or ext.logical >= entry.size:
                continue
            assert ext.on_volume, (entry.path, ext)
            length = min(ext.length, entry.size - ext.logical)
            data[ext.logical : ext.logical + length] = os.pread(
                volume.fileno(), length, ext.physical
            )
    return bytes(data)


def test_every_file_rebuilt_from_its_extents_equals_its_content(mounted: tuple) -> None:
    dev, root = mounted
    populate(root, random.Random(11))
    files = build_file_list(
        root, ["etc", "sparse", "prealloc", "log.hardlink", "data", "conf", "empty"]
    )
    expected = {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink()
    }
    os.sync()
    subprocess.run(["umount", str(root)], check=True, timeout=60)
    by_path = {e.path: e for e in files.entries}
    assert set(by_path) == {*expected, "etc", "data", "conf"}
    for path, digest in expected.items():
        entry = by_path[path]
        assert entry.kind == "file" and not entry.by_content, path
        source = by_path[entry.link_to] if entry.link_to else entry
        assert hashlib.sha256(rebuilt(dev, source)).hexdigest() == digest, path
    assert by_path["log.hardlink"].link_to == "etc/log"
    conf = by_path["etc/app.conf"]
    assert (conf.mode, conf.uid, conf.gid) == (0o640, 1234, 5678)
    assert conf.xattrs == {"user.origin": b"deploy-42"}
    assert by_path["conf"].kind == "symlink" and by_path["conf"].target == "etc/app.conf"
    assert by_path["data"].kind == "dir" and by_path["empty"].extents == ()
    # Holes and the unwritten part of a preallocation need no bytes of the volume.
    assert sum(n for _, n in by_path["sparse"].volume_ranges()) <= 200_000 + 2 * 4096
    assert sum(n for _, n in by_path["prealloc"].volume_ranges()) <= 300_000 + 2 * 4096
    merged = files.ranges()
    assert merged == sorted(merged)
    assert all(a + n < b for (a, n), (b, _) in itertools.pairwise(merged))
    assert sum(n for _, n in merged) == sum(
        n for e in files.entries if not e.link_to for _, n in e.volume_ranges()
    )


def test_bad_paths_are_named_and_nothing_is_listed(mounted: tuple, tmp_path: Path) -> None:
    _, root = mounted
    (root / "a").write_bytes(b"x")
    os.symlink("/etc", root / "out")
    with pytest.raises(InvalidInput, match=r"must not contain '\.\.'"):
        build_file_list(root, ["a/../../x"])
    with pytest.raises(InvalidInput, match="is not below"):
        build_file_list(root, [str(tmp_path)])
    with pytest.raises(InvalidInput, match=r"leaves .* through a symlink"):
        build_file_list(root, ["out/passwd"])
    with pytest.raises(NotFound, match="nothing-here"):
        build_file_list(root, ["nothing-here"])
    with pytest.raises(InvalidInput, match="not the file system of the volume"):
        build_file_list(root, ["a"], device=os.stat("/").st_dev)
    assert [e.path for e in build_file_list(root, ["a"], device=os.stat(root).st_dev).entries] == [
        "a"
    ]


def test_a_file_system_mounted_below_is_not_listed(mounted: tuple) -> None:
    _, root = mounted
    (root / "keep").write_bytes(b"mine")
    (root / "other").mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root / "other")], check=True
    )
    try:
        (root / "other" / "theirs").write_bytes(b"not on the volume")
        listed = [e.path for e in build_file_list(root, ["."]).entries]
    finally:
        subprocess.run(["umount", str(root / "other")], check=True, timeout=60)
    assert "keep" in listed and not any(p.startswith("other") for p in listed)
