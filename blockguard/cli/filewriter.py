"""The writer of ``restore-files``: a file group's files written in the caller's mount
namespace from the read-only loop device the daemon serves.

The daemon decides what to restore (``storage/filerestore.py``: the entries, checked)
and serves the generation's checksum-verified image as a read-only loop device, as
``mount`` does (docs/design/browse.md); under its systemd unit it could not write into
the admin's directories itself (ProtectSystem=strict, PrivateTmp, ProtectHome). This
module reads each file's bytes at its extents from that device and writes them with
their metadata: size (holes and unwritten extents stay holes), mode, owner,
mtime/atime, xattrs; hard links as links, symlinks, directories.

A file's data goes to a temporary name beside it and is renamed into place once all of
it was read, written and synced: a read that fails (EIO: a damaged chunk, which the
image refuses to serve) stops the restore with a named error and leaves no partial
file under the name of a restored one.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import gzip
import json
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from blockguard.errors import (
    AlreadyExists,
    CorruptMetadata,
    DeviceIOError,
    GenerationUnreadable,
    InvalidInput,
    NotABlockDevice,
)

#: The newest format of the entries this writer reads.
ITEMS_VERSION = 1
#: Bytes read from the device per request.
_PIECE = 4 << 20


@dataclass(frozen=True)
class Item:
    """One entry to restore, as the daemon sends it.

    :param ranges: ``(file offset, volume offset, length)`` of the data to copy.
    :param link_to: a hard link: the earlier path of its inode.
    """

    path: str
    kind: str  # "file" | "dir" | "symlink"
    size: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    atime_ns: int
    xattrs: dict[str, bytes] = field(default_factory=dict)
    ranges: tuple[tuple[int, int, int], ...] = ()
    link_to: str | None = None
    target: str | None = None


def decode_items(data: bytes) -> list[Item]:
    """The entries the daemon sent, checked to stay below the target.

    :raises CorruptMetadata: not readable, of a newer format, or a path that is absolute
        or has ``..``.
    """
    try:
        doc = json.loads(gzip.decompress(data))
        if doc["version"] > ITEMS_VERSION:
            raise CorruptMetadata(
                what="the daemon's list of files",
                detail=f"format {doc['version']} is newer than this blockguardctl knows",
            )
        items = [_item(raw) for raw in doc["entries"]]
    except (OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise CorruptMetadata(what="the daemon's list of files", detail=str(exc)) from None
    for item in items:
        for path in (item.path, item.link_to):
            pure = PurePosixPath(path or ".")
            if path is not None and (pure.is_absolute() or ".." in pure.parts or path in ("", ".")):
                raise CorruptMetadata(
                    what="the daemon's list of files",
                    detail=f"a path {path!r} is not below the target",
                )
    return items


def _item(raw: dict[str, Any]) -> Item:
    return Item(
        path=raw["path"],
        kind=raw["kind"],
        size=int(raw["size"]),
        mode=int(raw["mode"]),
        uid=int(raw["uid"]),
        gid=int(raw["gid"]),
        mtime_ns=int(raw["mtime_ns"]),
        atime_ns=int(raw["atime_ns"]),
        xattrs={k: base64.b64decode(v) for k, v in raw.get("xattrs", {}).items()},
        ranges=tuple((int(a), int(b), int(c)) for a, b, c in raw.get("ranges", ())),
        link_to=raw.get("link_to"),
        target=raw.get("target"),
    )


def check_target(items: Sequence[Item], dest: Path, *, overwrite: bool) -> None:
    """``dest`` is a directory, and (unless ``overwrite``) no entry exists in it (a
    directory that is one already is fine).

    :raises InvalidInput: ``dest`` is not a directory.
    :raises AlreadyExists: files exist at target paths (named, up to 20).
    """
    if not dest.is_dir():
        raise InvalidInput(detail=f"the target {dest} is not a directory")
    if overwrite:
        return
    existing = [
        i.path
        for i in items
        if os.path.lexists(dest / i.path) and not (i.kind == "dir" and (dest / i.path).is_dir())
    ]
    if existing:
        raise AlreadyExists(
            what="file",
            name=f"{', '.join(str(dest / p) for p in existing[:20])} (give --overwrite)",
        )


class DeviceReader:
    """Reads of the generation's read-only loop device (checked to be a block device:
    never read a regular file that took its name).

    :param generation: named in the error of a failed read.
    """

    def __init__(self, device: str, generation: str) -> None:
        self.device = device
        self.generation = generation
        self.fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        if not stat.S_ISBLK(os.fstat(self.fd).st_mode):
            os.close(self.fd)
            raise NotABlockDevice(path=device)

    def read(self, offset: int, size: int, path: str) -> bytes:
        """``size`` bytes at ``offset`` of the volume, for the file ``path``.

        :raises GenerationUnreadable: the image answered EIO (a damaged chunk).
        :raises DeviceIOError: another error of the read.
        """
        try:
            return os.pread(self.fd, size, offset)
        except OSError as exc:
            if exc.errno == errno.EIO:
                raise GenerationUnreadable(
                    generation=self.generation, offset=offset, path=path, reason=exc.strerror
                ) from None
            raise DeviceIOError(
                path=self.device, offset=offset, op=f"reading for {path}", reason=exc.strerror
            ) from None

    def close(self) -> None:
        os.close(self.fd)


def write_files(
    reader: DeviceReader,
    items: Sequence[Item],
    dest: Path,
    *,
    overwrite: bool,
    progress: Callable[[int], None] = lambda _n: None,
) -> int:
    """Write ``items`` below ``dest``; returns the data bytes written.

    :param progress: called with the data bytes written so far.
    :raises GenerationUnreadable: a read failed (the file being written is not left).
    """
    done = 0
    for item in items:
        target = dest / item.path
        _check_parent(dest, target)
        if item.kind == "dir":
            target.mkdir(exist_ok=True)
            continue
        if os.path.lexists(target):
            if not overwrite:  # appeared since the target was checked
                raise AlreadyExists(what="file", name=str(target))
            if target.is_dir() and not target.is_symlink():
                raise InvalidInput(detail=f"{target} is a directory, the generation has a file")
        if item.kind == "symlink":
            assert item.target is not None
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
            os.symlink(item.target, target)
            _set_metadata(target, item)
        elif item.link_to is not None:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
            os.link(dest / item.link_to, target)  # the first path of the inode has its metadata
        else:
            done = _write_data(reader, item, target, done, progress)
    # Directories last, deepest first: creating their children changed their times.
    for item in reversed(items):
        if item.kind == "dir":
            _set_metadata(dest / item.path, item)
    return done


def _check_parent(dest: Path, target: Path) -> None:
    """The target's directory is below ``dest`` (no symlink of the target tree leads
    out of it)."""
    real = Path(os.path.realpath(target.parent))
    if not real.is_relative_to(os.path.realpath(dest)):
        raise InvalidInput(detail=f"{target.parent} leads out of {dest} through a symlink")


def _write_data(
    reader: DeviceReader, item: Item, target: Path, done: int, progress: Callable[[int], None]
) -> int:
    # Written under a name of its own and renamed when complete: a failed read leaves
    # nothing under the file's name (and an overwritten file stays as it was).
    partial = target.with_name(f".{target.name}.blockguard-{os.getpid()}")
    fd = os.open(
        partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    try:
        try:
            os.ftruncate(fd, item.size)  # holes and unwritten extents stay holes
            for logical, physical, length in item.ranges:
                for at in range(0, length, _PIECE):
                    n = min(_PIECE, length - at)
                    data = reader.read(physical + at, n, item.path)
                    if len(data) != n:
                        raise CorruptMetadata(
                            what="the file list",
                            detail=f"{item.path}: its extent at byte {physical} of the volume "
                            "lies past the generation's end",
                        )
                    os.pwrite(fd, data, logical + at)
                    done += n
                    progress(done)
            os.fsync(fd)
        finally:
            os.close(fd)
        _set_metadata(partial, item)
        os.rename(partial, target)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
    return done


def _set_metadata(target: Path, item: Item) -> None:
    link = item.kind == "symlink"
    with contextlib.suppress(PermissionError):  # not root: the files are the restorer's
        os.chown(target, item.uid, item.gid, follow_symlinks=False)
    if not link:
        os.chmod(target, stat.S_IMODE(item.mode))
        for name, value in item.xattrs.items():
            try:
                os.setxattr(target, name, value, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
                    raise
    os.utime(target, ns=(item.atime_ns, item.mtime_ns), follow_symlinks=False)
