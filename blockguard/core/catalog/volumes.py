"""Protected volumes and the groups that share recovery objectives."""

from __future__ import annotations

import sqlite3
from typing import Any

from blockguard.core import vocab
from blockguard.core.catalog._db import CatalogBase
from blockguard.core.catalog.rows import (
    TRACKER_STATES,
    DeviceIdentity,
    Group,
    Volume,
    check_chunk_size,
    check_identity,
    check_path,
    check_text,
    decode_json,
    encode_json,
)
from blockguard.core.vocab import check_choice
from blockguard.errors import AlreadyExists, Busy, DeviceInUse, InvalidInput, NotFound


class _Unset:
    """Marks an ``update_volume`` argument that was not given (``None`` means clear)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


def _volume(row: sqlite3.Row) -> Volume:
    return Volume(
        name=row["name"],
        device_path=row["device_path"],
        identity=DeviceIdentity(row["major"], row["minor"], row["size"], row["serial"]),
        chunk_size=row["chunk_size"],
        tracker_backend=row["tracker_backend"],
        tracker_state=row["tracker_state"],
        tracker_reason=row["tracker_reason"],
        objectives=decode_json(f"objectives of volume {row['name']}", row["objectives"]),
        group=row["group_name"],
        pool=row["pool_name"],
        created=row["created"],
    )


def _group(row: sqlite3.Row) -> Group:
    return Group(
        name=row["name"],
        objectives=decode_json(f"objectives of group {row['name']}", row["objectives"]),
        created=row["created"],
    )


def _tracker(state: object, reason: object) -> tuple[str, str]:
    state = check_choice("tracker state", state, TRACKER_STATES)
    if not isinstance(reason, str):
        raise InvalidInput(detail=f"tracker reason {reason!r} must be text")
    if state == "unknown" and not reason.strip():
        raise InvalidInput(detail="tracker state 'unknown' needs a reason")
    return state, reason


class VolumeStore(CatalogBase):
    """Volumes and groups (mixed into :class:`~blockguard.core.catalog.Catalog`)."""

    # --- volumes ---------------------------------------------------------------------

    def add_volume(
        self,
        name: str,
        device_path: str,
        identity: DeviceIdentity,
        *,
        chunk_size: int,
        tracker_backend: str,
        objectives: dict[str, Any] | None = None,
        group: str | None = None,
        pool: str | None = None,
        tracker_state: str = "unknown",
        tracker_reason: str = "never backed up",
    ) -> Volume:
        """Record a newly protected volume.

        :raises AlreadyExists: the name or the device is already a protected volume
        :raises DeviceInUse: the device is a pool device
        :raises NotFound: the group or pool does not exist
        """
        vocab.check_name("volume", name)
        check_path("volume device path", device_path)
        check_identity(f"volume {name}", identity)
        check_chunk_size(chunk_size)
        check_text("tracker backend", tracker_backend)
        tracker_state, tracker_reason = _tracker(tracker_state, tracker_reason)
        objectives_json = encode_json(f"objectives of volume {name}", objectives or {})
        with self.transaction() as conn:
            if self._volume_row(conn, name) is not None:
                raise AlreadyExists(what="volume", name=name)
            self._check_device_free(conn, device_path, name)
            self._check_refs(conn, group=group, pool=pool)
            conn.execute(
                """INSERT INTO volumes (name, device_path, major, minor, size, serial,
                       chunk_size, tracker_backend, tracker_state, tracker_reason,
                       objectives, group_name, pool_name, created)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    name,
                    device_path,
                    identity.major,
                    identity.minor,
                    identity.size,
                    identity.serial,
                    chunk_size,
                    tracker_backend,
                    tracker_state,
                    tracker_reason,
                    objectives_json,
                    group,
                    pool,
                    self.now(),
                ),
            )
            return self.get_volume(name)

    def get_volume(self, name: str) -> Volume:
        """:raises NotFound: no volume of that name"""
        with self._reading() as conn:
            row = self._volume_row(conn, name)
        if row is None:
            raise NotFound(what="volume", name=name)
        return _volume(row)

    def volume_by_device(self, device_path: str) -> Volume | None:
        """The protected volume on ``device_path``, if there is one."""
        with self._reading() as conn:
            row = conn.execute(
                "SELECT * FROM volumes WHERE device_path = ?", (device_path,)
            ).fetchone()
        return None if row is None else _volume(row)

    def list_volumes(self, *, group: str | None = None, pool: str | None = None) -> list[Volume]:
        """All volumes by name, optionally only those of one group or pool."""
        query, args = "SELECT * FROM volumes WHERE 1", []
        if group is not None:
            query += " AND group_name = ?"
            args.append(group)
        if pool is not None:
            query += " AND pool_name = ?"
            args.append(pool)
        with self._reading() as conn:
            rows = conn.execute(query + " ORDER BY name", args).fetchall()
        return [_volume(r) for r in rows]

    def update_volume(
        self,
        name: str,
        *,
        device_path: str = UNSET,
        identity: DeviceIdentity = UNSET,
        chunk_size: int = UNSET,
        tracker_backend: str = UNSET,
        objectives: dict[str, Any] = UNSET,
        group: str | None = UNSET,
        pool: str | None = UNSET,
    ) -> Volume:
        """Change the given fields of a volume; ``group=None`` takes it out of its group.

        :raises NotFound: the volume, or a group or pool named, does not exist
        """
        changes: dict[str, object] = {}
        if device_path is not UNSET:
            changes["device_path"] = check_path("volume device path", device_path)
        if identity is not UNSET:
            check_identity(f"volume {name}", identity)
            changes.update(
                major=identity.major,
                minor=identity.minor,
                size=identity.size,
                serial=identity.serial,
            )
        if chunk_size is not UNSET:
            changes["chunk_size"] = check_chunk_size(chunk_size)
        if tracker_backend is not UNSET:
            changes["tracker_backend"] = check_text("tracker backend", tracker_backend)
        if objectives is not UNSET:
            changes["objectives"] = encode_json(f"objectives of volume {name}", objectives)
        if group is not UNSET:
            changes["group_name"] = group
        if pool is not UNSET:
            changes["pool_name"] = pool
        with self.transaction() as conn:
            if self._volume_row(conn, name) is None:
                raise NotFound(what="volume", name=name)
            if device_path is not UNSET:
                self._check_device_free(conn, device_path, name)
            self._check_refs(
                conn,
                group=None if group is UNSET else group,
                pool=None if pool is UNSET else pool,
            )
            if changes:
                # Column names come from the code above, never from the caller.
                assignments = ", ".join(f"{column} = ?" for column in changes)
                conn.execute(
                    f"UPDATE volumes SET {assignments} WHERE name = ?", [*changes.values(), name]
                )
            return self.get_volume(name)

    def set_tracker_state(self, name: str, state: str, reason: str = "") -> Volume:
        """Record whether the volume's change tracking is exact (``reason`` says why not).

        :raises NotFound: no volume of that name
        """
        state, reason = _tracker(state, reason)
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE volumes SET tracker_state = ?, tracker_reason = ? WHERE name = ?",
                (state, reason, name),
            )
            if cur.rowcount == 0:
                raise NotFound(what="volume", name=name)
            return self.get_volume(name)

    def remove_volume(self, name: str, *, drop_generations: bool = False) -> None:
        """Forget a volume. Its job history and measured restores are kept.

        :param drop_generations: also forget its generations; without it a volume that
            still has generations is refused, since they would become invisible
        :raises Busy: it has generations, or a job of it is queued or running
        :raises NotFound: no volume of that name
        """
        with self.transaction() as conn:
            if self._volume_row(conn, name) is None:
                raise NotFound(what="volume", name=name)
            active = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM jobs WHERE volume = ? AND state IN ('queued', 'running')",
                    (name,),
                )
            ]
            if active:
                raise Busy(what=f"volume {name}", reason=f"jobs {', '.join(active)} are active")
            count = conn.execute(
                "SELECT count(*) FROM generations WHERE volume = ?", (name,)
            ).fetchone()[0]
            if count and not drop_generations:
                raise Busy(
                    what=f"volume {name}",
                    reason=f"it has {count} generations in the catalog; remove them first",
                )
            conn.execute("DELETE FROM generations WHERE volume = ?", (name,))
            conn.execute("DELETE FROM volumes WHERE name = ?", (name,))

    # --- groups ----------------------------------------------------------------------

    def add_group(self, name: str, objectives: dict[str, Any] | None = None) -> Group:
        """:raises AlreadyExists: a group of that name exists"""
        vocab.check_name("group", name)
        objectives_json = encode_json(f"objectives of group {name}", objectives or {})
        with self.transaction() as conn:
            if conn.execute("SELECT 1 FROM groups WHERE name = ?", (name,)).fetchone():
                raise AlreadyExists(what="group", name=name)
            conn.execute(
                "INSERT INTO groups (name, objectives, created) VALUES (?, ?, ?)",
                (name, objectives_json, self.now()),
            )
            return self.get_group(name)

    def get_group(self, name: str) -> Group:
        """:raises NotFound: no group of that name"""
        with self._reading() as conn:
            row = conn.execute("SELECT * FROM groups WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(what="group", name=name)
        return _group(row)

    def list_groups(self) -> list[Group]:
        with self._reading() as conn:
            return [_group(r) for r in conn.execute("SELECT * FROM groups ORDER BY name")]

    def set_group_objectives(self, name: str, objectives: dict[str, Any]) -> Group:
        """Replace a group's objectives.

        :raises NotFound: no group of that name
        """
        objectives_json = encode_json(f"objectives of group {name}", objectives)
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE groups SET objectives = ? WHERE name = ?", (objectives_json, name)
            )
            if cur.rowcount == 0:
                raise NotFound(what="group", name=name)
            return self.get_group(name)

    def remove_group(self, name: str) -> None:
        """:raises Busy: volumes still belong to it; :raises NotFound: no such group"""
        with self.transaction() as conn:
            if not conn.execute("SELECT 1 FROM groups WHERE name = ?", (name,)).fetchone():
                raise NotFound(what="group", name=name)
            members = [
                r[0]
                for r in conn.execute(
                    "SELECT name FROM volumes WHERE group_name = ? ORDER BY name", (name,)
                )
            ]
            if members:
                raise Busy(
                    what=f"group {name}", reason=f"volumes {', '.join(members)} belong to it"
                )
            conn.execute("DELETE FROM groups WHERE name = ?", (name,))

    # --- helpers ---------------------------------------------------------------------

    @staticmethod
    def _volume_row(conn: sqlite3.Connection, name: str) -> sqlite3.Row | None:
        return conn.execute("SELECT * FROM volumes WHERE name = ?", (name,)).fetchone()

    @staticmethod
    def _check_device_free(conn: sqlite3.Connection, device_path: str, volume: str) -> None:
        row = conn.execute(
            "SELECT name FROM volumes WHERE device_path = ? AND name != ?",
            (device_path, volume),
        ).fetchone()
        if row is not None:
            raise AlreadyExists(what="protected device", name=f"{device_path} (volume {row[0]})")
        row = conn.execute(
            "SELECT pool FROM pool_devices WHERE device_path = ?", (device_path,)
        ).fetchone()
        if row is not None:
            raise DeviceInUse(path=device_path, reason=f"it is a device of pool {row[0]}")

    @staticmethod
    def _check_refs(conn: sqlite3.Connection, *, group: str | None, pool: str | None) -> None:
        if (
            group is not None
            and not conn.execute("SELECT 1 FROM groups WHERE name = ?", (group,)).fetchone()
        ):
            raise NotFound(what="group", name=group)
        if (
            pool is not None
            and not conn.execute("SELECT 1 FROM pools WHERE name = ?", (pool,)).fetchone()
        ):
            raise NotFound(what="pool", name=pool)
