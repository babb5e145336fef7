"""A dir pool's damaged generations (host, loop devices): reported, never removed; verify of
a whole chain; a backup whose commit fails leaves nothing; failures after it are warnings."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pyroaring import BitMap

from blockguard.errors import ChecksumMismatch, CorruptMetadata, EnvironmentProblem, NotFound
from blockguard.storage import manifest as manifest_mod
from blockguard.storage.backup import run_backup
from blockguard.storage.manifest import MANIFEST_NAME, Manifest, VolumeIdentity
from blockguard.storage.pool.dirpool import DirPool
from blockguard.storage.restore import verify

MiB = 1 << 20
CHUNK = 64 << 10
SIZE = 8 * MiB
VOL = VolumeIdentity("v", SIZE)


@pytest.fixture
def pool(loopdev: Callable[..., str], tmp_path: Path) -> Iterator[DirPool]:
    p = DirPool.create("p", loopdev(512 * MiB, "pool.img"), tmp_path / "root")
    try:
        yield p
    finally:
        p.close()


def write(dev: str, offset: int, nbytes: int, seed: int) -> None:
    fd = os.open(dev, os.O_WRONLY)
    try:
        os.pwrite(fd, random.Random(seed).randbytes(nbytes), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def three(pool: DirPool, dev: str) -> list[Manifest]:
    """A full and two incrementals (chunk 2, then chunk 5)."""
    write(dev, 0, SIZE, 1)
    full = run_backup(pool, VOL, dev, "full", None, chunk_size=CHUNK).manifest
    gens = [full]
    for chunk in (2, 5):
        write(dev, chunk * CHUNK, CHUNK, chunk)
        gens.append(
            run_backup(
                pool, VOL, dev, "incremental", BitMap([chunk]), chunk_size=CHUNK,
                parent_id=gens[-1].generation_id,
            ).manifest
        )  # fmt: skip
    return gens


def gen_dir(pool: DirPool, m: Manifest) -> Path:
    return pool._gen_dir("v", m.generation_id)


DAMAGE: dict[str, Callable[[Path], None]] = {
    "truncated manifest": lambda d: (d / MANIFEST_NAME).write_bytes(
        (d / MANIFEST_NAME).read_bytes()[:80]
    ),
    "bad JSON": lambda d: (d / MANIFEST_NAME).write_text("{not json"),
    "bad manifest digest": lambda d: (d / MANIFEST_NAME).write_text(
        (d / MANIFEST_NAME).read_text().replace('"bytes_stored": ', '"bytes_stored": 1')
    ),
    "missing data file": lambda d: (d / "chunks").unlink(),
    "short checksum array": lambda d: (d / "checksums.xxh3").write_bytes(b"\0" * 4),
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damage_is_reported_with_its_id_and_kept(
    pool: DirPool, loopdev: Callable[..., str], how: str
) -> None:
    gens = three(pool, loopdev(SIZE))
    victim = gen_dir(pool, gens[1])
    DAMAGE[how](victim)
    scan = pool.scan("v")
    assert [m.generation_id for m in scan.manifests] == [
        gens[0].generation_id,
        gens[2].generation_id,
    ]
    assert [d.generation_id for d in scan.damaged] == [gens[1].generation_id]
    assert scan.damaged[0].volume == "v" and scan.damaged[0].reason
    readable = how in ("missing data file", "short checksum array")
    assert (scan.damaged[0].manifest is not None) == readable
    # generations() (what storage code removes and chains from) has every readable one.
    assert len(pool.generations("v")) == (3 if readable else 2)
    pool.collect_garbage()
    assert victim.exists()


def test_verify_chain_names_the_damaged_parent_and_chunk(
    pool: DirPool, loopdev: Callable[..., str]
) -> None:
    gens = three(pool, loopdev(SIZE))
    result = verify(pool, "v", gens[2].generation_id, whole_chain=True)
    assert result.chain == tuple(m.generation_id for m in gens)
    assert result.chunks == SIZE // CHUNK + 2
    packed = gen_dir(pool, gens[1]) / "chunks"
    fd = os.open(packed, os.O_RDWR)
    try:
        os.pwrite(fd, bytes([os.pread(fd, 1, 100)[0] ^ 1]), 100)
        os.fsync(fd)
    finally:
        os.close(fd)
    with pytest.raises(ChecksumMismatch) as info:
        verify(pool, "v", gens[2].generation_id, whole_chain=True)
    assert info.value.fields == {"generation": gens[1].generation_id, "chunk": 2}
    verify(pool, "v", gens[0].generation_id, whole_chain=True)  # the full alone is fine

    (gen_dir(pool, gens[1]) / "checksums.xxh3").write_bytes(b"\0" * 8)
    with pytest.raises(CorruptMetadata) as meta:
        verify(pool, "v", gens[2].generation_id, whole_chain=True)
    assert meta.value.fields["generation"] == gens[1].generation_id


@pytest.mark.parametrize("point", ["before-checksums", "before-manifest", "after-manifest"])
def test_a_failed_commit_leaves_no_generation(
    pool: DirPool, loopdev: Callable[..., str], monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    dev = loopdev(SIZE)
    write(dev, 0, SIZE, 1)
    monkeypatch.setattr(manifest_mod, "_fail_hits", {})
    monkeypatch.setenv("BLOCKGUARD_TEST_FAIL_AT", point)
    with pytest.raises(EnvironmentProblem, match=point):
        run_backup(pool, VOL, dev, "full", None, chunk_size=CHUNK)
    assert pool.generations("v") == [] and pool.scan("v").damaged == []
    volume_dir = Path(pool.devices()[0].area) / "volumes" / "v"
    assert list(volume_dir.iterdir()) == []


def test_retention_failure_after_commit_is_a_warning(
    pool: DirPool, loopdev: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = loopdev(SIZE)
    write(dev, 0, SIZE, 1)

    def broken(volume: str, keep: int) -> None:
        raise NotFound(what="generation", name="x")

    monkeypatch.setattr(pool, "apply_retention", broken)
    result = run_backup(pool, VOL, dev, "full", None, chunk_size=CHUNK, keep=1)
    assert result.retention is None
    assert len(result.warnings) == 1 and "retention failed" in result.warnings[0]
    assert [m.generation_id for m in pool.generations("v")] == [result.manifest.generation_id]


def test_damage_found_on_use_is_recorded_on_the_pool(
    pool: DirPool, loopdev: Callable[..., str], tmp_path: Path
) -> None:
    gens = three(pool, loopdev(SIZE))
    gid = gens[1].generation_id
    assert pool.mark_damaged("v", gid, "chunk 2 does not match its checksum", 2)
    devices = [d.path for d in pool.devices()]
    pool.close()
    reopened = DirPool.open("p", devices, tmp_path / "root")
    try:
        (damaged,) = reopened.scan("v").damaged
        assert (damaged.generation_id, damaged.found_on_use, damaged.chunk) == (gid, True, 2)
        assert damaged.manifest == gens[1]
        assert "chunk 2" in damaged.reason
        reopened.clear_damaged("v", gid)
        assert reopened.scan("v").damaged == []
        assert len(reopened.scan("v").manifests) == 3
    finally:
        reopened.close()
