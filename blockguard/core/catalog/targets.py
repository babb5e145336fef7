"""Backup targets: the remote hosts this host registered (issue 11).

The link to a target is measured like a disk: its throughputs are a performance-table
row (:func:`~blockguard.core.catalog.rows.link_perf_key`), written with the target in
one transaction so a target is never recorded without its link or the other way round.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from blockguard.core import vocab
from blockguard.core.catalog.pools import PoolStore
from blockguard.core.catalog.rows import (
    TARGET_KINDS,
    TARGET_STATES,
    PerfEntry,
    Target,
    area_of_perf_key,
    area_perf_key,
    check_count,
    check_number,
    check_text,
    link_perf_key,
)
from blockguard.core.vocab import check_choice
from blockguard.errors import AlreadyExists, InvalidInput, NotFound


def _target(row: sqlite3.Row) -> Target:
    return Target(
        id=row["id"],
        url=row["url"],
        client_id=row["client_id"],
        pool=row["pool"],
        host_key=row["host_key"],
        state=row["state"],
        state_reason=row["state_reason"],
        round_trip=row["round_trip"],
        space_free=row["space_free"],
        space_total=row["space_total"],
        space_used=row["space_used"],
        checked_at=row["checked_at"],
        added=row["added"],
        kind=row["kind"],
        endpoint=row["endpoint"],
        credentials=row["credentials"],
    )


class TargetStore(PoolStore):
    """Backup targets (mixed into the Catalog)."""

    def add_target(
        self,
        target_id: str,
        *,
        url: str,
        client_id: str,
        pool: str,
        host_key: str,
        link: PerfEntry,
        round_trip: float,
        space: tuple[int, int, int] | None = None,
        areas: Sequence[PerfEntry] = (),
        kind: str = "ssh",
        endpoint: str = "",
        credentials: str = "",
    ) -> Target:
        """Record a target whose link was measured.

        :param kind: ``ssh`` (a pinned host key, a pool there) or ``s3`` (an object store
            at ``endpoint``: no pool or host key; ``credentials`` a file's path or "")

        :param link: the link's figures (stored under ``target:ID:link``, kind pool)
        :param areas: the target's areas as seen from here (``target:ID:area:NAME``)
        :param space: the target's ``(free, total, used)`` bytes when it was asked
        :raises AlreadyExists: a target of that id exists
        """
        vocab.check_name("target", target_id)
        vocab.check_name("client id", client_id)
        check_choice("target kind", kind, TARGET_KINDS)
        check_text(f"URL of target {target_id}", url)
        if kind == "ssh":
            vocab.check_name("target pool", pool)
            if not isinstance(host_key, str) or not host_key.startswith("SHA256:"):
                raise InvalidInput(detail=f"host key {host_key!r:.80} is not a SHA256 fingerprint")
        else:
            check_text(f"endpoint of target {target_id}", endpoint)
            if pool or host_key:
                raise InvalidInput(
                    detail=f"target {target_id} is an object store: it has no pool or host key"
                )
        check_number(f"round trip of target {target_id}", round_trip)
        if link.device_key != link_perf_key(target_id) or link.kind != "pool":
            raise InvalidInput(
                detail=f"the link of target {target_id} must be stored as "
                f"{link_perf_key(target_id)} (kind pool), not {link.device_key} ({link.kind})"
            )
        for entry in areas:
            if area_of_perf_key(target_id, entry.device_key) is None or entry.kind != "pool":
                raise InvalidInput(
                    detail=f"an area of target {target_id} must be stored as "
                    f"{area_perf_key(target_id, 'NAME')} (kind pool), not {entry.device_key}"
                )
        free = total = used = None
        if space is not None:
            free, total, used = (check_count(f"space of target {target_id}", n) for n in space)
        with self.transaction() as conn:
            if self._target_row(conn, target_id) is not None:
                raise AlreadyExists(what="target", name=target_id)
            now = self.now()
            conn.execute(
                """INSERT INTO targets (id, kind, endpoint, credentials, url, client_id,
                       pool, host_key, round_trip, space_free, space_total, space_used,
                       checked_at, added)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    target_id,
                    kind,
                    endpoint,
                    credentials,
                    url,
                    client_id,
                    pool,
                    host_key,
                    round_trip,
                    free,
                    total,
                    used,
                    None if space is None else now,
                    now,
                ),
            )
            self.upsert_perf(link)
            for entry in areas:
                self.upsert_perf(entry)
            return self.get_target(target_id)

    def get_target(self, target_id: str) -> Target:
        """:raises NotFound: no target of that id"""
        with self._reading() as conn:
            row = self._target_row(conn, target_id)
        if row is None:
            raise NotFound(what="target", name=target_id)
        return _target(row)

    def list_targets(self) -> list[Target]:
        with self._reading() as conn:
            return [_target(r) for r in conn.execute("SELECT * FROM targets ORDER BY id")]

    def set_target_state(self, target_id: str, state: str, reason: str = "") -> Target:
        """Mark a target ok, unreachable or refused (its key was revoked).

        :raises NotFound: no target of that id
        """
        check_choice("target state", state, TARGET_STATES)
        if state != "ok" and not reason.strip():
            raise InvalidInput(detail=f"target state {state!r} needs a reason")
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE targets SET state = ?, state_reason = ? WHERE id = ?",
                (state, reason, target_id),
            )
            if cur.rowcount == 0:
                raise NotFound(what="target", name=target_id)
            return self.get_target(target_id)

    def remove_target(self, target_id: str) -> None:
        """Forget a target and its link's and areas' figures.

        :raises NotFound: no target of that id
        """
        with self.transaction() as conn:
            cur = conn.execute("DELETE FROM targets WHERE id = ?", (target_id,))
            if cur.rowcount == 0:
                raise NotFound(what="target", name=target_id)
            conn.execute(
                "DELETE FROM perf WHERE device_key = ? AND kind = 'pool'",
                (link_perf_key(target_id),),
            )
            prefix = area_perf_key(target_id, "")
            # substr, not LIKE: a target id may hold LIKE's wildcard "_".
            conn.execute(
                "DELETE FROM perf WHERE kind = 'pool' AND substr(device_key, 1, ?) = ?",
                (len(prefix), prefix),
            )

    @staticmethod
    def _target_row(conn: sqlite3.Connection, target_id: str) -> sqlite3.Row | None:
        return conn.execute("SELECT * FROM targets WHERE id = ?", (target_id,)).fetchone()
