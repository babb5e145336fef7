"""Pools, their devices, and the performance table."""

from __future__ import annotations

import sqlite3

from blockguard.core import vocab
from blockguard.core.catalog._db import CatalogBase
from blockguard.core.catalog.rows import (
    PERF_KINDS,
    PERF_SOURCES,
    POOL_DEVICE_STATES,
    POOL_STATES,
    DeviceIdentity,
    PerfEntry,
    Pool,
    PoolDevice,
    check_count,
    check_identity,
    check_number,
    check_path,
    check_text,
)
from blockguard.core.vocab import POOL_BACKENDS, check_choice
from blockguard.errors import AlreadyExists, Busy, DeviceInUse, InvalidInput, NotFound

_PERF_FIGURES = (
    "device_path",
    "capacity",
    "rotational",
    "transport",
    "layout",
    "seq_read",
    "seq_write",
    "rand_read",
    "rand_write",
    "chunk_size",
)


def _pool(row: sqlite3.Row) -> Pool:
    return Pool(
        name=row["name"],
        backend=row["backend"],
        location=row["location"],
        state=row["state"],
        state_reason=row["state_reason"],
        created=row["created"],
    )


def _pool_device(row: sqlite3.Row) -> PoolDevice:
    return PoolDevice(
        pool=row["pool"],
        device_path=row["device_path"],
        identity=DeviceIdentity(row["major"], row["minor"], row["size"], row["serial"]),
        capacity=row["capacity"],
        state=row["state"],
        added=row["added"],
    )


def _perf(row: sqlite3.Row) -> PerfEntry:
    rotational = row["rotational"]
    return PerfEntry(
        device_key=row["device_key"],
        kind=row["kind"],
        measured_at=row["measured_at"],
        source=row["source"],
        device_path=row["device_path"],
        capacity=row["capacity"],
        rotational=None if rotational is None else bool(rotational),
        transport=row["transport"],
        layout=row["layout"],
        seq_read=row["seq_read"],
        seq_write=row["seq_write"],
        rand_read=row["rand_read"],
        rand_write=row["rand_write"],
        chunk_size=row["chunk_size"],
    )


def _check_perf(entry: PerfEntry) -> None:
    if not isinstance(entry, PerfEntry):
        raise InvalidInput(detail=f"performance entry {entry!r} must be a PerfEntry")
    if not isinstance(entry.device_key, str) or not entry.device_key:
        raise InvalidInput(detail=f"performance device key {entry.device_key!r} must be text")
    check_choice("performance entry kind", entry.kind, PERF_KINDS)
    check_choice("performance source", entry.source, PERF_SOURCES)
    check_number("measurement time", entry.measured_at)
    what = f"performance of {entry.device_key}"
    for name in ("seq_read", "seq_write", "rand_read", "rand_write"):
        check_number(f"{what}: {name}", getattr(entry, name), optional=True)
    check_count(f"{what}: capacity", entry.capacity, optional=True)
    check_count(f"{what}: chunk size", entry.chunk_size, optional=True)
    if entry.rotational is not None and not isinstance(entry.rotational, bool):
        raise InvalidInput(detail=f"{what}: rotational {entry.rotational!r} must be a bool")


class PoolStore(CatalogBase):
    """Pools, pool devices and performance (mixed into the Catalog)."""

    # --- pools -----------------------------------------------------------------------

    def add_pool(self, name: str, backend: str, location: str) -> Pool:
        """Record a new pool.

        :param location: the volume group name (lvm) or the directory (dir)
        :raises AlreadyExists: a pool of that name exists
        """
        vocab.check_name("pool", name)
        check_choice("pool backend", backend, POOL_BACKENDS)
        if backend == "dir":
            check_path(f"directory of pool {name}", location)
        else:
            check_text(f"volume group of pool {name}", location)
        with self.transaction() as conn:
            if self._pool_row(conn, name) is not None:
                raise AlreadyExists(what="pool", name=name)
            conn.execute(
                "INSERT INTO pools (name, backend, location, created) VALUES (?, ?, ?, ?)",
                (name, backend, location, self.now()),
            )
            return self.get_pool(name)

    def get_pool(self, name: str) -> Pool:
        """:raises NotFound: no pool of that name"""
        with self._reading() as conn:
            row = self._pool_row(conn, name)
        if row is None:
            raise NotFound(what="pool", name=name)
        return _pool(row)

    def list_pools(self) -> list[Pool]:
        with self._reading() as conn:
            return [_pool(r) for r in conn.execute("SELECT * FROM pools ORDER BY name")]

    def set_pool_state(self, name: str, state: str, reason: str = "") -> Pool:
        """Mark a pool ok, degraded (a device vanished) or missing.

        :raises NotFound: no pool of that name
        """
        check_choice("pool state", state, POOL_STATES)
        if state != "ok" and not reason.strip():
            raise InvalidInput(detail=f"pool state {state!r} needs a reason")
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE pools SET state = ?, state_reason = ? WHERE name = ?",
                (state, reason, name),
            )
            if cur.rowcount == 0:
                raise NotFound(what="pool", name=name)
            return self.get_pool(name)

    def remove_pool(self, name: str) -> None:
        """Forget a pool and its devices.

        :raises Busy: volumes back up to it or generations are stored on it
        :raises NotFound: no pool of that name
        """
        with self.transaction() as conn:
            if self._pool_row(conn, name) is None:
                raise NotFound(what="pool", name=name)
            users = [
                r[0]
                for r in conn.execute(
                    "SELECT name FROM volumes WHERE pool_name = ? ORDER BY name", (name,)
                )
            ]
            if users:
                raise Busy(what=f"pool {name}", reason=f"volumes {', '.join(users)} use it")
            count = conn.execute(
                "SELECT count(*) FROM generations WHERE pool = ?", (name,)
            ).fetchone()[0]
            if count:
                raise Busy(what=f"pool {name}", reason=f"it stores {count} generations")
            conn.execute("DELETE FROM pools WHERE name = ?", (name,))

    # --- pool devices ----------------------------------------------------------------

    def add_pool_device(
        self, pool: str, device_path: str, identity: DeviceIdentity, capacity: int
    ) -> PoolDevice:
        """Record a disk added to a pool.

        :raises NotFound: no pool of that name
        :raises AlreadyExists: the device already belongs to a pool
        :raises DeviceInUse: the device is a protected volume
        """
        check_path("pool device path", device_path)
        check_identity(f"pool device {device_path}", identity)
        check_count(f"capacity of pool device {device_path}", capacity)
        with self.transaction() as conn:
            if self._pool_row(conn, pool) is None:
                raise NotFound(what="pool", name=pool)
            row = conn.execute(
                "SELECT pool FROM pool_devices WHERE device_path = ?", (device_path,)
            ).fetchone()
            if row is not None:
                raise AlreadyExists(what="pool device", name=f"{device_path} (pool {row[0]})")
            row = conn.execute(
                "SELECT name FROM volumes WHERE device_path = ?", (device_path,)
            ).fetchone()
            if row is not None:
                raise DeviceInUse(path=device_path, reason=f"it is protected volume {row[0]}")
            conn.execute(
                """INSERT INTO pool_devices (pool, device_path, major, minor, size, serial,
                       capacity, added) VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    pool,
                    device_path,
                    identity.major,
                    identity.minor,
                    identity.size,
                    identity.serial,
                    capacity,
                    self.now(),
                ),
            )
            return self._get_pool_device(conn, device_path)

    def list_pool_devices(self, pool: str | None = None) -> list[PoolDevice]:
        """The devices of one pool, or of all pools."""
        with self._reading() as conn:
            if pool is None:
                rows = conn.execute("SELECT * FROM pool_devices ORDER BY pool, device_path")
            else:
                if self._pool_row(conn, pool) is None:
                    raise NotFound(what="pool", name=pool)
                rows = conn.execute(
                    "SELECT * FROM pool_devices WHERE pool = ? ORDER BY device_path", (pool,)
                )
            return [_pool_device(r) for r in rows]

    def set_pool_device_state(self, device_path: str, state: str) -> PoolDevice:
        """:raises NotFound: the device is in no pool"""
        check_choice("pool device state", state, POOL_DEVICE_STATES)
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE pool_devices SET state = ? WHERE device_path = ?", (state, device_path)
            )
            if cur.rowcount == 0:
                raise NotFound(what="pool device", name=device_path)
            return self._get_pool_device(conn, device_path)

    def remove_pool_device(self, pool: str, device_path: str) -> None:
        """:raises NotFound: the device is not in that pool"""
        with self.transaction() as conn:
            cur = conn.execute(
                "DELETE FROM pool_devices WHERE pool = ? AND device_path = ?",
                (pool, device_path),
            )
            if cur.rowcount == 0:
                raise NotFound(what="pool device", name=f"{device_path} in pool {pool}")

    # --- performance table -----------------------------------------------------------

    def upsert_perf(self, entry: PerfEntry) -> PerfEntry:
        """Store measured figures for a device.

        Figures given as ``None`` keep their stored value, so a live update that only
        knows the sequential read rate does not erase the probe's other figures. The
        time and source are always replaced.
        """
        _check_perf(entry)
        values = {
            "device_key": entry.device_key,
            "kind": entry.kind,
            "measured_at": entry.measured_at,
            "source": entry.source,
            **{name: getattr(entry, name) for name in _PERF_FIGURES},
        }
        if entry.rotational is not None:
            values["rotational"] = int(entry.rotational)  # stored as 0/1
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        keep = ", ".join(f"{n} = coalesce(excluded.{n}, perf.{n})" for n in _PERF_FIGURES)
        with self.transaction() as conn:
            # Column names are ours; only values come from the caller.
            conn.execute(
                f"""INSERT INTO perf ({columns}) VALUES ({marks})
                    ON CONFLICT (device_key, kind) DO UPDATE SET {keep},
                    measured_at = excluded.measured_at, source = excluded.source""",
                list(values.values()),
            )
            found = self.get_perf(entry.device_key, entry.kind)
            assert found is not None
            return found

    def get_perf(self, device_key: str, kind: str) -> PerfEntry | None:
        """The figures of one device, or ``None`` if it was never measured."""
        check_choice("performance entry kind", kind, PERF_KINDS)
        with self._reading() as conn:
            row = conn.execute(
                "SELECT * FROM perf WHERE device_key = ? AND kind = ?", (device_key, kind)
            ).fetchone()
        return None if row is None else _perf(row)

    def list_perf(self, kind: str | None = None) -> list[PerfEntry]:
        """The whole performance table, or the pool or volume part of it."""
        with self._reading() as conn:
            if kind is None:
                rows = conn.execute("SELECT * FROM perf ORDER BY kind, device_key")
            else:
                check_choice("performance entry kind", kind, PERF_KINDS)
                rows = conn.execute(
                    "SELECT * FROM perf WHERE kind = ? ORDER BY device_key", (kind,)
                )
            return [_perf(r) for r in rows]

    def remove_perf(self, device_key: str, kind: str) -> None:
        """:raises NotFound: no figures for that device"""
        with self.transaction() as conn:
            cur = conn.execute(
                "DELETE FROM perf WHERE device_key = ? AND kind = ?", (device_key, kind)
            )
            if cur.rowcount == 0:
                raise NotFound(what=f"performance entry ({kind})", name=device_key)

    # --- helpers ---------------------------------------------------------------------

    @staticmethod
    def _pool_row(conn: sqlite3.Connection, name: str) -> sqlite3.Row | None:
        return conn.execute("SELECT * FROM pools WHERE name = ?", (name,)).fetchone()

    @staticmethod
    def _get_pool_device(conn: sqlite3.Connection, device_path: str) -> PoolDevice:
        row = conn.execute(
            "SELECT * FROM pool_devices WHERE device_path = ?", (device_path,)
        ).fetchone()
        return _pool_device(row)
