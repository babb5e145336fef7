"""Restore the files of a file group from a generation (``restore-files``).

Each file's bytes are read at its extents from the generation's image
(:class:`~blockguard.storage.genimage.GenerationImage`: the restore's own chunk plan,
every chunk checked against its stored checksum), and written with its metadata: size
(holes and unwritten extents stay holes), mode, owner, mtime/atime, xattrs; hard links
as links, symlinks, directories.

Everything that can be refused is refused before the first byte is written: a path the
list does not hold, a file kept *by content* (not on the volume: this slice stores no
content) or *unsettled* (it changed during its backup), an existing file without
``overwrite``, a path of the list that would leave the target directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from blockguard.errors import AlreadyExists, CorruptMetadata, InvalidInput, NotFound
from blockguard.storage.filelists import StoredFileList
from blockguard.storage.filemap import FileEntry

#: Bytes read from the image per request.
_PIECE = 4 << 20


class ImageReader(Protocol):
    def read(self, offset: int, size: int) -> bytes: ...


@dataclass(frozen=True)
class FilesRestore:
    """What a restore of files will write (decided before anything is written)."""

    entries: tuple[FileEntry, ...]
    #: Bytes to read from the image (the files' data on the volume).
    data_bytes: int


def plan_files(
    stored: StoredFileList, paths: Sequence[str], dest: Path, *, overwrite: bool
) -> FilesRestore:
    """The entries of ``stored`` to restore (``paths``: those paths and what is below
    them; none: all) into directory ``dest``, checked.

    :raises NotFound: a path the list does not hold.
    :raises InvalidInput: ``dest`` is not a directory; a selected file is kept by
        content or unsettled (named); a path of the list is not a plain relative path.
    :raises AlreadyExists: a file exists at a target path and ``overwrite`` is False.
    """
    if not dest.is_dir():
        raise InvalidInput(detail=f"the target {dest} is not a directory")
    for entry in stored.files.entries:
        _check_relative(entry.path)
    chosen = _with_own_data(_select(stored.files.entries, paths), stored.files.entries)
    refused = [e.path for e in chosen if e.by_content]
    if refused:
        raise InvalidInput(
            detail=f"not restorable from the volume's blocks (inline, encoded or "
            f"encrypted data, kept by content): {', '.join(refused[:20])}"
        )
    unsettled = set(stored.unsettled) & {e.path for e in chosen}
    if unsettled:
        raise InvalidInput(
            detail="changed while this generation was taken, so its bytes cannot be vouched "
            f"for: {', '.join(sorted(unsettled)[:20])}"
        )
    if not overwrite:
        existing = [
            e.path
            for e in chosen
            if os.path.lexists(dest / e.path) and not (e.kind == "dir" and (dest / e.path).is_dir())
        ]
        if existing:
            raise AlreadyExists(
                what="file",
                name=f"{', '.join(str(dest / p) for p in existing[:20])} (give --overwrite)",
            )
    data = sum(length for e in chosen if e.link_to is None for _, length in e.volume_ranges())
    return FilesRestore(tuple(chosen), data)


def _with_own_data(chosen: list[FileEntry], entries: Sequence[FileEntry]) -> list[FileEntry]:
    """A hard link whose first path is not restored with it carries that path's data
    (and is the first of its inode for the links after it)."""
    every = {e.path: e for e in entries}
    first_of: dict[str, str] = {}
    result = []
    picked = {e.path for e in chosen}
    for entry in chosen:
        if entry.link_to is not None and entry.link_to not in picked:
            if entry.link_to in first_of:
                entry = dataclasses.replace(entry, link_to=first_of[entry.link_to])
            else:
                first = every.get(entry.link_to)
                if first is None:
                    raise CorruptMetadata(
                        detail=f"the file list links {entry.path} to {entry.link_to}, "
                        "which it does not hold"
                    )
                first_of[entry.link_to] = entry.path
                entry = dataclasses.replace(
                    entry, link_to=None, extents=first.extents, by_content=first.by_content
                )
        result.append(entry)
    return result


def _check_relative(path: str) -> None:
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts or str(pure) in (".", ""):
        raise CorruptMetadata(
            detail=f"the file list holds a path {path!r} that is not below its root"
        )


def _select(entries: Sequence[FileEntry], paths: Sequence[str]) -> list[FileEntry]:
    if not paths:
        return list(entries)
    wanted = [str(PurePosixPath(p.strip("/"))) for p in paths]
    missing = [
        p for p in wanted if not any(e.path == p or e.path.startswith(p + "/") for e in entries)
    ]
    if missing:
        raise NotFound(what="path in the file list", name=", ".join(missing))
    chosen = [e for e in entries if any(e.path == p or e.path.startswith(p + "/") for p in wanted)]
    # The directories above a chosen path come along (created, their metadata kept).
    parents = {str(q) for e in chosen for q in PurePosixPath(e.path).parents if str(q) != "."}
    picked = {e.path for e in chosen} | parents
    return [e for e in entries if e.path in picked]


def write_files(
    image: ImageReader,
    plan: FilesRestore,
    dest: Path,
    *,
    overwrite: bool,
    progress: Callable[[int], None] = lambda _n: None,
) -> int:
    """Write the planned entries below ``dest``; returns the data bytes written.

    :param progress: called with the data bytes written so far.
    """
    done = 0
    for entry in plan.entries:
        target = dest / entry.path
        _check_parent(dest, target)
        if entry.kind == "dir":
            target.mkdir(exist_ok=True)
            continue
        if os.path.lexists(target):
            if not overwrite:  # appeared since the plan was checked
                raise AlreadyExists(what="file", name=str(target))
            if target.is_dir() and not target.is_symlink():
                raise InvalidInput(detail=f"{target} is a directory, the generation has a file")
            target.unlink()
        if entry.kind == "symlink":
            assert entry.target is not None
            os.symlink(entry.target, target)
        elif entry.link_to is not None:
            os.link(dest / entry.link_to, target)
            continue  # the first path of the inode set its metadata
        else:
            done = _write_data(image, entry, target, done, progress)
        _set_metadata(target, entry)
    # Directories last, deepest first: creating their children changed their times.
    for entry in reversed(plan.entries):
        if entry.kind == "dir":
            _set_metadata(dest / entry.path, entry)
    return done


def _check_parent(dest: Path, target: Path) -> None:
    """The target's directory is below ``dest`` (no symlink of the target tree leads
    out of it)."""
    real = Path(os.path.realpath(target.parent))
    if not real.is_relative_to(os.path.realpath(dest)):
        raise InvalidInput(detail=f"{target.parent} leads out of {dest} through a symlink")


def _write_data(
    image: ImageReader, entry: FileEntry, target: Path, done: int, progress: Callable[[int], None]
) -> int:
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, entry.size)  # holes and unwritten extents stay holes
        for ext in entry.extents:
            if ext.zeros or ext.logical >= entry.size:
                continue
            length = min(ext.length, entry.size - ext.logical)
            for at in range(0, length, _PIECE):
                n = min(_PIECE, length - at)
                data = image.read(ext.physical + at, n)
                if len(data) != n:
                    raise CorruptMetadata(
                        detail=f"{entry.path}: its extent at byte {ext.physical} of the volume "
                        "lies past the generation's end"
                    )
                os.pwrite(fd, data, ext.logical + at)
                done += n
                progress(done)
        os.fsync(fd)
    finally:
        os.close(fd)
    return done


def _set_metadata(target: Path, entry: FileEntry) -> None:
    link = entry.kind == "symlink"
    with contextlib.suppress(PermissionError):  # not root: the files are the restorer's
        os.chown(target, entry.uid, entry.gid, follow_symlinks=False)
    if not link:
        os.chmod(target, stat.S_IMODE(entry.mode))
        for name, value in entry.xattrs.items():
            try:
                os.setxattr(target, name, value, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
                    raise
    os.utime(target, ns=(entry.atime_ns, entry.mtime_ns), follow_symlinks=False)
