"""A restore drill on a real dir pool over loop devices: samples of each shape and mode,
nothing left behind, nothing written outside the pool."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockguard.errors import PoolDiskRefused
from blockguard.storage.drill import DEFAULT_SHAPES, DRILL_VOLUME, run_drill
from blockguard.storage.pool.dirpool import SCRATCH_FILE, DirPool
from blockguard.storage.runner import default_runner
from blockguard.storage.safety import SafetyGate

MiB = 1 << 20


@pytest.fixture
def pool(loopdev, tmp_path: Path) -> Iterator[DirPool]:
    p = DirPool.create("drillpool", loopdev(512 * MiB, "pool.img"), tmp_path / "mnt")
    try:
        yield p
    finally:
        p.close()


def _sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            h.update(block)
    return h.hexdigest()


def _drill_loops() -> list[str]:
    """Attached loop devices whose backing file is a drill scratch image."""
    found = []
    for entry in Path("/sys/block").iterdir():
        backing = entry / "loop" / "backing_file"
        if entry.name.startswith("loop") and backing.exists() and "@drill" in backing.read_text():
            found.append(entry.name)
    return found


def test_drill_records_every_shape_and_mode_and_leaves_nothing(loopdev, pool: DirPool) -> None:
    # A bystander: a protected volume's device, with data, that the drill must not touch.
    bystander = loopdev(16 * MiB, "bystander.img")
    with open(bystander, "r+b") as f:
        f.write(os.urandom(16 * MiB))
    before = _sha(bystander)
    area = Path(pool.devices()[0].area)

    result = run_drill(pool, volume_bytes=8 * MiB, seed=14, repeats=1)

    # One sample per shape and mode, with the shape each restore really had.
    assert len(result.samples) == 2 * len(DEFAULT_SHAPES)
    by = {(s.shape, s.mode): s for s in result.samples}
    for mode in ("copy", "swap-in"):
        assert by["full", mode].generations == 1
        assert by["full", mode].extents == 0
        assert by["full+8", mode].generations == 9
        assert by["full+diff+2", mode].generations == 4
        assert by["full+8", mode].extents > by["full+1", mode].extents > 0
        # The differential holds 10 % of the chunks: the drill's most scattered restore.
        assert by["full+diff+2", mode].extents > by["full+8", mode].extents
        assert by["full", mode].nbytes == 8 * MiB
        assert by["half full", mode].nbytes == 4 * MiB
        assert all(s.seconds > 0 for s in result.samples)
    # 1 % of 128 chunks: one or two chunks per incremental, each its own extent here.
    assert by["full+1", "copy"].extents == by["full+1", "swap-in"].extents
    assert by["full", "copy"].chunks == 128  # a copy writes every chunk
    assert by["full", "swap-in"].chunks == 0  # a swap-in writes only the deltas
    assert result.written  # it did write generations on the pool...

    # ...and removed every one of them, its volume directory, its scratch images and loops.
    assert pool.generations(DRILL_VOLUME) == []
    assert not (area / "volumes" / DRILL_VOLUME).exists()
    assert not list((area / "swapin").glob("@drill*"))
    assert _drill_loops() == []
    assert _sha(bystander) == before


def test_a_copy_drill_writes_no_device(
    loopdev, pool: DirPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copy mode times the restore's read side only: no scratch device is made or written
    (a real copy's target writes come from the target's own speed), and every chunk read
    is still checked against its checksum."""

    def no_scratch(full, label):  # type: ignore[no-untyped-def]
        raise AssertionError("a copy drill asked the pool for a scratch device")

    monkeypatch.setattr(pool, "swap_in", no_scratch)
    result = run_drill(pool, volume_bytes=4 * MiB, modes=("copy",), seed=3)
    assert {s.mode for s in result.samples} == {"copy"}
    assert all(s.nbytes > 0 and s.seconds > 0 for s in result.samples)
    assert pool.generations(DRILL_VOLUME) == []


def test_a_copy_drill_given_scratch_restores_into_it(loopdev, pool: DirPool) -> None:
    """With scratch space, copy mode is a real copy restore into it (reads and writes, as a
    restore to a new device runs): the scratch ends up holding the last shape's data, every
    sample is timed, and nothing of the drill stays in the pool."""
    scratch = loopdev(8 * MiB, "scratch.img")
    with open(scratch, "r+b") as f:
        f.write(b"\0" * (8 * MiB))
    before = _sha(scratch)
    result = run_drill(pool, volume_bytes=4 * MiB, modes=("copy",), seed=3, copy_scratch=scratch)
    assert result.copy_scratch == scratch
    assert {s.mode for s in result.samples} == {"copy"}
    assert all(s.nbytes > 0 and s.seconds > 0 for s in result.samples)
    # The drill's volume is random data: a restore into the scratch changed it.
    with open(scratch, "rb") as f:
        head = f.read(4 * MiB)
    assert head != b"\0" * (4 * MiB)
    assert _sha(scratch) != before
    assert pool.generations(DRILL_VOLUME) == []


def test_pool_scratch_is_written_only_as_the_gate_knows_it(pool: DirPool) -> None:
    """The dir pool's drill scratch (a sparse file on its area, on a loop device) lies on a
    pool disk: the gate refuses it until it is registered as that pool's scratch, and
    refuses it for another pool or the pool disk itself registered so. A drill given the
    registered scratch and the gate restores its copies into it; the scratch is gone
    after release."""
    disk = pool.devices()[0].path
    gate = SafetyGate({}, {disk: pool.name}, default_runner())
    scratch = pool.drill_scratch(8 * MiB)
    try:
        image = Path(scratch.name)
        assert image.parent == Path(pool.devices()[0].area) and image.name == SCRATCH_FILE
        assert os.stat(image).st_blocks == 0  # sparse until written
        with pytest.raises(PoolDiskRefused):
            gate.check_scratch(scratch.device, pool=pool.name, purpose="scratch")
        with pytest.raises(PoolDiskRefused):
            gate.adding(scratch={scratch.device: "other"}).check_scratch(
                scratch.device, pool=pool.name, purpose="scratch"
            )
        with pytest.raises(PoolDiskRefused):
            gate.adding(scratch={disk: pool.name}).check_scratch(
                disk, pool=pool.name, purpose="scratch"
            )
        known = gate.adding(scratch={scratch.device: pool.name})
        known.check_scratch(scratch.device, pool=pool.name, purpose="scratch")
        # Registration is no licence for other writes: a plain restore target is refused.
        with pytest.raises(PoolDiskRefused):
            known.check_writable(scratch.device, purpose="a restore target", force=True)

        result = run_drill(
            pool,
            volume_bytes=4 * MiB,
            modes=("copy",),
            seed=5,
            repeats=1,
            copy_scratch=scratch.device,
            gate=known,
        )
        assert result.copy_scratch == scratch.device and result.copy_write_rate > 0
        assert os.stat(image).st_blocks > 0  # the copies wrote the scratch file
        with pytest.raises(PoolDiskRefused):  # an unregistered scratch stops the drill
            run_drill(pool, volume_bytes=4 * MiB, modes=("copy",), repeats=1,
                      copy_scratch=scratch.device, gate=gate)  # fmt: skip
    finally:
        scratch.release()
    assert not image.exists()
    backing = Path(f"/sys/block/{Path(scratch.device).name}/loop/backing_file")
    assert not backing.exists() or SCRATCH_FILE not in backing.read_text()
    assert not pool.generations(DRILL_VOLUME)
