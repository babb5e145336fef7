"""File groups (issue 13): named sets of paths on the file system of a protected volume.

The paths are relative to the volume's mount point, so a group outlives the mount point
it was defined under. Removing the volume from protection removes its groups.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from blockguard.core import vocab
from blockguard.core.catalog.volumes import VolumeStore
from blockguard.errors import AlreadyExists, InvalidInput, NotFound


@dataclass(frozen=True)
class FileGroup:
    name: str
    volume: str
    #: Paths relative to the volume's mount point, as given (checked when created).
    paths: tuple[str, ...]
    created: float


def _file_group(row: sqlite3.Row) -> FileGroup:
    return FileGroup(
        name=row["name"],
        volume=row["volume"],
        paths=tuple(json.loads(row["paths"])),
        created=row["created"],
    )


class FileGroupStore(VolumeStore):
    """File groups (mixed into the Catalog)."""

    def add_file_group(self, name: str, volume: str, paths: Sequence[str]) -> FileGroup:
        """Record file group ``name`` of ``volume``.

        :raises InvalidInput: a bad name, or no paths
        :raises NotFound: no such volume
        :raises AlreadyExists: a file group of that name exists
        """
        vocab.check_name("file group", name)
        if not paths or not all(isinstance(p, str) and p for p in paths):
            raise InvalidInput(detail=f"file group {name} needs at least one path")
        with self.transaction() as conn:
            if conn.execute("SELECT 1 FROM volumes WHERE name = ?", (volume,)).fetchone() is None:
                raise NotFound(what="volume", name=volume)
            if self._file_group_row(conn, name) is not None:
                raise AlreadyExists(what="file group", name=name)
            conn.execute(
                "INSERT INTO file_groups (name, volume, paths, created) VALUES (?, ?, ?, ?)",
                (name, volume, json.dumps(list(paths)), self.now()),
            )
            return self.get_file_group(name)

    def get_file_group(self, name: str) -> FileGroup:
        """:raises NotFound: no file group of that name"""
        with self._reading() as conn:
            row = self._file_group_row(conn, name)
        if row is None:
            raise NotFound(what="file group", name=name)
        return _file_group(row)

    def list_file_groups(self, volume: str | None = None) -> list[FileGroup]:
        """Every file group, or those of ``volume``, by name."""
        with self._reading() as conn:
            if volume is None:
                rows = conn.execute("SELECT * FROM file_groups ORDER BY name")
            else:
                rows = conn.execute(
                    "SELECT * FROM file_groups WHERE volume = ? ORDER BY name", (volume,)
                )
            return [_file_group(r) for r in rows]

    def remove_file_group(self, name: str) -> None:
        """:raises NotFound: no file group of that name"""
        with self.transaction() as conn:
            cur = conn.execute("DELETE FROM file_groups WHERE name = ?", (name,))
            if cur.rowcount == 0:
                raise NotFound(what="file group", name=name)

    @staticmethod
    def _file_group_row(conn: sqlite3.Connection, name: str) -> sqlite3.Row | None:
        return conn.execute("SELECT * FROM file_groups WHERE name = ?", (name,)).fetchone()
