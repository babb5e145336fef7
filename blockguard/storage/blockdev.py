"""Opening block devices safely, and what the kernel says about them.

The rule (see the platform notes): blockguard never reads or writes a path it has not
verified, after ``open``, with ``fstat`` to be a block device — and, where the caller
knows it, the very device it means (``st_rdev``). Without udev, ``/dev/mapper/NAME`` may be
missing, and opening it for writing would otherwise create a regular file and "succeed".
Nothing here ever passes ``O_CREAT``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import mmap
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from blockguard.core import vocab
from blockguard.errors import (
    DeviceInUse,
    DeviceIOError,
    DeviceReadOnly,
    EnvironmentProblem,
    NotABlockDevice,
)
from blockguard.storage.ioedge import EdgeFile

# ioctl numbers from <linux/fs.h>
BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKPBSZGET = 0x127B
BLKROGET = 0x125E
BLKFLSBUF = 0x1261

SECTOR = 512


@dataclass(frozen=True)
class DeviceIdentity:
    """What identifies a block device for as long as it exists."""

    major: int
    minor: int
    size: int

    @property
    def devno(self) -> str:
        return f"{self.major}:{self.minor}"


class BlockDevice(EdgeFile):
    """An open, verified block device. Use as a context manager; its I/O is the edge's
    (:class:`~.ioedge.EdgeFile`).

    :param path: device path; it must resolve to a block device.
    :param write: open read-write (never creates anything).
    :param direct: ``O_DIRECT`` (I/O must use aligned buffers, offsets and sizes).
    :param exclusive: ``O_EXCL``: fail if the device is mounted or held by the kernel.
    :param expect_rdev: the ``st_rdev`` the caller means; a different device is refused.
    :param pool: the pool the device belongs to (a thin LV of an lvm pool): then ENOSPC is
        a full pool (:class:`~blockguard.errors.PoolSpaceLow`), not a device error.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        write: bool = False,
        direct: bool = False,
        exclusive: bool = False,
        expect_rdev: int | None = None,
        pool: str | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.pool = pool
        flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        if exclusive:
            flags |= os.O_EXCL
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            raise NotABlockDevice(self.path, "it does not exist") from None
        except IsADirectoryError:
            raise NotABlockDevice(self.path, "it is a directory") from None
        except OSError as exc:
            if exc.errno == 16:  # EBUSY from O_EXCL: mounted or claimed by the kernel
                raise DeviceInUse(path=self.path, reason="it is open exclusively") from None
            if exc.errno == 30:  # EROFS
                raise DeviceReadOnly(path=self.path) from None
            if exc.errno in (40, 36, 20):  # ELOOP, ENAMETOOLONG, ENOTDIR: a bad path
                raise NotABlockDevice(self.path, exc.strerror or "") from None
            raise EnvironmentProblem(detail=f"cannot open {self.path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISBLK(st.st_mode):
                raise NotABlockDevice(self.path, f"it is a {_kind(st.st_mode)}")
            if expect_rdev is not None and st.st_rdev != expect_rdev:
                raise NotABlockDevice(
                    self.path,
                    f"it is device {vocab.devno(st.st_rdev)}, expected {vocab.devno(expect_rdev)}",
                )
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.rdev = st.st_rdev
        self.size = _ioctl_u64(fd, BLKGETSIZE64)
        self.logical_block_size = _ioctl_int(fd, BLKSSZGET)

    @property
    def identity(self) -> DeviceIdentity:
        return DeviceIdentity(os.major(self.rdev), os.minor(self.rdev), self.size)

    @property
    def read_only(self) -> bool:
        return _ioctl_int(self.fd, BLKROGET) != 0


def aligned_buffer(size: int) -> mmap.mmap:
    """A page-aligned, zero-filled buffer usable for ``O_DIRECT`` I/O."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def device_rdev(path: str | os.PathLike[str]) -> int:
    """``st_rdev`` of a block device path (stat, no open)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotABlockDevice(os.fspath(path), "it does not exist") from None
    if not stat.S_ISBLK(st.st_mode):
        raise NotABlockDevice(os.fspath(path), f"it is a {_kind(st.st_mode)}")
    return st.st_rdev


def sysfs_dir(rdev: int) -> Path:
    """The device's directory in sysfs (``/sys/dev/block/MAJ:MIN``, resolved)."""
    return Path(f"/sys/dev/block/{vocab.devno(rdev)}").resolve()


def holders(rdev: int) -> list[str]:
    """Kernel names of devices stacked on this one (dm, md, ...)."""
    d = sysfs_dir(rdev) / "holders"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def partitions(rdev: int) -> list[str]:
    """Kernel names of this disk's partitions."""
    d = sysfs_dir(rdev)
    return sorted(p.name for p in d.iterdir() if (p / "partition").exists())


def mounted_devnos() -> dict[str, str]:
    """``"MAJ:MIN" -> mount point`` for every mounted block device."""
    result: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            result.setdefault(fields[2], fields[4])
    return result


def write_count(rdev: int) -> int | None:
    """Writes and discards the kernel completed on the device since it appeared (its
    ``stat`` in sysfs: no command, no open); None if it cannot be read.

    Only a hint (the counters start again when the device is made again): a caller may
    skip work when it is unchanged, never decide what changed from it."""
    try:
        fields = (sysfs_dir(rdev) / "stat").read_text().split()
        return int(fields[4]) + (int(fields[11]) if len(fields) > 11 else 0)
    except (OSError, ValueError, IndexError):
        return None


def unescape_mount(field: str) -> str:
    """A mountinfo path field: spaces, tabs, newlines and backslashes come octal-escaped."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def sync_written(path: str) -> None:
    """Push what was written to the device and is still cached onto it: every file
    system mounted from it is synced (``syncfs``) and the device's own page cache
    written back and flushed (``fsync``). What a suspend with its file system frozen
    does for a snapshot, for a point in time taken without one.

    :raises DeviceIOError: a write-back failed.
    """
    with BlockDevice(path) as dev:
        devno = vocab.devno(dev.rdev)
        with open("/proc/self/mountinfo") as f:
            points = [unescape_mount(ln.split()[4]) for ln in f if ln.split()[2:3] == [devno]]
        for point in points:
            try:
                fd = os.open(point, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue  # gone since, or not ours to open: its writes are the kernel's
            try:
                if libc().syncfs(fd) != 0:
                    code = ctypes.get_errno()
                    if code != errno.ENOSYS:  # a write-back failed: never hidden
                        raise DeviceIOError(
                            path=point, op="syncing its file system", offset=0,
                            reason=f"{os.strerror(code)} (errno {code})",
                        )  # fmt: skip
                    os.sync()  # no syncfs to be had: all of them
            finally:
                os.close(fd)
        dev.flush()


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library (one handle for the daemon; errno kept for ``ctypes.get_errno``)."""
    return ctypes.CDLL(None, use_errno=True)


def swap_devices() -> set[int]:
    """``st_rdev`` of active swap devices."""
    found: set[int] = set()
    with open("/proc/swaps") as f:
        next(f, None)
        for line in f:
            with_path = line.split()[0]
            try:
                st = os.stat(with_path)
            except OSError:
                continue
            if stat.S_ISBLK(st.st_mode):
                found.add(st.st_rdev)
    return found


def has_lvm_label(path: str) -> bool:
    """True when the device carries an LVM physical-volume label (in its first 4 sectors)."""
    with BlockDevice(path) as dev:
        head = os.pread(dev.fd, 4 * SECTOR, 0)
    return any(head[i * SECTOR : i * SECTOR + 8] == b"LABELONE" for i in range(4))


def in_use_reasons(path: str) -> list[str]:
    """Why a device must not be taken over: mounted, swap, holders, partitions, LVM PV.

    Empty when nothing is known to use it.
    """
    rdev = device_rdev(path)
    devno = vocab.devno(rdev)
    reasons: list[str] = []
    mounts = mounted_devnos()
    if devno in mounts:
        reasons.append(f"it is mounted on {mounts[devno]}")
    if rdev in swap_devices():
        reasons.append("it is an active swap device")
    if held := holders(rdev):
        reasons.append(f"it is held by {', '.join(held)}")
    if parts := partitions(rdev):
        reasons.append(f"it has partitions ({', '.join(parts)})")
    if has_lvm_label(path):
        reasons.append("it is an LVM physical volume")
    return reasons


def _ioctl_u64(fd: int, request: int) -> int:
    return struct.unpack("Q", fcntl.ioctl(fd, request, b"\0" * 8))[0]


def _ioctl_int(fd: int, request: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, request, b"\0" * 4))[0]


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "regular file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "non-block file"
