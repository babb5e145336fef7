"""Files of one generation in a ``dir`` pool: its writer, its reader, reflink clones.

Layout of ``volumes/VOLUME/GENERATION_ID/`` (see :mod:`.dirpool`): ``image`` for a full,
``chunks`` (packed in chunk order) for a delta, ``checksums.xxh3``, ``manifest.json``
written last, and ``.writing``, whose flock marks a live writer.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import mmap
import os
import shutil
import stat
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from pyroaring import BitMap

from blockguard.errors import CorruptMetadata, EnvironmentProblem
from blockguard.storage.blockdev import aligned_buffer
from blockguard.storage.ioedge import io_edge, map_oserror
from blockguard.storage.manifest import (
    MANIFEST_NAME,
    Manifest,
    checksum_bytes,
    checksum_digest,
    checksums_from_bytes,
    crash_point,
    fsync_dir,
    write_atomic,
    write_durable,
)
from blockguard.storage.pool.base import GenerationReader, GenerationWriter

FICLONE = 0x40049409
DATA_FULL = "image"
DATA_PACKED = "chunks"
CHECKSUMS = "checksums.xxh3"
LOCK = ".writing"
#: Small packed extents are gathered into writes of up to this size.
STAGE_BYTES = 8 << 20


class PoolFile:
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

    def pread_into(self, view: memoryview, offset: int) -> int:
        done = 0
        try:
            while done < len(view):
                n = os.preadv(self.fd, [view[done:]], offset + done)
                if n == 0:
                    break
                done += n
        except OSError as exc:
            raise map_oserror(
                exc, path=self.path, op="reading", offset=offset + done, pool=self.pool
            ) from exc
        return done

    def pwrite_all(self, view: memoryview, offset: int) -> None:
        done = 0
        try:
            while done < len(view):
                done += os.pwritev(self.fd, [view[done:]], offset + done)
        except OSError as exc:
            raise map_oserror(
                exc, path=self.path, op="writing", offset=offset + done, pool=self.pool
            ) from exc

    def allocate(self, size: int) -> None:
        """Reserve ``size`` bytes up front (a full pool fails here, before any copying)."""
        with io_edge(self.path, "allocating", offset=0, pool=self.pool):
            os.posix_fallocate(self.fd, 0, size)

    def flush(self) -> None:
        with io_edge(self.path, "flushing", pool=self.pool):
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class DirGenerationWriter(GenerationWriter):
    """Writes one generation directory; see the module docstring for the layout."""

    def __init__(
        self,
        draft: Manifest,
        gen_dir: Path,
        source: Manifest | None,
        src_image: Path | None,
        pool: str | None = None,
    ) -> None:
        self.pool = pool
        self.dir = gen_dir
        self._lock_fd = -1
        self._file: PoolFile | None = None
        self._new_volume_dir = not gen_dir.parent.exists()
        self._stage: mmap.mmap | None = None
        self._staged = 0
        self._stage_offset = 0
        with creating(gen_dir):
            with io_edge(gen_dir, "creating", pool=pool):
                gen_dir.mkdir(parents=True)
            try:
                with io_edge(gen_dir / LOCK, "creating", pool=pool):
                    self._lock_fd = os.open(
                        gen_dir / LOCK, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600
                    )
            except BaseException:
                self._cleanup()
                raise
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._bytes = 0
        try:
            # A concurrent open() may have taken the directory for garbage between our
            # mkdir and flock: then the lock we hold is on a removed file.
            try:
                same = os.stat(gen_dir / LOCK).st_ino == os.fstat(self._lock_fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                raise EnvironmentProblem(detail=f"{gen_dir} was removed while being created")
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
                self._file = PoolFile(image, write=True, create=cloned is None, pool=pool)
                if cloned is None:
                    self._file.allocate(draft.volume.size)
            else:
                self._file = PoolFile(gen_dir / DATA_PACKED, write=True, create=True, pool=pool)
                if draft.changed:
                    self._file.allocate(len(draft.changed) * draft.chunk_size)
        except BaseException:
            self._cleanup()
            raise
        if cloned is None and draft.is_full:
            draft = draft.with_(changed=BitMap(range(draft.chunks)))
        super().__init__(draft.with_(cloned_from=cloned.generation_id if cloned else None), cloned)

    def write_chunks(self, first: int, view: memoryview, digests: Sequence[int]) -> None:
        assert self._file is not None
        offset = self._slot(first) * self.draft.chunk_size
        if self.draft.is_full or len(view) >= STAGE_BYTES // 2:
            self._flush_stage()
            self._file.pwrite_all(view, offset)
        else:
            # Packed chunks are contiguous in the file even when they are scattered in
            # the volume: gather small extents into one large write instead of paying
            # an O_DIRECT write (and an XFS extent conversion) per extent.
            if self._staged and (
                offset != self._stage_offset + self._staged
                or self._staged + len(view) > STAGE_BYTES
            ):
                self._flush_stage()
            if self._stage is None:
                self._stage = aligned_buffer(STAGE_BYTES)
            if not self._staged:
                self._stage_offset = offset
            self._stage[self._staged : self._staged + len(view)] = view
            self._staged += len(view)
        self._bytes += len(view)
        crash_point("chunks-written")

    def _slot(self, chunk: int) -> int:
        return chunk if self.draft.is_full else self.draft.changed.rank(chunk) - 1

    def _flush_stage(self) -> None:
        if self._staged and self._stage is not None and self._file is not None:
            self._file.pwrite_all(memoryview(self._stage)[: self._staged], self._stage_offset)
        self._staged = 0

    def commit(self, checksums: array.array[int]) -> Manifest:
        assert self._file is not None
        self._flush_stage()
        self._file.flush()
        with io_edge(self.dir, "committing", pool=self.pool):
            return self._commit(checksums)

    def _commit(self, checksums: array.array[int]) -> Manifest:
        assert self._file is not None
        raw = checksum_bytes(checksums)
        crash_point("before-checksums")
        # No rename needed: the manifest, written after it, is what commits it.
        write_durable(self.dir / CHECKSUMS, raw)
        crash_point("after-checksums")
        manifest = self.draft.with_(
            bytes_stored=self._bytes,
            checksum_count=len(checksums),
            checksum_digest=checksum_digest(raw),
            storage={
                "layout": "image" if self.draft.is_full else "packed",
                "data": DATA_FULL if self.draft.is_full else DATA_PACKED,
                "checksums": CHECKSUMS,
            },
        )
        fsync_dir(self.dir)
        fsync_dir(self.dir.parent)
        if self._new_volume_dir:
            fsync_dir(self.dir.parent.parent)
        crash_point("before-manifest")
        write_atomic(self.dir / MANIFEST_NAME, manifest.to_json())
        crash_point("after-manifest")
        self.committed = manifest
        self._file.close()
        (self.dir / LOCK).unlink(missing_ok=True)
        os.close(self._lock_fd)
        self._lock_fd = -1
        return manifest

    def abort(self) -> None:
        if self.committed is None:
            self._cleanup()

    def _cleanup(self) -> None:
        if self._file is not None:
            self._file.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


class DirGenerationReader(GenerationReader):
    def __init__(self, manifest: Manifest, gen_dir: Path, pool: str | None = None) -> None:
        super().__init__(manifest)
        self.dir = gen_dir
        self._file = PoolFile(gen_dir / manifest.storage.get("data", DATA_FULL), pool=pool)

    def read_chunks(self, first: int, view: memoryview) -> None:
        slot = self.manifest.checksum_slot(first)
        got = self._file.pread_into(view, slot * self.manifest.chunk_size)
        if got != len(view):
            raise CorruptMetadata(
                what=f"generation {self.manifest.generation_id}",
                detail=f"its data ends early at chunk {first}",
            )

    def _load_checksums(self) -> array.array[int]:
        path = self.dir / self.manifest.storage.get("checksums", CHECKSUMS)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise CorruptMetadata(what=str(path), detail=exc.strerror or str(exc)) from None
        return checksums_from_bytes(raw, self.manifest, str(path))

    def close(self) -> None:
        self._file.close()


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


_creating: set[str] = set()
_creating_lock = threading.Lock()


@contextlib.contextmanager
def creating(gen: Path) -> Iterator[None]:
    """Mark ``gen`` as being created by a writer of this process until its lock is held.

    Between a writer's mkdir and its flock the directory has no locked ``.writing`` file;
    a garbage collection of this process that looked then would take it for garbage. It
    asks :func:`writer_alive`, which knows these directories. (Pools are written by one
    process: the daemon holding its state directory; a writer of a killed process left
    garbage, whatever its age.)"""
    key = str(gen)
    with _creating_lock:
        _creating.add(key)
    try:
        yield
    finally:
        with _creating_lock:
            _creating.discard(key)


def writer_alive(gen: Path) -> bool:
    """True while a live writer holds the generation's lock or is creating it."""
    with _creating_lock:
        if str(gen) in _creating:
            return True
    try:
        fd = os.open(gen / LOCK, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
