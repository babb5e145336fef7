"""A committed local generation copied to a target (issue 11): a full of the first local
generation, then an incremental there that is the union of two local incrementals; each
copy has the local generation's id and restores from the target bit-exact; a damaged
local chunk stops the transfer and nothing is committed there."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroaring import BitMap

from blockguard.core.vocab import GenerationKind
from blockguard.errors import ChecksumMismatch
from blockguard.storage.backup import run_backup
from blockguard.storage.manifest import VolumeIdentity
from blockguard.storage.pool.dirpool import DirPool
from blockguard.storage.pool.remotepool import RemotePool
from blockguard.storage.remote.keys import MasterKey
from blockguard.storage.remote.packstore import PackStore
from blockguard.storage.remote.session import RemoteSession
from blockguard.storage.restore import restore_to_device
from blockguard.storage.transfer import transfer_generation, transfer_spec
from tests.support.remote import local_serve

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
CHUNK = 64 << 10
SIZE = 8 * MiB


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(SIZE)).hexdigest()


@pytest.fixture
def pools(loopdev, tmp_path: Path) -> Iterator[tuple[DirPool, RemotePool]]:
    local = DirPool.create("local", loopdev(400 * MiB, "pool.img"), tmp_path / "mnt")
    area = tmp_path / "area"
    area.mkdir()
    PackStore.create(area, "C1").close()

    def session() -> RemoteSession:
        return local_serve(area)

    remote = RemotePool("offsite", session, MasterKey.generate(), target="t1", area="main")
    try:
        yield local, remote
    finally:
        remote.close()
        local.close()


def test_local_generations_replicate_with_their_ids_and_restore_bit_exact(
    loopdev, pools: tuple[DirPool, RemotePool]
) -> None:
    local, remote = pools
    rng = random.Random(5)
    snap = loopdev(SIZE, "snap.img")
    ident = VolumeIdentity("db", SIZE, "7:0")
    history: list[tuple[str, str, BitMap]] = []
    parent = None
    with open(snap, "r+b") as f:
        f.write(rng.randbytes(SIZE))
    for n in range(3):
        changed = BitMap()
        if n:
            with open(snap, "r+b") as f:
                for _ in range(5):
                    chunk = rng.randrange(SIZE // CHUNK)
                    f.seek(chunk * CHUNK)
                    f.write(rng.randbytes(CHUNK))
                    changed.add(chunk)
        kind = GenerationKind.INCREMENTAL if n else GenerationKind.FULL
        result = run_backup(
            local, ident, snap, kind, changed if n else None, chunk_size=CHUNK, parent_id=parent
        )
        parent = result.manifest.generation_id
        history.append((parent, sha256_of(snap), changed))

    first, _, _ = history[0]
    spec = transfer_spec(remote, local.chain("db", first)[-1], GenerationKind.FULL, None)
    remote.expect_resume(spec, first)
    full = transfer_generation(local, local.chain("db", first), remote, spec)
    assert full.manifest.generation_id == first and full.manifest.is_full

    newest, _, _ = history[-1]
    union = history[1][2] | history[2][2]
    chain = local.chain("db", newest)
    spec = transfer_spec(remote, chain[-1], GenerationKind.INCREMENTAL, union, parent_id=first)
    remote.expect_resume(spec, newest)
    inc = transfer_generation(local, chain, remote, spec)
    assert inc.manifest.generation_id == newest
    assert inc.manifest.changed == union
    assert inc.bytes_copied == len(union) * CHUNK

    assert [m.generation_id for m in remote.generations("db")] == [first, newest]
    for gid, sha in ((first, history[0][1]), (newest, history[-1][1])):
        target = loopdev(SIZE, f"restore-{gid[:8]}.img")
        restore_to_device(remote, "db", gid, target)
        assert sha256_of(target) == sha


def test_a_damaged_local_chunk_stops_the_transfer_and_commits_nothing(
    loopdev, pools: tuple[DirPool, RemotePool]
) -> None:
    local, remote = pools
    snap = loopdev(SIZE, "snap.img")
    with open(snap, "r+b") as f:
        f.write(random.Random(9).randbytes(SIZE))
    made = run_backup(
        local, VolumeIdentity("db", SIZE, "7:0"), snap, "full", None, chunk_size=CHUNK
    )
    gid = made.manifest.generation_id
    data = local._gen_dir("db", gid) / made.manifest.storage["data"]
    with open(data, "r+b") as f:
        f.seek(3 * CHUNK + 100)
        byte = f.read(1)
        f.seek(3 * CHUNK + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    chain = local.chain("db", gid)
    spec = transfer_spec(remote, chain[-1], GenerationKind.FULL, None)
    remote.expect_resume(spec, gid)
    with pytest.raises(ChecksumMismatch):
        transfer_generation(local, chain, remote, spec)
    assert remote.generations("db") == []
