"""The I/O edge: the one place where an ``OSError`` of block or pool I/O becomes a named error.

The idea is borg's ``BackupIO``: every read, write, fsync or allocation of a device or of a
pool's data file runs inside :func:`io_edge` (or calls :func:`map_oserror` in a hot loop),
which knows *what* was being done *where*; the errno then says which named error the user
sees. An EIO in the middle of a backup is thus "I/O error on /dev/sdb at offset 4194304
while reading", never "internal error (OSError in job 7)".

=================  ==============================================================
errno              error
=================  ==============================================================
ENOSPC, EDQUOT     :class:`~blockguard.errors.PoolSpaceLow` when a pool is known,
                   else :class:`~blockguard.errors.DeviceIOError` (a write past the
                   end of a block device also says ENOSPC)
EROFS, EPERM on a  :class:`~blockguard.errors.DeviceReadOnly`
write
EBUSY              :class:`~blockguard.errors.DeviceInUse`
ENODEV, ENXIO      :class:`~blockguard.errors.DeviceVanished`
anything else      :class:`~blockguard.errors.DeviceIOError` (EIO, EREMOTEIO, ...)
=================  ==============================================================
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Self

from blockguard.errors import (
    BlockguardError,
    DeviceInUse,
    DeviceIOError,
    DeviceReadOnly,
    DeviceVanished,
    PoolSpaceLow,
)

SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
READ_ONLY = frozenset({errno.EROFS})
BUSY = frozenset({errno.EBUSY})
VANISHED = frozenset({errno.ENODEV, errno.ENXIO})


def map_oserror(
    exc: OSError,
    *,
    path: str | os.PathLike[str],
    op: str,
    offset: int | None = None,
    pool: str | None = None,
) -> BlockguardError:
    """The named error for ``exc``, raised by ``op`` on ``path`` (see the module table).

    :param exc: what the kernel said.
    :param path: the device or pool file that was being used.
    :param op: what was being done, as a gerund ("reading", "writing", "flushing").
    :param offset: the byte offset of the failed request, when there was one.
    :param pool: the pool that ``path`` belongs to; only then is ENOSPC a full pool.
    """
    where = os.fspath(path)
    code = exc.errno or 0
    reason = exc.strerror or str(exc)
    at = "?" if offset is None else str(offset)
    if code in SPACE and pool is not None:
        return PoolSpaceLow(pool=pool, free=_free_bytes(where), needed=None, path=where)
    if code in READ_ONLY or (code == errno.EPERM and op.startswith("writ")):
        return DeviceReadOnly(path=where)
    if code in BUSY:
        return DeviceInUse(path=where, reason=f"the kernel refused {op} ({reason})")
    if code in VANISHED:
        return DeviceVanished(path=where, op=op, offset=at, reason=reason)
    return DeviceIOError(path=where, op=op, offset=at, reason=f"{reason} (errno {code})")


@contextmanager
def io_edge(
    path: str | os.PathLike[str],
    op: str,
    *,
    offset: int | None = None,
    pool: str | None = None,
) -> Iterator[None]:
    """Run the body with every ``OSError`` turned into its named error.

    The original ``OSError`` stays the ``__cause__`` (for the daemon log and the CLI's
    explanation of the cause chain). Parameters as for :func:`map_oserror`.
    """
    try:
        yield
    except OSError as exc:
        raise map_oserror(exc, path=path, op=op, offset=offset, pool=pool) from exc


def _free_bytes(path: str) -> int | str:
    """Free bytes of the file system holding ``path`` (best effort: ``"?"`` if unknown)."""
    probe = path
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    try:
        st = os.statvfs(probe or "/")
    except OSError:
        return "?"
    return st.f_bavail * st.f_frsize


def read_at(
    fd: int, buf: memoryview, offset: int, *, path: str | os.PathLike[str], pool: str | None
) -> int:
    """Read ``len(buf)`` bytes of ``fd`` at ``offset``; short only at its end.

    :raises BlockguardError: the named error of a failed read (see the module table).
    """
    done = 0
    try:
        while done < len(buf):
            n = os.preadv(fd, [buf[done:]], offset + done)
            if n == 0:
                break
            done += n
    except OSError as exc:
        raise map_oserror(exc, path=path, op="reading", offset=offset + done, pool=pool) from exc
    return done


def readv_at(
    fd: int,
    bufs: Sequence[memoryview],
    offset: int,
    *,
    path: str | os.PathLike[str],
    pool: str | None,
) -> int:
    """Read ``bufs`` one after the other from ``fd`` at ``offset`` in as few ``preadv``
    calls as the kernel allows (one, unless it returns short); short only at its end.

    :raises BlockguardError: the named error of a failed read (see the module table).
    """
    views = list(bufs)
    done = 0
    try:
        while views:
            n = os.preadv(fd, views, offset + done)
            if n == 0:
                break
            done += n
            while views and n >= len(views[0]):
                n -= len(views.pop(0))
            if n:
                views[0] = views[0][n:]
    except OSError as exc:
        raise map_oserror(exc, path=path, op="reading", offset=offset + done, pool=pool) from exc
    return done


def write_at(
    fd: int, buf: memoryview | bytes, offset: int, *, path: str | os.PathLike[str], pool: str | None
) -> None:
    """Write all of ``buf`` to ``fd`` at ``offset``.

    :raises BlockguardError: the named error of a failed write (see the module table).
    """
    view = memoryview(buf)
    done = 0
    try:
        while done < len(view):
            done += os.pwritev(fd, [view[done:]], offset + done)
    except OSError as exc:
        raise map_oserror(exc, path=path, op="writing", offset=offset + done, pool=pool) from exc


class EdgeFile:
    """An open descriptor of a device or pool data file whose reads, writes and flushes
    go through the I/O edge: a failure names the path, the offset and (where the file
    belongs to one) the pool. Use as a context manager.

    A subclass opens and verifies ``fd`` (a block device, a regular file of a pool) and
    sets ``path`` and ``pool``.
    """

    path: str | os.PathLike[str]
    pool: str | None
    fd: int

    def pread_into(self, buf: memoryview, offset: int) -> int:
        """Read ``len(buf)`` bytes at ``offset``; short only at the end.

        :raises DeviceIOError: the kernel failed the read (see the module table for the rest).
        """
        return read_at(self.fd, buf, offset, path=self.path, pool=self.pool)

    def preadv_into(self, bufs: Sequence[memoryview], offset: int) -> int:
        """Read ``bufs`` in turn from ``offset`` (a vectored read); short only at the end.

        :raises DeviceIOError: the kernel failed the read (see the module table for the rest).
        """
        return readv_at(self.fd, bufs, offset, path=self.path, pool=self.pool)

    def pwrite_all(self, buf: memoryview | bytes, offset: int) -> None:
        """Write all of ``buf`` at ``offset``.

        :raises DeviceIOError: the kernel failed the write (see the module table for the rest).
        """
        write_at(self.fd, buf, offset, path=self.path, pool=self.pool)

    def flush(self) -> None:
        """Make every write so far durable.

        :raises DeviceIOError: a write-back failed (the kernel reports it here, once).
        """
        with io_edge(self.path, "flushing", pool=self.pool):
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
