"""Where a file's bytes lie on its volume: FIEMAP extents, and the file list of a group.

The seed's third embodiment has the backup server send the storage system a *file list*:
for each file of a file group, the logical unit, logical block address and number of
blocks of its data. Here the file list is read from the mounted file system of a
protected volume with the ``FS_IOC_FIEMAP`` ioctl (``FIEMAP_FLAG_SYNC`` first, so
delayed allocations get their blocks), as byte ranges of the volume the file system lies
on (no partition or other layer between: checked by the mount's device).

An extent is *readable from the volume* when the kernel vouches that its bytes lie there
as they are: not ``UNKNOWN``, ``DELALLOC``, ``ENCODED``, ``DATA_ENCRYPTED``,
``DATA_INLINE``, ``DATA_TAIL`` or ``NOT_ALIGNED``. An ``UNWRITTEN`` (preallocated) extent
reads as zeros whatever its blocks hold; a hole is zeros. A file with any extent not
readable from the volume is kept *by content* (read through the file system), as the
issue asks.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import IntFlag
from pathlib import Path

from blockguard.errors import DeviceIOError, EnvironmentProblem, InvalidInput, NotFound

#: ``_IOWR('f', 11, struct fiemap)`` from <linux/fs.h> (struct fiemap is 32 bytes).
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
#: ``FIEMAP_MAX_OFFSET``: map to the end of the file.
_MAX_OFFSET = (1 << 64) - 1
_HEAD = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, mapped, count, reserved
_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, 2 reserved, flags, 3 reserved
#: Extents asked for per ioctl (a fragmented file takes several calls).
_BATCH = 256


class ExtentFlag(IntFlag):
    """``FIEMAP_EXTENT_*`` from <linux/fiemap.h>."""

    LAST = 0x1
    UNKNOWN = 0x2
    DELALLOC = 0x4
    ENCODED = 0x8
    DATA_ENCRYPTED = 0x80
    NOT_ALIGNED = 0x100
    DATA_INLINE = 0x200
    DATA_TAIL = 0x400
    UNWRITTEN = 0x800
    MERGED = 0x1000
    SHARED = 0x2000


#: Flags that say the bytes are not (or not as they are) at the extent's physical place.
NOT_ON_VOLUME = (
    ExtentFlag.UNKNOWN
    | ExtentFlag.DELALLOC
    | ExtentFlag.ENCODED
    | ExtentFlag.DATA_ENCRYPTED
    | ExtentFlag.NOT_ALIGNED
    | ExtentFlag.DATA_INLINE
    | ExtentFlag.DATA_TAIL
)


@dataclass(frozen=True)
class Extent:
    """``length`` bytes of a file from offset ``logical`` lie at byte ``physical`` of the
    volume (the last extent may reach past the file's size, to a block's end)."""

    logical: int
    physical: int
    length: int
    flags: ExtentFlag

    @property
    def on_volume(self) -> bool:
        """The volume holds these bytes as the file reads them."""
        return not self.flags & NOT_ON_VOLUME

    @property
    def zeros(self) -> bool:
        """Preallocated and never written: reads as zeros, whatever its blocks hold."""
        return bool(self.flags & ExtentFlag.UNWRITTEN)


def file_extents(fd: int, *, sync: bool = True, where: str = "") -> list[Extent]:
    """The extents of the open file ``fd``, in file order.

    :param sync: ``FIEMAP_FLAG_SYNC``: write the file's dirty pages first, so delayed
        allocations have their blocks (and the map is the one on the volume).
    :raises EnvironmentProblem: the file system does not map extents (``EOPNOTSUPP``).
    :raises DeviceIOError: the kernel reported an I/O error.
    """
    extents: list[Extent] = []
    start = 0
    flags = FIEMAP_FLAG_SYNC if sync else 0
    while True:
        buf = bytearray(_HEAD.size + _BATCH * _EXTENT.size)
        _HEAD.pack_into(buf, 0, start, _MAX_OFFSET - start, flags, 0, _BATCH, 0)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
                raise EnvironmentProblem(
                    detail=f"{where or 'the file'}: its file system does not map extents (FIEMAP)"
                ) from None
            raise DeviceIOError(
                path=where or "a file",
                offset=start,
                op="mapping its extents (FIEMAP)",
                reason=os.strerror(exc.errno or errno.EIO),
            ) from None
        mapped = _HEAD.unpack_from(buf, 0)[3]
        for n in range(mapped):
            logical, physical, length, _, _, fe_flags, *_ = _EXTENT.unpack_from(
                buf, _HEAD.size + n * _EXTENT.size
            )
            extents.append(Extent(logical, physical, length, ExtentFlag(fe_flags)))
        if mapped == 0 or extents[-1].flags & ExtentFlag.LAST:
            return extents
        start = extents[-1].logical + extents[-1].length
        flags = 0  # synced once is enough


# --- the file list --------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """One file of a group as the file list carries it.

    ``path`` is relative to the mount point; ``link_to`` names the earlier entry of the
    same inode (a hard link: no extents of its own); ``target`` is a symlink's text;
    ``by_content`` says the file's bytes are not all readable from the volume, so they
    are kept by reading the file.
    """

    path: str
    kind: str  # "file" | "dir" | "symlink"
    size: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    atime_ns: int
    inode: int
    nlink: int
    xattrs: dict[str, bytes] = field(default_factory=dict)
    extents: tuple[Extent, ...] = ()
    by_content: bool = False
    link_to: str | None = None
    target: str | None = None

    def volume_ranges(self) -> list[tuple[int, int]]:
        """The byte ranges ``(offset, length)`` of the volume holding this file's data
        (cut to its size; unwritten extents are zeros and need no bytes)."""
        ranges = []
        for ext in self.extents:
            if ext.zeros or ext.logical >= self.size:
                continue
            length = min(ext.length, self.size - ext.logical)
            ranges.append((ext.physical, length))
        return ranges


@dataclass(frozen=True)
class FileList:
    """The file list of a group on one volume (the mount point it was read under and the
    device number of the file system, so a later read can check it is the same)."""

    root: str
    device: int
    entries: tuple[FileEntry, ...]

    def ranges(self) -> list[tuple[int, int]]:
        """Every volume byte range any file of the list occupies, merged and sorted."""
        spans = sorted(r for e in self.entries for r in e.volume_ranges())
        merged: list[tuple[int, int]] = []
        for off, length in spans:
            if merged and off <= merged[-1][0] + merged[-1][1]:
                last_off, last_len = merged[-1]
                merged[-1] = (last_off, max(last_len, off + length - last_off))
            else:
                merged.append((off, length))
        return merged


def _xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    return {name: os.getxattr(path, name, follow_symlinks=False) for name in sorted(names)}


def _walk(root: Path, relative: str, device: int) -> Iterator[Path]:
    """``relative`` and, for a directory, everything below it on file system
    ``device`` (a file system mounted below is not entered)."""
    top = root / relative
    yield top
    if top.is_dir() and not top.is_symlink():
        for dirpath, dirnames, filenames in os.walk(top):
            base = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if os.lstat(base / d).st_dev == device)
            for name in [*dirnames, *sorted(filenames)]:
                yield base / name


def mount_point_of(device_path: str, *, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Where the file system on block device ``device_path`` is mounted (its first mount
    in ``mountinfo``, matched by device number), or None when it is not mounted.

    :raises NotFound: no such device.
    """
    try:
        rdev = os.stat(device_path).st_rdev
    except FileNotFoundError:
        raise NotFound(what="device", name=device_path) from None
    want = f"{os.major(rdev)}:{os.minor(rdev)}"
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as info:
        for line in info:
            fields = line.split()
            # fields[3] is the root of the mount inside its file system: a bind mount of
            # a subdirectory is not where the volume's paths start.
            if len(fields) > 4 and fields[2] == want and fields[3] == "/":
                return _unescape(fields[4])
    return None


def _unescape(field: str) -> str:
    """A mountinfo path: space, tab, newline and backslash are written as octal escapes."""
    for code in ("040", "011", "012", "134"):
        field = field.replace("\\" + code, chr(int(code, 8)))
    return field


def relative_path(root: Path, given: str) -> str:
    """``given`` (relative to ``root``, or absolute below it) as a relative path, checked.

    :raises InvalidInput: it contains ``..``, is outside ``root`` or leaves it through a
        symlink.
    :raises NotFound: it does not exist.
    """
    return _relative(Path(root), given)


def _relative(root: Path, given: str) -> str:
    """``given`` as a path below ``root`` without ``..`` or symlinks leaving it."""
    candidate = Path(given)
    if candidate.is_absolute():
        try:
            candidate = candidate.relative_to(root)
        except ValueError:
            raise InvalidInput(detail=f"path {given!r} is not below {root}") from None
    if ".." in candidate.parts:
        raise InvalidInput(detail=f"path {given!r} must not contain '..'")
    real = (root / candidate).resolve()
    if not real.is_relative_to(root.resolve()):
        raise InvalidInput(detail=f"path {given!r} leaves {root} through a symlink")
    if not (root / candidate).exists() and not (root / candidate).is_symlink():
        raise NotFound(what="path", name=str(root / candidate))
    return str(candidate)


def build_file_list(root: Path, paths: Iterable[str], *, device: int | None = None) -> FileList:
    """Walk ``paths`` (files or directories, below the mount point ``root``) and map each
    file's data to byte ranges of the volume.

    Only what lies on the file system mounted at ``root`` is listed: a directory that is
    another mount is not entered (its files are on another device).

    :param device: the ``st_dev`` the file system must have (the protected volume's
        device number); None: whatever ``root`` is on.
    :raises InvalidInput: a path outside ``root``, or ``root`` not on ``device``.
    :raises NotFound: a path does not exist.
    """
    root = Path(root)
    root_dev = os.lstat(root).st_dev
    if device is not None and root_dev != device:
        raise InvalidInput(
            detail=f"{root} is not the file system of the volume (device "
            f"{os.major(root_dev)}:{os.minor(root_dev)}, expected "
            f"{os.major(device)}:{os.minor(device)})"
        )
    seen: dict[int, str] = {}
    entries: list[FileEntry] = []
    listed: set[str] = set()
    for given in paths:
        for path in _walk(root, _relative(root, given), root_dev):
            rel = str(path.relative_to(root))
            if rel in listed:
                continue
            st = os.lstat(path)
            if st.st_dev != root_dev:
                continue  # another file system mounted below
            listed.add(rel)
            entries.append(_entry(path, rel, st, seen))
    return FileList(str(root), root_dev, tuple(entries))


def _entry(path: Path, rel: str, st: os.stat_result, seen: dict[int, str]) -> FileEntry:
    common = {
        "path": rel,
        "size": st.st_size,
        "mode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mtime_ns": st.st_mtime_ns,
        "atime_ns": st.st_atime_ns,
        "inode": st.st_ino,
        "nlink": st.st_nlink,
    }
    if stat.S_ISLNK(st.st_mode):
        return FileEntry(kind="symlink", target=os.readlink(path), **common)
    xattrs = _xattrs(path)
    if stat.S_ISDIR(st.st_mode):
        return FileEntry(kind="dir", xattrs=xattrs, **common)
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInput(detail=f"{path} is neither a file, a directory nor a symlink")
    if st.st_nlink > 1 and st.st_ino in seen:
        return FileEntry(kind="file", xattrs=xattrs, link_to=seen[st.st_ino], **common)
    seen[st.st_ino] = rel
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        extents = tuple(file_extents(fd, where=str(path)))
    finally:
        os.close(fd)
    by_content = any(not e.on_volume for e in extents if e.logical < st.st_size)
    return FileEntry(kind="file", xattrs=xattrs, extents=extents, by_content=by_content, **common)
