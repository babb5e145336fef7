"""S3Pool (blockguard/storage/pool/s3pool.py) through the storage layer's own backup and
restore, against a real SeaweedFS cluster: a full and two incrementals restore bit-exact;
another "host" (another pool object with the same key, the same bucket and prefix) backs
up an identical volume uploading < 5 % of it; a third, fresh one with only the key
restores everything bit-exact; a tampered pack is a named TamperedPack; a volume server
killed in the middle of backups gives named errors or successes, and every committed
generation restores afterwards."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import pytest
from pyroaring import BitMap

from blockguard.core.vocab import GenerationKind
from blockguard.errors import BlockguardError, StoreFailed, TamperedPack
from blockguard.storage.backup import run_backup
from blockguard.storage.manifest import VolumeIdentity
from blockguard.storage.pool.s3pool import S3Pool
from blockguard.storage.remote.keys import MasterKey
from blockguard.storage.remote.objstore import Credentials, ObjectStore
from blockguard.storage.remote.s3chunks import DATA_PREFIX, pack_key, slots_of
from blockguard.storage.remote.s3gc import SweepResult, sweep
from blockguard.storage.restore import restore_to_device
from tests.support.seaweed import ADMIN, REGION, SeaweedCluster
from tests.timeouts import scaled

pytestmark = pytest.mark.root

MiB = 1 << 20
CHUNK = 64 << 10
SIZE = 24 * MiB
BUCKET = "bg-s3pool"
PREFIX = "fleet"


class CountingStore(ObjectStore):
    """An ObjectStore that counts the bytes of every PUT (what crossed to the store)."""

    put_bytes = 0

    def put(self, key: str, data: bytes) -> str | None:
        etag = super().put(key, data)
        self.put_bytes += len(data)
        return etag


def new_store(cluster: SeaweedCluster) -> CountingStore:
    return CountingStore(
        target="s3t",
        endpoint=cluster.endpoint,
        bucket=BUCKET,
        prefix=PREFIX,
        credentials=Credentials(ADMIN.access_key, ADMIN.secret_key),
        region=REGION,
        timeout=scaled(30),
        retries=1,
    )


@pytest.fixture
def bucket(seaweed: SeaweedCluster) -> SeaweedCluster:
    seaweed.client().create_bucket(Bucket=BUCKET)  # type: ignore[attr-defined]
    return seaweed


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(SIZE)).hexdigest()


def copy_to(snap: str, data: bytes) -> None:
    with open(snap, "r+b") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def history_of(
    loopdev: Callable[..., str], pool: S3Pool, name: str, seed: int
) -> tuple[list[tuple[str, str]], bytes]:
    """A full and two incrementals of a volume of random data (nothing compresses);
    returns ``(generation id, sha256)`` of each and the volume's last content."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(SIZE))
    snap = loopdev(SIZE, f"{name}-snap.img")
    ident = VolumeIdentity(name, SIZE, "7:0")
    history: list[tuple[str, str]] = []
    parent = None
    changed = BitMap()
    for kind in ("full", "incremental", "incremental"):
        if parent is not None:
            changed = BitMap()
            for _ in range(40):
                off = rng.randrange(SIZE // 4096) * 4096
                data[off : off + 4096] = rng.randbytes(4096)
                changed.add(off // CHUNK)
        copy_to(snap, bytes(data))
        result = run_backup(
            pool,
            ident,
            snap,
            GenerationKind(kind),
            changed if parent else None,
            chunk_size=CHUNK,
            parent_id=parent,
        )
        parent = result.manifest.generation_id
        history.append((parent, sha256_of(snap)))
    return history, bytes(data)


def restores(
    loopdev: Callable[..., str], pool: S3Pool, volume: str, history: list[tuple[str, str]]
) -> None:
    for n, (gid, sha) in enumerate(history):
        target = loopdev(SIZE, f"restore-{volume}-{n}-{id(pool)}.img")
        restore_to_device(pool, volume, gid, target)
        assert sha256_of(target) == sha, f"generation {gid} of {volume} restored wrong"


def test_backup_dedup_across_hosts_and_restore_on_a_fresh_host(
    loopdev: Callable[..., str], bucket: SeaweedCluster
) -> None:
    key = MasterKey.generate()
    host1 = S3Pool("fleet", new_store(bucket), key)
    history1, last = history_of(loopdev, host1, "db", seed=12)
    assert [m.generation_id for m in host1.generations("db")] == [g for g, _ in history1]
    restores(loopdev, host1, "db", history1)
    # The incrementals stored only their changed chunks' packs: under 2 chunks each per
    # changed 4 KiB (random data: no compression), far below a full.
    sent_by_host1 = host1.store.put_bytes  # type: ignore[attr-defined]
    assert SIZE <= sent_by_host1 < SIZE + 2 * 80 * CHUNK + MiB

    # Another host, the same key and bucket: a full of an identical volume is deduped.
    store2 = new_store(bucket)
    host2 = S3Pool("fleet", store2, key)
    snap = loopdev(SIZE, "db2-snap.img")
    copy_to(snap, last)
    result = run_backup(
        host2, VolumeIdentity("db2", SIZE, "7:1"), snap, GenerationKind.FULL, None, chunk_size=CHUNK
    )
    print(f"host 2's full of an identical volume put {store2.put_bytes} bytes of {SIZE}")
    assert store2.put_bytes < SIZE * 0.05
    assert host2.last_writer is not None and host2.last_writer.packs == 0
    history2 = [(result.manifest.generation_id, sha256_of(snap))]

    # A third, fresh host with only the key: every generation of both restores.
    host3 = S3Pool("fleet", new_store(bucket), key)
    assert host3.volumes() == ["db", "db2"]
    restores(loopdev, host3, "db", history1)
    restores(loopdev, host3, "db2", history2)
    # Another key sees the same bucket as damaged generations, never as good ones.
    stranger = S3Pool("fleet", new_store(bucket), MasterKey.generate())
    found = stranger.scan(every_host=True)
    assert found.manifests == [] and len(found.damaged) == 4


def test_a_tampered_pack_is_named_on_restore(
    loopdev: Callable[..., str], bucket: SeaweedCluster
) -> None:
    key = MasterKey.generate()
    pool = S3Pool("fleet", new_store(bucket), key)
    history, _ = history_of(loopdev, pool, "db", seed=5)
    client = bucket.client()
    full = history[0][0]
    # The pack of the full's first chunk (random ids: not the first one listed).
    first_chunk = slots_of(pool.manifest("db", full))[0][0]
    place = pool.index.get(first_chunk)
    assert place is not None
    raw = f"{PREFIX}/{pack_key(place.pack_id)}"
    body = bytearray(client.get_object(Bucket=BUCKET, Key=raw)["Body"].read())  # type: ignore[attr-defined]
    body[len(body) // 2] ^= 0x01
    client.put_object(Bucket=BUCKET, Key=raw, Body=bytes(body))  # type: ignore[attr-defined]
    fresh = S3Pool("fleet", new_store(bucket), key)
    with pytest.raises(
        TamperedPack, match=f"pack {place.pack_id} of generation {full} failed its authentication"
    ):
        restore_to_device(fresh, "db", full, loopdev(SIZE, "restore.img"))


def test_a_volume_server_killed_during_backups(
    loopdev: Callable[..., str], bucket: SeaweedCluster
) -> None:
    key = MasterKey.generate()
    pool = S3Pool("fleet", new_store(bucket), key)
    snap = loopdev(SIZE, "snap.img")
    ident = VolumeIdentity("db", SIZE, "7:0")
    committed: list[tuple[str, str]] = []
    failures: list[BaseException] = []
    started = threading.Event()

    def backups() -> None:
        rng = random.Random(7)
        for _ in range(6):
            copy_to(snap, rng.randbytes(SIZE))
            try:
                result = run_backup(pool, ident, snap, GenerationKind.FULL, None, chunk_size=CHUNK)
            except BaseException as exc:  # an unnamed error fails the test below
                failures.append(exc)
            else:
                committed.append((result.manifest.generation_id, sha256_of(snap)))
            started.set()

    worker = threading.Thread(target=backups)
    worker.start()
    assert started.wait(scaled(300)), "the first backup did not end"
    killed = bucket.kill_volume_server(0)
    worker.join(scaled(900))
    assert not worker.is_alive()
    assert [f for f in failures if not isinstance(f, BlockguardError)] == []
    print(f"{len(committed)} committed, {len(failures)} failed: {failures[:3]}")
    assert committed
    bucket.restart(killed)
    fresh = S3Pool("fleet", new_store(bucket), key)
    # A manifest whose PUT failed after the store kept it may be listed too; every
    # committed one must be.
    listed = {m.generation_id for m in fresh.generations("db")}
    assert {g for g, _ in committed} <= listed
    deadline = time.monotonic() + scaled(120)
    for n, (gid, sha) in enumerate(committed):
        target = loopdev(SIZE, f"restore{n}.img")
        while True:
            try:
                restore_to_device(fresh, "db", gid, target)
                break
            except StoreFailed:
                # The master learns of the restarted server's volumes by its heartbeat.
                assert time.monotonic() < deadline, f"{gid} unreadable after the restart"
                time.sleep(0.5)
        assert sha256_of(target) == sha, f"generation {gid} restored wrong"


def test_gc_deletes_only_packs_unreferenced_since_a_grace_period(
    loopdev: Callable[..., str], bucket: SeaweedCluster
) -> None:
    """Two-phase sweep (grace 0 here): a removed generation's packs are marked by one
    sweep and deleted by the next; a backup between the two that holds the same chunks
    stores them again (marked packs are not reused) and restores bit-exact after both;
    the other volume's packs are never touched."""
    key = MasterKey.generate()
    pool = S3Pool("fleet", new_store(bucket), key)
    ident_a, ident_b = VolumeIdentity("a", SIZE, "7:0"), VolumeIdentity("b", SIZE, "7:1")
    data_a, data_b = random.Random(1).randbytes(SIZE), random.Random(2).randbytes(SIZE)
    snap = loopdev(SIZE, "snap.img")
    copy_to(snap, data_a)
    old_a = run_backup(pool, ident_a, snap, GenerationKind.FULL, None, chunk_size=CHUNK)
    copy_to(snap, data_b)
    gen_b = run_backup(pool, ident_b, snap, GenerationKind.FULL, None, chunk_size=CHUNK)
    sha_b = sha256_of(snap)
    packs_before = {o.key for o in pool.store.list(DATA_PREFIX)}
    pool.remove_generation("a", old_a.manifest.generation_id)

    first = sweep(pool, timedelta(0))
    assert first.deleted == () and len(first.marked) == 3  # 24 MiB in 8 MiB packs
    assert {o.key for o in pool.store.list(DATA_PREFIX)} == packs_before

    # Another host backs up a's content again between the sweeps: it does not reuse
    # the marked packs.
    other = S3Pool("fleet", new_store(bucket), key)
    copy_to(snap, data_a)
    new_a = run_backup(other, ident_a, snap, GenerationKind.FULL, None, chunk_size=CHUNK)
    sha_a = sha256_of(snap)
    assert other.last_writer is not None and other.last_writer.packs == 3

    second = sweep(pool, timedelta(0))
    # The marked packs' chunks are referenced again (by chunk id): spared, not lost.
    assert second.deleted == () and len(second.spared) == 3
    target = loopdev(SIZE, "restore-a.img")
    restore_to_device(
        S3Pool("fleet", new_store(bucket), key), "a", new_a.manifest.generation_id, target
    )
    assert sha256_of(target) == sha_a
    # Remove the new generation too: now the old and new packs of a go, b's stay.
    other.remove_generation("a", new_a.manifest.generation_id)
    sweep(pool, timedelta(0))
    third = sweep(pool, timedelta(0))
    assert len(third.deleted) == 6
    left = {o.key for o in pool.store.list(DATA_PREFIX)}
    assert len(left) == 3 and left < packs_before
    # A long grace spares everything young.
    assert sweep(pool, timedelta(days=1)) == SweepResult((), (), ())
    for host in (pool, S3Pool("fleet", new_store(bucket), key)):
        target = loopdev(SIZE, f"restore-b-{id(host)}.img")
        restore_to_device(host, "b", gen_b.manifest.generation_id, target)
        assert sha256_of(target) == sha_b
