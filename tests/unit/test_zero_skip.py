"""A full written into a target that reads zeros (a new thin LV, a new preallocated file)
skips its all-zero chunks: what the target then holds equals the volume byte for byte, a
chunk is skipped only when its bytes are zero (never on its checksum alone), and a target
that may hold old data (a clone) gets every chunk."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import xxhash

from blockguard.storage.pool.stagedio import (
    StagedGenerationWriter,
    StoredData,
    is_zero,
    zero_digest,
)

CHUNK = 4096


class MemoryTarget:
    """A target in memory, zeros where nothing was written; records each write."""

    def __init__(self, size: int, fill: int = 0) -> None:
        self.data = bytearray([fill]) * size
        self.writes: list[tuple[int, int]] = []

    def pwrite_all(self, buf: memoryview, offset: int) -> None:
        self.writes.append((offset, len(buf)))
        self.data[offset : offset + len(buf)] = buf

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def writer(target: MemoryTarget, *, zeroed: bool) -> StagedGenerationWriter:
    draft = SimpleNamespace(is_full=True, chunk_size=CHUNK, generation_id="g1")
    data = StoredData(target, zeroed=zeroed)  # type: ignore[arg-type]
    return StagedGenerationWriter(draft, Path("/nonexistent"), -1, data, new_volume_dir=False)  # type: ignore[arg-type]


def digests(view: memoryview) -> list[int]:
    return [xxhash.xxh3_64_intdigest(view[o : o + CHUNK]) for o in range(0, len(view), CHUNK)]


def volume(pattern: str, tail: int = CHUNK) -> bytes:
    """``pattern``: one letter per chunk, ``z`` zeros, ``r`` random; the last ``tail`` long."""
    parts = [bytes(CHUNK) if c == "z" else os.urandom(CHUNK) for c in pattern]
    parts[-1] = parts[-1][:tail]
    return b"".join(parts)


@pytest.mark.parametrize(
    ("pattern", "tail", "want"),
    [
        ("rzzrrzr", CHUNK, [(0, 1), (3, 2), (6, 1)]),
        ("zzzz", CHUNK, []),
        ("rrrr", CHUNK, [(0, 4)]),
        ("zrrz", 512, [(1, 2)]),
        ("zrrr", 512, [(1, 3)]),
    ],
)
def test_zero_chunks_are_skipped_and_the_target_equals_the_volume(
    pattern: str, tail: int, want: list[tuple[int, int]]
) -> None:
    data = volume(pattern, tail)
    target = MemoryTarget(len(data))
    w = writer(target, zeroed=True)
    # Two calls, as the copy engine makes one per extent.
    half = (len(pattern) // 2) * CHUNK
    view = memoryview(data)
    w.write_chunks(0, view[:half], digests(view[:half]))
    w.write_chunks(half // CHUNK, view[half:], digests(view[half:]))
    assert bytes(target.data) == data
    got = [(off // CHUNK, -(-n // CHUNK)) for off, n in target.writes]
    # Runs split only at the extent boundary of the two calls: merge them back.
    merged: list[tuple[int, int]] = []
    for first, count in got:
        if merged and merged[-1][0] + merged[-1][1] == first:
            merged[-1] = (merged[-1][0], merged[-1][1] + count)
        else:
            merged.append((first, count))
    assert merged == want


def test_a_chunk_with_the_zero_checksum_but_other_bytes_is_written() -> None:
    data = volume("zrz")
    target = MemoryTarget(len(data))
    forged = [zero_digest(CHUNK)] * 3  # as if chunk 1 collided with the zeros' xxh3
    writer(target, zeroed=True).write_chunks(0, memoryview(data), forged)
    assert bytes(target.data) == data
    assert target.writes == [(CHUNK, CHUNK)]


def test_a_target_that_may_hold_old_data_gets_every_chunk() -> None:
    data = volume("zrz")
    target = MemoryTarget(len(data), fill=0xAA)
    writer(target, zeroed=False).write_chunks(0, memoryview(data), digests(memoryview(data)))
    assert bytes(target.data) == data
    assert target.writes == [(0, len(data))]


def test_is_zero_looks_at_every_byte_of_large_views() -> None:
    big = bytearray(3 << 20)
    assert is_zero(memoryview(big))
    big[-1] = 1
    assert not is_zero(memoryview(big))
    big[-1], big[(1 << 20) + 5] = 0, 1
    assert not is_zero(memoryview(big))
