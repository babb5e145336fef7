"""File groups (issue 13): ``filegroup create NAME --volume V PATH...``, list, show, remove.

A group names paths on the file system of a protected volume, relative to the volume's
mount point, which is found when the group is created (and at each backup) from the
mount table by the volume's device number: the group follows the volume wherever it is
mounted, and is refused while it is not mounted (its paths could not be checked).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blockguard.core.catalog import Catalog, FileGroup
from blockguard.errors import InvalidInput
from blockguard.storage.filemap import mount_point_of, relative_path


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


def show(catalog: Catalog, name: str) -> dict[str, Any]:
    """:raises NotFound: no file group of that name."""
    group = catalog.get_file_group(name)
    found = describe(group)
    found["mounted_at"] = mount_point_of(catalog.get_volume(group.volume).device_path) or ""
    return found


def remove(catalog: Catalog, name: str) -> None:
    """:raises NotFound: no file group of that name."""
    catalog.remove_file_group(name)
