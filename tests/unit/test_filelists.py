"""Stored file lists: a list read back is the list written (xattrs, extents, links,
symlinks, the unsettled files); a damaged or newer one is refused by name; a group's
changed bytes are exactly the bytes of its ranges inside the changed chunks."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from pyroaring import BitMap

from blockguard.errors import CorruptMetadata
from blockguard.storage.filelists import (
    StoredFileList,
    bytes_in_chunks,
    decode_file_list,
    encode_file_list,
)
from blockguard.storage.filemap import Extent, ExtentFlag, FileEntry, FileList

COMMON = {"mode": 0o640, "uid": 7, "gid": 8, "mtime_ns": 123, "atime_ns": 456, "nlink": 1}


def test_round_trip() -> None:
    files = FileList(
        "/mnt/x",
        2049,
        (
            FileEntry("d", "dir", 4096, inode=2, xattrs={"user.a": b"\0\xff"}, **COMMON),
            FileEntry(
                "d/f",
                "file",
                5000,
                inode=3,
                extents=(
                    Extent(0, 1 << 20, 4096, ExtentFlag(0)),
                    Extent(4096, 9 << 20, 4096, ExtentFlag.LAST | ExtentFlag.UNWRITTEN),
                ),
                **COMMON,
            ),
            FileEntry("d/g", "file", 5000, inode=3, link_to="d/f", **COMMON),
            FileEntry("d/l", "symlink", 3, inode=4, target="f", **COMMON),
            FileEntry("d/i", "file", 10, inode=5, by_content=True, **COMMON),
        ),
    )
    stored = StoredFileList("conf", files, ("d/i",))
    assert decode_file_list(encode_file_list(stored), "here") == stored


def test_damaged_or_newer_refused() -> None:
    with pytest.raises(CorruptMetadata, match="db/g1/filelist"):
        decode_file_list(b"not gzip", "db/g1/filelist")
    newer = gzip.compress(json.dumps({"version": 99, "group": "g", "entries": []}).encode())
    with pytest.raises(CorruptMetadata, match="format 99 is newer"):
        decode_file_list(newer, "db/g1/filelist")


def test_bytes_in_chunks() -> None:
    cs = 4096
    # A range from the middle of chunk 1 to the middle of chunk 4; chunks 1 and 3 changed.
    ranges = [(cs + 100, 3 * cs + 50), (10 * cs, cs)]
    assert bytes_in_chunks(ranges, BitMap([1, 3]), cs) == (cs - 100) + cs
    assert bytes_in_chunks(ranges, BitMap([4]), cs) == 150
    assert bytes_in_chunks(ranges, BitMap([10, 11]), cs) == cs
    assert bytes_in_chunks(ranges, BitMap(), cs) == 0
    assert bytes_in_chunks(ranges, BitMap(range(20)), cs) == 3 * cs + 50 + cs
    # Within one chunk.
    assert bytes_in_chunks([(cs + 10, 20)], BitMap([1]), cs) == 20


def test_restore_plan_refusals(tmp_path: Path) -> None:
    from blockguard.cli.filewriter import check_target, decode_items
    from blockguard.errors import AlreadyExists, InvalidInput, NotFound
    from blockguard.storage.filerestore import encode_items, plan_files

    ext = (Extent(0, 1 << 20, 4096, ExtentFlag.LAST),)
    files = FileList(
        "/mnt",
        1,
        (
            FileEntry("d", "dir", 4096, inode=2, **COMMON),
            FileEntry("d/f", "file", 4000, inode=3, extents=ext, **COMMON),
            FileEntry("d/inline", "file", 10, inode=4, by_content=True, **COMMON),
            FileEntry("d/moving", "file", 4000, inode=5, extents=ext, **COMMON),
        ),
    )
    stored = StoredFileList("g", files, ("d/moving",))
    plan = plan_files(stored, ["d/f"])
    assert [e.path for e in plan.entries] == ["d", "d/f"] and plan.data_bytes == 4000
    with pytest.raises(InvalidInput, match="d/inline"):
        plan_files(stored, ["d/inline"])
    with pytest.raises(InvalidInput, match="d/moving"):
        plan_files(stored, ["d/moving"])
    with pytest.raises(NotFound, match="d/nope"):
        plan_files(stored, ["d/nope"])
    escaping = FileEntry("../x", "file", 1, inode=9, **COMMON)
    bad = StoredFileList("g", FileList("/mnt", 1, (escaping,)))
    with pytest.raises(CorruptMetadata, match=r"\.\./x"):
        plan_files(bad, [])

    # What the client writes: the file's data cut to its size, at its place on the volume.
    items = decode_items(encode_items(plan))
    assert [(i.path, i.kind, i.ranges) for i in items] == [
        ("d", "dir", ()),
        ("d/f", "file", ((0, 1 << 20, 4000),)),
    ]
    check_target(items, tmp_path, overwrite=False)
    (tmp_path / "d").mkdir()  # an existing directory is no conflict
    check_target(items, tmp_path, overwrite=False)
    (tmp_path / "d/f").write_bytes(b"mine")
    with pytest.raises(AlreadyExists, match="d/f"):
        check_target(items, tmp_path, overwrite=False)
    check_target(items, tmp_path, overwrite=True)
    with pytest.raises(InvalidInput, match="not a directory"):
        check_target(items, tmp_path / "d/f", overwrite=True)


def test_the_writer_refuses_paths_leaving_the_target() -> None:
    import gzip
    import json

    from blockguard.cli.filewriter import decode_items

    entry = {"kind": "file", "size": 1, "mode": 0o100644, "uid": 0, "gid": 0}
    entry |= {"mtime_ns": 0, "atime_ns": 0}
    for path, link in (("../x", None), ("/etc/x", None), ("a", "../b")):
        raw = {**entry, "path": path, **({"link_to": link} if link else {})}
        doc = gzip.compress(json.dumps({"version": 1, "entries": [raw]}).encode())
        with pytest.raises(CorruptMetadata, match="not below the target"):
            decode_items(doc)
    newer = gzip.compress(json.dumps({"version": 99, "entries": []}).encode())
    with pytest.raises(CorruptMetadata, match="newer"):
        decode_items(newer)
