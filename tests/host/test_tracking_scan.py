"""The scan change tracker and check_protectable, on real loop devices."""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroaring import BitMap

from blockguard.errors import (
    AlreadyExists,
    DeviceReadOnly,
    DeviceTooSmall,
    InvalidChunkSize,
    InvalidInput,
    NotABlockDevice,
    NotFound,
    PoolDiskRefused,
    TrackingLost,
)
from blockguard.storage.blockdev import BlockDevice, aligned_buffer
from blockguard.storage.tracking import ChangeSet, ChunkHashes, check_protectable
from blockguard.storage.tracking.scan import INDEX_NAME, ScanTracker, hash_device

KiB, MiB = 1024, 1024 * 1024


# --- helpers ----------------------------------------------------------------------------


class Volume:
    """A loop device plus an in-memory shadow of its content (the ground truth)."""

    def __init__(self, path: str, size: int, rng: random.Random) -> None:
        self.path, self.size, self.rng = path, size, rng
        self.image = bytearray(rng.randbytes(size))
        self.write(0, bytes(self.image))

    def write(self, offset: int, data: bytes) -> None:
        with BlockDevice(self.path, write=True) as dev:
            dev.pwrite_all(data, offset)
            dev.flush()
        self.image[offset : offset + len(data)] = data


def chunks_of(offset: int, length: int, chunk_size: int) -> range:
    return range(offset // chunk_size, (offset + length - 1) // chunk_size + 1)


def random_write(rng: random.Random, size: int, chunk_size: int) -> tuple[int, int]:
    """``(offset, length)`` of one write of a mixed workload."""
    n_chunks = -(-size // chunk_size)
    kind = rng.choice(["aligned", "partial", "straddle", "tiny", "tail", "multi"])
    if kind == "aligned":  # whole chunks
        c = rng.randrange(n_chunks - 1)
        return c * chunk_size, chunk_size
    if kind == "partial":  # inside one chunk, unaligned
        c = rng.randrange(n_chunks - 1)
        lo = rng.randrange(chunk_size - 1)
        return c * chunk_size + lo, rng.randint(1, chunk_size - lo)
    if kind == "straddle":  # across one chunk boundary, a few bytes each side
        c = rng.randrange(1, n_chunks)
        return c * chunk_size - rng.randint(1, 700), rng.randint(701, 1400)
    if kind == "tiny":  # one odd byte anywhere
        return rng.randrange(size), 1
    if kind == "tail":  # the volume's last bytes (its last chunk is partial)
        n = rng.randint(1, 3000)
        return size - n, n
    offset = rng.randrange(size - 3 * chunk_size)  # several chunks, unaligned
    return offset, rng.randint(chunk_size + 1, 3 * chunk_size)


def changing_bytes(
    rng: random.Random, vol: Volume, offset: int, length: int, chunk_size: int, olds: list[bytes]
) -> bytes:
    """Random bytes for a write that really changes every chunk it touches, relative to
    the current content and to each reference's content (a hash scan reports content,
    so a write that happened to restore a chunk's old bytes would not be a change)."""
    data = bytearray(rng.randbytes(length))
    first = [offset, *(c * chunk_size for c in chunks_of(offset, length, chunk_size)[1:])]
    for pos in first:
        taken = {vol.image[pos]} | {img[pos] for img in olds}
        data[pos - offset] = next(b for b in rng.sample(range(256), 256) if b not in taken)
    return bytes(data)


def content_diff(a: bytes | bytearray, b: bytes | bytearray, chunk_size: int) -> BitMap:
    return BitMap(
        i
        for i in range(-(-len(a) // chunk_size))
        if a[i * chunk_size : (i + 1) * chunk_size] != b[i * chunk_size : (i + 1) * chunk_size]
    )


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "scan-state"


def ls(path: Path) -> list[str]:
    return sorted(os.listdir(path)) if path.exists() else []


# --- the randomized workload ------------------------------------------------------------


@pytest.mark.parametrize(
    ("seed", "chunk_size", "size"),
    [
        (1, 64 * KiB, 20 * MiB + 12 * KiB),
        (2, 4 * KiB, 6 * MiB + 512),
        (3, 1 * MiB, 24 * MiB + 4 * KiB),
    ],
)
def test_randomized_workload_reports_exactly_the_written_chunks(
    loopdev, state_dir: Path, tmp_path: Path, seed: int, chunk_size: int, size: int
) -> None:
    rng = random.Random(seed)
    vol = Volume(loopdev(size), size, rng)
    tracker = ScanTracker(vol.path, state_dir, chunk_size, read_size=4 * MiB)
    images: dict[str, bytes] = {}
    written: dict[str, BitMap] = {}
    snapshot = loopdev(size, name="snapshot.img")

    def add(name: str, how: str) -> None:
        if how == "hashes":  # the backup engine hands in what it computed while copying
            tracker.add_reference(name, hashes=hash_device(vol.path, chunk_size), replace=True)
        elif how == "source":  # or the point-in-time copy it read
            with BlockDevice(snapshot, write=True) as dev:
                dev.pwrite_all(bytes(vol.image), 0)
                dev.flush()
            tracker.add_reference(name, source=snapshot, replace=True)
        else:
            tracker.add_reference(name, replace=True)
        images[name] = bytes(vol.image)
        written[name] = BitMap()

    plan = {0: [("full", "live")], 1: [("diff-a", "hashes")], 3: [("diff-b", "source")]}
    for rnd in range(6):
        for name, how in plan.get(rnd, []):
            add(name, how)
        add("last", "live" if rnd % 2 else "hashes")  # "since the last backup", moved on
        if rnd == 4:
            tracker.drop_reference("diff-a")
            del images["diff-a"], written["diff-a"]
        assert tracker.references() == sorted(written)
        for _ in range(rng.randint(1, 25)):
            offset, length = random_write(rng, size, chunk_size)
            data = changing_bytes(rng, vol, offset, length, chunk_size, list(images.values()))
            vol.write(offset, data)
            for bm in written.values():
                bm.update(chunks_of(offset, length, chunk_size))
        reported = tracker.changed_many(written)
        assert tracker.state().is_exact
        for name, expected in written.items():
            # the workload itself: what was written is what differs in content
            assert content_diff(images[name], vol.image, chunk_size) == expected, name
            cs = reported[name]
            assert cs.chunks == expected, (rnd, name, cs.chunks ^ expected)
            assert cs.volume_size == size and cs.chunk_size == chunk_size
        assert tracker.changed("last") == reported["last"]
        assert tracker.changed_bytes("full") == reported["full"].changed_bytes
    # the state survives a restart of the daemon
    again = ScanTracker(vol.path, state_dir, chunk_size)
    assert again.references() == ["diff-b", "full", "last"]
    assert again.changed("diff-b").chunks == written["diff-b"]


def test_partial_last_chunk_counts_its_real_size(loopdev, state_dir: Path) -> None:
    size = 2 * MiB + 4 * KiB
    vol = Volume(loopdev(size), size, random.Random(5))
    tracker = ScanTracker(vol.path, state_dir, 64 * KiB)
    tracker.add_reference("ref")
    vol.write(size - 1, bytes([vol.image[-1] ^ 0xFF]))
    cs = tracker.changed("ref")
    assert list(cs) == [32] and cs.n_chunks == 33
    assert cs.changed_bytes == 4 * KiB
    assert tracker.changed_bytes("ref") == 4 * KiB


# --- verification -----------------------------------------------------------------------


def test_verify_reference_catches_a_change_the_tracker_was_not_told_about(
    loopdev, state_dir: Path
) -> None:
    c, size = 64 * KiB, 8 * MiB
    vol = Volume(loopdev(size), size, random.Random(11))
    tracker = ScanTracker(vol.path, state_dir, c)
    tracker.add_reference("last-backup")
    for chunk in (3, 4, 90):
        vol.write(chunk * c + 100, os.urandom(50))
    assert list(tracker.changed("last-backup")) == [3, 4, 90]
    clean = tracker.verify_reference("last-backup", fraction=1.0, rng=random.Random(1))
    assert clean.ok and clean.sampled == 128 - 3
    assert tracker.state().is_exact

    # behind the tracker's back: chunk 77 changes after the change set was reported
    vol.write(77 * c + 5, os.urandom(3))
    result = tracker.verify_reference("last-backup", fraction=1.0, rng=random.Random(2))
    assert list(result.mismatched) == [77] and not result.ok
    state = tracker.state()
    assert not state.is_exact
    assert "77" in state.reason and "reported unchanged" in state.reason
    with pytest.raises(TrackingLost, match="77"):
        tracker.changed("last-backup")
    # persistent: a restarted daemon does not vouch for it either
    assert not ScanTracker(vol.path, state_dir, c).state().is_exact


def test_verify_sample_is_generic_over_a_lying_tracker(loopdev, state_dir: Path) -> None:
    """What the era/thin backends get: the backup's checksums vs the claimed change set."""
    c, size = 64 * KiB, 8 * MiB
    vol = Volume(loopdev(size), size, random.Random(12))
    tracker = ScanTracker(vol.path, state_dir, c)
    backup = hash_device(vol.path, c)  # the checksums the last backup stored
    tracker.add_reference("last", hashes=backup)
    truly_changed = BitMap(random.Random(3).sample(range(128), 40))
    for chunk in truly_changed:
        vol.write(chunk * c, os.urandom(c))

    honest = ChangeSet(c, size, truly_changed)
    assert tracker.verify_sample(backup, honest, count=1000, rng=random.Random(4)).ok
    small = tracker.verify_sample(backup, honest, count=10, rng=random.Random(4))
    assert small.ok and small.sampled == 10

    # a tracker that forgot half of the changes: a 20-chunk sample of the 88 + 20
    # "unchanged" chunks hits a forgotten one (deterministic with this seed)
    forgotten = BitMap(list(truly_changed)[::2])
    lying = ChangeSet(c, size, truly_changed - forgotten)
    result = tracker.verify_sample(backup, lying, count=20, rng=random.Random(5))
    assert result.sampled == 20
    assert result.mismatched and result.mismatched.issubset(forgotten)
    assert not tracker.state().is_exact
    assert str(result.mismatched.min()) in tracker.state().reason

    with pytest.raises(InvalidInput, match="exactly one"):
        tracker.verify_sample(backup, honest, count=1, fraction=0.5)
    with pytest.raises(InvalidInput, match="different volume sizes"):
        tracker.verify_sample(backup, ChangeSet(c, size + c), count=1)


def test_verify_after_resize_marks_unknown(loopdev, state_dir: Path, tmp_path: Path) -> None:
    c, size = 64 * KiB, 4 * MiB
    vol = Volume(loopdev(size), size, random.Random(13))
    tracker = ScanTracker(vol.path, state_dir, c)
    tracker.add_reference("last")
    backup = tracker.stored_hashes("last")
    claimed = tracker.changed("last")
    os.truncate(tmp_path / "loop0.img", size + 1 * MiB)
    subprocess.run(["losetup", "-c", vol.path], check=True, timeout=30)
    with pytest.raises(TrackingLost, match="resized"):
        tracker.verify_sample(backup, claimed, fraction=0.5)
    assert "resized" in tracker.state().reason


# --- faults: never a crash, never a smaller set ------------------------------------------


@pytest.mark.parametrize("grow", [True, False])
def test_resized_volume_is_unknown(loopdev, state_dir: Path, tmp_path: Path, grow: bool) -> None:
    c, size = 64 * KiB, 4 * MiB
    vol = Volume(loopdev(size), size, random.Random(14))
    tracker = ScanTracker(vol.path, state_dir, c)
    tracker.add_reference("last")
    new_size = size + 1 * MiB if grow else size - 1 * MiB
    os.truncate(tmp_path / "loop0.img", new_size)
    subprocess.run(["losetup", "-c", vol.path], check=True, timeout=30)
    state = tracker.state()
    assert not state.is_exact
    assert f"now {new_size} bytes but was {size} bytes" in state.reason
    with pytest.raises(TrackingLost, match="resized"):
        tracker.changed("last")
    # a reference taken after the resize is exact; dropping the old one clears the state
    tracker.add_reference("after")
    assert tracker.changed("after").chunks == BitMap()
    tracker.drop_reference("last")
    assert tracker.state().is_exact


def test_corrupt_hash_file_is_unknown(loopdev, state_dir: Path) -> None:
    vol = Volume(loopdev(2 * MiB), 2 * MiB, random.Random(15))
    tracker = ScanTracker(vol.path, state_dir, 64 * KiB)
    tracker.add_reference("payload")
    tracker.add_reference("header")
    with open(state_dir / "payload.ref", "r+b") as f:  # a flipped bit among the hashes
        f.seek(-7, os.SEEK_END)
        b = f.read(1)
        f.seek(-7, os.SEEK_END)
        f.write(bytes([b[0] ^ 0x10]))
    with open(state_dir / "header.ref", "r+b") as f:
        f.seek(30)
        f.write(b"\xff")
    state = tracker.state()
    assert "reference header: hash file header is corrupt" in state.reason
    with pytest.raises(TrackingLost, match=r"payload: .*corrupt \(checksum mismatch\)"):
        tracker.changed("payload")
    # found by a query, remembered: state() now says so, and after a restart too
    assert "reference payload:" in ScanTracker(vol.path, state_dir, 64 * KiB).state().reason


def test_missing_hash_file_and_index_are_unknown(loopdev, state_dir: Path) -> None:
    vol = Volume(loopdev(2 * MiB), 2 * MiB, random.Random(16))
    tracker = ScanTracker(vol.path, state_dir, 64 * KiB)
    tracker.add_reference("a")
    tracker.add_reference("b")
    (state_dir / "a.ref").unlink()
    assert "reference a: its hash file" in tracker.state().reason
    assert "missing" in tracker.state().reason
    with pytest.raises(TrackingLost, match="missing"):
        tracker.changed("a")
    assert tracker.changed("b").chunks == BitMap()

    (state_dir / INDEX_NAME).unlink()
    assert tracker.references() == ["b"]
    assert "index" in tracker.state().reason and "missing" in tracker.state().reason
    with pytest.raises(TrackingLost, match="index"):
        tracker.changed("b")

    (state_dir / INDEX_NAME).write_text("{not json")
    assert "corrupt" in tracker.state().reason
    tracker.add_reference("fresh")  # rewrites the index; the old reference stays suspect
    assert tracker.changed("fresh").chunks == BitMap()
    with pytest.raises(TrackingLost):
        tracker.changed("b")
    tracker.drop_reference("b")
    assert tracker.references() == ["fresh"]  # "a" went with the index and its file
    assert tracker.state().is_exact


def test_mark_unknown_affects_existing_references_only(loopdev, state_dir: Path) -> None:
    vol = Volume(loopdev(2 * MiB), 2 * MiB, random.Random(17))
    tracker = ScanTracker(vol.path, state_dir, 64 * KiB)
    tracker.add_reference("old")
    tracker.mark_unknown("the volume was written while the daemon was down")
    assert "reference old: the volume was written" in tracker.state().reason
    tracker.add_reference("new")
    assert tracker.changed("new").chunks == BitMap()
    tracker.add_reference("old", replace=True)  # a full backup moved it on
    assert tracker.state().is_exact


def test_reference_errors(loopdev, state_dir: Path) -> None:
    vol = Volume(loopdev(2 * MiB), 2 * MiB, random.Random(18))
    other = loopdev(3 * MiB)
    tracker = ScanTracker(vol.path, state_dir, 64 * KiB)
    tracker.add_reference("a")
    with pytest.raises(AlreadyExists, match="reference a already exists"):
        tracker.add_reference("a")
    with pytest.raises(NotFound, match="reference nope does not exist"):
        tracker.changed("nope")
    with pytest.raises(NotFound):
        tracker.drop_reference("nope")
    with pytest.raises(InvalidInput, match="reference name"):
        tracker.add_reference("../escape")
    with pytest.raises(InvalidInput, match="do not fit"):
        tracker.add_reference("b", hashes=ChunkHashes(64 * KiB, 1 * MiB, bytes(16 * 16)))
    with pytest.raises(InvalidInput, match="do not fit"):
        tracker.add_reference("b", source=other)
    with pytest.raises(InvalidInput, match="not both"):
        tracker.add_reference("b", source=vol.path, hashes=tracker.stored_hashes("a"))
    with pytest.raises(InvalidInput, match="call changed"):
        tracker.verify_reference("a", count=1)
    assert tracker.references() == ["a"]
    assert ls(state_dir) == ["a.ref", INDEX_NAME]  # no temporary files left behind


def test_a_regular_file_is_never_read_or_written(tmp_path: Path) -> None:
    f = tmp_path / "not-a-device"
    f.write_bytes(b"\0" * 2 * MiB)
    tracker = ScanTracker(f, tmp_path / "state", 64 * KiB)
    with pytest.raises(NotABlockDevice, match="regular file"):
        tracker.add_reference("a")
    assert tracker.references() == []
    assert tracker.state().is_exact  # nothing is claimed
    assert f.read_bytes() == b"\0" * 2 * MiB


# --- check_protectable --------------------------------------------------------------------


def protect(path: str | Path, state_dir: Path, pool: list[str], protected: list[str], **kw) -> None:
    """What protecting a volume does: decide first, create only when allowed."""
    check_protectable(path, pool, protected, **kw)
    ScanTracker(path, state_dir, kw.get("chunk_size", 64 * KiB))


@pytest.fixture
def read_only(loopdev) -> Iterator[str]:
    dev = loopdev(4 * MiB)
    subprocess.run(["blockdev", "--setro", dev], check=True, timeout=30)
    try:
        yield dev
    finally:
        subprocess.run(["blockdev", "--setrw", dev], check=True, timeout=30)


def test_protectable_device_passes(loopdev, state_dir: Path) -> None:
    dev = loopdev(4 * MiB)
    assert check_protectable(dev, [loopdev(4 * MiB)], [loopdev(4 * MiB)]) == 4 * MiB
    assert check_protectable(dev, [], [], chunk_size=4 * MiB) == 4 * MiB


def test_protect_refusals_name_the_problem_and_create_nothing(
    loopdev, read_only: str, state_dir: Path, tmp_path: Path
) -> None:
    vol, pool_disk = loopdev(4 * MiB), loopdev(4 * MiB)
    alias = tmp_path / "by-id-alias"
    alias.symlink_to(vol)
    regular = tmp_path / "disk.img"
    regular.write_bytes(b"\0" * 2 * MiB)
    cases = [
        (regular, [], [], {}, NotABlockDevice, "disk.img is not a block device (it is a regular"),
        (tmp_path / "gone", [], [], {}, NotABlockDevice, "gone is not a block device"),
        (tmp_path, [], [], {}, NotABlockDevice, "it is a directory"),
        (vol, [], [str(alias)], {}, AlreadyExists, f"protected volume {vol} ({alias}) already"),
        (alias, [pool_disk], [vol], {}, AlreadyExists, "already exists"),
        (pool_disk, [pool_disk], [], {}, PoolDiskRefused, f"it is {pool_disk}, a disk of pool"),
        (read_only, [], [], {}, DeviceReadOnly, f"{read_only} is read-only"),
        (loopdev(512 * KiB), [], [], {}, DeviceTooSmall, "524288 bytes, at least 1048576"),
        (
            loopdev(2 * MiB),
            [],
            [],
            {"chunk_size": 4 * MiB},
            DeviceTooSmall,
            "2097152 bytes, at least 4194304",
        ),
        (vol, [], [], {"chunk_size": 48 * KiB}, InvalidChunkSize, "49152 is not allowed"),
    ]
    before = ls(tmp_path)
    for path, pool, protected, kw, error, message in cases:
        with pytest.raises(error) as caught:
            protect(path, state_dir, pool, protected, **kw)
        assert message in str(caught.value), (path, str(caught.value))
        assert not state_dir.exists()
    assert ls(tmp_path) == before
    assert regular.read_bytes() == b"\0" * 2 * MiB


# --- throughput -----------------------------------------------------------------------------


def test_full_scan_uses_large_reads_near_device_speed(
    loopdev, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size, read_size = 128 * MiB, 8 * MiB
    vol = loopdev(size, direct_io=True)
    with BlockDevice(vol, write=True) as dev:
        block = os.urandom(8 * MiB)
        for off in range(0, size, len(block)):
            dev.pwrite_all(block[:8] + os.urandom(8) + block[16:], off)
        dev.flush()

    def raw_read() -> float:
        buf = aligned_buffer(read_size)
        t0 = time.monotonic()
        with BlockDevice(vol, direct=True) as dev:
            for off in range(0, size, read_size):
                assert dev.pread_into(memoryview(buf), off) == read_size
        return size / 1e6 / (time.monotonic() - t0)

    tracker = ScanTracker(vol, state_dir, 64 * KiB, read_size=read_size)
    tracker.add_reference("last")
    calls = []
    real_preadv = os.preadv

    def counting_preadv(fd: int, buffers: list, offset: int) -> int:
        calls.append(offset)
        return real_preadv(fd, buffers, offset)

    def timed_scan() -> float:
        t0 = time.monotonic()
        assert len(tracker.changed("last")) == 0
        return size / 1e6 / (time.monotonic() - t0)

    monkeypatch.setattr(os, "preadv", counting_preadv)
    timed_scan()
    monkeypatch.undo()
    assert len(calls) == size // read_size  # one read per 8 MiB, not one per chunk
    # best of three, interleaved: the machine is shared and its speed drifts
    raw = max(raw_read() for _ in range(3))
    scan = max(timed_scan() for _ in range(3))
    print(
        f"\nO_DIRECT read {raw:.0f} MB/s; scan (read + xxh3-128 + compare) {scan:.0f} MB/s "
        f"({scan / raw:.0%} of the raw read)"
    )


def test_an_interrupted_write_leaves_the_old_state(loopdev, state_dir: Path) -> None:
    vol = Volume(loopdev(2 * MiB), 2 * MiB, random.Random(19))
    tracker = ScanTracker(vol.path, state_dir, 64 * KiB)
    tracker.add_reference("a")
    vol.write(0, bytes([vol.image[0] ^ 1]))
    # what a crash between "write tmp" and "rename" leaves behind
    (state_dir / ".a.ref.tmp-1-deadbeef").write_bytes(b"half a hash file")
    (state_dir / f".{INDEX_NAME}.tmp-1-deadbeef").write_bytes(b"{")
    again = ScanTracker(vol.path, state_dir, 64 * KiB)
    assert ls(state_dir) == ["a.ref", INDEX_NAME]
    assert again.state().is_exact
    assert list(again.changed("a")) == [0]


def test_a_scan_abandoned_midway_frees_its_buffers(loopdev) -> None:
    from blockguard.storage.tracking.scan import _digest_blocks

    dev = loopdev(4 * MiB)
    with BlockDevice(dev, direct=True) as bd:
        blocks = _digest_blocks(bd, 64 * KiB, 1 * MiB)
        first, digests = next(blocks)
        assert first == 0 and len(digests) == 16 * 16
        blocks.close()  # must not raise BufferError for the block read ahead
