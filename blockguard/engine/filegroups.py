"""File groups (issue 13): ``filegroup create NAME --volume V PATH...``, list, show, remove.

A group names paths on the file system of a protected volume, relative to the volume's
mount point, which is found when the group is created (and at each backup) from the
mount table by the volume's device number: the group follows the volume wherever it is
mounted, and is refused while it is not mounted (its paths could not be checked).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blockguard.core.catalog import Catalog, FileGroup
from blockguard.errors import BlockguardError, InvalidInput, NotFound
from blockguard.storage.filelists import (
    StoredFileList,
    bytes_in_chunks,
    decode_file_list,
    encode_file_list,
    file_list_name,
)
from blockguard.storage.filemap import (
    FileList,
    build_file_list,
    file_extents,
    mount_point_of,
    relative_path,
)
from blockguard.storage.pool.base import PoolBackend

log = logging.getLogger(__name__)


def mounted_root(catalog: Catalog, volume: str) -> Path:
    """The mount point of ``volume``'s file system.

    :raises NotFound: no such volume (or its device is gone).
    :raises InvalidInput: its file system is not mounted.
    """
    vol = catalog.get_volume(volume)
    point = mount_point_of(vol.device_path)
    if point is None:
        raise InvalidInput(
            detail=f"the file system of volume {volume} ({vol.device_path}) is not mounted: "
            "a file group's paths are checked on it"
        )
    # The mount table names the volume's mount, but the path may lead elsewhere: a mount
    # over it, or (under the unit's PrivateTmp) the daemon's own /tmp in place of the
    # admin's. Its files would then be another file system's: their extents are not the
    # volume's bytes.
    try:
        seen = os.stat(point).st_dev
    except OSError as exc:
        seen = None
        why = exc.strerror
    else:
        why = "another file system is mounted over it"
    if seen != os.stat(vol.device_path).st_rdev:
        raise InvalidInput(
            detail=f"the file system of volume {volume} is mounted at {point}, but the daemon "
            f"does not see it there ({why}; a volume mounted under /tmp is hidden from "
            "the daemon by its unit's PrivateTmp)"
        )
    return Path(point)


def create(catalog: Catalog, name: str, volume: str, paths: Sequence[str]) -> dict[str, Any]:
    """Record file group ``name`` of the paths ``paths`` of ``volume``'s file system.

    Every path is checked first; a bad one refuses the group and nothing is recorded.

    :raises InvalidInput: the volume is not mounted, or a path is outside its mount
        point (``..``, absolute elsewhere, a symlink leaving it).
    :raises NotFound: no such volume, or a path does not exist.
    :raises AlreadyExists: a file group of that name exists.
    """
    if not paths:
        raise InvalidInput(detail=f"file group {name} needs at least one path")
    root = mounted_root(catalog, volume)
    checked = []
    for given in paths:
        rel = relative_path(root, given)
        if rel in ("", "."):
            raise InvalidInput(
                detail=f"path {given!r} is the whole file system: protect the volume instead"
            )
        checked.append(rel)
    return describe(catalog.add_file_group(name, volume, checked))


def describe(group: FileGroup) -> dict[str, Any]:
    """A file group as the D-Bus API and the CLI show it."""
    return {
        "name": group.name,
        "volume": group.volume,
        "paths": list(group.paths),
        "created": group.created,
    }


def list_groups(catalog: Catalog) -> list[dict[str, Any]]:
    return [describe(g) for g in catalog.list_file_groups()]


def show(catalog: Catalog, pool: PoolBackend | None, name: str) -> dict[str, Any]:
    """A file group, where its volume is mounted now, and its generations: each of its
    volume's generations with the group's bytes and changed bytes in it (``listed``
    False: that generation has no list of the group).

    :raises NotFound: no file group of that name.
    """
    group = catalog.get_file_group(name)
    found = describe(group)
    found["mounted_at"] = mount_point_of(catalog.get_volume(group.volume).device_path) or ""
    found["generations"] = [] if pool is None else group_generations(pool, group)
    return found


def group_generations(pool: PoolBackend, group: FileGroup) -> list[dict[str, Any]]:
    """The group in each generation of its volume, oldest first."""
    rows = []
    for manifest in sorted(pool.generations(group.volume), key=lambda m: m.created):
        row: dict[str, Any] = {
            "generation": f"{group.volume}@{manifest.generation_id}",
            "number": manifest.sequence,
            "kind": manifest.kind.value,
            "created": manifest.created,
        }
        stored = read_list(pool, group.volume, manifest.generation_id, group.name)
        if stored is None:
            rows.append({**row, "listed": False})
            continue
        ranges = stored.files.ranges()
        size = sum(length for _, length in ranges)
        changed = (
            size
            if manifest.is_full
            else bytes_in_chunks(ranges, manifest.changed, manifest.chunk_size)
        )
        rows.append(
            {
                **row,
                "listed": True,
                "files": sum(1 for e in stored.files.entries if e.kind == "file"),
                "bytes": size,
                "changed_bytes": changed,
                "unsettled": list(stored.unsettled),
            }
        )
    return rows


def read_list(
    pool: PoolBackend, volume: str, generation_id: str, group: str
) -> StoredFileList | None:
    """The list of ``group`` stored with a generation; None when it has none.

    :raises CorruptMetadata: it is unreadable.
    """
    name = file_list_name(group)
    try:
        data = pool.read_generation_file(volume, generation_id, name)
    except NotFound:
        return None
    return decode_file_list(data, f"{volume}/{generation_id}/{name}")


def remove(catalog: Catalog, name: str) -> None:
    """:raises NotFound: no file group of that name."""
    catalog.remove_file_group(name)


# --- at each backup ---------------------------------------------------------------------


def capture_lists(catalog: Catalog, volume: str, warnings: list[str]) -> list[FileListCapture]:
    """The file lists of ``volume``'s groups, built now (just before the backup's point
    in time: ``FIEMAP_FLAG_SYNC`` writes each file's dirty pages first, so the point in
    time holds the bytes the list maps; :meth:`FileListCapture.settled` finds the files
    that changed since).

    A group that cannot be listed (the volume not mounted, a path gone) gets no list in
    this generation and a warning; the volume's backup goes on.
    """
    groups = catalog.list_file_groups(volume)
    if not groups:
        return []
    try:
        root = mounted_root(catalog, volume)
    except BlockguardError as exc:
        warnings.append(f"no file lists of {', '.join(g.name for g in groups)}: {exc}")
        return []
    device = os.lstat(root).st_dev
    captured = []
    for group in groups:
        try:
            files = build_file_list(root, group.paths, device=device)
        except (BlockguardError, OSError) as exc:
            warnings.append(f"file group {group.name}: no file list in this generation: {exc}")
            log.warning(warnings[-1], extra={"VOLUME": volume})
            continue
        captured.append(FileListCapture(group.name, files))
    return captured


class FileListCapture:
    """A group's file list taken before a backup's copy, checked after it."""

    def __init__(self, group: str, files: FileList) -> None:
        self.group = group
        self.files = files

    def settled(self) -> StoredFileList:
        """The list to store, naming the files that changed since it was taken (their
        size, mtime, inode or extents differ now): the copy may hold either version."""
        root = Path(self.files.root)
        moved = []
        for entry in self.files.entries:
            if entry.kind != "file" or entry.link_to is not None:
                continue
            try:
                st = os.lstat(root / entry.path)
                if (st.st_size, st.st_mtime_ns, st.st_ino) != (
                    entry.size,
                    entry.mtime_ns,
                    entry.inode,
                ):
                    moved.append(entry.path)
                    continue
                fd = os.open(root / entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    if tuple(file_extents(fd, sync=False)) != entry.extents:
                        moved.append(entry.path)
                finally:
                    os.close(fd)
            except (BlockguardError, OSError):
                moved.append(entry.path)  # gone or unreadable now: it changed
        return StoredFileList(self.group, self.files, tuple(moved))


def store_lists(
    pool: PoolBackend,
    volume: str,
    generation_id: str,
    captured: Sequence[FileListCapture],
    warnings: list[str],
) -> None:
    """Store each captured list with the committed generation (a failure is a warning:
    the generation itself is good)."""
    for capture in captured:
        stored = capture.settled()
        if stored.unsettled:
            warnings.append(
                f"file group {capture.group}: changed during the backup, not restorable from "
                f"this generation: {', '.join(stored.unsettled[:10])}"
            )
        try:
            pool.write_generation_file(
                volume, generation_id, file_list_name(capture.group), encode_file_list(stored)
            )
        except (BlockguardError, OSError) as exc:
            warnings.append(f"file group {capture.group}: its file list was not stored: {exc}")
            log.error(warnings[-1], extra={"VOLUME": volume})
