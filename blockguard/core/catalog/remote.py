"""Generations on backup targets (issue 11): what this host knows the targets committed.

A row is written only after the target answered the commit, so a transfer cut by the
link records nothing. ``target import`` on a new host rebuilds a target's rows from what
the target lists (:meth:`RemoteGenerationStore.replace_remote_generations`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from blockguard.core import vocab
from blockguard.core.catalog.pools import PoolStore
from blockguard.core.catalog.rows import RemoteGenerationRow, check_count, check_number
from blockguard.core.vocab import check_choice
from blockguard.errors import NotFound

KINDS = ("full", "differential", "incremental")


def _row(r: sqlite3.Row) -> RemoteGenerationRow:
    return RemoteGenerationRow(
        target=r["target"],
        volume=r["volume"],
        generation=r["generation"],
        kind=r["kind"],
        base=r["base"],
        parent=r["parent"],
        created=r["created"],
        volume_size=r["volume_size"],
        bytes_stored=r["bytes_stored"],
        extents=r["extents"],
        sent_at=r["sent_at"],
        seconds=r["seconds"],
    )


def _check(row: RemoteGenerationRow) -> None:
    vocab.check_name("target", row.target)
    vocab.check_name("volume", row.volume)
    check_choice("remote generation kind", row.kind, KINDS)
    check_count(f"bytes of {row.volume}@{row.generation}", row.bytes_stored)
    check_count(f"size of {row.volume}@{row.generation}", row.volume_size)
    check_number(f"time of {row.volume}@{row.generation}", row.created)


_INSERT = """INSERT OR REPLACE INTO remote_generations (target, volume, generation, kind,
    base, parent, created, volume_size, bytes_stored, extents, sent_at, seconds)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""


def _values(row: RemoteGenerationRow) -> tuple[object, ...]:
    return (
        row.target,
        row.volume,
        row.generation,
        row.kind,
        row.base,
        row.parent,
        row.created,
        row.volume_size,
        row.bytes_stored,
        row.extents,
        row.sent_at,
        row.seconds,
    )


class RemoteGenerationStore(PoolStore):
    """Generations on targets (mixed into the Catalog)."""

    def record_remote_generation(self, row: RemoteGenerationRow) -> None:
        """Record a generation the target committed (again: the same row replaced)."""
        _check(row)
        with self.transaction() as conn:
            conn.execute(_INSERT, _values(row))

    def list_remote_generations(
        self, target: str | None = None, volume: str | None = None
    ) -> list[RemoteGenerationRow]:
        """Oldest first (by point in time), optionally of one target and one volume."""
        query = "SELECT * FROM remote_generations WHERE 1"
        args: list[str] = []
        if target is not None:
            query += " AND target = ?"
            args.append(target)
        if volume is not None:
            query += " AND volume = ?"
            args.append(volume)
        with self._reading() as conn:
            rows = conn.execute(query + " ORDER BY created, generation", args)
            return [_row(r) for r in rows]

    def remove_remote_generation(self, target: str, volume: str, generation: str) -> None:
        """:raises NotFound: no such row"""
        with self.transaction() as conn:
            cur = conn.execute(
                "DELETE FROM remote_generations WHERE target = ? AND volume = ? AND generation = ?",
                (target, volume, generation),
            )
            if cur.rowcount == 0:
                raise NotFound(what="remote generation", name=f"{volume}@{generation}")

    def replace_remote_generations(self, target: str, rows: Sequence[RemoteGenerationRow]) -> None:
        """Make the target's rows exactly ``rows`` (what it lists), in one transaction."""
        for row in rows:
            _check(row)
        with self.transaction() as conn:
            conn.execute("DELETE FROM remote_generations WHERE target = ?", (target,))
            conn.executemany(_INSERT, [_values(r) for r in rows if r.target == target])
