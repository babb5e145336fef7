"""Scattered deltas on the dir pool, bit-exact: incrementals whose chunks are scattered,
adjacent, rewritten by later layers and include the volume's short last chunk are
backed up in batches of runs and restored in gathered windows; every generation's
restore equals the volume as it was at its backup, and a drill's read-back of the restored
device (in the restore's windows) passes it, or names the wrong chunk and its generation."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from pyroaring import BitMap

from blockguard.errors import DrillMismatch
from blockguard.storage.backup import run_backup
from blockguard.storage.copyengine import Progress, extents
from blockguard.storage.manifest import VolumeIdentity
from blockguard.storage.pool.dirpool import DirPool
from blockguard.storage.restore import restore_to_device, swap_in, verify
from blockguard.storage.voldrill import read_back

MiB = 1 << 20
CHUNK = 64 << 10
SIZE = 24 * MiB + 12 * 1024  # the last chunk is 12 KiB
NCHUNKS = -(-SIZE // CHUNK)


def sha_of(path: str) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return hashlib.sha256(os.pread(fd, SIZE, 0)).hexdigest()
    finally:
        os.close(fd)


def write_chunks(path: str, chunks: BitMap, rng: random.Random) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        for c in chunks:
            n = min(CHUNK, SIZE - c * CHUNK)
            os.pwrite(fd, rng.randbytes(n), c * CHUNK)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_scattered_chain_restores_every_generation_bit_exact(loopdev, tmp_path: Path) -> None:
    rng = random.Random(14)
    src = loopdev(SIZE, "source.img")
    target = loopdev(SIZE, "target.img")
    pool = DirPool.create("scatter", loopdev(512 * MiB, "pool.img"), tmp_path / "mnt")
    try:
        ident = VolumeIdentity("vol", SIZE)
        write_chunks(src, BitMap(range(NCHUNKS)), rng)
        gen = run_backup(pool, ident, src, "full", None, chunk_size=CHUNK).manifest
        history = [(gen.generation_id, sha_of(src))]
        overwritten = BitMap()
        for n in range(6):
            # Scattered singles (more runs than a batch holds), a run of neighbours,
            # chunks an earlier incremental holds, and the short last chunk.
            changed = BitMap(rng.sample(range(NCHUNKS - 1), 40))
            changed |= BitMap(range(100 + 10 * n, 105 + 10 * n))
            changed |= BitMap(rng.sample(list(overwritten), min(5, len(overwritten))))
            if n % 2 == 0:
                changed.add(NCHUNKS - 1)
            overwritten |= changed
            write_chunks(src, changed, rng)
            gen = run_backup(
                pool,
                ident,
                src,
                "incremental",
                changed,
                chunk_size=CHUNK,
                parent_id=gen.generation_id,
            ).manifest
            history.append((gen.generation_id, sha_of(src)))
        for gen_id, sha in history:
            verify(pool, "vol", gen_id, whole_chain=True)
            restore_to_device(pool, "vol", gen_id, target)
            assert sha_of(target) == sha, f"restore of {gen_id}"
            chain = pool.chain("vol", gen_id)
            assert read_back(pool, "vol", chain, target, Progress()) == (NCHUNKS, SIZE)
        last_id, last_sha = history[-1]
        swapped = swap_in(pool, "vol", last_id)
        try:
            assert sha_of(swapped.target) == last_sha
        finally:
            assert swapped.swap is not None
            swapped.swap.release()
    finally:
        pool.close()


@pytest.mark.parametrize("which", ["delta", "full", "last"])
def test_read_back_names_a_wrong_chunk_and_the_generation_it_came_from(
    loopdev, tmp_path: Path, which: str
) -> None:
    rng = random.Random(18)
    src = loopdev(SIZE, "source.img")
    target = loopdev(SIZE, "target.img")
    pool = DirPool.create("scatter", loopdev(512 * MiB, "pool.img"), tmp_path / "mnt")
    try:
        ident = VolumeIdentity("vol", SIZE)
        write_chunks(src, BitMap(range(NCHUNKS)), rng)
        gens = [run_backup(pool, ident, src, "full", None, chunk_size=CHUNK).manifest]
        for _ in range(2):
            changed = BitMap(rng.sample(range(NCHUNKS - 1), 30)) | BitMap([NCHUNKS - 1])
            write_chunks(src, changed, rng)
            gens.append(
                run_backup(
                    pool,
                    ident,
                    src,
                    "incremental",
                    changed,
                    chunk_size=CHUNK,
                    parent_id=gens[-1].generation_id,
                ).manifest
            )
        restore_to_device(pool, "vol", gens[-1].generation_id, target)
        newest, first_inc = gens[2].changed, gens[1].changed
        # A chunk only the first incremental holds, one of the full's between delta
        # chunks, or the volume's short last chunk (the newest incremental's).
        chunk, owner = {
            "delta": (min(first_inc - newest), gens[1]),
            "full": (min(BitMap(range(NCHUNKS)) - first_inc - newest), gens[0]),
            "last": (NCHUNKS - 1, gens[2]),
        }[which]
        write_chunks(target, BitMap([chunk]), rng)
        with pytest.raises(DrillMismatch) as err:
            read_back(pool, "vol", pool.chain("vol", gens[-1].generation_id), target, Progress())
        assert err.value.fields["chunk"] == chunk
        assert err.value.fields["generation"] == owner.generation_id
    finally:
        pool.close()


class _CheckingWriter:
    """A generation writer that checks every call is contiguous chunks from ``first``
    equal to the source there (the contract the engine's hashing writer relies on)."""

    def __init__(self, inner: Any, source: bytes) -> None:
        self._inner = inner
        self._source = source
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def write_chunks(self, first: int, view: memoryview, digests: Sequence[int]) -> None:
        assert bytes(view) == self._source[first * CHUNK : first * CHUNK + len(view)]
        assert len(digests) == -(-len(view) // CHUNK)
        self.calls += 1
        self._inner.write_chunks(first, view, digests)

    def __enter__(self) -> _CheckingWriter:
        self._inner.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.__exit__(*exc)


def test_a_batched_delta_reaches_the_writer_as_contiguous_runs(loopdev, tmp_path: Path) -> None:
    rng = random.Random(16)
    src = loopdev(SIZE, "source.img")
    pool = DirPool.create("scatter", loopdev(512 * MiB, "pool.img"), tmp_path / "mnt")
    try:
        ident = VolumeIdentity("vol", SIZE)
        write_chunks(src, BitMap(range(NCHUNKS)), rng)
        full = run_backup(pool, ident, src, "full", None, chunk_size=CHUNK).manifest
        changed = BitMap(rng.sample(range(NCHUNKS), 60)) | BitMap([NCHUNKS - 1, 5, 6])
        write_chunks(src, changed, rng)
        fd = os.open(src, os.O_RDONLY)
        try:
            data = os.pread(fd, SIZE, 0)
        finally:
            os.close(fd)
        writers: list[_CheckingWriter] = []

        class Proxy:
            def __getattr__(self, name: str) -> Any:
                return getattr(pool, name)

            def begin_generation(self, spec: Any) -> _CheckingWriter:
                writers.append(_CheckingWriter(pool.begin_generation(spec), data))
                return writers[-1]

        run_backup(
            Proxy(),  # type: ignore[arg-type]
            ident,
            src,
            "incremental",
            changed,
            chunk_size=CHUNK,
            parent_id=full.generation_id,
        )
        runs = sum(1 for _ in extents(changed, NCHUNKS, NCHUNKS))
        assert writers[0].calls == runs
    finally:
        pool.close()
