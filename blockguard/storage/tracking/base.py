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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar

from pyroaring import BitMap

from blockguard.errors import (
    CorruptMetadata,
    InvalidInput,
    TrackingLost,
)
from blockguard.storage.blockdev import BlockDevice, aligned_buffer
from blockguard.storage.tracking.changeset import (
    DEFAULT_CHUNK_SIZE,
    DIGEST_SIZE,
    MAX_CHUNK_SIZE,
    MAX_CHUNKS,
    MIN_CHUNK_SIZE,
    MIN_VOLUME_SIZE,
    ChangeSet,
    ChunkHashes,
    MiB,
    chunk_count,
    chunk_digest,
    differing_chunks,
    validate_chunk_size,
    validate_reference_name,
)
from blockguard.storage.tracking.protect import check_protectable

# The tracker vocabulary lives in .changeset and .protect; importers of base still find it.
__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DIGEST_SIZE",
    "MAX_CHUNKS",
    "MAX_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "MIN_VOLUME_SIZE",
    "ChangeSet",
    "ChangeTracker",
    "ChunkHashes",
    "Exactness",
    "MiB",
    "TrackerState",
    "VerificationResult",
    "check_protectable",
    "chunk_count",
    "chunk_digest",
    "describe_chunks",
    "differing_chunks",
    "read_chunk_digests",
    "validate_chunk_size",
    "validate_reference_name",
]

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
