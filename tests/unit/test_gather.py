"""The restore's gathered windows: target-contiguous, bounded, each chunk from the newest
generation that holds it, and a damaged chunk named by its own generation."""

from __future__ import annotations

import array
import itertools
import random
from types import SimpleNamespace

import pytest
import xxhash
from pyroaring import BitMap

from blockguard.errors import ChecksumMismatch
from blockguard.storage.copyengine import copy_chunks
from blockguard.storage.pool.base import GenerationReader
from blockguard.storage.restore import gathered_items

CHUNK = 4096
NCHUNKS = 1000


class MemoryReader(GenerationReader):
    """A generation held in memory: chunk ``c`` of generation ``g`` is bytes of ``(g, c)``.

    A test double for a pool's reader (the pools' own readers are tested on loop devices
    and in the guest); ``bad`` chunks read back different from their checksum.
    """

    def __init__(self, name: str, changed: BitMap | None, bad: frozenset[int] = frozenset()):
        own = BitMap(range(NCHUNKS)) if changed is None else changed
        manifest = SimpleNamespace(
            generation_id=name,
            chunk_size=CHUNK,
            chunks=NCHUNKS,
            is_full=changed is None,
            checksum_slot=lambda c: own.rank(c) - 1,
        )
        super().__init__(manifest)  # type: ignore[arg-type]
        self.own = own
        self.bad = bad
        self.reads = 0

    def data(self, chunk: int) -> bytes:
        return random.Random(f"{self.manifest.generation_id}/{chunk}").randbytes(CHUNK)

    def read_chunks(self, first: int, view: memoryview) -> None:
        self.reads += 1
        for i in range(len(view) // CHUNK):
            assert first + i in self.own, "read a chunk this generation does not hold"
            data = self.data(first + i)
            if first + i in self.bad:
                data = bytes([data[0] ^ 1]) + data[1:]
            view[i * CHUNK : (i + 1) * CHUNK] = data

    def _load_checksums(self) -> array.array[int]:
        return array.array("Q", (xxhash.xxh3_64_intdigest(self.data(c)) for c in self.own))


def chain(bad: dict[str, frozenset[int]] | None = None) -> list[tuple[MemoryReader, BitMap]]:
    """A full and eight incrementals of scattered chunks; each chunk's owner is the newest."""
    bad = bad or {}
    rng = random.Random(1)
    readers = [MemoryReader("full", None, bad.get("full", frozenset()))]
    for n in range(8):
        changed = BitMap(rng.sample(range(NCHUNKS), 40))
        readers.append(MemoryReader(f"inc{n}", changed, bad.get(f"inc{n}", frozenset())))
    remaining = BitMap(range(NCHUNKS))
    plan = []
    for r in reversed(readers):
        own = remaining & r.own
        remaining -= own
        plan.append((r, own))
    plan.reverse()
    return plan


def restore(plan: list[tuple[MemoryReader, BitMap]], extent: int) -> bytearray:
    out = bytearray(NCHUNKS * CHUNK)

    def sink(first: int, view: memoryview, _digests: object) -> None:
        out[first * CHUNK : first * CHUNK + len(view)] = view

    items = gathered_items([r for r, _ in plan], [own for _, own in plan], extent)
    copy_chunks(items, sink, chunk_size=CHUNK, volume_size=NCHUNKS * CHUNK, extent_bytes=extent)
    return out


@pytest.mark.parametrize("extent_chunks", [1, 3, 64, 2000])
def test_windows_cover_the_volume_once_in_order_from_the_newest(extent_chunks: int) -> None:
    plan = chain()
    extent = extent_chunks * CHUNK
    items = list(gathered_items([r for r, _ in plan], [o for _, o in plan], extent))
    assert [i.first for i in items] == sorted(i.first for i in items)
    assert sum(i.count for i in items) == NCHUNKS
    assert all(i.count <= max(1, extent_chunks) for i in items)
    # Windows are target-contiguous and fill up: only the last may be short.
    assert all(a.first + a.count == b.first for a, b in itertools.pairwise(items))
    assert all(i.count == min(extent_chunks, NCHUNKS) for i in items[:-1])

    out = restore(plan, extent)
    owner = {c: r for r, own in plan for c in own}
    for c in range(NCHUNKS):
        assert out[c * CHUNK : (c + 1) * CHUNK] == owner[c].data(c), f"chunk {c}"


def test_a_damaged_chunk_is_named_by_its_own_generation_inside_a_gathered_window() -> None:
    plan = chain()
    inc3 = plan[4][0]
    victim = sorted(plan[4][1])[5]  # a chunk inc3 supplies, inside a window the full fills
    bad_plan = chain({"inc3": frozenset({victim})})
    with pytest.raises(ChecksumMismatch) as err:
        restore(bad_plan, 64 * CHUNK)
    assert err.value.fields["generation"] == inc3.manifest.generation_id
    assert err.value.fields["chunk"] == victim
