"""The one chunk writer and reader of every generation store (see :mod:`.store`).

The writer puts a full's chunks at their own offsets and a delta's packed in chunk order
(a chunk's slot is its rank in the changed set), gathering small packed extents into one
large write; then it flushes the data, writes the checksums and, last, the manifest. The
data is wherever the backend made it: a file of the pool, an LV's block device.
"""

from __future__ import annotations

import array
import mmap
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import xxhash

from blockguard.errors import CorruptMetadata, EnvironmentProblem
from blockguard.storage.blockdev import aligned_buffer
from blockguard.storage.ioedge import io_edge
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
from blockguard.storage.pool.gendir import CHECKSUMS, LOCK

#: Small packed extents are gathered into writes of up to this size.
STAGE_BYTES = 8 << 20


_ZEROS = bytes(1 << 20)
_ZERO_DIGESTS: dict[int, int] = {}


def zero_digest(nbytes: int) -> int:
    """The xxh3_64 of ``nbytes`` zeros (cached: one per chunk size, and a short last one)."""
    got = _ZERO_DIGESTS.get(nbytes)
    if got is None:
        got = _ZERO_DIGESTS[nbytes] = xxhash.xxh3_64_intdigest(bytes(nbytes))
    return got


def is_zero(view: memoryview) -> bool:
    """Whether every byte of ``view`` is zero (a memcmp per MiB, no copy)."""
    for at in range(0, len(view), len(_ZEROS)):
        if not _ZEROS.startswith(view[at : at + len(_ZEROS)]):
            return False
    return True


class ChunkTarget(Protocol):
    """Where a writer puts a generation's chunks (a pool file, an LV's block device)."""

    def pwrite_all(self, buf: memoryview, offset: int) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class ChunkSource(Protocol):
    """Where a reader finds a generation's chunks."""

    def pread_into(self, buf: memoryview, offset: int) -> int: ...
    def preadv_into(self, bufs: Sequence[memoryview], offset: int) -> int: ...
    def close(self) -> None: ...


#: A gap of at most this many bytes between two runs a reader is asked for is read
#: through (into a scratch buffer) rather than split into two requests: one 8 MiB read
#: of a full around a few delta chunks instead of a dozen small ones. Larger gaps cost
#: more in bytes than the request they save.
GAP_BYTES = 256 << 10

#: At most this many buffers per ``preadv`` (the kernel's IOV_MAX).
IOV_MAX = 1024


@dataclass
class StoredData:
    """A new generation's data, made by the backend before any chunk is written.

    :param target: where the chunks go (None: nothing to store, an empty delta).
    :param cloned: the full the data was cloned from (then only changed chunks are
        written), else None.
    :param storage: what the manifest's ``storage`` says of it (``checksums`` is added).
    :param drop: removes the data when the writer aborts (files in the directory go with
        it; an LV needs this).
    :param zeroed: the target reads as zeros wherever nothing was written (a new thin LV,
        a new preallocated file): a full's all-zero chunks are then not written.
    """

    target: ChunkTarget | None
    cloned: Manifest | None = None
    storage: dict[str, Any] = field(default_factory=dict)
    drop: Callable[[], None] | None = None
    zeroed: bool = False


class StagedGenerationWriter(GenerationWriter):
    """Writes one generation's chunks to its data, then its checksums and manifest.

    A full's chunks go at their own offsets; a delta's are packed in chunk order (a
    chunk's slot is its rank in the changed set), and small packed extents are gathered
    into one large write.

    :param lock_fd: the held flock of the directory's ``.writing`` file (closed at the end).
    :param new_volume_dir: the volume's directory was made for this generation (its
        parent is synced at commit).
    """

    def __init__(
        self,
        draft: Manifest,
        gen_dir: Path,
        lock_fd: int,
        data: StoredData,
        *,
        new_volume_dir: bool,
        pool: str | None = None,
    ) -> None:
        super().__init__(draft, data.cloned)
        self.pool = pool
        self.dir = gen_dir
        self.data = data
        self._lock_fd = lock_fd
        self._new_volume_dir = new_volume_dir
        self._bytes = 0
        self._stage: mmap.mmap | None = None
        self._staged = 0
        self._stage_offset = 0

    def write_chunks(self, first: int, view: memoryview, digests: Sequence[int]) -> None:
        target = self.data.target
        if target is None:
            raise EnvironmentProblem(detail=f"generation {self.generation_id} stores no chunks")
        offset = self._slot(first) * self.draft.chunk_size
        if self.draft.is_full and self.data.zeroed:
            self._write_nonzero(target, view, offset, digests)
        elif self.draft.is_full or len(view) >= STAGE_BYTES // 2:
            self._flush_stage()
            target.pwrite_all(view, offset)
        else:
            # Packed chunks are contiguous in the data even when they are scattered in
            # the volume: gather small extents into one large write instead of paying
            # an O_DIRECT write (and a file system's extent conversion) per extent.
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

    def _write_nonzero(
        self, target: ChunkTarget, view: memoryview, offset: int, digests: Sequence[int]
    ) -> None:
        """Write the runs of ``view``'s chunks that are not all zeros (the target already
        reads zeros there): half a volume of zeros costs neither writes nor, on a thin
        LV, pool blocks, and a restore reads unmapped blocks without disk I/O. The
        checksum only picks the candidates; the bytes decide (xxh3 is no proof)."""
        cs = self.draft.chunk_size
        start = -1
        for i, digest in enumerate(digests):
            at = i * cs
            chunk = view[at : at + cs]
            if digest == zero_digest(len(chunk)) and is_zero(chunk):
                if start >= 0:
                    target.pwrite_all(view[start:at], offset + start)
                    start = -1
            elif start < 0:
                start = at
        if start >= 0:
            target.pwrite_all(view[start:], offset + start)

    def _slot(self, chunk: int) -> int:
        return chunk if self.draft.is_full else self.draft.changed.rank(chunk) - 1

    def _flush_stage(self) -> None:
        if self._staged and self._stage is not None and self.data.target is not None:
            view = memoryview(self._stage)[: self._staged]
            self.data.target.pwrite_all(view, self._stage_offset)
        self._staged = 0

    def commit(self, checksums: array.array[int]) -> Manifest:
        self._flush_stage()
        if self.data.target is not None:
            # For a thin LV this flush also commits the pool's mappings of the new blocks.
            self.data.target.flush()
        with io_edge(self.dir, "committing", pool=self.pool):
            return self._commit(checksums)

    def _commit(self, checksums: array.array[int]) -> Manifest:
        raw = checksum_bytes(checksums)
        crash_point("before-checksums")
        # No rename needed: the manifest, written after it, is what commits it.
        write_durable(self.dir / CHECKSUMS, raw)
        crash_point("after-checksums")
        manifest = self.draft.with_(
            bytes_stored=self._bytes,
            checksum_count=len(checksums),
            checksum_digest=checksum_digest(raw),
            storage={**self.data.storage, "checksums": CHECKSUMS},
        )
        fsync_dir(self.dir)
        fsync_dir(self.dir.parent)
        if self._new_volume_dir:
            fsync_dir(self.dir.parent.parent)
        crash_point("before-manifest")
        write_atomic(self.dir / MANIFEST_NAME, manifest.to_json())
        crash_point("after-manifest")
        self.committed = manifest
        if self.data.target is not None:
            self.data.target.close()
        (self.dir / LOCK).unlink(missing_ok=True)
        os.close(self._lock_fd)
        self._lock_fd = -1
        return manifest

    def abort(self) -> None:
        if self.committed is None:
            self._cleanup()

    def _cleanup(self) -> None:
        if self.data.target is not None:
            self.data.target.close()
            self.data.target = None
        if self.data.drop is not None:
            self.data.drop()
            self.data.drop = None
        shutil.rmtree(self.dir, ignore_errors=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


class StoredGenerationReader(GenerationReader):
    """Reads a committed generation: chunks from its data, checksums from its directory.

    :param source: the data (None: the generation has none, e.g. an empty delta).
    :param what: how errors name the data ("data", "data volume").
    """

    def __init__(
        self, manifest: Manifest, gen_dir: Path, source: ChunkSource | None, what: str
    ) -> None:
        super().__init__(manifest)
        self.dir = gen_dir
        self._source = source
        self._what = what
        self._scratch: memoryview | None = None

    def read_chunks(self, first: int, view: memoryview) -> None:
        if self._source is None:
            raise CorruptMetadata(
                what=f"generation {self.manifest.generation_id}", detail=f"it has no {self._what}"
            )
        slot = self.manifest.checksum_slot(first)
        if self._source.pread_into(view, slot * self.manifest.chunk_size) != len(view):
            raise CorruptMetadata(
                what=f"generation {self.manifest.generation_id}",
                detail=f"its {self._what} ends early at chunk {first}",
            )

    def read_runs(self, runs: Sequence[tuple[int, memoryview]]) -> None:
        """Read ``runs`` in vectored reads: runs whose slots are adjacent in the data, or
        apart by at most :data:`GAP_BYTES` (read into a scratch buffer and dropped), are
        one ``preadv``. For a delta, whose chunks are packed in chunk order, that is also
        true of chunks far apart in the volume."""
        if self._source is None or not runs:
            super().read_runs(runs)
            return
        cs = self.manifest.chunk_size
        max_gap = max(1, GAP_BYTES // cs)
        start = end = -1
        views: list[memoryview] = []
        for first, view in runs:
            slot = self.manifest.checksum_slot(first)
            gap = slot - end
            if views and 0 <= gap <= max_gap and len(views) + 2 <= IOV_MAX:
                if gap:
                    views.append(self._gap_buffer(gap * cs))
            else:
                if views:
                    self._readv(start, views)
                start, views = slot, []
            views.append(view)
            end = slot + -(-len(view) // cs)
        self._readv(start, views)

    def _gap_buffer(self, nbytes: int) -> memoryview:
        # Shared by the threads reading through this reader: what lands in it is dropped.
        if self._scratch is None:
            self._scratch = memoryview(aligned_buffer(max(GAP_BYTES, self.manifest.chunk_size)))
        return self._scratch[:nbytes]

    def _readv(self, slot: int, views: Sequence[memoryview]) -> None:
        assert self._source is not None
        want = sum(len(v) for v in views)
        if self._source.preadv_into(views, slot * self.manifest.chunk_size) != want:
            raise CorruptMetadata(
                what=f"generation {self.manifest.generation_id}",
                detail=f"its {self._what} ends early at slot {slot}",
            )

    def _load_checksums(self) -> array.array[int]:
        path = self.dir / self.manifest.storage.get("checksums", CHECKSUMS)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise CorruptMetadata(what=str(path), detail=exc.strerror or str(exc)) from None
        return checksums_from_bytes(raw, self.manifest, str(path))

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
