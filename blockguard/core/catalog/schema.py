"""The catalog's schema and its ordered migrations.

The schema version lives in ``PRAGMA user_version`` and the file is marked as a
blockguard catalog by ``PRAGMA application_id``. A new catalog is built by running every
migration from version 0, so a fresh catalog and an upgraded one go through the same
code. Migrations are frozen once released: change the schema by appending a step, never
by editing one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from blockguard.errors import CorruptMetadata

#: "BGCT" — lets ``file(1)`` and this code tell a blockguard catalog from any SQLite file.
APPLICATION_ID = 0x42474354


@dataclass(frozen=True)
class Migration:
    """One schema step, from ``version - 1`` to ``version``."""

    version: int
    description: str
    statements: tuple[str, ...]
    #: Extra work that plain SQL cannot express; runs after the statements.
    apply: Callable[[sqlite3.Connection], None] | None = None


#: The columns of a job's run, the same in every version of ``jobs`` (frozen with them).
_JOB_RUN_COLUMNS = """\
        state TEXT NOT NULL
            CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
        progress REAL NOT NULL DEFAULT 0 CHECK (progress >= 0 AND progress <= 1),
        bytes_done INTEGER NOT NULL DEFAULT 0 CHECK (bytes_done >= 0),
        bytes_total INTEGER CHECK (bytes_total IS NULL OR bytes_total >= 0),
        created REAL NOT NULL,
        started REAL,
        finished REAL,"""

_V1 = (
    """
    CREATE TABLE groups (
        name TEXT PRIMARY KEY NOT NULL CHECK (length(name) > 0),
        objectives TEXT NOT NULL DEFAULT '{}',
        created REAL NOT NULL
    )""",
    """
    CREATE TABLE pools (
        name TEXT PRIMARY KEY NOT NULL CHECK (length(name) > 0),
        backend TEXT NOT NULL CHECK (backend IN ('lvm', 'dir')),
        location TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'ok' CHECK (state IN ('ok', 'degraded', 'missing')),
        state_reason TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL
    )""",
    """
    CREATE TABLE pool_devices (
        pool TEXT NOT NULL REFERENCES pools(name) ON DELETE CASCADE,
        device_path TEXT NOT NULL UNIQUE,
        major INTEGER,
        minor INTEGER,
        size INTEGER NOT NULL CHECK (size >= 0),
        serial TEXT,
        capacity INTEGER NOT NULL CHECK (capacity >= 0),
        state TEXT NOT NULL DEFAULT 'ok' CHECK (state IN ('ok', 'missing', 'failed')),
        added REAL NOT NULL,
        PRIMARY KEY (pool, device_path)
    )""",
    """
    CREATE TABLE volumes (
        name TEXT PRIMARY KEY NOT NULL CHECK (length(name) > 0),
        device_path TEXT NOT NULL UNIQUE,
        major INTEGER,
        minor INTEGER,
        size INTEGER NOT NULL CHECK (size >= 0),
        serial TEXT,
        chunk_size INTEGER NOT NULL CHECK (chunk_size > 0),
        tracker_backend TEXT NOT NULL,
        tracker_state TEXT NOT NULL DEFAULT 'unknown'
            CHECK (tracker_state IN ('exact', 'unknown')),
        tracker_reason TEXT NOT NULL DEFAULT '',
        objectives TEXT NOT NULL DEFAULT '{}',
        group_name TEXT REFERENCES groups(name) ON DELETE RESTRICT,
        pool_name TEXT REFERENCES pools(name) ON DELETE RESTRICT,
        created REAL NOT NULL
    )""",
    "CREATE INDEX volumes_group ON volumes(group_name)",
    "CREATE INDEX volumes_pool ON volumes(pool_name)",
    # Keyed by a stable device key (serial when known), not by path: /dev/sdX and dm
    # minors move between boots, a measured disk does not get slower by being renamed.
    """
    CREATE TABLE perf (
        device_key TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('pool', 'volume')),
        device_path TEXT,
        capacity INTEGER,
        rotational INTEGER CHECK (rotational IN (0, 1)),
        transport TEXT,
        layout TEXT,
        seq_read REAL,
        seq_write REAL,
        rand_read REAL,
        rand_write REAL,
        chunk_size INTEGER,
        measured_at REAL NOT NULL,
        source TEXT NOT NULL CHECK (source IN ('probe', 'live')),
        PRIMARY KEY (device_key, kind)
    )""",
    # base/parent are deferred so that a whole chain can be replaced in one transaction
    # (rebuild from the pool manifests) without ordering the inserts.
    """
    CREATE TABLE generations (
        id TEXT PRIMARY KEY NOT NULL,
        volume TEXT NOT NULL REFERENCES volumes(name) ON DELETE CASCADE,
        pool TEXT NOT NULL REFERENCES pools(name) ON DELETE RESTRICT,
        kind TEXT NOT NULL CHECK (kind IN ('full', 'differential', 'incremental')),
        base TEXT REFERENCES generations(id) DEFERRABLE INITIALLY DEFERRED,
        parent TEXT REFERENCES generations(id) DEFERRABLE INITIALLY DEFERRED,
        created REAL NOT NULL,
        bytes_stored INTEGER NOT NULL DEFAULT 0 CHECK (bytes_stored >= 0),
        chunks INTEGER NOT NULL DEFAULT 0 CHECK (chunks >= 0),
        state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'committed')),
        committed_at REAL,
        location TEXT NOT NULL DEFAULT '{}',
        manifest_checksum TEXT,
        CHECK ((kind = 'full') = (base IS NULL)),
        CHECK ((state = 'committed') = (committed_at IS NOT NULL))
    )""",
    "CREATE INDEX generations_volume ON generations(volume, created)",
    "CREATE INDEX generations_base ON generations(base)",
    "CREATE INDEX generations_parent ON generations(parent)",
    # jobs.volume has no foreign key on purpose: job history outlives an unprotected volume.
    f"""
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('backup', 'restore', 'verify')),
        volume TEXT,
{_JOB_RUN_COLUMNS}
        error TEXT
    )""",
    "CREATE INDEX jobs_volume ON jobs(volume, created)",
    "CREATE INDEX jobs_state ON jobs(state)",
    """
    CREATE TABLE job_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        job TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        at REAL NOT NULL,
        state TEXT NOT NULL,
        message TEXT NOT NULL DEFAULT ''
    )""",
    "CREATE INDEX job_events_job ON job_events(job, seq)",
)


def _rebuilt_jobs(version: int, kinds: tuple[str, ...], copy: str) -> tuple[str, ...]:
    """The statements that rebuild ``jobs`` with a new CHECK on ``kind`` (v2 and v3).

    SQLite cannot change a CHECK constraint in place: create ``jobs_v<version>``, ``copy``
    the rows into it, drop ``jobs``, rename, index again. The columns are those of v2 and
    v3 alike; this helper is frozen with them (a step that changes a column writes its own).
    """
    table = f"jobs_v{version}"
    checked = ", ".join(f"'{kind}'" for kind in kinds)
    return (
        f"""
    CREATE TABLE {table} (
        id TEXT PRIMARY KEY NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ({checked})),
        volume TEXT,
        pool TEXT,
        generation TEXT,
{_JOB_RUN_COLUMNS}
        error TEXT,
        result TEXT
    )""",
        copy,
        "DROP TABLE jobs",
        f"ALTER TABLE {table} RENAME TO jobs",
        "CREATE INDEX jobs_volume ON jobs(volume, created)",
        "CREATE INDEX jobs_state ON jobs(state)",
    )


# v2: probe jobs, jobs that say what they worked on and what came out, and the measured
# restores the restore-time model learns from. SQLite cannot change a CHECK constraint in
# place, so ``jobs`` is rebuilt (the documented create-copy-drop-rename procedure; foreign
# keys are off during migrations and checked before commit).
_V2 = (
    *_rebuilt_jobs(
        2,
        ("backup", "restore", "verify", "probe"),
        """
    INSERT INTO jobs_v2 (id, kind, volume, state, progress, bytes_done, bytes_total,
                         created, started, finished, error)
    SELECT id, kind, volume, state, progress, bytes_done, bytes_total,
           created, started, finished, error FROM jobs""",
    ),
    # No foreign keys: a restore stays evidence for the model after retention removed
    # its generation or the volume was unprotected.
    """
    CREATE TABLE restores (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        volume TEXT NOT NULL,
        generation TEXT NOT NULL,
        method TEXT NOT NULL CHECK (method IN ('full', 'differential', 'incremental')),
        mode TEXT NOT NULL,
        bytes_restored INTEGER NOT NULL CHECK (bytes_restored >= 0),
        predicted_seconds REAL CHECK (predicted_seconds IS NULL OR predicted_seconds >= 0),
        measured_seconds REAL NOT NULL CHECK (measured_seconds >= 0),
        at REAL NOT NULL,
        job TEXT
    )""",
    "CREATE INDEX restores_volume ON restores(volume, at)",
)

# v3: drill jobs, and every measured restore path sample (real restores and drills) with
# its shape, which the restore-time model fits its terms to (issue 14). ``jobs`` is rebuilt
# again for its CHECK, as in v2.
_V3 = (
    *_rebuilt_jobs(
        3,
        ("backup", "restore", "verify", "probe", "drill"),
        "INSERT INTO jobs_v3 SELECT * FROM jobs",
    ),
    # No foreign keys, like restores: evidence outlives volumes and pool devices.
    """
    CREATE TABLE path_samples (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        volume TEXT NOT NULL,
        pool_device TEXT NOT NULL CHECK (length(pool_device) > 0),
        mode TEXT NOT NULL CHECK (length(mode) > 0),
        source TEXT NOT NULL CHECK (source IN ('restore', 'drill')),
        generations INTEGER NOT NULL CHECK (generations >= 0),
        chunks INTEGER NOT NULL CHECK (chunks >= 0),
        extents INTEGER NOT NULL CHECK (extents >= 0),
        bytes INTEGER NOT NULL CHECK (bytes >= 0),
        predicted_seconds REAL CHECK (predicted_seconds IS NULL OR predicted_seconds >= 0),
        measured_seconds REAL NOT NULL CHECK (measured_seconds >= 0),
        at REAL NOT NULL
    )""",
    "CREATE INDEX path_samples_device ON path_samples(pool_device, mode, at)",
)

# v5: backup targets (issue 11): the remote hosts this host registered, and target
# registration as a job kind (it connects and measures the link, which takes seconds).
# The link's throughputs go into ``perf`` as a pool-kind row keyed ``target:ID:link``
# (reads = down, writes = up); its round trip, which ``perf`` has no column for, and the
# target's last reported space are kept with the target.
_V5 = (
    *_rebuilt_jobs(
        5,
        ("backup", "restore", "verify", "probe", "drill", "target"),
        "INSERT INTO jobs_v5 SELECT * FROM jobs",
    ),
    """
    CREATE TABLE targets (
        id TEXT PRIMARY KEY NOT NULL CHECK (length(id) > 0),
        url TEXT NOT NULL CHECK (length(url) > 0),
        client_id TEXT NOT NULL CHECK (length(client_id) > 0),
        pool TEXT NOT NULL CHECK (length(pool) > 0),
        host_key TEXT NOT NULL CHECK (host_key LIKE 'SHA256:%'),
        state TEXT NOT NULL DEFAULT 'ok' CHECK (state IN ('ok', 'unreachable', 'refused')),
        state_reason TEXT NOT NULL DEFAULT '',
        round_trip REAL CHECK (round_trip IS NULL OR round_trip >= 0),
        space_free INTEGER CHECK (space_free IS NULL OR space_free >= 0),
        space_total INTEGER CHECK (space_total IS NULL OR space_total >= 0),
        space_used INTEGER CHECK (space_used IS NULL OR space_used >= 0),
        checked_at REAL,
        added REAL NOT NULL
    )""",
)

# v6: generations on backup targets (issue 11) and transfers as a job kind. A remote
# generation is a copy of the local generation of the same id (the same point in time);
# a row is written only after the target committed it. No foreign keys, like restores:
# the engine refuses to remove a target that still holds generations.
_V6 = (
    *_rebuilt_jobs(
        6,
        ("backup", "restore", "verify", "probe", "drill", "target", "transfer"),
        "INSERT INTO jobs_v6 SELECT * FROM jobs",
    ),
    """
    CREATE TABLE remote_generations (
        target TEXT NOT NULL CHECK (length(target) > 0),
        volume TEXT NOT NULL CHECK (length(volume) > 0),
        generation TEXT NOT NULL CHECK (length(generation) > 0),
        kind TEXT NOT NULL CHECK (kind IN ('full', 'differential', 'incremental')),
        base TEXT,
        parent TEXT,
        created REAL NOT NULL,
        volume_size INTEGER NOT NULL CHECK (volume_size > 0),
        bytes_stored INTEGER NOT NULL CHECK (bytes_stored >= 0),
        extents INTEGER CHECK (extents IS NULL OR extents >= 0),
        sent_at REAL NOT NULL,
        seconds REAL CHECK (seconds IS NULL OR seconds >= 0),
        PRIMARY KEY (target, volume, generation)
    )""",
)

# v7: file groups (issue 13): named sets of paths on a protected volume's file system.
# A group's generations are its volume's; their file lists live in the pool beside the
# generation's manifest (a new host reading the pool has them too), not here.
_V7 = (
    """
    CREATE TABLE file_groups (
        name TEXT PRIMARY KEY NOT NULL CHECK (length(name) > 0),
        volume TEXT NOT NULL REFERENCES volumes(name) ON DELETE CASCADE,
        paths TEXT NOT NULL CHECK (json_valid(paths)),
        created REAL NOT NULL
    )""",
)

# v8: object-store targets (issue 12). A target records its kind: ``ssh`` (issue 11's:
# a pinned host key and an area on the target) or ``s3`` (a bucket and prefix at an
# endpoint: no host key, no area; the credentials file's path, never a secret, or "" for
# the daemon's AWS environment). SQLite cannot relax a CHECK in place: the table is
# rebuilt with its rows (every existing target is an ssh one).
_V8 = (
    """
    CREATE TABLE targets_v8 (
        id TEXT PRIMARY KEY NOT NULL CHECK (length(id) > 0),
        kind TEXT NOT NULL DEFAULT 'ssh' CHECK (kind IN ('ssh', 's3')),
        url TEXT NOT NULL CHECK (length(url) > 0),
        client_id TEXT NOT NULL CHECK (length(client_id) > 0),
        pool TEXT NOT NULL CHECK (kind = 's3' OR length(pool) > 0),
        host_key TEXT NOT NULL CHECK (kind = 's3' OR host_key LIKE 'SHA256:%'),
        endpoint TEXT NOT NULL DEFAULT '' CHECK (kind = 'ssh' OR length(endpoint) > 0),
        credentials TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL DEFAULT 'ok' CHECK (state IN ('ok', 'unreachable', 'refused')),
        state_reason TEXT NOT NULL DEFAULT '',
        round_trip REAL CHECK (round_trip IS NULL OR round_trip >= 0),
        space_free INTEGER CHECK (space_free IS NULL OR space_free >= 0),
        space_total INTEGER CHECK (space_total IS NULL OR space_total >= 0),
        space_used INTEGER CHECK (space_used IS NULL OR space_used >= 0),
        checked_at REAL,
        added REAL NOT NULL
    )""",
    """INSERT INTO targets_v8 (id, kind, url, client_id, pool, host_key, state, state_reason,
           round_trip, space_free, space_total, space_used, checked_at, added)
       SELECT id, 'ssh', url, client_id, pool, host_key, state, state_reason, round_trip,
           space_free, space_total, space_used, checked_at, added FROM targets""",
    "DROP TABLE targets",
    "ALTER TABLE targets_v8 RENAME TO targets",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "volumes, groups, pools, performance table, generations, jobs", _V1),
    Migration(2, "probe jobs, job results, measured restores", _V2),
    Migration(3, "drill jobs, restore path samples", _V3),
    Migration(
        4,
        "restore path samples: the copy target's write rate the estimate assumed",
        (
            # 0: the sample wrote to no target the model adds (a drill, a swap-in).
            "ALTER TABLE path_samples ADD COLUMN write_rate REAL NOT NULL DEFAULT 0 "
            "CHECK (write_rate >= 0)",
        ),
    ),
    Migration(5, "backup targets, target registration jobs", _V5),
    Migration(6, "generations on backup targets, transfer jobs", _V6),
    Migration(7, "file groups", _V7),
    Migration(8, "object-store targets", _V8),
)

CURRENT_VERSION = MIGRATIONS[-1].version

# migrate() indexes MIGRATIONS by version; a gap or a reordering would skip a step.
assert [m.version for m in MIGRATIONS] == list(range(1, CURRENT_VERSION + 1))


def _pragma_int(conn: sqlite3.Connection, name: str) -> int:
    return int(conn.execute(f"PRAGMA {name}").fetchone()[0])


def _has_tables(conn: sqlite3.Connection) -> bool:
    row = conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()
    return bool(row[0])


def check_compatible(conn: sqlite3.Connection, path: Path) -> int:
    """Return the catalog's schema version after checking this code can use it.

    Only reads. Raises :class:`CorruptMetadata` for a file that is not a blockguard
    catalog or whose schema is newer than this code knows.

    :param conn: an open connection to the catalog (read-only is enough)
    :param path: the catalog's path, for the messages
    """
    what = f"catalog {path}"
    app = _pragma_int(conn, "application_id")
    version = _pragma_int(conn, "user_version")
    if app not in (0, APPLICATION_ID):
        raise CorruptMetadata(
            what=what, detail=f"it is not a blockguard catalog (application id {app:#x})"
        )
    if app == 0 and _has_tables(conn):
        raise CorruptMetadata(
            what=what, detail="it is an SQLite file with tables but not a blockguard catalog"
        )
    if version > CURRENT_VERSION:
        raise CorruptMetadata(
            what=what,
            detail=(
                f"its schema version {version} is newer than the newest this blockguard "
                f"knows ({CURRENT_VERSION}); it was written by a newer blockguard, which must "
                "be used with it (the catalog was left unchanged)"
            ),
        )
    return version


def migrate(conn: sqlite3.Connection, path: Path) -> tuple[int, int]:
    """Bring the catalog to :data:`CURRENT_VERSION` in one transaction.

    A failure rolls everything back, leaving the catalog at its old version.

    :param conn: a read-write connection in autocommit mode, outside any transaction
    :param path: the catalog's path, for the messages
    :returns: (version found, version now)
    """
    # foreign_keys cannot change inside a transaction, and table rebuilds need it off.
    conn.execute("PRAGMA foreign_keys = OFF")
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the write lock: another process may have migrated meanwhile.
            found = check_compatible(conn, path)
            for step in MIGRATIONS[found:]:
                for statement in step.statements:
                    conn.execute(statement)
                if step.apply is not None:
                    step.apply(conn)
            broken = conn.execute("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise CorruptMetadata(
                    what=f"catalog {path}",
                    detail=f"upgrade from schema version {found} left dangling references "
                    f"{broken[:5]!r}; nothing was changed",
                )
            if found < CURRENT_VERSION:
                conn.execute(f"PRAGMA user_version = {CURRENT_VERSION:d}")
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID:d}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    finally:
        conn.execute("PRAGMA foreign_keys = ON")
    return found, CURRENT_VERSION
