"""A group's file list as stored with a generation: compressed JSON beside its manifest.

The file list (:class:`~blockguard.storage.filemap.FileList`) is kept in the generation's
directory on the pool (``filelist.GROUP.json.gz``), so it goes wherever the generation
goes (an import on a new host has it) and is removed with it. xattr values are bytes:
stored in base64.
"""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pyroaring import BitMap

from blockguard.errors import CorruptMetadata
from blockguard.storage.filemap import Extent, ExtentFlag, FileEntry, FileList

#: The format of a stored file list; a reader refuses a newer one by name.
FILE_LIST_VERSION = 1


def file_list_name(group: str) -> str:
    """The file a group's list is stored in, in a generation's directory."""
    return f"filelist.{group}.json.gz"


@dataclass(frozen=True)
class StoredFileList:
    """A group's file list as one generation keeps it.

    ``unsettled`` names the files that changed between the list and the end of the
    generation's copy (their bytes in the generation may be of either moment):
    ``restore-files`` refuses them by name rather than write bytes nobody can vouch for.
    """

    group: str
    files: FileList
    unsettled: tuple[str, ...] = ()


def encode_file_list(stored: StoredFileList) -> bytes:
    """A file list as the compressed JSON document stored with a generation."""
    files = stored.files
    doc = {
        "version": FILE_LIST_VERSION,
        "group": stored.group,
        "root": files.root,
        "device": files.device,
        "unsettled": list(stored.unsettled),
        "entries": [_entry_doc(e) for e in files.entries],
    }
    return gzip.compress(json.dumps(doc, separators=(",", ":")).encode(), mtime=0)


def decode_file_list(data: bytes, where: str) -> StoredFileList:
    """A stored document read back.

    :raises CorruptMetadata: it is not one, or of a newer format.
    """
    try:
        doc = json.loads(gzip.decompress(data))
        if doc["version"] > FILE_LIST_VERSION:
            raise CorruptMetadata(
                detail=f"{where}: file list format {doc['version']} is newer than this "
                f"blockguard knows ({FILE_LIST_VERSION})"
            )
        entries = tuple(_entry(e) for e in doc["entries"])
        files = FileList(doc["root"], doc["device"], entries)
        return StoredFileList(doc["group"], files, tuple(doc.get("unsettled", ())))
    except (OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise CorruptMetadata(detail=f"{where}: not a readable file list ({exc})") from None


def _entry_doc(entry: FileEntry) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "path": entry.path,
        "kind": entry.kind,
        "size": entry.size,
        "mode": entry.mode,
        "uid": entry.uid,
        "gid": entry.gid,
        "mtime_ns": entry.mtime_ns,
        "atime_ns": entry.atime_ns,
        "inode": entry.inode,
        "nlink": entry.nlink,
    }
    if entry.xattrs:
        doc["xattrs"] = {k: base64.b64encode(v).decode() for k, v in entry.xattrs.items()}
    if entry.extents:
        doc["extents"] = [[e.logical, e.physical, e.length, int(e.flags)] for e in entry.extents]
    if entry.by_content:
        doc["by_content"] = True
    if entry.link_to is not None:
        doc["link_to"] = entry.link_to
    if entry.target is not None:
        doc["target"] = entry.target
    return doc


def _entry(doc: dict[str, Any]) -> FileEntry:
    return FileEntry(
        path=doc["path"],
        kind=doc["kind"],
        size=doc["size"],
        mode=doc["mode"],
        uid=doc["uid"],
        gid=doc["gid"],
        mtime_ns=doc["mtime_ns"],
        atime_ns=doc["atime_ns"],
        inode=doc["inode"],
        nlink=doc["nlink"],
        xattrs={k: base64.b64decode(v) for k, v in doc.get("xattrs", {}).items()},
        extents=tuple(Extent(a, b, c, ExtentFlag(f)) for a, b, c, f in doc.get("extents", ())),
        by_content=bool(doc.get("by_content", False)),
        link_to=doc.get("link_to"),
        target=doc.get("target"),
    )


def bytes_in_chunks(ranges: Sequence[tuple[int, int]], chunks: BitMap, chunk_size: int) -> int:
    """How many bytes of ``ranges`` (volume byte ranges, not overlapping) lie in
    ``chunks``: a generation's changed chunks ∩ a group's extents, the group's changed
    bytes in that generation (the per-group change table of the seed)."""
    total = 0
    for offset, length in ranges:
        if length <= 0:
            continue
        end = offset + length
        first, last = offset // chunk_size, (end - 1) // chunk_size
        hit = chunks.range_cardinality(first, last + 1) * chunk_size
        if first in chunks:
            hit -= offset - first * chunk_size
        if last in chunks:
            hit -= (last + 1) * chunk_size - end
        total += hit
    return total
