"""A small FUSE server in pure Python: one directory holding one read-only file.

The host has the kernel's FUSE (``/dev/fuse``) but no libfuse, no fusermount and no
Python binding, so this speaks the kernel protocol itself (``include/uapi/linux/fuse.h``):
it opens ``/dev/fuse``, mounts a ``fuse.blockguard`` file system with that descriptor by
``mount(2)`` and answers the few requests a read-only file needs (INIT, LOOKUP, GETATTR,
OPEN, READ, RELEASE, FORGET, STATFS, FLUSH, OPENDIR, READDIR, RELEASEDIR, DESTROY). Any
other request gets ENOSYS (GETXATTR, LISTXATTR: the kernel then stops asking) or EROFS.

The file's content comes from a ``read(offset, size) -> bytes`` callable; an ``OSError``
it raises becomes that errno for the one read (a corrupt chunk: EIO), anything else EIO.
Requests are served one at a time by one thread: the callable need not be thread-safe.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from blockguard.errors import BlockguardError, EnvironmentProblem
from blockguard.storage import blockdev

log = logging.getLogger(__name__)

#: The type shown in /proc/self/mountinfo (``fuse.blockguard``): how a restarted daemon
#: tells its own FUSE mounts from anyone else's.
FS_TYPE = "fuse.blockguard"
FUSE_DEV = "/dev/fuse"

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2

ROOT_ID = 1
FILE_ID = 2
#: Attributes and names never change while mounted: the kernel may keep them long.
VALID_SECONDS = 3600

# Opcodes (fuse.h enum fuse_opcode).
LOOKUP, FORGET, GETATTR = 1, 2, 3
OPEN, READ, STATFS, RELEASE = 14, 15, 17, 18
GETXATTR, LISTXATTR, FLUSH, INIT = 22, 23, 25, 26
OPENDIR, READDIR, RELEASEDIR = 27, 28, 29
ACCESS, INTERRUPT, DESTROY, BATCH_FORGET = 34, 36, 38, 42

FUSE_KERNEL_VERSION = 7
FUSE_KERNEL_MINOR = 31
FUSE_MAX_PAGES = 1 << 22
FOPEN_KEEP_CACHE = 1 << 1
MAX_PAGES = 256  # 1 MiB reads
MAX_WRITE = 128 * 1024

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, ext, pad
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags
# major, minor, max_readahead, flags, max_background, congestion_threshold, max_write,
# time_gran, max_pages, map_alignment, flags2, max_stack_depth, 2 + 22 bytes unused.
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
# ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode, nlink,
# uid, gid, rdev, blksize, flags.
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ATTR_OUT = struct.Struct("<QII")  # attr_valid, attr_valid_nsec, dummy; then ATTR
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid, generation, entry_valid, attr_valid, nsecs
OPEN_OUT = struct.Struct("<QIi")  # fh, open_flags, backing_id
READ_IN = struct.Struct("<QQI")  # fh, offset, size (then flags we do not need)
STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # blocks..ffree, bsize, namelen, frsize, pad
DIRENT = struct.Struct("<QQII")  # ino, off, namelen, type

_libc = blockdev.libc()
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class FuseFile:
    """Serve ``read`` as the read-only file ``name`` in a FUSE file system at ``mountpoint``.

    :param mountpoint: an existing empty directory.
    :param name: the file's name in it.
    :param size: the file's size in bytes.
    :param read: ``(offset, size) -> bytes`` (at most ``size`` bytes; short at the end).
    :param on_exit: called by the serving thread once the kernel let the file system go
        (after :meth:`stop`, which may return before when the unmount had to be lazy).
    """

    def __init__(
        self,
        mountpoint: Path,
        name: str,
        size: int,
        read: Callable[[int, int], bytes],
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        self.mountpoint = Path(mountpoint)
        self._on_exit = on_exit
        self.name = name
        self.size = size
        self._read = read
        self._fd = -1
        self._thread: threading.Thread | None = None
        self._made = int(time.time())

    @property
    def path(self) -> Path:
        """The served file."""
        return self.mountpoint / self.name

    def start(self) -> None:
        """Mount and start serving (returns once the file can be opened).

        :raises EnvironmentProblem: /dev/fuse cannot be opened or the mount is refused.
        """
        try:
            self._fd = os.open(FUSE_DEV, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            # Mapped here, at the edge: no /dev/fuse, or a device cgroup without it.
            raise EnvironmentProblem(
                detail=f"cannot open {FUSE_DEV}: {exc.strerror} (FUSE is needed to browse)"
            ) from exc
        data = (
            f"fd={self._fd},rootmode=40000,user_id=0,group_id=0,allow_other,"
            f"max_read={MAX_PAGES * 4096}"
        )
        flags = MS_RDONLY | MS_NOSUID | MS_NODEV
        if (
            _libc.mount(
                b"blockguard", os.fsencode(self.mountpoint), FS_TYPE.encode(), flags, data.encode()
            )
            != 0
        ):
            err = ctypes.get_errno()
            os.close(self._fd)
            self._fd = -1
            raise EnvironmentProblem(
                detail=f"cannot mount a FUSE file system at {self.mountpoint}: {os.strerror(err)}"
            )
        self._thread = threading.Thread(
            target=self._serve, name=f"blockguard-fuse-{self.mountpoint.name}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Unmount (lazily if still busy) and wait up to ``timeout`` seconds for the
        serving thread to end; False when it still serves (a lazy unmount: the kernel
        releases the file system, and the thread ends, once its last user is gone).
        """
        if self._thread is None:
            return True
        unmount(self.mountpoint)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def serving(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- the protocol ----------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            self._serve_requests()
        finally:
            # The thread owns the descriptor: it ends only when the kernel is done with it.
            os.close(self._fd)
            self._fd = -1
            if self._on_exit is not None:
                self._on_exit()

    def _serve_requests(self) -> None:
        bufsize = MAX_PAGES * 4096 + MAX_WRITE + 4096
        while True:
            try:
                req = os.read(self._fd, bufsize)
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue  # an interrupted request: read the next
                if exc.errno != errno.ENODEV:  # ENODEV: unmounted
                    log.error("FUSE %s: reading requests failed: %s", self.mountpoint, exc)
                return
            if not req:
                return
            try:
                if not self._handle(req):
                    return
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    continue  # the request was interrupted before our reply
                if exc.errno == errno.ENODEV:
                    return
                log.error("FUSE %s: replying failed: %s", self.mountpoint, exc)

    def _reply(self, unique: int, body: bytes = b"", error: int = 0) -> None:
        os.write(self._fd, OUT_HEADER.pack(OUT_HEADER.size + len(body), -error, unique) + body)

    def _attr(self, node: int) -> bytes:
        t = self._made
        if node == ROOT_ID:
            mode, nlink, size = stat.S_IFDIR | 0o555, 2, 0
        else:
            mode, nlink, size = stat.S_IFREG | 0o444, 1, self.size
        return ATTR.pack(
            node, size, (size + 511) // 512, t, t, t, 0, 0, 0, mode, nlink, 0, 0, 0, 4096, 0
        )

    def _handle(self, req: bytes) -> bool:
        """Answer one request; False once the file system is gone."""
        _n, op, unique, node, *_ = IN_HEADER.unpack_from(req)
        body = memoryview(req)[IN_HEADER.size :]
        if op in (FORGET, BATCH_FORGET, INTERRUPT):
            return True  # no reply: nothing is counted, an interrupt is answered by the read
        if op == INIT:
            major, minor, readahead, flags = INIT_IN.unpack_from(body)
            if major != FUSE_KERNEL_VERSION:
                self._reply(unique, error=errno.EPROTO)
                return False
            self._reply(
                unique,
                INIT_OUT.pack(
                    FUSE_KERNEL_VERSION,
                    min(minor, FUSE_KERNEL_MINOR),
                    readahead,
                    flags & FUSE_MAX_PAGES,
                    16,
                    12,
                    MAX_WRITE,
                    1,
                    MAX_PAGES,
                    0,
                    0,
                    0,
                ),
            )
        elif op == LOOKUP:
            name = bytes(body).split(b"\0", 1)[0]
            if node != ROOT_ID or name != self.name.encode():
                self._reply(unique, error=errno.ENOENT)
            else:
                entry = ENTRY_OUT.pack(FILE_ID, 1, VALID_SECONDS, VALID_SECONDS, 0, 0)
                self._reply(unique, entry + self._attr(FILE_ID))
        elif op == GETATTR:
            self._reply(unique, ATTR_OUT.pack(VALID_SECONDS, 0, 0) + self._attr(node))
        elif op in (OPEN, OPENDIR):
            if op == OPEN and struct.unpack_from("<I", body)[0] & os.O_ACCMODE != os.O_RDONLY:
                self._reply(unique, error=errno.EROFS)
            else:
                self._reply(unique, OPEN_OUT.pack(0, FOPEN_KEEP_CACHE if op == OPEN else 0, 0))
        elif op == READ:
            _fh, offset, size = READ_IN.unpack_from(body)
            self._do_read(unique, offset, size)
        elif op == READDIR:
            _fh, offset, size = READ_IN.unpack_from(body)
            self._reply(unique, self._dirents(offset, size))
        elif op in (RELEASE, RELEASEDIR, FLUSH, ACCESS):
            self._reply(unique)
        elif op == STATFS:
            blocks = (self.size + 4095) // 4096
            self._reply(unique, STATFS_OUT.pack(blocks, 0, 0, 2, 0, 4096, 255, 4096, 0))
        elif op == DESTROY:
            self._reply(unique)
            return False
        elif op in (GETXATTR, LISTXATTR):
            self._reply(unique, error=errno.ENOSYS)
        else:
            self._reply(unique, error=errno.EROFS if op < INIT else errno.ENOSYS)
        return True

    def _do_read(self, unique: int, offset: int, size: int) -> None:
        size = max(0, min(size, self.size - offset))
        if size == 0:
            self._reply(unique)
            return
        try:
            data = self._read(offset, size)
        except OSError as exc:
            self._reply(unique, error=exc.errno or errno.EIO)
            return
        except BlockguardError as exc:
            log.error("FUSE %s: read of %d bytes at %d failed: %s", self.path, size, offset, exc)
            self._reply(unique, error=errno.EIO)
            return
        except Exception:
            log.exception("FUSE %s: read of %d bytes at %d failed", self.path, size, offset)
            self._reply(unique, error=errno.EIO)
            return
        self._reply(unique, data)

    def _dirents(self, offset: int, size: int) -> bytes:
        entries = [(ROOT_ID, b".", 4), (ROOT_ID, b"..", 4), (FILE_ID, self.name.encode(), 8)]
        out = b""
        for index in range(offset, len(entries)):
            ino, name, kind = entries[index]
            rec = DIRENT.pack(ino, index + 1, len(name), kind) + name
            rec += b"\0" * (-len(rec) % 8)
            if len(out) + len(rec) > size:
                break
            out += rec
        return out


def unmount(path: Path | str, *, lazy_if_busy: bool = True) -> bool:
    """Unmount ``path`` (detached when busy and ``lazy_if_busy``); False when it was not
    mounted.

    :raises EnvironmentProblem: the unmount failed.
    """
    target = os.fsencode(str(path))
    if _libc.umount2(target, 0) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EBUSY and lazy_if_busy and _libc.umount2(target, MNT_DETACH) == 0:
        return True
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    raise EnvironmentProblem(detail=f"cannot unmount {path}: {os.strerror(err)}")
