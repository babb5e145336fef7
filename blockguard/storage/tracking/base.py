"""The change-tracking interface every backend (scan, era, thin) implements.

A :class:`ChangeTracker` follows one volume in one chunk size. It keeps any number of
named *reference points* ("last-backup", "last-full", ...) and answers, per reference,
which chunks changed since then as a :class:`ChangeSet` (a compressed bitmap). Where the
reference is held is the backend's business: a file of chunk hashes (scan), an era number
in dm-era metadata (era), a thin snapshot (thin).

The one unforgivable bug is an incremental built on a change set that is too small. So a
tracker that cannot vouch for a reference says so: its :class:`TrackerState` is
``unknown`` with a reason, and asking it for that reference's change set raises
:class:`~blockguard.errors.TrackingLost` instead of returning something smaller.
:meth:`ChangeTracker.verify_sample` checks a tracker from the outside against the last
backup's checksums, for any backend.
"""

from __future__ import annotations

import abc
import enum
import math
import os
import random
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar

import xxhash
from pyroaring import BitMap

from blockguard.errors import (
    AlreadyExists,
    CorruptMetadata,
    DeviceInUse,
    DeviceReadOnly,
    DeviceTooSmall,
    InvalidChunkSize,
    InvalidInput,
    NotABlockDevice,
    TrackingLost,
)
from blockguard.storage.blockdev import BlockDevice, aligned_buffer, device_rdev, sysfs_dir

KiB = 1024
MiB = 1024 * KiB
MIN_CHUNK_SIZE = 4 * KiB
MAX_CHUNK_SIZE = 16 * MiB
DEFAULT_CHUNK_SIZE = 64 * KiB
#: Smallest volume blockguard protects, whatever the chunk size.
MIN_VOLUME_SIZE = 1 * MiB
#: pyroaring's BitMap holds 32-bit values, so a volume has at most 2**32 chunks
#: (16 TiB in 4 KiB chunks, 256 TiB in the default 64 KiB chunks).
MAX_CHUNKS = 1 << 32
#: Bytes of one chunk checksum (xxh3-128; see :func:`chunk_digest`).
DIGEST_SIZE = 16

_REFERENCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate_chunk_size(chunk_size: int) -> int:
    """Return ``chunk_size`` if it is a power of two from 4 KiB to 16 MiB.

    :raises InvalidChunkSize: otherwise (also for non-integers and bools).
    """
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, int)
        or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE
        or chunk_size & (chunk_size - 1)
    ):
        raise InvalidChunkSize(chunk_size=chunk_size)
    return chunk_size


def validate_reference_name(name: str) -> str:
    """Return ``name`` if it can name a reference point (it also names files and dm objects).

    :raises InvalidInput: for anything but 1-64 of ``A-Z a-z 0-9 . _ -``, not starting
        with ``.``, ``_`` or ``-``.
    """
    if not isinstance(name, str) or not _REFERENCE_NAME.fullmatch(name):
        raise InvalidInput(
            detail=f"reference name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def chunk_count(volume_size: int, chunk_size: int) -> int:
    """Number of chunks of a volume; the last one may be partial."""
    return -(-volume_size // chunk_size)


def chunk_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The checksum of one chunk's bytes, as trackers and the backup engine store it.

    xxh3-128: as fast as xxh3-64 (far faster than any disk), and a missed change needs a
    128-bit collision rather than a 64-bit one; at 16 bytes per 64 KiB chunk it costs
    1/4096 of the volume per reference. It is not a cryptographic hash: someone who can
    write the volume and knows the function could craft a collision on purpose.
    """
    return xxhash.xxh3_128_digest(data)


# --- change sets ----------------------------------------------------------------------


class ChangeSet:
    """The chunks of a volume that changed since a reference point.

    :param chunk_size: bytes per chunk (validated).
    :param volume_size: bytes of the volume; the last chunk may be partial.
    :param chunks: changed chunk indexes (a BitMap is taken over, not copied).
    :raises InvalidInput: a chunk index beyond the volume, or more than 2**32 chunks.
    """

    __slots__ = ("chunk_size", "chunks", "volume_size")
    _MAGIC = b"BGCHSET1"
    _HEADER = struct.Struct("<8sHHIQQ")  # magic, version, flags, chunk size, volume size, len

    def __init__(
        self, chunk_size: int, volume_size: int, chunks: BitMap | Iterable[int] = ()
    ) -> None:
        self.chunk_size = validate_chunk_size(chunk_size)
        if volume_size < 0 or chunk_count(volume_size, chunk_size) > MAX_CHUNKS:
            raise InvalidInput(
                detail=f"a volume of {volume_size} bytes in {chunk_size}-byte chunks "
                f"cannot be tracked (0 to {MAX_CHUNKS} chunks)"
            )
        self.volume_size = volume_size
        self.chunks = chunks if isinstance(chunks, BitMap) else BitMap(chunks)
        if self.chunks and self.chunks.max() >= self.n_chunks:
            raise InvalidInput(
                detail=f"chunk {self.chunks.max()} is beyond the volume's {self.n_chunks} chunks"
            )

    @classmethod
    def full(cls, chunk_size: int, volume_size: int) -> ChangeSet:
        """Every chunk of the volume (what a full backup copies)."""
        bm = BitMap()
        bm.add_range(0, chunk_count(volume_size, chunk_size))
        return cls(chunk_size, volume_size, bm)

    @classmethod
    def from_byte_ranges(
        cls, chunk_size: int, volume_size: int, ranges: Iterable[tuple[int, int]]
    ) -> ChangeSet:
        """Every chunk that intersects one of the ``(offset, length)`` byte ranges.

        For backends whose native block differs from the chunk (dm-era blocks, thin-pool
        blocks): convert their ranges to bytes, then to chunks, rounding outwards.
        """
        bm = BitMap()
        for offset, length in ranges:
            if length <= 0:
                continue
            if offset < 0 or offset + length > volume_size:
                raise InvalidInput(
                    detail=f"byte range {offset}+{length} is outside the volume "
                    f"({volume_size} bytes)"
                )
            bm.add_range(offset // chunk_size, (offset + length - 1) // chunk_size + 1)
        return cls(chunk_size, volume_size, bm)

    @property
    def n_chunks(self) -> int:
        """Chunks of the whole volume."""
        return chunk_count(self.volume_size, self.chunk_size)

    @property
    def changed_bytes(self) -> int:
        """Bytes in the changed chunks; the volume's partial last chunk counts its real size."""
        total = len(self.chunks) * self.chunk_size
        tail = self.volume_size % self.chunk_size
        if tail and (self.n_chunks - 1) in self.chunks:
            total -= self.chunk_size - tail
        return total

    def extents(self) -> Iterator[tuple[int, int]]:
        """Coalesced runs of changed chunks, ``(start_chunk, count)``, in ascending order.

        Costs one step per run, not per chunk: a full set of millions of chunks is one run.
        """
        if not self.chunks:
            return
        end = self.n_chunks
        gaps = BitMap.flip(self.chunks, 0, end)
        gaps.add(end)  # a sentinel, so every run ends at a gap
        start = self.chunks.min()
        while True:
            stop = gaps.next_set_bit(start)
            yield start, stop - start
            if stop >= end:
                return
            try:
                start = self.chunks.next_set_bit(stop)
            except ValueError:
                return

    def byte_extents(self) -> Iterator[tuple[int, int]]:
        """The runs of :meth:`extents` as ``(offset, length)`` bytes, clipped to the volume."""
        for start, count in self.extents():
            offset = start * self.chunk_size
            yield offset, min(count * self.chunk_size, self.volume_size - offset)

    def union(self, other: ChangeSet) -> ChangeSet:
        """Chunks changed in either set (for example, a chain of incrementals).

        :raises InvalidInput: the sets do not describe the same volume geometry.
        """
        self._same_geometry(other)
        return ChangeSet(self.chunk_size, self.volume_size, self.chunks | other.chunks)

    __or__ = union

    def _same_geometry(self, other: ChangeSet) -> None:
        if (self.chunk_size, self.volume_size) != (other.chunk_size, other.volume_size):
            raise InvalidInput(
                detail=f"change sets differ in geometry: {self.chunk_size}/{self.volume_size} "
                f"vs {other.chunk_size}/{other.volume_size} (chunk size/volume size)"
            )

    def serialize(self) -> bytes:
        """Self-describing bytes, with a checksum; read back with :meth:`deserialize`."""
        self.chunks.run_optimize()
        payload = self.chunks.serialize()
        header = self._HEADER.pack(
            self._MAGIC, 1, 0, self.chunk_size, self.volume_size, len(payload)
        )
        body = header + payload
        return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))

    @classmethod
    def deserialize(cls, data: bytes | bytearray | memoryview) -> ChangeSet:
        """The inverse of :meth:`serialize`.

        :raises CorruptMetadata: truncated, wrong magic or version, bad checksum or contents.
        """
        data = bytes(data)
        hs = cls._HEADER.size
        if len(data) < hs + 8:
            raise CorruptMetadata(what="change set", detail=f"only {len(data)} bytes")
        magic, version, _flags, chunk_size, volume_size, length = cls._HEADER.unpack_from(data)
        if magic != cls._MAGIC or version != 1:
            raise CorruptMetadata(what="change set", detail="not a blockguard change set")
        if len(data) != hs + length + 8:
            raise CorruptMetadata(what="change set", detail="length does not match its header")
        (check,) = struct.unpack_from("<Q", data, hs + length)
        if check != xxhash.xxh3_64_intdigest(data[: hs + length]):
            raise CorruptMetadata(what="change set", detail="checksum mismatch")
        try:
            return cls(chunk_size, volume_size, BitMap.deserialize(data[hs : hs + length]))
        except (InvalidInput, ValueError) as exc:
            raise CorruptMetadata(what="change set", detail=str(exc)) from None

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator[int]:
        return iter(self.chunks)

    def __contains__(self, chunk: object) -> bool:
        return chunk in self.chunks

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ChangeSet):
            return NotImplemented
        return (self.chunk_size, self.volume_size, self.chunks) == (
            other.chunk_size,
            other.volume_size,
            other.chunks,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable bitmap inside

    def __repr__(self) -> str:
        return (
            f"ChangeSet(chunk_size={self.chunk_size}, volume_size={self.volume_size}, "
            f"{len(self.chunks)} of {self.n_chunks} chunks)"
        )


# --- chunk checksums ------------------------------------------------------------------


class ChunkHashes:
    """One :func:`chunk_digest` per chunk of a volume, packed (16 bytes each).

    The scan backend stores these per reference; the backup engine computes the same
    while it copies and keeps them with each generation.

    :param digests: ``n_chunks * DIGEST_SIZE`` bytes (a bytearray is taken over).
    :raises InvalidInput: the length does not match the geometry.
    """

    __slots__ = ("chunk_size", "digests", "volume_size")

    def __init__(
        self, chunk_size: int, volume_size: int, digests: bytes | bytearray | memoryview
    ) -> None:
        self.chunk_size = validate_chunk_size(chunk_size)
        self.volume_size = volume_size
        self.digests = digests if isinstance(digests, bytearray) else bytearray(digests)
        if len(self.digests) != self.n_chunks * DIGEST_SIZE:
            raise InvalidInput(
                detail=f"{len(self.digests)} bytes of checksums do not fit {self.n_chunks} "
                f"chunks of {DIGEST_SIZE} bytes"
            )

    @property
    def n_chunks(self) -> int:
        return chunk_count(self.volume_size, self.chunk_size)

    def chunk_length(self, chunk: int) -> int:
        """Bytes of ``chunk`` (only the last one can be short)."""
        return min(self.chunk_size, self.volume_size - chunk * self.chunk_size)

    def __getitem__(self, chunk: int) -> bytes:
        if not 0 <= chunk < self.n_chunks:
            raise IndexError(chunk)
        return bytes(self.digests[chunk * DIGEST_SIZE : (chunk + 1) * DIGEST_SIZE])

    def __setitem__(self, chunk: int, digest: bytes) -> None:
        if not 0 <= chunk < self.n_chunks or len(digest) != DIGEST_SIZE:
            raise IndexError(chunk)
        self.digests[chunk * DIGEST_SIZE : (chunk + 1) * DIGEST_SIZE] = digest

    def __len__(self) -> int:
        return self.n_chunks

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ChunkHashes):
            return NotImplemented
        return (self.chunk_size, self.volume_size, self.digests) == (
            other.chunk_size,
            other.volume_size,
            other.digests,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable


def differing_chunks(
    first_chunk: int, current: bytes | bytearray | memoryview, stored: ChunkHashes
) -> Iterator[int]:
    """Chunks whose digest in ``current`` (packed, starting at ``first_chunk``) differs.

    Compares the whole block first (one memcmp), so unchanged stretches cost no Python
    loop per chunk.
    """
    start = first_chunk * DIGEST_SIZE
    theirs = memoryview(stored.digests)[start : start + len(current)]
    if theirs == current:
        return
    ours = memoryview(current)
    for i in range(0, len(current), DIGEST_SIZE):
        if ours[i : i + DIGEST_SIZE] != theirs[i : i + DIGEST_SIZE]:
            yield first_chunk + i // DIGEST_SIZE


# --- state --------------------------------------------------------------------------


class Exactness(enum.Enum):
    EXACT = "exact"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class TrackerState:
    """Whether a tracker's change sets can be trusted: ``exact``, or ``unknown`` and why.

    After ``unknown`` the next backup of the affected references must be a full one (or
    one whose change set came from a full scan).
    """

    kind: Exactness
    reason: str = ""

    def __post_init__(self) -> None:
        if (self.kind is Exactness.UNKNOWN) != bool(self.reason):
            raise ValueError("an unknown state needs a reason, and only an unknown state has one")

    @classmethod
    def exact(cls) -> TrackerState:
        return cls(Exactness.EXACT)

    @classmethod
    def unknown(cls, reason: str) -> TrackerState:
        return cls(Exactness.UNKNOWN, reason)

    @property
    def is_exact(self) -> bool:
        return self.kind is Exactness.EXACT

    def require_exact(self, volume: str) -> None:
        """:raises TrackingLost: when the state is unknown."""
        if not self.is_exact:
            raise TrackingLost(volume=volume, reason=self.reason)

    def __str__(self) -> str:
        return self.kind.value if self.is_exact else f"unknown: {self.reason}"


@dataclass(frozen=True)
class VerificationResult:
    """What :meth:`ChangeTracker.verify_sample` compared and what it found.

    :ivar sampled: chunks re-read and compared.
    :ivar mismatched: sampled chunks reported unchanged whose content differs.
    """

    sampled: int
    mismatched: BitMap

    @property
    def ok(self) -> bool:
        return not self.mismatched


def describe_chunks(chunks: Iterable[int], limit: int = 16) -> str:
    """``"3, 17, 18 and 40 more"``: chunk numbers for a message that stays short."""
    items = list(chunks)
    shown = ", ".join(str(c) for c in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# --- the interface --------------------------------------------------------------------


class ChangeTracker(abc.ABC):
    """Follows one volume's changes in one chunk size, per named reference point.

    References are named (see :func:`validate_reference_name`); their meaning is the
    caller's ("last-backup", "full-2026-11-03", ...). A backend keeps them across daemon
    restarts. ``state()`` is ``unknown`` while some reference cannot be vouched for;
    :meth:`changed` refuses such a reference rather than under-report.
    """

    #: Backend name as the catalog and the D-Bus API show it ("scan", "era", "thin").
    backend: ClassVar[str]
    #: Whether :meth:`changed_bytes` is cheap enough to poll every few seconds.
    cheap_polling: ClassVar[bool]

    def __init__(self, volume: str | os.PathLike[str], chunk_size: int) -> None:
        self._volume = os.fspath(volume)
        self._chunk_size = validate_chunk_size(chunk_size)

    @property
    def volume(self) -> str:
        """The protected volume's device path."""
        return self._volume

    @property
    def chunk_size(self) -> int:
        return self._chunk_size

    @abc.abstractmethod
    def state(self) -> TrackerState:
        """``exact``, or ``unknown`` with the reason (naming the references affected)."""

    @abc.abstractmethod
    def references(self) -> list[str]:
        """Names of the reference points held, sorted."""

    @abc.abstractmethod
    def add_reference(self, name: str, *, replace: bool = False) -> None:
        """Make "now" (the content being backed up) a reference point called ``name``.

        :param replace: move an existing reference of that name to now, atomically.
        :raises AlreadyExists: ``name`` exists and ``replace`` is false.
        """

    @abc.abstractmethod
    def drop_reference(self, name: str) -> None:
        """Forget a reference point and release what it holds.

        :raises NotFound: no such reference.
        """

    @abc.abstractmethod
    def changed(self, name: str) -> ChangeSet:
        """Chunks changed since reference ``name``; never fewer than really changed.

        :raises NotFound: no such reference.
        :raises TrackingLost: the tracker cannot vouch for this reference.
        """

    def changed_many(self, names: Iterable[str]) -> dict[str, ChangeSet]:
        """:meth:`changed` for several references (a backend may share the work)."""
        return {name: self.changed(name) for name in names}

    def changed_bytes(self, name: str) -> int:
        """Bytes in the chunks changed since ``name`` (see :attr:`cheap_polling`)."""
        return self.changed(name).changed_bytes

    @abc.abstractmethod
    def mark_unknown(self, reason: str) -> None:
        """Stop vouching for every reference held now, persistently, because of ``reason``.

        References added afterwards are exact again; dropping the affected ones (after a
        full backup) brings the state back to ``exact``.
        """

    def verify_sample(
        self,
        checksums: ChunkHashes,
        claimed: ChangeSet,
        *,
        count: int | None = None,
        fraction: float | None = None,
        rng: random.Random | None = None,
        source: str | os.PathLike[str] | None = None,
    ) -> VerificationResult:
        """Re-read a random sample of chunks ``claimed`` does not contain and compare them
        with the last backup's ``checksums``.

        Works for any backend: ``claimed`` is what the tracker reported since the last
        backup, ``checksums`` what that backup stored. A mismatch means the tracker missed
        a change: it is an alarm, so the tracker is marked ``unknown`` with a reason naming
        the chunks. Read a point-in-time ``source`` (the snapshot ``claimed`` describes)
        when the volume is being written, or live writes look like missed changes.

        :param count: how many unchanged chunks to sample (capped at all of them).
        :param fraction: or which fraction of them (0..1, rounded up).
        :param rng: the random source (seed it for a reproducible sample).
        :param source: device to read instead of the volume; same size required.
        :raises InvalidInput: bad count/fraction, or geometries that do not match.
        :raises TrackingLost: the device's size is not the checksums' size (the tracker is
            marked unknown too).
        """
        if (count is None) == (fraction is None):
            raise InvalidInput(detail="give exactly one of count and fraction")
        if (count is not None and count < 0) or (fraction is not None and not 0 <= fraction <= 1):
            raise InvalidInput(detail=f"bad sample size: count={count}, fraction={fraction}")
        if checksums.chunk_size != self.chunk_size or claimed.chunk_size != self.chunk_size:
            raise InvalidInput(detail="checksums and change set must use the tracker's chunk size")
        if checksums.volume_size != claimed.volume_size:
            raise InvalidInput(detail="checksums and change set describe different volume sizes")
        path = os.fspath(source) if source is not None else self.volume
        unchanged = BitMap.flip(claimed.chunks, 0, claimed.n_chunks)
        wanted = count if fraction is None else math.ceil(fraction * len(unchanged))
        k = min(wanted or 0, len(unchanged))
        rng = rng or random.Random()
        sample = BitMap(unchanged[i] for i in rng.sample(range(len(unchanged)), k))
        with BlockDevice(path, direct=True) as dev:
            if dev.size != checksums.volume_size:
                reason = (
                    f"{path} is {dev.size} bytes but the last backup's checksums cover "
                    f"{checksums.volume_size} bytes (resized?)"
                )
                self.mark_unknown(reason)
                raise TrackingLost(volume=self.volume, reason=reason)
            mismatched = BitMap(
                chunk
                for chunk, digest in read_chunk_digests(dev, self.chunk_size, sample)
                if digest != checksums[chunk]
            )
        if mismatched:
            self.mark_unknown(
                f"verification found {len(mismatched)} chunk(s) reported unchanged that differ "
                f"from the last backup: {describe_chunks(mismatched)}"
            )
        return VerificationResult(sampled=k, mismatched=mismatched)


def read_chunk_digests(
    dev: BlockDevice, chunk_size: int, chunks: BitMap, max_read: int = 8 * MiB
) -> Iterator[tuple[int, bytes]]:
    """``(chunk, digest)`` for each of ``chunks``, read from ``dev`` (opened ``direct``).

    Adjacent chunks are read together, up to ``max_read`` bytes at a time.
    """
    per_read = max(1, max_read // chunk_size)
    buf = aligned_buffer(per_read * chunk_size)
    view = memoryview(buf)
    try:
        for start, count in ChangeSet(chunk_size, dev.size, chunks).extents():
            for first in range(start, start + count, per_read):
                n = min(per_read, start + count - first)
                offset = first * chunk_size
                length = min(n * chunk_size, dev.size - offset)
                if dev.pread_into(view[:length], offset) != length:
                    raise CorruptMetadata(
                        what=f"device {dev.path}", detail=f"short read at byte {offset}"
                    )
                for i in range(n):
                    lo = i * chunk_size
                    yield first + i, chunk_digest(view[lo : min(lo + chunk_size, length)])
    finally:
        view.release()
        buf.close()


# --- what may be protected --------------------------------------------------------------


def check_protectable(
    path: str | os.PathLike[str],
    pool_devices: Iterable[str | os.PathLike[str]],
    protected: Iterable[str | os.PathLike[str]] | Mapping[str, object],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> int:
    """Decide whether ``path`` may be protected; only reads, creates nothing.

    Devices are compared by device number, and through partitions and stacking (a
    partition of a pool disk, or a dm device built on one, is refused too).

    :param pool_devices: the pool's disks.
    :param protected: volumes already protected (paths, or a mapping keyed by path).
    :returns: the volume's size in bytes.
    :raises InvalidChunkSize: bad ``chunk_size``.
    :raises NotABlockDevice: missing, or not a block device.
    :raises AlreadyExists: it (the same device) is already protected.
    :raises DeviceInUse: it is, contains or sits on a pool disk.
    :raises DeviceReadOnly: the kernel says it is read-only.
    :raises DeviceTooSmall: smaller than 1 MiB or than one chunk.
    """
    validate_chunk_size(chunk_size)
    path = os.fspath(path)
    with BlockDevice(path) as dev:
        rdev, size, read_only = dev.rdev, dev.size, dev.read_only
    for other in protected:
        if _rdev_or_none(other) == rdev:
            raise AlreadyExists(what="protected volume", name=f"{path} ({os.fspath(other)})")
    mine = _related_devices(rdev)
    for disk in pool_devices:
        disk_rdev = _rdev_or_none(disk)
        if disk_rdev is not None and mine & _related_devices(disk_rdev):
            raise DeviceInUse(path=path, reason=f"it is or shares a disk with pool disk {disk}")
    if read_only:
        raise DeviceReadOnly(path=path)
    needed = max(MIN_VOLUME_SIZE, chunk_size)
    if size < needed:
        raise DeviceTooSmall(path=path, size=size, needed=needed)
    return size


def _rdev_or_none(path: str | os.PathLike[str]) -> int | None:
    try:
        return device_rdev(path)
    except NotABlockDevice:
        return None


def _related_devices(rdev: int) -> set[int]:
    """The device, its whole disk or partitions, and everything it is stacked on."""
    found: set[int] = set()
    todo = [sysfs_dir(rdev)]
    while todo:
        d = todo.pop()
        number = _sysfs_devno(d)
        if number is None or number in found:
            continue
        found.add(number)
        if (d / "partition").exists():
            todo.append(d.parent)
        todo.extend(p for p in d.iterdir() if (p / "partition").exists())
        slaves = d / "slaves"
        if slaves.is_dir():
            todo.extend(p.resolve() for p in slaves.iterdir())
    return found


def _sysfs_devno(d: os.PathLike[str]) -> int | None:
    try:
        with open(os.path.join(d, "dev")) as f:
            major, minor = f.read().strip().split(":")
    except (OSError, ValueError):
        return None
    return os.makedev(int(major), int(minor))
