"""What a ``restore-files`` restores, decided from a generation's file list: the
entries chosen, checked, and their wire form for the client that writes them.

The daemon decides; the CLI writes, in the caller's mount namespace (under its systemd
unit the daemon sees a read-only, partly private file system): it reads each file's
bytes from the read-only loop device the daemon serves over the generation's
checksum-verified image (docs/design/browse.md) and writes files, links, symlinks,
xattrs, owner, mode and times (:mod:`blockguard.cli.filewriter`, the one writer).

Everything the list can refuse is refused before the device is served, so before the
first byte is written: a path the list does not hold, a file kept *by content* (not on
the volume: this slice stores no content) or *unsettled* (it changed during its
backup), a path of the list that would leave the target directory. Existing files in
the target are the client's check (the target is in its namespace).
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from blockguard.errors import CorruptMetadata, InvalidInput, NotFound
from blockguard.storage.filelists import StoredFileList
from blockguard.storage.filemap import FileEntry

#: The format of the entries sent to the writer; it refuses a newer one by name.
ITEMS_VERSION = 1


@dataclass(frozen=True)
class FilesRestore:
    """What a restore of files will write (decided before anything is written)."""

    entries: tuple[FileEntry, ...]
    #: Bytes to read from the image (the files' data on the volume).
    data_bytes: int

    @property
    def files(self) -> int:
        return sum(1 for e in self.entries if e.kind != "dir")


def plan_files(stored: StoredFileList, paths: Sequence[str]) -> FilesRestore:
    """The entries of ``stored`` to restore (``paths``: those paths and what is below
    them; none: all), checked.

    :raises NotFound: a path the list does not hold.
    :raises InvalidInput: a selected file is kept by content or unsettled (named).
    :raises CorruptMetadata: a path of the list is not a plain relative path.
    """
    for entry in stored.files.entries:
        _check_relative(entry.path)
    chosen = _with_own_data(_select(stored.files.entries, paths), stored.files.entries)
    refused = [e.path for e in chosen if e.by_content]
    if refused:
        raise InvalidInput(
            detail=f"not restorable from the volume's blocks (inline, encoded or "
            f"encrypted data, kept by content): {', '.join(refused[:20])}"
        )
    unsettled = set(stored.unsettled) & {e.path for e in chosen}
    if unsettled:
        raise InvalidInput(
            detail="changed while this generation was taken, so its bytes cannot be vouched "
            f"for: {', '.join(sorted(unsettled)[:20])}"
        )
    data = sum(length for e in chosen if e.link_to is None for _, length in e.volume_ranges())
    return FilesRestore(tuple(chosen), data)


def encode_items(plan: FilesRestore) -> bytes:
    """The planned entries as the writer takes them (compressed JSON): per entry its
    path, kind, size, metadata, and the byte ranges to copy as ``[file offset, volume
    offset, length]`` (cut to the size; holes and unwritten extents left out: they stay
    holes)."""
    items = []
    for e in plan.entries:
        item: dict[str, Any] = {
            "path": e.path,
            "kind": e.kind,
            "size": e.size,
            "mode": e.mode,
            "uid": e.uid,
            "gid": e.gid,
            "mtime_ns": e.mtime_ns,
            "atime_ns": e.atime_ns,
        }
        if e.xattrs:
            item["xattrs"] = {k: base64.b64encode(v).decode() for k, v in e.xattrs.items()}
        if e.link_to is not None:
            item["link_to"] = e.link_to
        elif e.kind == "file":
            item["ranges"] = [
                [x.logical, x.physical, min(x.length, e.size - x.logical)]
                for x in e.extents
                if not x.zeros and x.logical < e.size
            ]
        if e.target is not None:
            item["target"] = e.target
        items.append(item)
    doc = {"version": ITEMS_VERSION, "entries": items}
    return gzip.compress(json.dumps(doc, separators=(",", ":")).encode(), mtime=0)


def _with_own_data(chosen: list[FileEntry], entries: Sequence[FileEntry]) -> list[FileEntry]:
    """A hard link whose first path is not restored with it carries that path's data
    (and is the first of its inode for the links after it)."""
    every = {e.path: e for e in entries}
    first_of: dict[str, str] = {}
    result = []
    picked = {e.path for e in chosen}
    for entry in chosen:
        if entry.link_to is not None and entry.link_to not in picked:
            if entry.link_to in first_of:
                entry = dataclasses.replace(entry, link_to=first_of[entry.link_to])
            else:
                first = every.get(entry.link_to)
                if first is None:
                    raise CorruptMetadata(
                        detail=f"the file list links {entry.path} to {entry.link_to}, "
                        "which it does not hold"
                    )
                first_of[entry.link_to] = entry.path
                entry = dataclasses.replace(
                    entry, link_to=None, extents=first.extents, by_content=first.by_content
                )
        result.append(entry)
    return result


def _check_relative(path: str) -> None:
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts or str(pure) in (".", ""):
        raise CorruptMetadata(
            detail=f"the file list holds a path {path!r} that is not below its root"
        )


def _select(entries: Sequence[FileEntry], paths: Sequence[str]) -> list[FileEntry]:
    if not paths:
        return list(entries)
    wanted = [str(PurePosixPath(p.strip("/"))) for p in paths]
    missing = [
        p for p in wanted if not any(e.path == p or e.path.startswith(p + "/") for e in entries)
    ]
    if missing:
        raise NotFound(what="path in the file list", name=", ".join(missing))
    chosen = [e for e in entries if any(e.path == p or e.path.startswith(p + "/") for p in wanted)]
    # The directories above a chosen path come along (created, their metadata kept).
    parents = {str(q) for e in chosen for q in PurePosixPath(e.path).parents if str(q) != "."}
    picked = {e.path for e in chosen} | parents
    return [e for e in entries if e.path in picked]
