"""Backup and restore on the dir pool, bit-exact, by every restore mode.

The host has no device-mapper, so the point-in-time copy is simulated: at each backup
point the test copies the volume (a loop device) to a second loop device, the
"snapshot", records its sha256, and keeps writing to the volume while the backup reads
the snapshot. The test also plays the change tracker: it knows every chunk it wrote.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroaring import BitMap

from blockguard.core.vocab import GenerationKind
from blockguard.errors import ChecksumMismatch, DeviceInUse, InvalidInput
from blockguard.storage.backup import run_backup
from blockguard.storage.copyengine import Progress
from blockguard.storage.manifest import VolumeIdentity
from blockguard.storage.pool.dirpool import DirPool
from blockguard.storage.pool.values import FreedGeneration
from blockguard.storage.restore import restore_in_place, restore_to_device, swap_in, verify
from tests.fsutil import frozen

MiB = 1 << 20
CHUNK = 64 << 10
VOLUME_SIZE = 32 * MiB
NCHUNKS = VOLUME_SIZE // CHUNK
POOL_SIZE = 512 * MiB


@pytest.fixture
def pool(loopdev, tmp_path: Path) -> Iterator[DirPool]:
    p = DirPool.create("testpool", loopdev(POOL_SIZE, "pool.img"), tmp_path / "mnt")
    try:
        yield p
    finally:
        p.close()


def sha256_of(path: str, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left:
            block = f.read(min(4 * MiB, left))
            assert block, f"{path} ended early"
            h.update(block)
            left -= len(block)
    return h.hexdigest()


class Volume:
    """A loop device that the test writes to, knowing which chunks changed when."""

    def __init__(self, path: str, rng: random.Random) -> None:
        self.path = path
        self.rng = rng
        self.lock = threading.Lock()
        self.events: list[int] = []  # chunk index of every write, in order
        self.fd = os.open(path, os.O_RDWR)

    def write_random(self, n: int, hot: int = NCHUNKS) -> None:
        for _ in range(n):
            chunk = self.rng.randrange(hot)
            off = chunk * CHUNK + self.rng.randrange(CHUNK // 4096) * 4096
            with self.lock:
                os.pwrite(self.fd, self.rng.randbytes(4096), off)
                self.events.append(chunk)

    def changed_since(self, mark: int) -> BitMap:
        with self.lock:
            return BitMap(self.events[mark:])

    def snapshot(self, snap: str) -> tuple[int, str]:
        """Copy the volume to ``snap`` atomically w.r.t. our writes; returns (mark, sha)."""
        with self.lock:
            os.fsync(self.fd)
            mark = len(self.events)
            data = os.pread(self.fd, VOLUME_SIZE, 0)
        with open(snap, "r+b") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return mark, hashlib.sha256(data).hexdigest()

    def close(self) -> None:
        os.close(self.fd)


class Writer(threading.Thread):
    """Keeps writing to the volume while a backup runs."""

    def __init__(self, volume: Volume) -> None:
        super().__init__(daemon=True)
        self.volume = volume
        self.stop = threading.Event()

    def run(self) -> None:
        # Throttled: the volume keeps changing during the backup, but not all of it.
        while not self.stop.wait(0.002):
            self.volume.write_random(2, hot=NCHUNKS // 8)

    def __enter__(self) -> Writer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.join()


def make_history(
    pool: DirPool,
    vol: Volume,
    snap: str,
    kinds: list[str],
    ident: VolumeIdentity,
    keep: int | None = None,
):
    """Run backups of the given kinds; returns [(manifest, sha at its backup point)]."""
    history = []
    marks: dict[str, int] = {}
    last_full = last = None
    for kind in kinds:
        vol.write_random(vol.rng.randrange(5, 60))
        mark, sha = vol.snapshot(snap)
        # A full clones the previous full; a differential is relative to it too.
        ref = last if kind == "incremental" else last_full
        changed = vol.changed_since(marks[ref]) if ref else None
        with Writer(vol):
            result = run_backup(
                pool,
                ident,
                snap,
                kind,
                changed,
                chunk_size=CHUNK,
                base_id=ref if kind != "incremental" else None,
                parent_id=ref if kind == "incremental" else None,
                keep=keep,
            )
        m = result.manifest
        marks[m.generation_id] = mark
        history.append((m, sha))
        last = m.generation_id
        if kind == "full":
            last_full = m.generation_id
    return history


KINDS = [
    "full",
    "incremental",
    "incremental",
    "differential",
    "incremental",
    "full",
    "incremental",
    "differential",
    "incremental",
    "incremental",
]


def test_history_restores_bit_exact_by_every_mode(pool: DirPool, loopdev) -> None:
    rng = random.Random(4)
    orig = loopdev(VOLUME_SIZE, "volume.img")
    snap = loopdev(VOLUME_SIZE, "snap.img")
    target = loopdev(VOLUME_SIZE, "target.img")
    vol = Volume(orig, rng)
    ident = VolumeIdentity("vol0", VOLUME_SIZE, "test:1")
    try:
        history = make_history(pool, vol, snap, KINDS, ident)
    finally:
        vol.close()
    assert [m.kind.value for m, _ in history] == KINDS
    assert [m.generation_id for m in pool.generations("vol0")] == [
        m.generation_id for m, _ in history
    ]
    # The second full was cloned from the first: only the changed chunks were stored.
    second_full = history[5][0]
    assert second_full.cloned_from == history[0][0].generation_id
    assert second_full.bytes_stored < VOLUME_SIZE // 2
    for m, sha in history:
        r = restore_to_device(pool, "vol0", m.generation_id, target)
        assert sha256_of(target, VOLUME_SIZE) == sha, f"restore of {m.kind} {m.generation_id}"
        assert r.bytes_written == VOLUME_SIZE and r.duration > 0
        assert r.chain[-1] == m.generation_id and pool.manifest("vol0", r.chain[0]).is_full

        r = restore_in_place(pool, "vol0", m.generation_id, orig, force=True)
        assert sha256_of(orig, VOLUME_SIZE) == sha, f"in-place restore of {m.generation_id}"
        assert r.mode == "in-place"

        r = swap_in(pool, "vol0", m.generation_id)
        try:
            assert r.target.startswith("/dev/loop")
            assert sha256_of(r.target, VOLUME_SIZE) == sha, f"swap-in of {m.generation_id}"
        finally:
            assert r.swap is not None
            r.swap.release()
        verify(pool, "vol0", m.generation_id)
    assert pool.swap_ins() == []


def test_in_place_needs_force_and_refuses_mounted(pool: DirPool, loopdev, tmp_path: Path) -> None:
    import subprocess

    orig = loopdev(VOLUME_SIZE, "volume.img")
    ident = VolumeIdentity("vol0", VOLUME_SIZE)
    m = run_backup(pool, ident, orig, "full", None, chunk_size=CHUNK).manifest
    with pytest.raises(InvalidInput, match="needs force"):
        restore_in_place(pool, "vol0", m.generation_id, orig)
    # No lazy init: ext4lazyinit would write inode tables behind our back after mounting.
    subprocess.run(
        ["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", orig],
        check=True,
        timeout=60,
    )
    mnt = tmp_path / "m"
    mnt.mkdir()
    subprocess.run(["mount", orig, str(mnt)], check=True, timeout=60)
    try:
        # Frozen: a mounted ext4 writes its journal on its own (see tests/fsutil.py).
        with frozen(mnt):
            before = sha256_of(orig, VOLUME_SIZE)
            with pytest.raises(DeviceInUse, match="mounted on"):
                restore_in_place(pool, "vol0", m.generation_id, orig, force=True)
            # (compared while mounted: unmounting ext4 updates its superblock)
            assert sha256_of(orig, VOLUME_SIZE) == before
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=60)


def flip_byte(pool: DirPool, volume: str, gen_id: str, chunk: int) -> None:
    """Flip one byte of a stored chunk, behind the pool's back."""
    m = pool.manifest(volume, gen_id)
    gen_dir = pool._gen_dir(volume, gen_id)
    path = gen_dir / m.storage["data"]
    offset = m.checksum_slot(chunk) * m.chunk_size + 1234
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))
        f.flush()
        os.fsync(f.fileno())
    # Drop cached pages so that O_DIRECT and buffered readers see the same bytes.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_flipped_byte_is_caught_by_restore_and_verify(pool: DirPool, loopdev) -> None:
    rng = random.Random(7)
    orig = loopdev(VOLUME_SIZE, "volume.img")
    snap = loopdev(VOLUME_SIZE, "snap.img")
    target = loopdev(VOLUME_SIZE, "target.img")
    vol = Volume(orig, rng)
    try:
        history = make_history(
            pool, vol, snap, ["full", "incremental"], VolumeIdentity("v", VOLUME_SIZE)
        )
    finally:
        vol.close()
    full, incr = history[0][0], history[1][0]
    bad_delta_chunk = sorted(incr.changed)[len(incr.changed) // 2]
    flip_byte(pool, "v", incr.generation_id, bad_delta_chunk)
    expected = f"generation {incr.generation_id} at chunk {bad_delta_chunk}"
    with pytest.raises(ChecksumMismatch, match=expected):
        verify(pool, "v", incr.generation_id)
    with pytest.raises(ChecksumMismatch, match=expected):
        restore_to_device(pool, "v", incr.generation_id, target)
    with pytest.raises(ChecksumMismatch, match=expected):
        swap_in(pool, "v", incr.generation_id)
    assert pool.swap_ins() == []  # a failed swap-in leaves nothing behind

    # A chunk of the full that the incremental does not replace.
    bad_full_chunk = next(c for c in range(NCHUNKS) if c not in incr.changed)
    flip_byte(pool, "v", full.generation_id, bad_full_chunk)
    expected = f"generation {full.generation_id} at chunk {bad_full_chunk}"
    with pytest.raises(ChecksumMismatch, match=expected):
        verify(pool, "v", full.generation_id)
    with pytest.raises(ChecksumMismatch, match=expected):
        restore_to_device(pool, "v", full.generation_id, target)
    with pytest.raises(ChecksumMismatch, match=expected):
        swap_in(pool, "v", full.generation_id)


def test_progress_is_readable_and_cancel_stops(pool: DirPool, loopdev) -> None:
    orig = loopdev(VOLUME_SIZE, "volume.img")
    progress = Progress()
    r = run_backup(
        pool,
        VolumeIdentity("v", VOLUME_SIZE),
        orig,
        GenerationKind.FULL,
        None,
        chunk_size=CHUNK,
        progress=progress,
        extent_bytes=1 * MiB,
    )
    assert progress.bytes_done == progress.total == VOLUME_SIZE == r.bytes_copied
    assert progress.rate > 0 and progress.eta == 0
    cancelled = Progress()
    cancelled.cancel()
    with pytest.raises(Exception, match="cancelled"):
        run_backup(
            pool,
            VolumeIdentity("v", VOLUME_SIZE),
            orig,
            "full",
            None,
            chunk_size=CHUNK,
            progress=cancelled,
        )
    assert len(pool.generations("v")) == 1
    gen_dirs = list((Path(pool.devices()[0].area) / "volumes" / "v").iterdir())
    assert len(gen_dirs) == 1  # the cancelled one was removed


def test_retention_after_commit_reports_what_was_freed(pool: DirPool, loopdev) -> None:
    rng = random.Random(11)
    orig = loopdev(VOLUME_SIZE, "volume.img")
    snap = loopdev(VOLUME_SIZE, "snap.img")
    target = loopdev(VOLUME_SIZE, "target.img")
    vol = Volume(orig, rng)
    ident = VolumeIdentity("v", VOLUME_SIZE)
    try:
        history = make_history(pool, vol, snap, KINDS[:5], ident)
        # One more incremental with retention: keep 3.
        vol.write_random(10)
        mark_sha = vol.snapshot(snap)
        parent = history[-1][0].generation_id
        changed = BitMap(vol.events)  # superset of the real changes: still correct
        result = run_backup(
            pool, ident, snap, "incremental", changed, chunk_size=CHUNK, parent_id=parent, keep=3
        )
    finally:
        vol.close()
    kept = [m.generation_id for m in pool.generations("v")]
    # Kept: the 3 newest (diff, incr, new incr) and the full the diff depends on.
    assert kept == [
        history[0][0].generation_id,
        history[3][0].generation_id,
        history[4][0].generation_id,
        result.manifest.generation_id,
    ]
    assert result.retention is not None
    assert result.retention.freed_ids == [history[1][0].generation_id, history[2][0].generation_id]
    assert result.retention.bytes == history[1][0].bytes_stored + history[2][0].bytes_stored
    restore_to_device(pool, "v", result.manifest.generation_id, target)
    assert sha256_of(target, VOLUME_SIZE) == mark_sha[1]


def test_keep_three_over_ten_generations(pool: DirPool, loopdev) -> None:
    """Retention after every commit never strands a kept generation; all kept restore."""
    rng = random.Random(3)
    orig = loopdev(VOLUME_SIZE, "volume.img")
    snap = loopdev(VOLUME_SIZE, "snap.img")
    target = loopdev(VOLUME_SIZE, "target.img")
    vol = Volume(orig, rng)
    try:
        history = make_history(pool, vol, snap, KINDS, VolumeIdentity("v", VOLUME_SIZE), keep=3)
    finally:
        vol.close()
    kept = pool.generations("v")
    shas = {m.generation_id: sha for m, sha in history}
    assert 3 <= len(kept) < len(KINDS)
    assert [m.generation_id for m in kept[-3:]] == [m.generation_id for m, _ in history[-3:]]
    for m in kept:
        chain = pool.chain("v", m.generation_id)  # raises if a link is missing
        assert chain[0].is_full
        restore_to_device(pool, "v", m.generation_id, target)
        assert sha256_of(target, VOLUME_SIZE) == shas[m.generation_id]


def test_retention_keeps_a_generation_held_after_its_plan(
    pool: DirPool, loopdev, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mount taken between retention's plan and its removals (a fault hook takes it
    once the first removal is done) keeps its generation and all it reads; the rest goes,
    and the kept one is named with its holder and still restores bit-exact."""
    rng = random.Random(5)
    orig = loopdev(VOLUME_SIZE, "volume.img")
    snap = loopdev(VOLUME_SIZE, "snap.img")
    target = loopdev(VOLUME_SIZE, "target.img")
    vol = Volume(orig, rng)
    try:
        history = make_history(pool, vol, snap, KINDS[:6], VolumeIdentity("v", VOLUME_SIZE))
    finally:
        vol.close()
    ids = [m.generation_id for m, _ in history]
    held = ids[2]  # an incremental: it reads the full and the first incremental
    chain = [m.generation_id for m in pool.chain("v", held)]
    holder = "the browse mount at /mnt/late"
    remove = pool.remove_generation

    def remove_then_mount(volume: str, generation_id: str) -> FreedGeneration:
        freed = remove(volume, generation_id)
        pool.hold(chain, holder)
        return freed

    monkeypatch.setattr(pool, "remove_generation", remove_then_mount)
    result = pool.apply_retention("v", 1)
    monkeypatch.undo()

    assert result.kept == {ids[2]: holder, ids[1]: holder, ids[0]: holder}
    assert result.freed_ids == [ids[3], ids[4]]
    assert [m.generation_id for m in pool.generations("v")] == [ids[0], ids[1], ids[2], ids[5]]
    restore_to_device(pool, "v", held, target)
    assert sha256_of(target, VOLUME_SIZE) == history[2][1]
    pool.release(holder)
    assert pool.apply_retention("v", 1).freed_ids == ids[:3]
