"""Files of one generation in a ``dir`` pool: its data file, reflink clones.

Layout of ``volumes/VOLUME/GENERATION_ID/`` (see :mod:`.dirpool`, :mod:`.gendir`):
``image`` for a full, ``chunks`` (packed in chunk order) for a delta, ``checksums.xxh3``,
``manifest.json`` written last, and ``.writing``, whose flock marks a live writer. The
writer and reader are the store's (:mod:`.store`), on a :class:`PoolFile`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from blockguard.errors import EnvironmentProblem
from blockguard.storage.ioedge import EdgeFile, io_edge, map_oserror
from blockguard.storage.manifest import Manifest, crash_point
from blockguard.storage.pool.store import (
    StagedGenerationWriter,
    StoredData,
    StoredGenerationReader,
)

FICLONE = 0x40049409
DATA_FULL = "image"
DATA_PACKED = "chunks"


class PoolFile(EdgeFile):
    """A regular file of the pool, opened without following links, verified with fstat.

    Its I/O goes through the I/O edge: a failure names the file, the offset and (for a
    full file system) the pool.

    :param pool: the pool the file belongs to (named in :class:`PoolSpaceLow`).
    """

    def __init__(
        self, path: Path, *, write: bool = False, create: bool = False, pool: str | None = None
    ) -> None:
        flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOFOLLOW
        flags |= os.O_DIRECT
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        self.path = path
        self.pool = pool
        with io_edge(path, "opening", pool=pool):
            self.fd = os.open(path, flags, 0o600)
        if not stat.S_ISREG(os.fstat(self.fd).st_mode):
            os.close(self.fd)
            raise EnvironmentProblem(detail=f"{path} is not a regular file")

    def allocate(self, size: int) -> None:
        """Reserve ``size`` bytes up front (a full pool fails here, before any copying)."""
        with io_edge(self.path, "allocating", offset=0, pool=self.pool):
            os.posix_fallocate(self.fd, 0, size)


class DirGenerationWriter(StagedGenerationWriter):
    """Writes one generation directory; see the module docstring for the layout."""


class DirGenerationReader(StoredGenerationReader):
    def __init__(self, manifest: Manifest, gen_dir: Path, pool: str | None = None) -> None:
        data = PoolFile(gen_dir / manifest.storage.get("data", DATA_FULL), pool=pool)
        super().__init__(manifest, gen_dir, data, "data")


def make_data_file(
    draft: Manifest, gen_dir: Path, source: Manifest | None, src_image: Path | None, pool: str
) -> StoredData:
    """The data file of a new generation in ``gen_dir``: for a full, a reflink clone of
    ``src_image`` (the full ``source``) when the file system can, else a new allocated
    file; for a delta, the packed file of its changed chunks."""
    cloned = None
    if draft.is_full:
        image = gen_dir / DATA_FULL
        if src_image is not None and source is not None:
            try:
                clone_file(src_image, image)
                cloned = source
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL):
                    raise map_oserror(exc, path=image, op="cloning", pool=pool) from exc
                image.unlink(missing_ok=True)
        crash_point("after-clone")
        data = PoolFile(image, write=True, create=cloned is None, pool=pool)
        size = draft.volume.size if cloned is None else 0
    else:
        data = PoolFile(gen_dir / DATA_PACKED, write=True, create=True, pool=pool)
        size = len(draft.changed) * draft.chunk_size
    try:
        if size:
            data.allocate(size)
    except BaseException:
        data.close()
        raise
    storage = {
        "layout": "image" if draft.is_full else "packed",
        "data": DATA_FULL if draft.is_full else DATA_PACKED,
    }
    # A new file reads zeros until written (preallocated extents are unwritten ones).
    return StoredData(data, cloned, storage, zeroed=draft.is_full and cloned is None)


def clone_file(src: Path, dst: Path) -> None:
    """Reflink ``src`` to a new ``dst`` (FICLONE: shares extents, instant), durably."""
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.ioctl(dfd, FICLONE, sfd)
            os.fsync(dfd)
        except BaseException:
            os.close(dfd)
            dfd = -1
            dst.unlink(missing_ok=True)
            raise
        finally:
            if dfd >= 0:
                os.close(dfd)
    finally:
        os.close(sfd)
