"""The device-mapper ioctl, for the requests asked often: a status, a table, a message.

Under TCG a ``dmsetup`` call costs 70-160 ms, nearly all of it starting the process,
and a thin backup asked five to nine of them (the pool's status, a thin id from a table,
reserving and releasing the metadata snapshot and looking who holds it); the same
request on ``/dev/mapper/control`` takes well under a millisecond. Only these reads
(``DM_TABLE_STATUS``) and target messages (``DM_TARGET_MSG``) go this way: what creates,
loads, suspends or removes a device stays with dmsetup, which makes the device nodes.

Where the control node cannot be opened (no device-mapper: this host) :func:`control`
is None and :class:`~.dm.DeviceMapper` runs dmsetup as before. A request the kernel
refuses raises :class:`~blockguard.errors.CommandFailed` with the kernel's reason, as a
failed dmsetup would (EBUSY: "Device or resource busy").
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import threading
import time

from blockguard.errors import CommandFailed

log = logging.getLogger(__name__)

CONTROL = "/dev/mapper/control"

#: struct dm_ioctl (<linux/dm-ioctl.h>): version[3], data_size, data_start,
#: target_count, open_count, flags, event_nr, padding, dev, name[128], uuid[129], data[7].
_HEADER = struct.Struct("=3IIIIiIIIQ128s129s7s")
#: struct dm_target_spec: sector_start, length, status, next, target_type[16].
_SPEC = struct.Struct("=QQiI16s")
_MSG = struct.Struct("=Q")  # struct dm_target_msg: sector, then the message

_TABLE_STATUS, _TARGET_MSG = 12, 14
_STATUS_TABLE_FLAG = 1 << 4
_BUFFER_FULL_FLAG = 1 << 8
#: The interface version asked for: any 4.x kernel answers these requests.
_VERSION = (4, 0, 0)
#: Errors that say this interface cannot be used here (dmsetup is used instead).
_UNUSABLE = {errno.ENOTTY, errno.EINVAL, errno.EPERM, errno.EACCES, errno.ENOSYS}


def _iowr(nr: int) -> int:
    return (3 << 30) | (_HEADER.size << 16) | (0xFD << 8) | nr


class Unusable(Exception):
    """The ioctl cannot serve this request here; the caller runs dmsetup."""


class Control:
    """The open control node; thread-safe (each request has its own buffer)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def status(self, *, name: str = "", rdev: int = 0, table: bool = False) -> str:
        """Like ``dmsetup status NAME`` (or ``table``), by name or by device number:
        one ``START LEN TYPE PARAMS`` line per target."""
        flags = _STATUS_TABLE_FLAG if table else 0
        size = 16384
        while True:
            out = self._call(_TABLE_STATUS, "table" if table else "status", name, rdev,
                             flags, b"", size)  # fmt: skip
            header = _HEADER.unpack_from(out)
            if not header[7] & _BUFFER_FULL_FLAG:
                break
            size *= 4
        count, start = header[5], header[4]
        lines, at = [], start
        for _ in range(count):
            first, length, _st, nxt, kind = _SPEC.unpack_from(out, at)
            params = out[at + _SPEC.size : out.index(b"\0", at + _SPEC.size)]
            target = kind.split(b"\0", 1)[0].decode()
            lines.append(f"{first} {length} {target} {params.decode(errors='replace')}".rstrip())
            at = start + nxt
        return "\n".join(lines)

    def message(self, name: str, message: str) -> None:
        """Like ``dmsetup message NAME 0 MESSAGE``."""
        payload = _MSG.pack(0) + message.encode() + b"\0"
        self._call(_TARGET_MSG, "message", name, 0, 0, payload, _HEADER.size + len(payload) + 8)

    def _call(
        self, nr: int, what: str, name: str, rdev: int, flags: int, payload: bytes, size: int
    ) -> bytearray:
        buf = bytearray(max(size, _HEADER.size + len(payload)))
        _HEADER.pack_into(
            buf, 0, *_VERSION, len(buf), _HEADER.size, 0, 0, flags, 0, 0, rdev,
            name.encode(), b"", b"",
        )  # fmt: skip
        buf[_HEADER.size : _HEADER.size + len(payload)] = payload
        argv = ["dm-ioctl", what, name or f"{os.major(rdev)}:{os.minor(rdev)}"]
        started = time.monotonic()
        try:
            fcntl.ioctl(self.fd, _iowr(nr), buf, True)
        except OSError as exc:
            # A message's EINVAL is the target refusing it (release_metadata_snap with
            # none held), not the interface: a failed command, as dmsetup's would be.
            if exc.errno in _UNUSABLE and not (nr == _TARGET_MSG and exc.errno == errno.EINVAL):
                raise Unusable(str(exc)) from None
            log.debug("rc=%d in %.4fs: %s", exc.errno, time.monotonic() - started, argv)
            raise CommandFailed(argv, exc.errno or 1, os.strerror(exc.errno or 0)) from None
        log.debug("ioctl in %.4fs: %s", time.monotonic() - started, argv)
        return buf


_control: Control | None = None
_tried = False
_lock = threading.Lock()


def control() -> Control | None:
    """The control node, opened once per process; None where it cannot be opened."""
    global _control, _tried
    with _lock:
        if not _tried:
            _tried = True
            try:
                _control = Control(os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC))
            except OSError as exc:
                log.debug("no device-mapper ioctl (%s): dmsetup answers", exc)
        return _control


def give_up(reason: str) -> None:
    """The kernel refused the interface itself: dmsetup from now on."""
    global _control
    with _lock:
        if _control is not None:
            log.warning("device-mapper ioctl unusable (%s): dmsetup answers", reason)
            # Not closed: another thread may be in an ioctl on it, and a closed number
            # can be reused by a device this process opens next.
            _control = None
