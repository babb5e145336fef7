"""A pool whose file system fills up during a backup: a named error, nothing half-written.

The pool's own space check passes (the space is taken by another writer right after it,
as on a shared disk), so the file system itself says ENOSPC: once at the allocation of a
fresh full, once in the middle of the writes of a cloned full (reflinked extents need new
space when they are overwritten). Either way the backup must fail with ``PoolSpaceLow``
naming the pool, leave no generation directory behind, and the earlier generation must
still restore bit-exact.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroaring import BitMap

from blockguard.core.vocab import GenerationKind
from blockguard.errors import PoolSpaceLow
from blockguard.storage.backup import run_backup
from blockguard.storage.manifest import VolumeIdentity
from blockguard.storage.pool.dirpool import DirPool
from blockguard.storage.restore import restore_to_device, verify

MiB = 1 << 20
CHUNK = 64 << 10
VOLUME_SIZE = 48 * MiB
POOL_SIZE = 320 * MiB
#: What the filler leaves free: less than a volume, more than the file system's reserve.
LEFT_FREE = 12 * MiB


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(VOLUME_SIZE)).hexdigest()


def fill_volume(path: str, seed: int) -> str:
    data = random.Random(seed).randbytes(VOLUME_SIZE)
    with open(path, "r+b") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def pool(loopdev, tmp_path: Path) -> Iterator[DirPool]:
    p = DirPool.create("fullpool", loopdev(POOL_SIZE, "pool.img"), tmp_path / "mnt")
    try:
        yield p
    finally:
        p.close()


def area(pool: DirPool) -> Path:
    [(_, mnt)] = pool._areas
    return mnt


def take_space_after_check(pool: DirPool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the pool's check pass, then fill its file system up to :data:`LEFT_FREE`."""
    real = pool.require_space

    def check_then_fill(needed: int, volume: str | None = None) -> None:
        real(needed, volume)
        mnt = area(pool)
        st = os.statvfs(mnt)
        take = st.f_bavail * st.f_frsize - LEFT_FREE
        fd = os.open(mnt / "someone-else.bin", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, take)
        finally:
            os.close(fd)

    monkeypatch.setattr(pool, "require_space", check_then_fill)


def generation_dirs(pool: DirPool, volume: str) -> list[str]:
    d = area(pool) / "volumes" / volume
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


@pytest.mark.parametrize("clone", [False, True], ids=["fresh-full", "cloned-full"])
def test_full_pool_fails_named_and_keeps_earlier_generations(
    pool: DirPool, loopdev, monkeypatch: pytest.MonkeyPatch, clone: bool
) -> None:
    vol = loopdev(VOLUME_SIZE, "vol.img")
    snap = loopdev(VOLUME_SIZE, "target.img")
    ident = VolumeIdentity("vol0", VOLUME_SIZE, "test:1")
    first_sha = fill_volume(vol, 1)
    first = run_backup(pool, ident, vol, GenerationKind.FULL, None, chunk_size=CHUNK).manifest
    before = generation_dirs(pool, "vol0")
    assert before == [first.generation_id]

    fill_volume(vol, 2)
    take_space_after_check(pool, monkeypatch)
    with pytest.raises(PoolSpaceLow, match="pool fullpool ran out of space writing") as err:
        if clone:
            # Every chunk changed: the clone's shared extents must all be rewritten.
            all_chunks = BitMap(range(VOLUME_SIZE // CHUNK))
            run_backup(
                pool,
                ident,
                vol,
                GenerationKind.FULL,
                all_chunks,
                chunk_size=CHUNK,
                base_id=first.generation_id,
            )
        else:
            run_backup(pool, ident, vol, GenerationKind.FULL, None, chunk_size=CHUNK)
    assert isinstance(err.value.__cause__, OSError)
    assert str(area(pool)) in str(err.value), "the error names the file being written"

    # Nothing of the failed generation is left, on disk or in the listing.
    assert generation_dirs(pool, "vol0") == before
    assert [m.generation_id for m in pool.generations("vol0")] == [first.generation_id]
    # The earlier generation is intact.
    (area(pool) / "someone-else.bin").unlink()
    verify(pool, "vol0", first.generation_id)
    restore_to_device(pool, "vol0", first.generation_id, snap)
    assert sha256_of(snap) == first_sha
