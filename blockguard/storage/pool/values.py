"""The plain values of the pool interface: what a pool is asked to write, its disks, its
space, what it holds and what it freed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pyroaring import BitMap

from blockguard.errors import InvalidInput
from blockguard.storage.manifest import GenerationKind, Manifest, VolumeIdentity, check_chunk_size


@dataclass(frozen=True)
class GenerationSpec:
    """What a new generation is to be: what :meth:`.PoolBackend.begin_generation` takes,
    checked when made.

    :param changed: the chunks it stores; None means every chunk (a full from scratch).
    :param base_id: the full a delta builds on (a full has none: ignored).
    :param parent_id: the generation an incremental follows (ignored for a full).
    :param clone_from: for a full: an earlier full of the volume that ``changed`` is
        relative to; the backend clones it when it can (``writer.cloned_from``).
    :raises InvalidChunkSize: a chunk size the manifests cannot hold.
    :raises InvalidInput: a delta without its changed-chunk set.
    """

    volume: VolumeIdentity
    kind: GenerationKind
    chunk_size: int
    changed: BitMap | None = None
    base_id: str | None = None
    parent_id: str | None = None
    clone_from: str | None = None

    def __post_init__(self) -> None:
        check_chunk_size(self.chunk_size)
        if self.kind is not GenerationKind.FULL and self.changed is None:
            raise InvalidInput(detail=f"a {self.kind} generation needs its changed-chunk set")

    @property
    def is_full(self) -> bool:
        return self.kind is GenerationKind.FULL


@dataclass(frozen=True)
class PoolDevice:
    """A disk that belongs to a pool."""

    path: str
    devno: str
    size: int
    area: str  # the backend's name for the space on it (a mount point, a PV name)


@dataclass(frozen=True)
class PoolCapacity:
    """A pool's space in bytes; for a pool with a thin pool, also the thin pool's own data
    and metadata space as the kernel reports it (0 where a backend has none)."""

    total: int
    used: int
    free: int
    thin_data_total: int = 0
    thin_data_free: int = 0
    thin_meta_total: int = 0
    thin_meta_free: int = 0


@dataclass(frozen=True)
class SpaceAlert:
    """Published when the pool's free space will not hold the next backup."""

    pool: str
    free: int
    needed: int
    volume: str | None = None
    #: What lacks: "" for the pool's space, else the thin pool's ``data`` or ``metadata``.
    resource: str = ""

    @property
    def message(self) -> str:
        what = f" for volume {self.volume}" if self.volume else ""
        where = f"'s thin pool {self.resource}" if self.resource else ""
        return f"pool {self.pool}{where} has {self.free} bytes free, {self.needed} needed{what}"


AlertCallback = Callable[[SpaceAlert], None]


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
    #: Generation id -> its holder: chosen for removal but held (or read by a held one)
    #: when its turn came; a later retention removes it once released.
    kept: dict[str, str] = field(default_factory=dict)

    @property
    def freed_ids(self) -> list[str]:
        return [f.generation_id for f in self.freed]

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.freed)
