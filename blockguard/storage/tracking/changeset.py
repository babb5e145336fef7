"""Change sets and chunk checksums: what every tracker reports and every backup stores."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

import xxhash
from pyroaring import BitMap

from blockguard.core import vocab
from blockguard.errors import CorruptMetadata, InvalidChunkSize, InvalidInput

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

    :raises InvalidInput: unless it follows the one name rule (:func:`vocab.check_name`).
    """
    return vocab.check_name("reference", name)


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
