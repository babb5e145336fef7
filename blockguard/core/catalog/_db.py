"""The catalog's SQLite connection: where the file lives, how it is opened, transactions."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from blockguard.core.catalog import schema
from blockguard.errors import (
    BlockguardError,
    Busy,
    CorruptMetadata,
    EnvironmentProblem,
    InternalError,
)

DEFAULT_STATE_DIR = Path("/var/lib/blockguard")
CATALOG_FILE = "catalog.db"
#: Seconds a writer waits for another process (blockguardctl reading, say) to let go.
BUSY_TIMEOUT = 10.0


def default_catalog_path() -> Path:
    """``$BLOCKGUARD_STATE_DIR/catalog.db`` if that is set, else under /var/lib/blockguard."""
    state_dir = os.environ.get("BLOCKGUARD_STATE_DIR")
    return (Path(state_dir) if state_dir else DEFAULT_STATE_DIR) / CATALOG_FILE


def _translate(exc: sqlite3.Error, path: Path) -> BlockguardError:
    """Turn an SQLite failure that is not a bug of ours into an error of the tree."""
    text = str(exc)
    what = f"catalog {path}"
    if isinstance(exc, sqlite3.OperationalError) and "locked" in text:
        return Busy(what=what, reason=f"another process holds it locked ({text})")
    if "malformed" in text or "not a database" in text:
        return CorruptMetadata(what=what, detail=text)
    if isinstance(exc, sqlite3.OperationalError) and (
        "disk" in text or "readonly" in text or "unable to open" in text
    ):
        return EnvironmentProblem(detail=f"{what}: {text}")
    return InternalError(detail=f"{what}: {text}")


def _prepare_file(path: Path) -> None:
    """Create the catalog's directory (0700) and an empty catalog file (0600)."""
    try:
        if not path.parent.is_dir():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # mkdir's mode is filtered by the umask; the state directory must not be.
            os.chmod(path.parent, 0o700)
        # SQLite gives -wal and -shm the mode of the main file, so creating it 0600 here
        # keeps the whole catalog private.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
    except OSError as e:
        raise EnvironmentProblem(
            detail=f"cannot create the catalog {path}: {e.strerror or e}"
        ) from e


class CatalogBase:
    """One connection to the catalog, shared by threads under a lock.

    :param path: the catalog file; by default :func:`default_catalog_path`
    :param busy_timeout: seconds to wait for another process's lock
    :param clock: returns the current time in seconds since the epoch (tests and
        simulations pass their own)
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        busy_timeout: float = BUSY_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path) if path is not None else default_catalog_path()
        self._clock = clock
        # Held for a whole transaction, so no thread reads another's uncommitted writes
        # on the shared connection; re-entrant so that a method can call another inside
        # the same transaction.
        self._lock = threading.RLock()
        self._depth = 0
        self._conn: sqlite3.Connection | None = None
        _prepare_file(self.path)
        try:
            # isolation_level=None: transactions are begun and ended here explicitly, never
            # implicitly by the sqlite3 module.
            conn = sqlite3.connect(
                self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            raise _translate(e, self.path) from e
        try:
            # Before anything writes (even switching to WAL rewrites the header): a foreign
            # or newer catalog must be left exactly as it was. A read-write connection
            # rather than a read-only one, because only the former removes the -wal and
            # -shm files it had to create when it closes.
            schema.check_compatible(conn, self.path)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise EnvironmentProblem(
                    detail=f"catalog {self.path}: the filesystem does not support SQLite's "
                    f"write-ahead log (journal mode stayed {mode!r})"
                )
            # FULL, not NORMAL: with WAL, NORMAL may lose the last commits on power loss,
            # and the daemon tells clients a generation or a job result exists as soon as
            # it committed. Catalog writes are few and small, so one more fsync per commit
            # costs nothing that matters.
            conn.execute("PRAGMA synchronous = FULL")
            schema.migrate(conn, self.path)
            conn.execute("PRAGMA foreign_keys = ON")
            conn.row_factory = sqlite3.Row
        except sqlite3.Error as e:
            conn.close()
            raise _translate(e, self.path) from e
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    # --- life cycle ------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection; the catalog object cannot be used afterwards."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> CatalogBase:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path}>"

    @property
    def schema_version(self) -> int:
        """The schema version of the open catalog."""
        with self._reading() as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    def integrity_problems(self) -> list[str]:
        """SQLite's integrity and foreign-key checks; an empty list means healthy."""
        with self._reading() as conn:
            rows = [str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall()]
            problems = [] if rows == ["ok"] else rows
            problems += [
                f"dangling reference in {r[0]} row {r[1]} to {r[2]}"
                for r in conn.execute("PRAGMA foreign_key_check").fetchall()
            ]
        return problems

    def now(self) -> float:
        """The catalog's clock (seconds since the epoch)."""
        return self._clock()

    # --- transactions ----------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Group several catalog calls into one atomic change.

        ``with catalog.transaction(): catalog.commit_generation(g); catalog.finish_job(j)``
        commits both or neither. Nested use is allowed; a failing inner block is rolled
        back to where it began.
        """
        with self._tx(write=True) as conn:
            yield conn

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._tx(write=False) as conn:
            yield conn

    @contextlib.contextmanager
    def _tx(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._conn
            if conn is None:
                raise InternalError(detail=f"catalog {self.path} used after it was closed")
            depth = self._depth
            # Savepoints make a failed inner call undo only itself, so "a failed
            # operation changes nothing" holds inside a caller's transaction too.
            begin, commit, undo = (
                (f"SAVEPOINT sp{depth}", f"RELEASE sp{depth}", f"ROLLBACK TO sp{depth}")
                if depth
                else ("BEGIN IMMEDIATE" if write else "BEGIN", "COMMIT", "ROLLBACK")
            )
            try:
                conn.execute(begin)
            except sqlite3.Error as e:
                raise _translate(e, self.path) from e
            self._depth = depth + 1
            try:
                yield conn
                conn.execute(commit)
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    if conn.in_transaction:
                        conn.execute(undo)
                        if depth:
                            conn.execute(commit)
                if isinstance(exc, sqlite3.Error):
                    raise _translate(exc, self.path) from exc
                raise
            finally:
                self._depth = depth
