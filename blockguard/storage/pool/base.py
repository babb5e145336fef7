# Over ~400 lines: the whole pool interface in one place, most of it the contract docstrings.
"""What every pool backend is: the interface the data path and the daemon program against.

A pool stores generations. The backends differ in where the bytes go — an XFS directory
with reflinks (``dir``), thin LVs in a VG (``lvm``), another host over SSH, an S3 bucket —
but all of them:

- create or open a pool by name (``create``/``open`` classmethods, backend-specific
  arguments: devices for ``dir``/``lvm``, a URL and credentials for remote ones);
- take chunks through a :class:`GenerationWriter` in increasing chunk order, and commit
  the manifest last; anything uncommitted is garbage that the next ``open`` removes;
- are the source of truth: :meth:`PoolBackend.generations` reads the manifests stored on
  the pool, never a catalog;
- read chunks back through a :class:`GenerationReader`;
- make a writable volume from a full for swap-in (:meth:`PoolBackend.swap_in`);
- keep one :class:`VolumeRecord` per volume (``records/VOLUME.json``, written atomically)
  so that a catalog can be rebuilt from the pool alone (``pool import``).

Generic policy (dependency chains, retention, the space alert) lives here, once. The
backends that keep generation directories on a file system share one implementation of
the generation bookkeeping and the chunk writer: :class:`.store.GenerationStore`.
"""

from __future__ import annotations

import array
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pyroaring import BitMap

from blockguard.core.retention import GenerationRef, RetentionPolicy, choose
from blockguard.errors import Busy, CorruptMetadata, EnvironmentProblem, NotFound, PoolSpaceLow
from blockguard.storage.manifest import (
    Manifest,
    VolumeIdentity,
    check_name,
    fsync_dir,
    sequence_numbers,
)
from blockguard.storage.pool.records import (
    VolumeRecord,
    read_volume_records,
    remove_volume_record,
    write_volume_record,
)
from blockguard.storage.pool.values import (
    AlertCallback,
    DamagedGeneration,
    FreedGeneration,
    GenerationSpec,
    PoolCapacity,
    PoolDevice,
    PoolScan,
    RetentionResult,
    SpaceAlert,
)

if TYPE_CHECKING:
    from blockguard.storage.pool.registration import DiskAdmission
    from blockguard.storage.snapshot import CowStore

# The values and records are part of the interface: importers take them from here.
__all__ = [
    "AlertCallback",
    "DamagedGeneration",
    "FreedGeneration",
    "GenerationReader",
    "GenerationSpec",
    "GenerationWriter",
    "PoolBackend",
    "PoolCapacity",
    "PoolDevice",
    "PoolScan",
    "RetentionResult",
    "ScratchSpace",
    "SpaceAlert",
    "SwapInVolume",
    "VolumeRecord",
    "generation_refs",
]

log = logging.getLogger(__name__)

#: The name of a pool's restore-drill scratch space (an LV of an lvm pool; a file, with
#: ``.img``, in a dir pool's area). Only this exact name is ever removed as a left-over.
DRILL_SCRATCH = "bg-drill-scratch"


class GenerationWriter(ABC):
    """Receives one generation's chunks and commits it.

    ``draft`` is the manifest to be (ids, kind, changed set); ``cloned_from`` is set when
    the backend made a new full as a clone of that earlier full, in which case only the
    chunks changed since it have to be written. Use as a context manager: leaving without
    :meth:`commit` aborts.
    """

    def __init__(self, draft: Manifest, cloned_from: Manifest | None) -> None:
        self.draft = draft
        self.cloned_from = cloned_from
        self.committed: Manifest | None = None

    @property
    def generation_id(self) -> str:
        return self.draft.generation_id

    def clone_reads(self, changed: BitMap) -> BitMap:
        """For a cloned full: the chunks to write, ``changed`` (relative to the clone) or
        more. A backend that stores chunks in groups (a remote pool's packs) asks for
        whole groups, cheaper to read from the source than from its clone."""
        return changed

    @abstractmethod
    def write_chunks(self, first: int, view: memoryview, digests: Sequence[int]) -> None:
        """Store the chunks starting at ``first`` (called in increasing chunk order)."""

    @abstractmethod
    def commit(self, checksums: array.array[int]) -> Manifest:
        """Make the data durable, then write the manifest last; returns it.

        :param checksums: one xxh3_64 per stored chunk (see :mod:`..manifest`).
        """

    @abstractmethod
    def abort(self) -> None:
        """Remove everything written; idempotent."""

    def __enter__(self) -> GenerationWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if self.committed is None:
            self.abort()


class GenerationReader(ABC):
    """Reads a committed generation's chunks; a chunk source for the copy engine."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self._sums: array.array[int] | None = None

    @abstractmethod
    def read_chunks(self, first: int, view: memoryview) -> None:
        """Fill ``view`` with stored chunks ``first, first+1, ...`` (all stored here)."""

    def read_runs(self, runs: Sequence[tuple[int, memoryview]]) -> None:
        """Fill each ``(first chunk, view)`` of ``runs`` as :meth:`read_chunks` would.

        ``runs`` are ascending and disjoint, all stored here. This default reads them one
        by one; a reader of stored data joins runs that lie close together in its data
        into one vectored read.
        """
        for first, view in runs:
            self.read_chunks(first, view)

    @abstractmethod
    def _load_checksums(self) -> array.array[int]:
        """The checksum array, checked against the manifest."""

    def checksums(self) -> array.array[int]:
        if self._sums is None:
            self._sums = self._load_checksums()
        return self._sums

    def expected(self, first: int, count: int) -> Sequence[int]:
        """Stored checksums of ``count`` consecutive stored chunks from ``first``."""
        slot = self.manifest.checksum_slot(first)
        return self.checksums()[slot : slot + count]

    def close(self) -> None:  # noqa: B027 - optional hook; most readers hold nothing
        """Release what the reader holds."""

    def __enter__(self) -> GenerationReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class SwapInVolume(ABC):
    """A writable block device made from a full for swap-in; the caller releases it."""

    def __init__(self, device: str, image: str | None) -> None:
        self.device = device
        self.image = image

    @abstractmethod
    def release(self, *, keep_image: bool = False) -> None:
        """Detach the device (and delete its backing unless ``keep_image``)."""


class ScratchSpace(ABC):
    """A block device on the pool's disks that a restore drill writes into (the target of
    its copy restores); the caller releases it.

    :param device: the verified device node.
    :param name: what it is on the pool (``VG/LV``, or the backing file's path).
    :param size: bytes.
    """

    def __init__(self, device: str, name: str, size: int) -> None:
        self.device = device
        self.name = name
        self.size = size

    @abstractmethod
    def release(self) -> None:
        """Remove it (detach the loop device, delete the file or LV)."""


class PoolBackend(ABC):
    """A named pool of backup space. See the module docstring for the contract."""

    kind: ClassVar[str] = "?"
    #: True when :meth:`begin_generation` can make a full as a cheap clone of an earlier one.
    can_clone_full: ClassVar[bool] = False

    def __init__(self, name: str, alert: AlertCallback | None = None) -> None:
        self.name = name
        self.alert = alert
        # Generation id -> who holds it (browse mounts reading it): never removed. A set:
        # two mounts share the chain's full, and one unmount must not drop the other's hold.
        self._holds: dict[str, set[str]] = {}
        # Taken by a hold and by retention's check-and-remove of each generation: a hold
        # comes before that check or after the removal, never in between.
        self._holds_lock = threading.RLock()

    # --- holds -----------------------------------------------------------------------

    def hold(self, generation_ids: Iterable[str], holder: str) -> None:
        """Keep ``generation_ids`` from removal (by retention or by hand) until
        :meth:`release`; ``holder`` is named when a removal is refused."""
        with self._holds_lock:
            for gid in generation_ids:
                self._holds.setdefault(gid, set()).add(holder)

    def release(self, holder: str) -> None:
        """Drop every hold of ``holder`` (the other holders' stay)."""
        with self._holds_lock:
            for gid in list(self._holds):
                holders = self._holds[gid]
                holders.discard(holder)
                if not holders:
                    del self._holds[gid]

    def holder_of(self, generation_id: str) -> str | None:
        """Who holds ``generation_id`` (the first by name when several do), or None."""
        with self._holds_lock:
            holders = self._holds.get(generation_id)
            return min(holders) if holders else None

    # --- devices and space --------------------------------------------------------

    @abstractmethod
    def devices(self) -> list[PoolDevice]: ...

    @abstractmethod
    def add_device(self, path: str, admission: DiskAdmission | None = None) -> PoolDevice:
        """Add a disk, refused as at pool creation (``admission``: the daemon's gate and
        ``force``; without one, a gate that knows no protected volume)."""

    @abstractmethod
    def capacity(self) -> PoolCapacity: ...

    # --- generations ---------------------------------------------------------------

    @abstractmethod
    def begin_generation(self, spec: GenerationSpec) -> GenerationWriter:
        """Start the generation ``spec`` describes (a full is cloned from
        ``spec.clone_from`` when the backend can: ``writer.cloned_from``).

        :raises PoolSpaceLow: the pool cannot hold it.
        """

    @abstractmethod
    def generations(self, volume: str | None = None) -> list[Manifest]:
        """Committed generations (of one volume, or all), oldest first, from the pool."""

    def swap_in_devices(self) -> list[tuple[str, str]]:
        """``(name, device)`` of every swap-in the pool holds; device ``""`` when it is
        not attached. The name is what :meth:`release_swap_in` takes."""
        return [(name, "") for name in self.swap_ins()]

    def swap_ins(self) -> list[str]:
        """Swap-in images or volumes that exist on the pool (attached or not)."""
        return []

    def release_swap_in(self, name: str) -> None:
        """Detach a swap-in left by a restore and delete it.

        :raises NotFound: the pool has no swap-in of that name.
        """
        raise NotFound(what="swap-in", name=name)

    def next_sequence(self, volume: str) -> int:
        """The running number a new generation of ``volume`` gets (one past the newest)."""
        found = self.scan(volume)
        readable = found.manifests + [d.manifest for d in found.damaged if d.manifest]
        return max(sequence_numbers(readable).values(), default=0) + 1

    def scan(self, volume: str | None = None) -> PoolScan:
        """Good manifests and damaged entries (unreadable manifest, missing data file).

        Backends that can tell override this; damaged entries are reported here only,
        so the daemon learns about them in one place. Readable manifests of damaged
        entries are also in :meth:`generations` (storage code may still remove them).
        """
        return PoolScan(self.generations(volume))

    def mark_damaged(
        self, volume: str, generation_id: str, reason: str, chunk: int | None = None
    ) -> bool:
        """Record on the pool that using a generation found it damaged, so that every
        later scan (also after a restart, or on another host) reports it.

        :returns: False when this backend cannot record it (then only the caller knows).
        """
        return False

    def clear_damaged(self, volume: str, generation_id: str) -> None:  # noqa: B027 - optional
        """Forget a :meth:`mark_damaged` record (the generation was read back whole)."""

    @abstractmethod
    def open_generation(self, manifest: Manifest) -> GenerationReader: ...

    @abstractmethod
    def remove_generation(self, volume: str, generation_id: str) -> FreedGeneration:
        """Delete one generation (crash-safe: it is gone or still whole)."""

    def _removable(self, volume: str, generation_id: str) -> Manifest:
        """The generation a removal may take: it exists and nothing depends on it.

        :raises NotFound: no such generation.
        :raises Busy: other generations are built on it (their parent or base).
        """
        gens = self.generations(volume)
        target = next((m for m in gens if m.generation_id == generation_id), None)
        if target is None:
            raise NotFound(what="generation", name=f"{volume}/{generation_id}")
        holder = self.holder_of(generation_id)
        if holder is not None:
            raise Busy(what=f"generation {generation_id}", reason=f"it is in use by {holder}")
        users = [m.generation_id for m in gens if generation_id in (m.parent_id, m.base_id)]
        if users:
            raise Busy(
                what=f"generation {generation_id}", reason=f"{', '.join(users)} depend on it"
            )
        return target

    @abstractmethod
    def swap_in(self, full: Manifest, label: str) -> SwapInVolume:
        """A writable device whose content is the full ``full`` (a clone: instant)."""

    # --- block space lent out (dm-era metadata, dm-snapshot exception stores) ---------

    #: True when the pool can lend block devices (:meth:`lend_device`, :meth:`cow_store`).
    can_lend_devices: ClassVar[bool] = False

    def lend_device(self, name: str, size: int, volume: str | None = None) -> str:
        """A new zeroed block device ``name`` of at least ``size`` bytes, kept across
        restarts; returns its stable path (replace one of that name first with
        :meth:`return_device`).

        :param volume: the volume it is for (named in the space alert).
        :raises EnvironmentProblem: this pool cannot lend block space.
        :raises PoolSpaceLow: no room for it.
        """
        raise EnvironmentProblem(detail=f"pool {self.name} ({self.kind}) lends no block devices")

    def lent_device(self, name: str) -> str:
        """The stable, verified path of lent device ``name`` (activated if needed, as
        after a reboot).

        :raises EnvironmentProblem: this pool cannot lend block space.
        """
        raise EnvironmentProblem(detail=f"pool {self.name} ({self.kind}) lends no block devices")

    def return_device(self, name: str) -> None:  # noqa: B027 - nothing to return by default
        """Remove lent device ``name`` if there is one (nothing for pools that lend none)."""

    def cow_store(self, size: int, label: str) -> CowStore:
        """A new device of at least ``size`` bytes for a dm-snapshot's exceptions, removed
        by its ``release()`` (or by the garbage collection of a reopened pool).

        :raises EnvironmentProblem: this pool cannot lend block space.
        :raises PoolSpaceLow: no room for it.
        """
        raise EnvironmentProblem(detail=f"pool {self.name} ({self.kind}) lends no block devices")

    # --- a restore drill's scratch space -------------------------------------------

    def drill_scratch(self, size: int) -> ScratchSpace:
        """New scratch space :data:`DRILL_SCRATCH` of ``size`` bytes on the pool's disks
        for a drill's copy restores (one at a time per pool: a left-over is removed first).

        :raises EnvironmentProblem: this pool has no block space to give.
        :raises PoolSpaceLow: no room for it.
        """
        raise EnvironmentProblem(detail=f"pool {self.name} ({self.kind}) has no scratch space")

    def remove_drill_scratch(self) -> list[str]:
        """Remove a scratch space :data:`DRILL_SCRATCH` a crash left (that name only);
        returns what was removed."""
        return []

    def prepare_ahead(  # noqa: B027 - optional hook
        self, volume: str, go_on: Callable[[], bool] = lambda: True
    ) -> None:
        """Make now, while the pool is idle, what the next backup of ``volume`` would
        have to make in its own time (the ``lvm`` pool: a spare delta area). ``go_on``
        is asked before each step that takes time: False (a job came) stops there."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the pool (unmount what this object mounted)."""

    def __enter__(self) -> PoolBackend:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def volume_dirs(self, volume: str) -> list[Path]:
        """The directories the pool keeps a volume's generations in (may not exist)."""
        return []

    def remove_volume_dirs(self, volume: str) -> None:
        """Remove a volume's directories once they hold no generation (else leave them)."""
        check_name(volume, "volume name")
        for directory in self.volume_dirs(volume):
            try:
                directory.rmdir()
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.info("volume directory %s stays: %s", directory, exc.strerror or exc)
                continue
            fsync_dir(directory.parent)

    # --- file lists (issue 13) --------------------------------------------------------

    def write_generation_file(
        self, volume: str, generation_id: str, name: str, data: bytes
    ) -> None:
        """Store ``data`` as file ``name`` with a committed generation (a file group's list):
        removed with it.

        :raises EnvironmentProblem: this kind of pool keeps no such files.
        """
        raise EnvironmentProblem(detail=f"a {type(self).__name__} keeps no files with generations")

    def read_generation_file(self, volume: str, generation_id: str, name: str) -> bytes:
        """A file stored by :meth:`write_generation_file`.

        :raises NotFound: the generation has no such file.
        """
        raise NotFound(what="file of generation", name=f"{volume}/{generation_id}/{name}")

    # --- volume records ---------------------------------------------------------------

    @abstractmethod
    def record_dirs(self) -> list[Path]:
        """Where volume records live (every ``dir`` area: each holds a full copy)."""

    def write_volume_record(self, record: VolumeRecord) -> None:
        """Store (replace) the record of ``record.name`` atomically, in every place."""
        write_volume_record(self.record_dirs(), record)

    def remove_volume_record(self, name: str) -> None:
        """Forget the record of ``name`` (only once its generations are deleted)."""
        remove_volume_record(self.record_dirs(), name)

    def volume_records(self) -> dict[str, VolumeRecord]:
        """Every readable record by volume name (the newest copy when areas differ);
        unreadable ones are logged and left out."""
        return read_volume_records(self.record_dirs())

    # --- generic policy -------------------------------------------------------------

    def volumes(self) -> list[str]:
        return sorted({m.volume.name for m in self.generations()})

    def manifest(self, volume: str, generation_id: str) -> Manifest:
        """:raises NotFound: no committed generation with that id."""
        for m in self.generations(volume):
            if m.generation_id == generation_id:
                return m
        raise NotFound(what="generation", name=f"{volume}/{generation_id}")

    def chain(self, volume: str, generation_id: str) -> list[Manifest]:
        """The generations needed to restore one: its full first, itself last.

        :raises CorruptMetadata: a link of the chain is missing or inconsistent.
        """
        by_id = {m.generation_id: m for m in self.generations(volume)}
        if generation_id not in by_id:
            raise NotFound(what="generation", name=f"{volume}/{generation_id}")
        chain = [by_id[generation_id]]
        while not chain[-1].is_full:
            link = chain[-1]
            parent = by_id.get(link.parent_id or "")
            if parent is None:
                raise CorruptMetadata(
                    what=f"generation {link.generation_id}",
                    detail=f"its parent {link.parent_id} is missing",
                )
            if (
                parent.chunk_size != link.chunk_size
                or parent.volume.size != link.volume.size
                or len(chain) > len(by_id)
            ):
                raise CorruptMetadata(
                    what=f"generation {link.generation_id}",
                    detail=f"it does not fit its parent {parent.generation_id}",
                )
            chain.append(parent)
        chain.reverse()
        if chain[-1].base_id not in (None, chain[0].generation_id):
            raise CorruptMetadata(
                what=f"generation {generation_id}",
                detail=f"its base {chain[-1].base_id} is not the full of its chain",
            )
        return chain

    def estimate_bytes(self, volume: VolumeIdentity, changed_chunks: int | None, chunk: int) -> int:
        """Pool space a generation of ``changed_chunks`` chunks needs (None: all)."""
        if changed_chunks is None:
            return volume.size
        return min(volume.size, changed_chunks * chunk)

    def check_space(self, needed: int, volume: str | None = None) -> SpaceAlert | None:
        """Alert (callback and return value) when ``needed`` bytes do not fit."""
        free = self.capacity().free
        if free >= needed:
            return None
        alert = SpaceAlert(self.name, free, needed, volume)
        log.warning("%s", alert.message)
        if self.alert is not None:
            self.alert(alert)
        return alert

    def require_space(self, needed: int, volume: str | None = None) -> None:
        """:raises PoolSpaceLow: ``needed`` bytes do not fit (after alerting)."""
        alert = self.check_space(needed, volume)
        if alert is not None:
            raise PoolSpaceLow(pool=self.name, free=alert.free, needed=alert.needed)

    def next_backup_estimate(self, volume: str) -> int:
        """A guess at the next backup's size: the largest of the last few, or a full."""
        gens = self.generations(volume)
        if not gens:
            return 0
        if not self.can_clone_full:
            return gens[-1].volume.size
        return max(m.bytes_stored for m in gens[-4:])

    def apply_retention(self, volume: str, keep: int | RetentionPolicy) -> RetentionResult:
        """Keep what ``keep`` asks for of ``volume`` and everything that depends on.

        Empty deltas do not count (see :mod:`blockguard.core.retention`). Damaged
        generations whose manifest cannot be read are not seen here and stay until
        removed by hand: nothing tells what depends on them.

        :param keep: the volume's policy, or how many of the newest to keep.
        """
        policy = keep if isinstance(keep, RetentionPolicy) else RetentionPolicy(last=keep)
        gens = self.generations(volume)
        doomed = choose(generation_refs(gens), policy).deleted
        if not doomed:
            return RetentionResult([], 0)  # no space question (an lvs on an lvm pool)
        reads = {m.generation_id: {m.parent_id, m.base_id} for m in gens}
        before: int | None = None  # asked only when something is removed (lvs on lvm)
        freed: list[FreedGeneration] = []
        kept: dict[str, str] = {}
        # Newest first: a generation is removed only after everything that depends on
        # it, so an interrupted retention never leaves a broken chain behind.
        for gid in reversed(doomed):
            # The hold is checked now, not when the plan was made: a browse mount or a
            # restore taken since keeps its generation, and what a kept one reads stays
            # too. A later retention removes them once released.
            with self._holds_lock:
                holder = self.holder_of(gid) or next(
                    (who for k, who in kept.items() if gid in reads.get(k, ())), None
                )
                if holder is not None:
                    kept[gid] = holder
                    continue
                if before is None:
                    before = self.capacity().free
                freed.append(self.remove_generation(volume, gid))
        freed.reverse()
        if kept:
            log.info(
                "retention of %s keeps %s: in use (%s)",
                volume,
                ", ".join(sorted(kept)),
                ", ".join(sorted(set(kept.values()))),
            )
        grown = 0 if before is None else max(0, self.capacity().free - before)
        return RetentionResult(freed, grown, kept)


def generation_refs(manifests: Iterable[Manifest]) -> list[GenerationRef]:
    """What retention looks at of each manifest (a delta with no changed chunk is empty)."""
    return [
        GenerationRef(
            m.generation_id,
            m.kind.value,
            m.base_id,
            m.parent_id,
            m.created,
            empty=not m.is_full and not m.changed,
        )
        for m in manifests
    ]
