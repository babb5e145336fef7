"""Items of several scattered runs: batched within bounds, read into one buffer, handed
to the sink run by run (the volume's short last chunk cut to its length), and a damaged
chunk named by its own index in the volume, not by its position in the item."""

from __future__ import annotations

import random

import pytest
import xxhash

from blockguard.errors import ChecksumMismatch
from blockguard.storage.copyengine import CopyItem, batched, copy_chunks

CHUNK = 4096


class Volume:
    """A chunk source over bytes in memory (the snapshot a backup reads)."""

    def __init__(self, size: int) -> None:
        self.data = random.Random(size).randbytes(size)

    def read_chunks(self, first: int, view: memoryview) -> None:
        got = self.data[first * CHUNK : first * CHUNK + len(view)]
        assert len(got) == len(view), "read past the volume's end"
        view[:] = got


def test_batches_keep_order_and_bounds() -> None:
    runs = [(0, 3), (10, 1), (12, 4), (20, 2), (30, 1), (40, 5)]
    batches = list(batched(runs, max_count=6, max_runs=2))
    assert [r for b in batches for r in b] == runs
    assert all(sum(n for _, n in b) <= 6 and len(b) <= 2 for b in batches)
    assert batches[0] == ((0, 3), (10, 1))
    assert list(batched([], 6, 2)) == []


@pytest.mark.parametrize("tail", [0, 1000])
def test_run_items_reach_the_sink_run_by_run_up_to_a_short_last_chunk(tail: int) -> None:
    nchunks = 50
    size = nchunks * CHUNK - tail
    vol = Volume(size)
    runs = [(1, 2), (7, 1), (8 + 3, 3), (nchunks - 2, 2)]  # the last run ends the volume
    calls: list[tuple[int, bytes, list[int]]] = []

    def sink(first: int, view: memoryview, digests: object) -> None:
        calls.append((first, bytes(view), list(digests)))  # type: ignore[call-overload]

    items = [CopyItem(vol, b[0][0], sum(n for _, n in b), runs=b) for b in batched(runs, 5, 16)]
    assert len(items) == 2
    copied = copy_chunks(items, sink, chunk_size=CHUNK, volume_size=size, extent_bytes=8 * CHUNK)
    # Each call is contiguous chunks from its ``first`` (what a writer that places or
    # hashes chunks by index relies on), with one digest per chunk.
    assert [f for f, _, _ in calls] == [f for f, _ in runs]
    for (first, data, digests), (_, count) in zip(calls, runs, strict=True):
        assert data == vol.data[first * CHUNK : (first + count) * CHUNK]
        assert digests == [
            xxhash.xxh3_64_intdigest(vol.data[c * CHUNK : (c + 1) * CHUNK])
            for c in range(first, first + count)
        ]
    assert copied == 8 * CHUNK - tail


def test_a_mismatch_in_a_run_item_names_the_volume_chunk() -> None:
    vol = Volume(20 * CHUNK)
    runs = ((2, 1), (9, 2))
    expected = [xxhash.xxh3_64_intdigest(vol.data[c * CHUNK : (c + 1) * CHUNK]) for c in (2, 9)]
    expected.append(0)  # chunk 10 is "damaged"
    item = CopyItem(vol, 2, 3, expected, "gen", runs=runs)
    with pytest.raises(ChecksumMismatch) as err:
        copy_chunks([item], lambda *_: None, chunk_size=CHUNK, volume_size=20 * CHUNK)
    assert err.value.fields["chunk"] == 10
    assert err.value.fields["generation"] == "gen"
