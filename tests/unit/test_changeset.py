"""ChangeSet, ChunkHashes, TrackerState and chunk-size validation: no devices needed."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyroaring import BitMap

from blockguard.errors import CorruptMetadata, InvalidChunkSize, InvalidInput, TrackingLost
from blockguard.storage.tracking import (
    DIGEST_SIZE,
    ChangeSet,
    ChunkHashes,
    TrackerState,
    chunk_digest,
    validate_chunk_size,
    validate_reference_name,
)
from blockguard.storage.tracking.base import describe_chunks, differing_chunks

KiB, MiB = 1024, 1024 * 1024


@pytest.mark.parametrize("n", [4 * KiB, 8 * KiB, 64 * KiB, 1 * MiB, 16 * MiB])
def test_valid_chunk_sizes(n: int) -> None:
    assert validate_chunk_size(n) == n


@pytest.mark.parametrize(
    "n", [0, -4096, 2 * KiB, 4 * KiB - 1, 12 * KiB, 32 * MiB, 16 * MiB + 4096, 4096.0, True, "64k"]
)
def test_invalid_chunk_sizes_are_refused_with_a_message(n: object) -> None:
    with pytest.raises(InvalidChunkSize, match=r"power of two between 4 KiB and 16 MiB"):
        validate_chunk_size(n)  # type: ignore[arg-type]


def test_changeset_constructor_validates() -> None:
    with pytest.raises(InvalidChunkSize):
        ChangeSet(3000, 1 * MiB)
    with pytest.raises(InvalidInput, match="beyond the volume"):
        ChangeSet(64 * KiB, 1 * MiB, [16])
    with pytest.raises(InvalidInput, match="cannot be tracked"):
        ChangeSet(4 * KiB, (1 << 32) * 4 * KiB + 1)
    assert isinstance(ChangeSet(64 * KiB, 1 * MiB, {1, 2}).chunks, BitMap)


def test_changed_bytes_counts_the_partial_last_chunk_by_its_real_size() -> None:
    cs, size = 64 * KiB, 10 * 64 * KiB + 4096  # 11 chunks, the last one 4 KiB
    assert ChangeSet(cs, size).n_chunks == 11
    assert ChangeSet(cs, size, [0]).changed_bytes == cs
    assert ChangeSet(cs, size, [10]).changed_bytes == 4096
    assert ChangeSet(cs, size, [0, 5, 10]).changed_bytes == 2 * cs + 4096
    assert ChangeSet.full(cs, size).changed_bytes == size
    # an exact multiple has no partial chunk
    assert ChangeSet.full(cs, 10 * cs).changed_bytes == 10 * cs
    assert ChangeSet(cs, 10 * cs).changed_bytes == 0


def test_extents_coalesce_runs() -> None:
    cs = ChangeSet(4 * KiB, 100 * 4 * KiB, [0, 1, 2, 5, 7, 8, 99])
    assert list(cs.extents()) == [(0, 3), (5, 1), (7, 2), (99, 1)]
    assert list(ChangeSet(4 * KiB, 400 * KiB).extents()) == []
    assert list(ChangeSet.full(4 * KiB, 1 * MiB).extents()) == [(0, 256)]


def test_byte_extents_are_clipped_to_the_volume() -> None:
    size = 3 * 64 * KiB + 512
    cs = ChangeSet(64 * KiB, size, [0, 2, 3])
    assert list(cs.byte_extents()) == [(0, 64 * KiB), (2 * 64 * KiB, 64 * KiB + 512)]


@given(st.sets(st.integers(min_value=0, max_value=999)))
def test_extents_cover_exactly_the_set(chunks: set[int]) -> None:
    cs = ChangeSet(4 * KiB, 1000 * 4 * KiB, chunks)
    runs = list(cs.extents())
    covered = [c for start, n in runs for c in range(start, start + n)]
    assert covered == sorted(chunks)
    # coalesced: two runs never touch
    assert all(a + n < b for (a, n), (b, _) in itertools.pairwise(runs))


def test_from_byte_ranges_rounds_outwards() -> None:
    c = 64 * KiB
    cs = ChangeSet.from_byte_ranges(
        c, 10 * c, [(0, 1), (c - 1, 2), (5 * c, c), (9 * c + 100, 1), (3 * c, 0)]
    )
    assert list(cs) == [0, 1, 5, 9]
    with pytest.raises(InvalidInput, match="outside the volume"):
        ChangeSet.from_byte_ranges(c, 10 * c, [(10 * c - 1, 2)])


def test_union_and_geometry_check() -> None:
    a = ChangeSet(4 * KiB, 1 * MiB, [1, 2])
    b = ChangeSet(4 * KiB, 1 * MiB, [2, 200])
    assert list(a.union(b)) == [1, 2, 200]
    assert (a | b) == a.union(b)
    assert list(a) == [1, 2]  # operands unchanged
    with pytest.raises(InvalidInput, match="geometry"):
        a.union(ChangeSet(8 * KiB, 1 * MiB))
    with pytest.raises(InvalidInput, match="geometry"):
        a.union(ChangeSet(4 * KiB, 2 * MiB))


def test_equality_includes_geometry() -> None:
    assert ChangeSet(4 * KiB, 1 * MiB, [1]) == ChangeSet(4 * KiB, 1 * MiB, [1])
    assert ChangeSet(4 * KiB, 1 * MiB, [1]) != ChangeSet(4 * KiB, 2 * MiB, [1])
    assert ChangeSet(4 * KiB, 1 * MiB, [1]) != ChangeSet(4 * KiB, 1 * MiB, [2])


def test_serialize_roundtrip() -> None:
    rng = random.Random(7)
    chunks = BitMap(rng.sample(range(1 << 20), 5000))
    chunks.add_range(100_000, 300_000)
    cs = ChangeSet(4 * KiB, (1 << 20) * 4 * KiB - 512, chunks)
    data = cs.serialize()
    back = ChangeSet.deserialize(data)
    assert back == cs
    assert back.changed_bytes == cs.changed_bytes
    assert len(data) < 50_000  # compressed, not a list of ints


def test_deserialize_refuses_damage() -> None:
    data = bytearray(ChangeSet(4 * KiB, 1 * MiB, [1, 2, 3]).serialize())
    with pytest.raises(CorruptMetadata, match="only"):
        ChangeSet.deserialize(data[:10])
    with pytest.raises(CorruptMetadata, match="length"):
        ChangeSet.deserialize(data[:-1])
    flipped = bytearray(data)
    flipped[-12] ^= 1
    with pytest.raises(CorruptMetadata, match="checksum"):
        ChangeSet.deserialize(flipped)
    with pytest.raises(CorruptMetadata, match="not a blockguard change set"):
        ChangeSet.deserialize(b"X" + data[1:])


def test_chunk_hashes_compare_blockwise() -> None:
    c, size = 4 * KiB, 10 * 4 * KiB
    digests = b"".join(chunk_digest(bytes([i]) * c) for i in range(10))
    stored = ChunkHashes(c, size, digests)
    assert stored[3] == chunk_digest(bytes([3]) * c)
    current = bytearray(digests)
    current[4 * DIGEST_SIZE] ^= 0xFF
    current[9 * DIGEST_SIZE + 5] ^= 0xFF
    assert list(differing_chunks(0, bytes(current), stored)) == [4, 9]
    # a block that starts in the middle of the volume
    assert list(differing_chunks(8, bytes(current[8 * DIGEST_SIZE :]), stored)) == [9]
    assert list(differing_chunks(0, digests, stored)) == []
    with pytest.raises(InvalidInput, match="do not fit"):
        ChunkHashes(c, size, digests[:-1])


def test_tracker_state() -> None:
    ok = TrackerState.exact()
    assert ok.is_exact and str(ok) == "exact"
    ok.require_exact("/dev/x")
    lost = TrackerState.unknown("era device was replaced")
    assert not lost.is_exact and "era device was replaced" in str(lost)
    with pytest.raises(TrackingLost, match="/dev/x is not exact: era device was replaced"):
        lost.require_exact("/dev/x")
    with pytest.raises(ValueError):
        TrackerState.unknown("")


@pytest.mark.parametrize("name", ["last-backup", "full.2026-11-03", "A", "x" * 64])
def test_reference_names(name: str) -> None:
    assert validate_reference_name(name) == name


@pytest.mark.parametrize("name", ["", ".hidden", "-x", "a/b", "../x", "x" * 65, "a b", "é"])
def test_bad_reference_names(name: str) -> None:
    with pytest.raises(InvalidInput, match="reference name"):
        validate_reference_name(name)


def test_describe_chunks_stays_short() -> None:
    assert describe_chunks([1, 2]) == "1, 2"
    assert describe_chunks(range(20), limit=3) == "0, 1, 2 and 17 more"
