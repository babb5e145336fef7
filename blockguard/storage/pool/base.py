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

Generic policy (dependency chains, retention, the space alert) lives here, once.
"""

from __future__ import annotations

import array
import json
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pyroaring import BitMap

from blockguard.core.retention import GenerationRef, select_for_deletion
from blockguard.errors import CorruptMetadata, NotFound, PoolSpaceLow
from blockguard.storage.manifest import (
    MANIFEST_NAME,
    GenerationKind,
    Manifest,
    VolumeIdentity,
    check_name,
    fsync_dir,
    read_manifest,
    sequence_numbers,
    write_atomic,
)

if TYPE_CHECKING:
    from blockguard.storage.safety import SafetyGate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolDevice:
    """A disk that belongs to a pool."""

    path: str
    devno: str
    size: int
    area: str  # the backend's name for the space on it (a mount point, a PV name)


@dataclass(frozen=True)
class PoolCapacity:
    total: int
    used: int
    free: int


@dataclass(frozen=True)
class SpaceAlert:
    """Published when the pool's free space will not hold the next backup."""

    pool: str
    free: int
    needed: int
    volume: str | None = None

    @property
    def message(self) -> str:
        what = f" for volume {self.volume}" if self.volume else ""
        return f"pool {self.pool} has {self.free} bytes free, {self.needed} needed{what}"


AlertCallback = Callable[[SpaceAlert], None]
#: Name suffix of a generation directory whose removal was committed.
DELETED_SUFFIX = ".deleted"
#: A generation directory's record of damage found on use (see ``mark_damaged``).
DAMAGE_RECORD = "damaged.json"


@dataclass(frozen=True)
class DamagedGeneration:
    """A generation the pool holds but cannot use as it is.

    :param generation_id: the pool's id (the directory name when the manifest is unreadable).
    :param reason: what is wrong, for a person.
    :param manifest: the manifest when it could be read (then something else is damaged,
        e.g. its data file is missing), else None.
    :param found_on_use: recorded by :meth:`PoolBackend.mark_damaged` (a verify or a
        restore found it), not seen in its files by the scan.
    :param chunk: the damaged chunk, when a checksum found it.
    """

    volume: str
    generation_id: str
    reason: str
    manifest: Manifest | None = None
    found_on_use: bool = False
    chunk: int | None = None


@dataclass(frozen=True)
class PoolScan:
    """What a pool holds of one volume (or all): good manifests and damaged entries."""

    manifests: list[Manifest]
    damaged: list[DamagedGeneration] = field(default_factory=list)


RECORDS_DIR = "records"
RECORD_FORMAT = "blockguard-volume"


@dataclass(frozen=True)
class VolumeRecord:
    """What the pool keeps about a volume so a catalog can be rebuilt from it alone.

    Tracking references are not kept: an imported volume starts tracking afresh (its
    next backup is a full).
    """

    name: str
    device_path: str
    major: int
    minor: int
    size: int
    serial: str | None
    chunk_size: int
    tracker_backend: str
    objectives: dict[str, Any] = field(default_factory=dict)
    group: str | None = None
    group_objectives: dict[str, Any] = field(default_factory=dict)
    updated: float = 0.0

    def to_json(self) -> bytes:
        return (json.dumps({"format": RECORD_FORMAT, **asdict(self)}, indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> VolumeRecord:
        """:raises CorruptMetadata: not a readable volume record."""
        try:
            body = json.loads(data)
            if not isinstance(body, dict) or body.pop("format", None) != RECORD_FORMAT:
                raise ValueError("not a blockguard volume record")
            record = cls(**body)
            check_name(record.name, "volume name")
            if not isinstance(record.objectives, dict):
                raise ValueError("objectives is not a mapping")
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            raise CorruptMetadata(what=where, detail=str(exc)) from None
        except Exception as exc:  # InvalidInput of a bad name
            raise CorruptMetadata(what=where, detail=str(exc)) from None
        return record


@dataclass(frozen=True)
class FreedGeneration:
    generation_id: str
    kind: str
    bytes: int  # bytes this generation had stored (shared reflinked blocks may stay used)


@dataclass(frozen=True)
class RetentionResult:
    """What applying a retention rule freed."""

    freed: list[FreedGeneration] = field(default_factory=list)
    measured_bytes: int = 0  # free-space growth the pool measured (0 if it cannot tell)

    @property
    def freed_ids(self) -> list[str]:
        return [f.generation_id for f in self.freed]

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.freed)


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


class PoolBackend(ABC):
    """A named pool of backup space. See the module docstring for the contract."""

    kind: ClassVar[str] = "?"
    #: True when :meth:`begin_generation` can make a full as a cheap clone of an earlier one.
    can_clone_full: ClassVar[bool] = False

    def __init__(self, name: str, alert: AlertCallback | None = None) -> None:
        self.name = name
        self.alert = alert

    # --- devices and space --------------------------------------------------------

    @abstractmethod
    def devices(self) -> list[PoolDevice]: ...

    @abstractmethod
    def add_device(
        self,
        path: str,
        *,
        protected: Sequence[str] = (),
        force: bool = False,
        gate: SafetyGate | None = None,
    ) -> PoolDevice:
        """Add a disk (same refusals as pool creation; ``gate``: the daemon's gate)."""

    @abstractmethod
    def capacity(self) -> PoolCapacity: ...

    # --- generations ---------------------------------------------------------------

    @abstractmethod
    def begin_generation(
        self,
        volume: VolumeIdentity,
        kind: GenerationKind,
        chunk_size: int,
        changed: BitMap | None,
        *,
        base_id: str | None,
        parent_id: str | None,
        clone_from: str | None = None,
    ) -> GenerationWriter:
        """Start a generation. ``changed`` None means every chunk (a full from scratch).

        :param clone_from: for a full: an earlier full of the volume that ``changed`` is
            relative to; the backend clones it when it can (``writer.cloned_from``).
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

    @abstractmethod
    def swap_in(self, full: Manifest, label: str) -> SwapInVolume:
        """A writable device whose content is the full ``full`` (a clone: instant)."""

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

    # --- volume records ---------------------------------------------------------------

    @abstractmethod
    def record_dirs(self) -> list[Path]:
        """Where volume records live (every ``dir`` area: each holds a full copy)."""

    def write_volume_record(self, record: VolumeRecord) -> None:
        """Store (replace) the record of ``record.name`` atomically, in every place."""
        check_name(record.name, "volume name")
        for directory in self.record_dirs():
            new = not directory.exists()
            directory.mkdir(exist_ok=True)
            if new:
                fsync_dir(directory.parent)
            write_atomic(directory / f"{record.name}.json", record.to_json())

    def remove_volume_record(self, name: str) -> None:
        """Forget the record of ``name`` (only once its generations are deleted)."""
        check_name(name, "volume name")
        for directory in self.record_dirs():
            path = directory / f"{name}.json"
            if path.exists():
                path.unlink()
                fsync_dir(directory)

    def volume_records(self) -> dict[str, VolumeRecord]:
        """Every readable record by volume name (the newest copy when areas differ);
        unreadable ones are logged and left out."""
        found: dict[str, VolumeRecord] = {}
        for directory in self.record_dirs():
            try:
                names = sorted(os.listdir(directory))
            except FileNotFoundError:
                continue
            for entry in names:
                if not entry.endswith(".json") or entry.startswith("."):
                    continue
                path = directory / entry
                try:
                    record = VolumeRecord.from_json(path.read_bytes(), str(path))
                except (OSError, CorruptMetadata) as exc:
                    log.error("volume record %s: %s", path, exc)
                    continue
                old = found.get(record.name)
                if old is None or record.updated > old.updated:
                    found[record.name] = record
        return found

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

    def apply_retention(self, volume: str, keep: int) -> RetentionResult:
        """Keep the ``keep`` newest generations of ``volume`` and their dependencies.

        Empty deltas do not count (see :mod:`blockguard.core.retention`). Damaged
        generations whose manifest cannot be read are not seen here and stay until
        removed by hand: nothing tells what depends on them.
        """
        gens = self.generations(volume)
        refs = [
            GenerationRef(
                m.generation_id,
                m.kind.value,
                m.base_id,
                m.parent_id,
                m.created,
                empty=not m.is_full and not m.changed,
            )
            for m in gens
        ]
        doomed = select_for_deletion(refs, keep)
        before = self.capacity().free
        # Newest first: a generation is removed only after everything that depends on
        # it, so an interrupted retention never leaves a broken chain behind.
        freed = [self.remove_generation(volume, gid) for gid in reversed(doomed)]
        freed.reverse()
        after = self.capacity().free if freed else before
        return RetentionResult(freed, max(0, after - before))


def scan_generation_dirs(
    volume_dirs: Iterable[Path], files_problem: Callable[[Path, Manifest], str | None]
) -> PoolScan:
    """Read the committed generation directories of some volumes (shared by file backends).

    A directory with a manifest is committed; an unreadable manifest, or a readable one
    whose files ``files_problem`` finds wrong, is reported as damaged (never removed:
    the garbage collector only takes what was never committed).
    """
    good: list[Manifest] = []
    damaged: list[DamagedGeneration] = []
    for vol in volume_dirs:
        try:
            gens = sorted(p for p in vol.iterdir() if p.is_dir() and not p.is_symlink())
        except FileNotFoundError:
            continue
        for gen in gens:
            if gen.name.endswith(DELETED_SUFFIX) or not (gen / MANIFEST_NAME).exists():
                continue
            try:
                manifest = read_manifest(gen)
            except CorruptMetadata as exc:
                log.error("%s", exc)
                damaged.append(
                    DamagedGeneration(vol.name, gen.name, f"its manifest is unreadable: {exc}")
                )
                continue
            record = read_damage_record(gen)
            if record is not None:
                reason, chunk = record
                damaged.append(DamagedGeneration(vol.name, gen.name, reason, manifest, True, chunk))
                continue
            problem = files_problem(gen, manifest)
            if problem:
                log.error("generation %s/%s is damaged: %s", vol.name, gen.name, problem)
                damaged.append(DamagedGeneration(vol.name, gen.name, problem, manifest))
            else:
                good.append(manifest)
    good.sort(key=lambda m: (m.created, m.generation_id))
    damaged.sort(key=lambda d: d.generation_id)
    return PoolScan(good, damaged)


def file_problem(path: Path, what: str, min_size: int, exact: bool = False) -> str | None:
    """Why a generation's file cannot be what its manifest says, or None (one stat)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"its {what} {path.name} is missing"
    except OSError as exc:
        return f"its {what} {path.name} cannot be read: {exc.strerror or exc}"
    if size < min_size or (exact and size != min_size):
        return f"its {what} {path.name} has {size} bytes, {min_size} expected"
    return None


def manifests_of(scan: PoolScan) -> list[Manifest]:
    """Every readable manifest of a scan (good and damaged), oldest first."""
    found = scan.manifests + [d.manifest for d in scan.damaged if d.manifest is not None]
    return sorted(found, key=lambda m: (m.created, m.generation_id))


def write_damage_record(gen: Path, reason: str, chunk: int | None) -> None:
    """Write a generation directory's :data:`DAMAGE_RECORD` (atomically)."""
    body = {"reason": reason, "chunk": chunk, "recorded": time.time()}
    write_atomic(gen / DAMAGE_RECORD, json.dumps(body).encode())


def read_damage_record(gen: Path) -> tuple[str, int | None] | None:
    """(reason, chunk) of a :data:`DAMAGE_RECORD`, or None without one.

    An unreadable record still means the generation was found damaged.
    """
    try:
        body = json.loads((gen / DAMAGE_RECORD).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return "a verify or restore found it damaged", None
    if not isinstance(body, dict):
        return "a verify or restore found it damaged", None
    chunk = body.get("chunk")
    return str(body.get("reason") or "found damaged"), chunk if isinstance(chunk, int) else None


def remove_damage_record(gen: Path) -> None:
    try:
        (gen / DAMAGE_RECORD).unlink()
    except FileNotFoundError:
        return
    fsync_dir(gen)
