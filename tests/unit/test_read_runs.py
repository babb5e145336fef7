"""A stored generation's vectored reads: runs close together in its data are one
``preadv`` (small gaps read through and dropped), far ones are split, a delta's chunks
scattered in the volume but packed side by side are one read, a restore gathered
from a chain of such readers writes each chunk from the newest generation that holds it,
and a verify of a scattered delta reads it in few vectored reads and names a damaged
chunk."""

from __future__ import annotations

import array
import contextlib
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import xxhash
from pyroaring import BitMap

from blockguard.errors import ChecksumMismatch, CorruptMetadata
from blockguard.storage.copyengine import copy_chunks, discard_sink
from blockguard.storage.pool.stagedio import GAP_BYTES, IOV_MAX, StoredGenerationReader
from blockguard.storage.restore import _stored_items, gathered_items
from tests.timeouts import scaled

CHUNK = 4096
MAX_GAP = GAP_BYTES // CHUNK


class MemoryData:
    """A generation's data in memory; records each vectored read as (offset, buffers)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.calls: list[tuple[int, int]] = []

    def pread_into(self, buf: memoryview, offset: int) -> int:
        return self.preadv_into([buf], offset)

    def preadv_into(self, bufs: list[memoryview], offset: int) -> int:
        self.calls.append((offset, len(bufs)))
        done = 0
        for buf in bufs:
            got = self.data[offset + done : offset + done + len(buf)]
            buf[: len(got)] = got
            done += len(got)
            if len(got) < len(buf):
                break
        return done

    def close(self) -> None:
        pass


class Stored(StoredGenerationReader):
    """A stored generation over :class:`MemoryData`: a full (``changed`` None) holds every
    chunk at its own offset, a delta its ``changed`` chunks packed in chunk order."""

    def __init__(self, name: str, nchunks: int, changed: BitMap | None, size: int) -> None:
        self.own = BitMap(range(nchunks)) if changed is None else changed
        own = self.own
        manifest = SimpleNamespace(
            generation_id=name,
            chunk_size=CHUNK,
            chunks=nchunks,
            is_full=changed is None,
            checksum_slot=lambda c: c if changed is None else own.rank(c) - 1,
        )
        self.size = size
        self.memory = MemoryData(b"")
        super().__init__(manifest, Path("/nonexistent"), self.memory, "data")  # type: ignore[arg-type]
        self.memory.data = b"".join(self.data(c) for c in own)

    def data(self, chunk: int) -> bytes:
        n = min(CHUNK, self.size - chunk * CHUNK)
        return random.Random(f"{self.manifest.generation_id}/{chunk}").randbytes(n)

    def _load_checksums(self) -> array.array[int]:
        return array.array("Q", (xxhash.xxh3_64_intdigest(self.data(c)) for c in self.own))


def read(reader: Stored, runs: list[tuple[int, int]]) -> list[bytes]:
    bufs = [bytearray(count * CHUNK) for _, count in runs]
    reader.read_runs([(first, memoryview(b)) for (first, _), b in zip(runs, bufs, strict=True)])
    return [bytes(b) for b in bufs]


def expect(reader: Stored, runs: list[tuple[int, int]]) -> list[bytes]:
    return [b"".join(reader.data(c) for c in range(f, f + n)) for f, n in runs]


def test_adjacent_runs_are_one_read() -> None:
    full = Stored("full", 64, None, 64 * CHUNK)
    runs = [(3, 2), (5, 1), (6, 4)]
    assert read(full, runs) == expect(full, runs)
    assert len(full.memory.calls) == 1


def test_a_small_gap_is_read_through_and_a_large_one_splits() -> None:
    full = Stored("full", 4 * MAX_GAP, None, 4 * MAX_GAP * CHUNK)
    near = [(0, 1), (1 + MAX_GAP, 1)]  # MAX_GAP chunks between them: still one read
    assert read(full, near) == expect(full, near)
    assert len(full.memory.calls) == 1
    full.memory.calls.clear()
    far = [(0, 1), (2 + MAX_GAP, 1)]
    assert read(full, far) == expect(full, far)
    assert [off for off, _ in full.memory.calls] == [0, (2 + MAX_GAP) * CHUNK]


def test_a_deltas_chunks_far_apart_in_the_volume_are_one_read_of_its_packed_data() -> None:
    changed = BitMap([7, 500, 9000, 9001, 20000])
    delta = Stored("inc", 30000, changed, 30000 * CHUNK)
    runs = [(7, 1), (500, 1), (9000, 2), (20000, 1)]
    assert read(delta, runs) == expect(delta, runs)
    assert delta.memory.calls == [(0, 4)]


def test_more_runs_than_iov_max_are_split_and_all_read() -> None:
    n = IOV_MAX + 100
    full = Stored("full", 2 * n, None, 2 * n * CHUNK)
    runs = [(2 * i, 1) for i in range(n)]  # one chunk gaps: a buffer each
    assert read(full, runs) == expect(full, runs)
    # A run and its gap are two buffers: about 2 n / IOV_MAX reads, each within the limit.
    assert len(full.memory.calls) == -(-(2 * n - 1) // (IOV_MAX - 1))
    assert all(nbufs <= IOV_MAX for _, nbufs in full.memory.calls)


def test_a_short_last_chunk_is_read_to_the_volume_end() -> None:
    size = 10 * CHUNK - 1000
    full = Stored("full", 10, None, size)
    buf = bytearray(size - 8 * CHUNK)
    full.read_runs([(8, memoryview(buf))])
    assert bytes(buf) == full.data(8) + full.data(9)


def test_data_that_ends_early_is_named_as_damage() -> None:
    delta = Stored("inc", 100, BitMap([1, 50]), 100 * CHUNK)
    delta.memory.data = delta.memory.data[:CHUNK]
    with pytest.raises(CorruptMetadata) as err:
        read(delta, [(1, 1), (50, 1)])
    assert "inc" in str(err.value)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("tail", [0, 1000])
def test_a_gathered_restore_takes_each_chunk_from_the_newest_generation(
    tail: int, parallel: bool
) -> None:
    nchunks = 3000
    size = nchunks * CHUNK - tail
    rng = random.Random(2)
    gens = [Stored("full", nchunks, None, size)]
    for n in range(8):
        # Overlapping layers: later incrementals rewrite chunks earlier ones hold, and
        # the volume's (possibly short) last chunk is in some of them.
        changed = BitMap(rng.sample(range(nchunks), 60)) | BitMap([nchunks - 1, 10, 11, 12])
        gens.append(Stored(f"inc{n}", nchunks, changed, size))
    remaining = BitMap(range(nchunks))
    plan = []
    for g in reversed(gens):
        own = remaining & g.own
        remaining -= own
        plan.append((g, own))
    plan.reverse()
    out = bytearray(size)

    def sink(first: int, view: memoryview, _digests: object) -> None:
        out[first * CHUNK : first * CHUNK + len(view)] = view

    extent = 256 * CHUNK
    with ThreadPoolExecutor(4) if parallel else contextlib.nullcontext() as pool:
        items = gathered_items([g for g, _ in plan], [own for _, own in plan], extent, pool)
        copy_chunks(items, sink, chunk_size=CHUNK, volume_size=size, extent_bytes=extent)
    owner = {c: g for g, own in plan for c in own}
    assert owner[nchunks - 1].manifest.generation_id == "inc7"
    for c in range(nchunks):
        assert out[c * CHUNK : (c + 1) * CHUNK] == owner[c].data(c), f"chunk {c}"
    windows = -(-nchunks // 256)
    # At most one read per generation per window (the full's runs around the delta
    # chunks are read through), where chunk-by-chunk reading took hundreds.
    assert sum(len(g.memory.calls) for g in gens) <= windows * len(gens)


def test_verify_reads_a_scattered_delta_in_few_vectored_reads_and_names_damage() -> None:
    nchunks = 20000
    size = nchunks * CHUNK - 100
    changed = BitMap(random.Random(3).sample(range(nchunks - 1), 700)) | BitMap([nchunks - 1])
    delta = Stored("inc", nchunks, changed, size)
    extent = 256 * CHUNK
    items = list(_stored_items(delta, changed, extent))
    assert sorted(c for item in items for f, n in item.runs for c in range(f, f + n)) == list(
        changed
    )
    nbytes = copy_chunks(
        items, discard_sink, chunk_size=CHUNK, volume_size=size, extent_bytes=extent
    )
    assert nbytes == len(changed) * CHUNK - 100
    # One read per item of up to 256 chunks, where run by run took one per chunk.
    assert len(delta.memory.calls) == -(-len(changed) // 256)
    # A damaged chunk in its data: named by its own index in the volume.
    victim = changed[500]
    slot = 500 * CHUNK
    data = bytearray(delta.memory.data)
    data[slot + 7] ^= 0xFF
    delta.memory.data = bytes(data)
    with pytest.raises(ChecksumMismatch) as err:
        copy_chunks(
            _stored_items(delta, changed, extent),
            discard_sink,
            chunk_size=CHUNK,
            volume_size=size,
            extent_bytes=extent,
        )
    assert err.value.fields["chunk"] == victim
    assert err.value.fields["generation"] == "inc"


class SlowStored(Stored):
    """A stored generation whose reads take a while and count how many run at once."""

    lock = threading.Lock()
    running = 0
    most = 0
    fail = ""
    #: Every read of a window meets here: they only all arrive if they run at once.
    barrier: threading.Barrier | None = None

    def read_runs(self, runs: list[tuple[int, memoryview]]) -> None:
        cls = SlowStored
        with cls.lock:
            cls.running += 1
            cls.most = max(cls.most, cls.running)
        try:
            if cls.barrier is not None:
                cls.barrier.wait()
            if cls.fail == self.manifest.generation_id:
                raise CorruptMetadata(what=f"generation {cls.fail}", detail="test damage")
            time.sleep(0.02)  # the others still read when one fails
            super().read_runs(runs)
        finally:
            with cls.lock:
                cls.running -= 1


def test_a_window_reads_its_generations_at_once_and_waits_for_all_of_them() -> None:
    nchunks = 64
    gens = [SlowStored("full", nchunks, None, nchunks * CHUNK)]
    gens += [
        SlowStored(f"inc{n}", nchunks, BitMap([5 + 10 * n]), nchunks * CHUNK) for n in range(4)
    ]
    plan = [(gens[0], BitMap(range(nchunks)) - BitMap([5, 15, 25, 35]))]
    plan += [(g, g.own) for g in gens[1:]]
    out = bytearray(nchunks * CHUNK)

    def sink(first: int, view: memoryview, _digests: object) -> None:
        out[first * CHUNK : first * CHUNK + len(view)] = view

    extent = nchunks * CHUNK  # one window holding all five generations
    SlowStored.most = 0
    SlowStored.barrier = threading.Barrier(5, timeout=scaled(30))
    with ThreadPoolExecutor(4) as pool:
        items = list(gathered_items([g for g, _ in plan], [o for _, o in plan], extent, pool))
        assert len(items) == 1
        copy_chunks(items, sink, chunk_size=CHUNK, volume_size=len(out), extent_bytes=extent)
        assert SlowStored.most == 5  # the full in the window's reader, four deltas beside it
        owner = {c: g for g, own in plan for c in own}
        assert all(out[c * CHUNK : (c + 1) * CHUNK] == owner[c].data(c) for c in range(nchunks))
        # A failing read of one generation fails the window, after every read of it ended.
        SlowStored.fail = "inc2"
        try:
            with pytest.raises(CorruptMetadata, match="inc2"):
                copy_chunks(
                    list(gathered_items([g for g, _ in plan], [o for _, o in plan], extent, pool)),
                    sink,
                    chunk_size=CHUNK,
                    volume_size=len(out),
                    extent_bytes=extent,
                )
            assert SlowStored.running == 0
        finally:
            SlowStored.fail = ""
            SlowStored.barrier = None
