"""A generation image reads whole aligned windows: sequential reads hit the last one."""

from __future__ import annotations

import threading

import pytest

from blockguard.errors import ChecksumMismatch
from blockguard.storage.genimage import WINDOW_BYTES, GenerationImage

CHUNK = 64 * 1024


def _image(size: int, reads: list[tuple[int, int]]) -> GenerationImage:
    """An image of ``size`` bytes whose chunk ``i`` is filled with byte ``i % 251``,
    noting every ``(first, last)`` range of chunks it reads from the pool."""
    image = GenerationImage.__new__(GenerationImage)
    image.size, image.chunk_size = size, CHUNK
    image.window = WINDOW_BYTES
    image._lock = threading.Lock()
    image._cached = None

    def read_chunks(first: int, last: int) -> bytes:
        reads.append((first, last))
        data = b"".join(bytes([i % 251]) * CHUNK for i in range(first, last))
        return data[: min(last * CHUNK, size) - first * CHUNK]

    image._read_chunks = read_chunks  # type: ignore[method-assign]
    return image


def _want(offset: int, size: int) -> bytes:
    return bytes((i // CHUNK) % 251 for i in range(offset, offset + size))


def test_sequential_reads_of_128k_read_each_window_once() -> None:
    reads: list[tuple[int, int]] = []
    size = 2 * WINDOW_BYTES + 3 * CHUNK + 100  # a short last window and chunk
    image = _image(size, reads)
    got = b"".join(image.read(at, 128 * 1024) for at in range(0, size, 128 * 1024))

    assert got == _want(0, size)
    per = WINDOW_BYTES // CHUNK
    assert reads == [(0, per), (per, 2 * per), (2 * per, 2 * per + 4)]


def test_a_read_across_a_window_boundary_reads_both_windows() -> None:
    reads: list[tuple[int, int]] = []
    image = _image(3 * WINDOW_BYTES, reads)
    at = WINDOW_BYTES - 4096

    assert image.read(at, 8192) == _want(at, 8192)
    assert image.read(WINDOW_BYTES + 4096, 4096) == _want(WINDOW_BYTES + 4096, 4096)
    per = WINDOW_BYTES // CHUNK
    assert reads == [(0, 2 * per)]


def test_a_damaged_chunk_fails_only_the_reads_that_need_it() -> None:
    reads: list[tuple[int, int]] = []
    image = _image(2 * WINDOW_BYTES, reads)
    plain = image._read_chunks
    damaged = 10

    def read_chunks(first: int, last: int) -> bytes:
        if first <= damaged < last:
            raise ChecksumMismatch(generation="g1", chunk=damaged)
        return plain(first, last)

    image._read_chunks = read_chunks  # type: ignore[method-assign]

    assert image.read(0, 4096) == _want(0, 4096)  # same window, other chunk
    with pytest.raises(ChecksumMismatch):
        image.read(damaged * CHUNK + 100, 4096)
    assert image.read(WINDOW_BYTES, 4096) == _want(WINDOW_BYTES, 4096)
