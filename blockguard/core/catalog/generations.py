"""Generations: the catalog's mirror of the pool manifests.

The pool is the source of truth; :meth:`GenerationStore.rebuild_generations` replaces a
volume's rows from its manifests. The rules a chain obeys are checked the same way for
rows added one by one and for rows rebuilt from manifests.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from blockguard.core.catalog._db import CatalogBase
from blockguard.core.catalog.chains import Link, chain_problem, manifest_fields
from blockguard.core.catalog.rows import (
    Generation,
    check_count,
    check_number,
    check_uuid,
    decode_json,
    encode_json,
    new_id,
)
from blockguard.core.vocab import GENERATION_KINDS, GenerationKind, check_choice
from blockguard.errors import (
    AlreadyExists,
    Busy,
    CorruptMetadata,
    InvalidInput,
    NotFound,
)


def _generation(row: sqlite3.Row) -> Generation:
    return Generation(
        id=row["id"],
        volume=row["volume"],
        pool=row["pool"],
        kind=row["kind"],
        base=row["base"],
        parent=row["parent"],
        created=row["created"],
        bytes_stored=row["bytes_stored"],
        chunks=row["chunks"],
        state=row["state"],
        committed_at=row["committed_at"],
        location=decode_json(f"location of generation {row['id']}", row["location"]),
        manifest_checksum=row["manifest_checksum"],
    )


class GenerationStore(CatalogBase):
    """Generations (mixed into the Catalog)."""

    def add_generation(
        self,
        volume: str,
        kind: str,
        *,
        id: str | None = None,
        pool: str | None = None,
        base: str | None = None,
        parent: str | None = None,
        created: float | None = None,
        bytes_stored: int = 0,
        chunks: int = 0,
        location: dict[str, Any] | None = None,
        manifest_checksum: str | None = None,
    ) -> Generation:
        """Record a generation being written; it is pending until committed.

        A full has no base or parent; a differential's parent is its base; an incremental's parent
        is its base or another generation on the same base.

        :param id: the generation's UUID (a new one by default)
        :param pool: where it is stored (by default the volume's pool)
        :raises NotFound: the volume, pool, base or parent does not exist
        :raises AlreadyExists: a generation with that id exists
        """
        check_choice("generation kind", kind, GENERATION_KINDS)
        gid = new_id() if id is None else check_uuid("generation", id)
        base = None if base is None else check_uuid("base generation", base)
        if kind == GenerationKind.DIFFERENTIAL and parent is None:
            parent = base
        parent = None if parent is None else check_uuid("parent generation", parent)
        check_count(f"bytes stored of generation {gid}", bytes_stored)
        check_count(f"chunk count of generation {gid}", chunks)
        created = self.now() if created is None else check_number("creation time", created)
        location_json = encode_json(f"location of generation {gid}", location or {})
        with self.transaction() as conn:
            pool = self._pool_of_volume(conn, volume, pool)
            if not conn.execute("SELECT 1 FROM pools WHERE name = ?", (pool,)).fetchone():
                raise NotFound(what="pool", name=pool)
            if self._link(conn, gid) is not None:
                raise AlreadyExists(what="generation", name=gid)
            problem = chain_problem(
                gid, volume, kind, base, parent, False, lambda g: self._link(conn, g)
            )
            if problem is not None:
                text, missing = problem
                if missing is not None:
                    raise NotFound(what="generation", name=missing)
                raise InvalidInput(detail=text)
            conn.execute(
                """INSERT INTO generations (id, volume, pool, kind, base, parent, created,
                       bytes_stored, chunks, location, manifest_checksum)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    gid,
                    volume,
                    pool,
                    kind,
                    base,
                    parent,
                    created,
                    bytes_stored,
                    chunks,
                    location_json,
                    manifest_checksum,
                ),
            )
            return self.get_generation(gid)

    def commit_generation(
        self,
        id: str,
        *,
        bytes_stored: int | None = None,
        chunks: int | None = None,
        location: dict[str, Any] | None = None,
        manifest_checksum: str | None = None,
    ) -> Generation:
        """Mark a generation committed (its manifest is on the pool), with its final figures.

        :raises NotFound: no such generation
        :raises InvalidInput: it is committed already, or its base or parent is not
        """
        check_count(f"bytes stored of generation {id}", bytes_stored, optional=True)
        check_count(f"chunk count of generation {id}", chunks, optional=True)
        location_json = encode_json(f"location of generation {id}", location, optional=True)
        with self.transaction() as conn:
            gen = self._get_generation(conn, id)
            if gen.committed:
                raise InvalidInput(detail=f"generation {id} is already committed")
            for role, other in (("base", gen.base), ("parent", gen.parent)):
                link = None if other is None else self._link(conn, other)
                if link is not None and link.state != "committed":
                    raise InvalidInput(
                        detail=f"generation {id} cannot commit before its {role} {other}"
                    )
            conn.execute(
                """UPDATE generations SET state = 'committed', committed_at = ?,
                       bytes_stored = coalesce(?, bytes_stored), chunks = coalesce(?, chunks),
                       location = coalesce(?, location),
                       manifest_checksum = coalesce(?, manifest_checksum)
                   WHERE id = ?""",
                (self.now(), bytes_stored, chunks, location_json, manifest_checksum, gen.id),
            )
            return self._get_generation(conn, gen.id)

    def get_generation(self, id: str) -> Generation:
        """:raises NotFound: no such generation"""
        with self._reading() as conn:
            return self._get_generation(conn, id)

    def list_generations(self, volume: str, *, committed_only: bool = False) -> list[Generation]:
        """A volume's generations, oldest first.

        :raises NotFound: no volume of that name
        """
        with self._reading() as conn:
            if not conn.execute("SELECT 1 FROM volumes WHERE name = ?", (volume,)).fetchone():
                raise NotFound(what="volume", name=volume)
            query = "SELECT * FROM generations WHERE volume = ?"
            if committed_only:
                query += " AND state = 'committed'"
            rows = conn.execute(query + " ORDER BY created, rowid", (volume,)).fetchall()
        return [_generation(r) for r in rows]

    def restore_chain(self, id: str) -> list[Generation]:
        """What a restore of this generation reads: its base full first, it last.

        :raises NotFound: no such generation
        """
        with self._reading() as conn:
            chain = [self._get_generation(conn, id)]
            while chain[-1].parent is not None and chain[-1].kind != GenerationKind.FULL:
                chain.append(self._get_generation(conn, chain[-1].parent))
        return chain[::-1]

    def dependents(self, id: str) -> list[str]:
        """Generations that need this one to restore (directly by base or parent)."""
        with self._reading() as conn:
            self._get_generation(conn, id)
            return self._dependents(conn, id)

    def remove_generation(self, id: str) -> None:
        """Forget a generation (retention removed it from the pool).

        :raises NotFound: no such generation
        :raises Busy: other generations depend on it
        """
        with self.transaction() as conn:
            self._get_generation(conn, id)
            users = self._dependents(conn, id)
            if users:
                raise Busy(
                    what=f"generation {id}", reason=f"generations {', '.join(users)} depend on it"
                )
            conn.execute("DELETE FROM generations WHERE id = ?", (id,))

    def remove_pending_generations(self, volume: str | None = None) -> list[str]:
        """Forget generations that never committed (for cleanup after a crash).

        :returns: their ids
        """
        query, args = "SELECT id FROM generations WHERE state = 'pending'", []
        if volume is not None:
            query += " AND volume = ?"
            args.append(volume)
        with self.transaction() as conn:
            ids = [r[0] for r in conn.execute(query, args)]
            conn.executemany("DELETE FROM generations WHERE id = ?", [(i,) for i in ids])
        return ids

    def rebuild_generations(
        self, volume: str, manifests: Sequence[Mapping[str, Any]], *, pool: str | None = None
    ) -> list[Generation]:
        """Replace a volume's generations with those the pool's manifests describe.

        Keys read from each manifest: ``id``, ``kind``, ``created`` (required), ``base``,
        ``parent``, ``bytes_stored`` (or ``bytes``), ``chunks`` (a count or the chunk
        collection), ``location``, ``manifest_checksum`` (or ``checksum``), ``pool``,
        ``volume`` (must match if present) and ``committed`` (default true); other keys
        are ignored. All or nothing: one bad manifest changes nothing.

        :param pool: the pool they were read from (by default the volume's pool)
        :raises NotFound: the volume or pool does not exist
        :raises CorruptMetadata: a manifest is incomplete or its chain is broken
        """
        with self.transaction() as conn:
            pool = self._pool_of_volume(conn, volume, pool)
            fields = [manifest_fields(volume, pool, m) for m in manifests]
            self._check_rebuild(conn, volume, fields)
            conn.execute("DELETE FROM generations WHERE volume = ?", (volume,))
            conn.executemany(
                """INSERT INTO generations (id, volume, pool, kind, base, parent, created,
                       bytes_stored, chunks, state, committed_at, location, manifest_checksum)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [
                    (
                        f["id"],
                        volume,
                        f["pool"],
                        f["kind"],
                        f["base"],
                        f["parent"],
                        f["created"],
                        f["bytes_stored"],
                        f["chunks"],
                        "committed" if f["committed"] else "pending",
                        f["committed_at"] if f["committed"] else None,
                        f["location"],
                        f["manifest_checksum"],
                    )
                    for f in fields
                ],
            )
        return self.list_generations(volume)

    # --- helpers ---------------------------------------------------------------------

    @staticmethod
    def _pool_of_volume(conn: sqlite3.Connection, volume: str, pool: str | None) -> str:
        """``pool``, or the volume's own pool when None.

        :raises NotFound: no such volume.
        :raises InvalidInput: none was given and the volume has no pool.
        """
        row = conn.execute("SELECT pool_name FROM volumes WHERE name = ?", (volume,)).fetchone()
        if row is None:
            raise NotFound(what="volume", name=volume)
        pool = pool or row[0]
        if pool is None:
            raise InvalidInput(detail=f"volume {volume} has no pool; name the pool to use")
        return pool

    def _check_rebuild(
        self, conn: sqlite3.Connection, volume: str, fields: Sequence[Mapping[str, Any]]
    ) -> None:
        """Refuse manifests that repeat an id, break a chain, name an unknown pool or take
        another volume's id (changes nothing).

        :raises CorruptMetadata: a manifest is inconsistent.
        :raises NotFound: a manifest names a pool the catalog does not know.
        """
        by_id: dict[str, Mapping[str, Any]] = {}
        for f in fields:
            if f["id"] in by_id:
                raise CorruptMetadata(
                    what=f"manifest of generation {f['id']}", detail="the id appears twice"
                )
            by_id[f["id"]] = f

        def lookup(gid: str) -> Link | None:
            f = by_id.get(gid)
            if f is None:
                return None
            return Link(volume, f["kind"], f["base"], "committed" if f["committed"] else "pending")

        for f in fields:
            problem = chain_problem(
                f["id"], volume, f["kind"], f["base"], f["parent"], f["committed"], lookup
            )
            if problem is not None:
                raise CorruptMetadata(what=f"manifest of generation {f['id']}", detail=problem[0])
            if not conn.execute("SELECT 1 FROM pools WHERE name = ?", (f["pool"],)).fetchone():
                raise NotFound(what="pool", name=f["pool"])
            other = self._link(conn, f["id"])
            if other is not None and other.volume != volume:
                raise CorruptMetadata(
                    what=f"manifest of generation {f['id']}",
                    detail=f"the id is already used by volume {other.volume}",
                )

    @staticmethod
    def _get_generation(conn: sqlite3.Connection, gid: str) -> Generation:
        row = conn.execute("SELECT * FROM generations WHERE id = ?", (gid,)).fetchone()
        if row is None:
            raise NotFound(what="generation", name=gid)
        return _generation(row)

    @staticmethod
    def _link(conn: sqlite3.Connection, gid: str) -> Link | None:
        row = conn.execute(
            "SELECT volume, kind, base, state FROM generations WHERE id = ?", (gid,)
        ).fetchone()
        return None if row is None else Link(*row)

    @staticmethod
    def _dependents(conn: sqlite3.Connection, gid: str) -> list[str]:
        rows = conn.execute(
            """SELECT id FROM generations WHERE (base = ? OR parent = ?) AND id != ?
               ORDER BY created""",
            (gid, gid, gid),
        )
        return [r[0] for r in rows]
