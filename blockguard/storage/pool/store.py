"""The generation store every pool with generation directories is: one implementation.

:class:`GenerationStore` keeps the bookkeeping of :mod:`.gendir` directories (begin,
scan, damage records, removal, garbage) and writes chunks through one staged writer; a
backend says only what differs (see the hooks marked *backend*):

- where a generation's bytes live: :meth:`GenerationStore._make_data` gives a
  :class:`StoredData` (a file in the directory for ``dir``, a thin or linear LV for
  ``lvm``), :meth:`~GenerationStore._drop_data` removes them;
- how space is made: :meth:`GenerationStore._make_room` checks, grows or chooses the
  place (an XFS area, the thin pool) before anything is written.

The commit protocol is the same for all: make and flock the directory, make the data,
write and flush it, then the checksums, then the manifest (the commit point).
"""

from __future__ import annotations

import logging
import os
import shutil
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from pyroaring import BitMap

from blockguard.errors import NotFound
from blockguard.storage.manifest import (
    MANIFEST_NAME,
    Manifest,
    check_name,
    crash_point,
    fsync_dir,
    generation_clock,
    new_generation_id,
    write_atomic,
)
from blockguard.storage.pool.base import (
    AlertCallback,
    FreedGeneration,
    GenerationSpec,
    GenerationWriter,
    PoolBackend,
    PoolScan,
)
from blockguard.storage.pool.gendir import (
    DELETED_SUFFIX,
    LOCK,
    checksums_problem,
    lock_generation_dir,
    manifests_of,
    remove_damage_record,
    scan_generation_dirs,
    subdirs,
    write_damage_record,
    writer_alive,
)
from blockguard.storage.pool.records import RECORDS_DIR
from blockguard.storage.pool.stagedio import (
    StagedGenerationWriter,
    StoredData,
    StoredGenerationReader,
)

# The writer, reader and data of the store are part of its interface for backends.
__all__ = [
    "GenerationStore",
    "StagedGenerationWriter",
    "StoredData",
    "StoredGenerationReader",
]

log = logging.getLogger(__name__)


class GenerationStore(PoolBackend):
    """A pool that keeps each generation in a directory ``ROOT/VOLUME/GENERATION_ID``
    under one or more roots (see the module docstring for what a backend provides)."""

    #: The writer class the store makes (a backend may name its own subclass).
    writer_class: ClassVar[type[StagedGenerationWriter]] = StagedGenerationWriter

    def __init__(self, name: str, alert: AlertCallback | None = None) -> None:
        super().__init__(name, alert)
        #: Directories of the damaged generations the last scan found.
        self.damaged: list[str] = []

    # --- backend ----------------------------------------------------------------------

    @abstractmethod
    def _volume_roots(self) -> list[Path]:
        """The ``volumes`` directories that hold generation directories."""

    @abstractmethod
    def _make_room(
        self, spec: GenerationSpec, source: Manifest | None
    ) -> tuple[Path, Manifest | None]:
        """Make sure the generation fits (alerting and raising :class:`PoolSpaceLow`
        when it does not); returns the root to write it under and the full to clone
        (``source``, or None when it cannot be cloned there)."""

    @abstractmethod
    def _make_data(self, draft: Manifest, gen_dir: Path, source: Manifest | None) -> StoredData:
        """Make the generation's data (cloned from ``source`` when it is not None and the
        backend can); on failure remove what it made."""

    def _drop_data(self, manifest: Manifest) -> None:
        """Remove a committed generation's data kept outside its directory."""

    def _data_problem(self, gen: Path, manifest: Manifest) -> str | None:
        """Why the generation's data is not what its manifest says (None: fine or not
        checked without reading it)."""
        return None

    def _can_clone(self, source: Manifest) -> bool:
        """Whether this full can be the clone source of a new full."""
        return True

    # --- generations ------------------------------------------------------------------

    def begin_generation(self, spec: GenerationSpec) -> GenerationWriter:
        volume, chunk_size = spec.volume, spec.chunk_size
        source: Manifest | None = None
        if spec.is_full and spec.clone_from and spec.changed is not None:
            source = self.manifest(volume.name, spec.clone_from)
            if (
                not source.is_full
                or source.volume.size != volume.size
                or source.chunk_size != chunk_size
                or not self._can_clone(source)
            ):
                source = None
        root, source = self._make_room(spec, source)
        created = generation_clock()
        draft = Manifest(
            generation_id=new_generation_id(created),
            volume=volume,
            chunk_size=chunk_size,
            kind=spec.kind,
            base_id=None if spec.is_full else spec.base_id,
            parent_id=None if spec.is_full else spec.parent_id,
            changed=BitMap() if spec.changed is None else BitMap(spec.changed),
            created=created,
            sequence=self.next_sequence(volume.name),
        )
        gen_dir = root / volume.name / draft.generation_id
        new_volume_dir = not gen_dir.parent.exists()
        lock_fd = lock_generation_dir(gen_dir, self.name)
        try:
            data = self._make_data(draft, gen_dir, source)
        except BaseException:
            shutil.rmtree(gen_dir, ignore_errors=True)
            os.close(lock_fd)
            raise
        if data.cloned is None and draft.is_full:
            draft = draft.with_(changed=BitMap(range(draft.chunks)))
        draft = draft.with_(cloned_from=data.cloned.generation_id if data.cloned else None)
        return self.writer_class(
            draft, gen_dir, lock_fd, data, new_volume_dir=new_volume_dir, pool=self.name
        )

    def generations(self, volume: str | None = None) -> list[Manifest]:
        return manifests_of(self.scan(volume))

    def scan(self, volume: str | None = None) -> PoolScan:
        vols = [
            vol
            for root in self._volume_roots()
            for vol in ([root / volume] if volume else subdirs(root))
        ]
        found = scan_generation_dirs(vols, self._files_problem)
        self.damaged = [str(self._damaged_dir(d.volume, d.generation_id)) for d in found.damaged]
        return found

    def _files_problem(self, gen: Path, manifest: Manifest) -> str | None:
        return self._data_problem(gen, manifest) or checksums_problem(gen, manifest)

    def _damaged_dir(self, volume: str, generation_id: str) -> Path:
        for root in self._volume_roots():
            d = root / volume / generation_id
            if d.exists():
                return d
        return Path(volume, generation_id)

    def _gen_dir(self, volume: str, generation_id: str) -> Path:
        """The committed generation's directory.

        :raises NotFound: no committed generation with that id.
        """
        check_name(volume, "volume name")
        check_name(generation_id, "generation id")
        for root in self._volume_roots():
            d = root / volume / generation_id
            if (d / MANIFEST_NAME).exists():
                return d
        raise NotFound(what="generation", name=f"{volume}/{generation_id}")

    def mark_damaged(
        self, volume: str, generation_id: str, reason: str, chunk: int | None = None
    ) -> bool:
        write_damage_record(self._gen_dir(volume, generation_id), reason, chunk)
        return True

    def clear_damaged(self, volume: str, generation_id: str) -> None:
        remove_damage_record(self._gen_dir(volume, generation_id))

    def remove_generation(self, volume: str, generation_id: str) -> FreedGeneration:
        target = self._removable(volume, generation_id)
        gen = self._gen_dir(volume, generation_id)
        doomed = gen.with_name(gen.name + DELETED_SUFFIX)
        # The rename is the commit point of a removal: afterwards the generation is gone
        # for every reader, and an interrupted removal is finished by the next open.
        os.rename(gen, doomed)
        fsync_dir(gen.parent)
        crash_point("remove-renamed")
        self._drop_data(target)
        shutil.rmtree(doomed)
        return FreedGeneration(generation_id, target.kind.value, target.bytes_stored)

    def write_generation_file(
        self, volume: str, generation_id: str, name: str, data: bytes
    ) -> None:
        check_name(name, "generation file name")
        write_atomic(self._gen_dir(volume, generation_id) / name, data)

    def read_generation_file(self, volume: str, generation_id: str, name: str) -> bytes:
        check_name(name, "generation file name")
        try:
            return (self._gen_dir(volume, generation_id) / name).read_bytes()
        except FileNotFoundError:
            raise NotFound(
                what="file of generation", name=f"{volume}/{generation_id}/{name}"
            ) from None

    def record_dirs(self) -> list[Path]:
        return [root.parent / RECORDS_DIR for root in self._volume_roots()]

    def volume_dirs(self, volume: str) -> list[Path]:
        return [root / volume for root in self._volume_roots()]

    # --- garbage ----------------------------------------------------------------------

    def _collect_generation_dirs(
        self, drop: Callable[[str, Path], None] | None = None
    ) -> tuple[list[str], set[str]]:
        """Remove uncommitted and half-removed generation directories (and, through
        ``drop``, their data kept elsewhere, by generation id and directory, before the
        directory goes).

        :returns: what was removed, and the ids of every generation directory seen.
        """
        removed: list[str] = []
        seen: set[str] = set()
        for root in self._volume_roots():
            for vol in subdirs(root):
                for gen in subdirs(vol):
                    gid = gen.name.removesuffix(DELETED_SUFFIX)
                    seen.add(gid)
                    deleted = gen.name.endswith(DELETED_SUFFIX)
                    if not deleted and (gen / MANIFEST_NAME).exists():
                        for stray in (gen / LOCK, gen / f".{MANIFEST_NAME}.tmp"):
                            if stray.exists() and not writer_alive(gen):
                                stray.unlink(missing_ok=True)
                        continue
                    if writer_alive(gen):
                        continue
                    if drop is not None:
                        drop(gid, gen)
                    shutil.rmtree(gen, ignore_errors=True)
                    removed.append(str(gen))
                if removed:
                    fsync_dir(vol)
        return removed, seen
