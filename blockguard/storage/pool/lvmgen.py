"""One generation in an ``lvm`` pool: its writer and reader; swap-in volumes; COW stores.

A generation is two things (see :mod:`.lvmpool` for the whole layout): a logical volume
``g<GENERATION_ID>`` holding its chunks — a thin LV the size of the volume for a full, a
linear LV with the changed chunks packed in chunk order for a delta — and a directory
``volumes/VOLUME/GENERATION_ID/`` on the pool's metadata file system holding
``checksums.xxh3`` and, committed last, ``manifest.json``. The directory is made (and
flock-ed through its ``.writing`` file) *before* the LV, so a garbage collector that finds
an LV always finds the directory that says whether a writer still owns it.
"""

from __future__ import annotations

import array
import fcntl
import mmap
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from blockguard.errors import CorruptMetadata, EnvironmentProblem
from blockguard.storage.blockdev import BlockDevice, aligned_buffer
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
from blockguard.storage.pool.base import GenerationReader, GenerationWriter, SwapInVolume
from blockguard.storage.pool.dirgen import CHECKSUMS, LOCK, creating

#: Small packed extents are gathered into writes of up to this size.
STAGE_BYTES = 8 << 20
LAYOUT_THIN = "thin-image"
LAYOUT_PACKED = "packed-lv"


def lv_name_of(generation_id: str) -> str:
    """The LV that holds a generation's chunks (generation ids are valid LV names)."""
    return f"g{generation_id}"


def lock_generation_dir(gen_dir: Path) -> int:
    """Make ``gen_dir`` and hold its ``.writing`` flock; returns the lock's fd.

    :raises EnvironmentProblem: a concurrent garbage collection removed it meanwhile.
    """
    with creating(gen_dir):
        gen_dir.mkdir(parents=True)
        fd = os.open(gen_dir / LOCK, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        same = os.stat(gen_dir / LOCK).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        raise EnvironmentProblem(detail=f"{gen_dir} was removed while being created")
    return fd


class LvmGenerationWriter(GenerationWriter):
    """Writes one generation's LV, then its checksums and manifest.

    :param device: the LV's verified device node (already created, active).
    :param remove_lv: removes the LV (used on abort).
    """

    def __init__(
        self,
        draft: Manifest,
        cloned: Manifest | None,
        gen_dir: Path,
        lock_fd: int,
        lv: str | None,
        device: str | None,
        remove_lv: Callable[[str], None],
        new_volume_dir: bool,
        pool: str | None = None,
    ) -> None:
        super().__init__(draft, cloned)
        self.pool = pool
        self.dir = gen_dir
        self.lv = lv
        self._lock_fd = lock_fd
        self._remove_lv = remove_lv
        self._new_volume_dir = new_volume_dir
        self._bytes = 0
        self._stage: mmap.mmap | None = None
        self._staged = 0
        self._stage_offset = 0
        self._dev: BlockDevice | None = None
        try:
            if device is not None:
                self._dev = BlockDevice(device, write=True, direct=True, exclusive=True, pool=pool)
        except BaseException:
            self._cleanup()
            raise

    def write_chunks(self, first: int, view: memoryview, digests: Sequence[int]) -> None:
        if self._dev is None:
            raise EnvironmentProblem(detail=f"generation {self.generation_id} stores no chunks")
        offset = self._slot(first) * self.draft.chunk_size
        if self.draft.is_full or len(view) >= STAGE_BYTES // 2:
            self._flush_stage()
            self._dev.pwrite_all(view, offset)
        else:
            # Packed chunks are contiguous in the LV even when scattered in the volume:
            # gather small extents into one large write instead of one per extent.
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
        if self._staged and self._stage is not None and self._dev is not None:
            self._dev.pwrite_all(memoryview(self._stage)[: self._staged], self._stage_offset)
        self._staged = 0

    def commit(self, checksums: array.array[int]) -> Manifest:
        self._flush_stage()
        if self._dev is not None:
            # For a thin LV this flush also commits the pool's mappings of the new blocks.
            self._dev.flush()
        # The manifest and checksums live on the pool's metadata file system.
        with io_edge(self.dir, "committing", pool=self.pool):
            return self._commit(checksums)

    def _commit(self, checksums: array.array[int]) -> Manifest:
        raw = checksum_bytes(checksums)
        crash_point("before-checksums")
        write_durable(self.dir / CHECKSUMS, raw)
        crash_point("after-checksums")
        manifest = self.draft.with_(
            bytes_stored=self._bytes,
            checksum_count=len(checksums),
            checksum_digest=checksum_digest(raw),
            storage={
                "layout": LAYOUT_THIN if self.draft.is_full else LAYOUT_PACKED,
                "lv": self.lv,
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
        if self._dev is not None:
            self._dev.close()
        (self.dir / LOCK).unlink(missing_ok=True)
        os.close(self._lock_fd)
        self._lock_fd = -1
        return manifest

    def abort(self) -> None:
        if self.committed is None:
            self._cleanup()

    def _cleanup(self) -> None:
        if self._dev is not None:
            self._dev.close()
            self._dev = None
        if self.lv is not None:
            self._remove_lv(self.lv)
            self.lv = None
        shutil.rmtree(self.dir, ignore_errors=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


class LvmGenerationReader(GenerationReader):
    """Reads a committed generation: chunks from its LV, checksums from the metadata FS."""

    def __init__(self, manifest: Manifest, gen_dir: Path, device: str | None) -> None:
        super().__init__(manifest)
        self.dir = gen_dir
        self._dev = BlockDevice(device, direct=True) if device is not None else None

    def read_chunks(self, first: int, view: memoryview) -> None:
        if self._dev is None:
            raise CorruptMetadata(
                what=f"generation {self.manifest.generation_id}", detail="it has no data volume"
            )
        slot = self.manifest.checksum_slot(first)
        if self._dev.pread_into(view, slot * self.manifest.chunk_size) != len(view):
            raise CorruptMetadata(
                what=f"generation {self.manifest.generation_id}",
                detail=f"its data volume ends early at chunk {first}",
            )

    def _load_checksums(self) -> array.array[int]:
        path = self.dir / self.manifest.storage.get("checksums", CHECKSUMS)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise CorruptMetadata(what=str(path), detail=exc.strerror or str(exc)) from None
        return checksums_from_bytes(raw, self.manifest, str(path))

    def close(self) -> None:
        if self._dev is not None:
            self._dev.close()


class LvmSwapIn(SwapInVolume):
    """A thin snapshot of a full, active: ``image`` is ``VG/LV``."""

    def __init__(self, device: str, image: str, remove: Callable[[str, bool], None]) -> None:
        super().__init__(device, image)
        self._remove = remove

    def release(self, *, keep_image: bool = False) -> None:
        """Remove the LV (or, with ``keep_image``, only deactivate it)."""
        assert self.image is not None
        self._remove(self.image, keep_image)


class LvCowStore:
    """A linear LV of the pool lent out as a dm-snapshot exception store.

    :param device: verified device node; ``release()`` removes the LV.
    """

    def __init__(self, device: str, lv: str, size: int, remove: Callable[[str], None]) -> None:
        self.device = device
        self.lv = lv
        self.size = size
        self._remove = remove
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._remove(self.lv)
            self._released = True
