"""S3Pool's chunk layer on an in-memory object store (no cluster, no device): equal
chunks are stored once and read back; the store holds no plaintext and no plain hash;
an index object that does not open counts as absent (its chunks are stored again);
a manifest sealed for another generation is reported damaged; two hosts with a volume
of one name share its chunks but not its chain; a pack upload that fails
(in the writer's upload thread) fails the generation and commits nothing."""

from __future__ import annotations

import array
import hashlib
import os
import time
from datetime import UTC, datetime, timedelta

import pytest
import xxhash

from blockguard.core.vocab import GenerationKind
from blockguard.errors import StoreFailed
from blockguard.storage.manifest import VolumeIdentity
from blockguard.storage.pool.base import GenerationSpec, PoolScan
from blockguard.storage.pool.s3pool import S3Pool
from blockguard.storage.remote.keys import MasterKey
from blockguard.storage.remote.objstore import ObjectInfo
from blockguard.storage.remote.s3chunks import DATA_PREFIX, INDEX_PREFIX, PACK_BYTES
from blockguard.storage.remote.s3gc import sweep

CHUNK = 64 << 10


class MemoryStore:
    """The part of ObjectStore the pool uses, in a dict."""

    target = "mem"
    endpoint = "http://mem"
    bucket = "b"
    prefix = "p"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        #: Last-Modified of each object: the store's clock (leases and marks read it).
        self.modified: dict[str, datetime] = {}

    def put(self, key: str, data: bytes) -> None:
        self.objects[key] = bytes(data)
        self.modified[key] = datetime.now(tz=UTC)

    def get(self, key: str) -> bytes:
        return self.objects[key]

    def head(self, key: str) -> ObjectInfo:
        return ObjectInfo(key, len(self.objects[key]), None, self.modified[key])

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        return [
            ObjectInfo(k, len(v), None, self.modified.get(k))
            for k, v in sorted(self.objects.items())
            if k.startswith(prefix)
        ]

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)
        self.modified.pop(key, None)


def backup(pool: S3Pool, name: str, data: bytes) -> str:
    spec = GenerationSpec(VolumeIdentity(name, len(data), "7:0"), GenerationKind.FULL, CHUNK)
    writer = pool.begin_generation(spec)
    sums = array.array(
        "Q", [xxhash.xxh3_64_intdigest(data[o : o + CHUNK]) for o in range(0, len(data), CHUNK)]
    )
    with writer:
        writer.write_chunks(0, memoryview(data), list(sums))
        return writer.commit(sums).generation_id


def read_back(pool: S3Pool, name: str, gid: str) -> bytes:
    manifest = pool.manifest(name, gid)
    out = bytearray(manifest.volume.size)
    with pool.open_generation(manifest) as reader:
        reader.read_chunks(0, memoryview(out))
        assert list(reader.checksums()) == [
            xxhash.xxh3_64_intdigest(out[o : o + CHUNK]) for o in range(0, len(out), CHUNK)
        ]
    return bytes(out)


def test_equal_chunks_are_stored_once_and_read_back() -> None:
    store = MemoryStore()
    key = MasterKey.generate()
    pool = S3Pool("p", store, key)  # type: ignore[arg-type]
    a, b = os.urandom(CHUNK), os.urandom(CHUNK - 512)  # the volume's last chunk is short
    data = a * 5 + b
    gid = backup(pool, "v", data)
    assert pool.last_writer is not None and pool.last_writer.reused == 4
    assert read_back(pool, "v", gid) == data
    packs = [k for k in store.objects if k.startswith(DATA_PREFIX)]
    assert len(packs) == 1
    stored = b"".join(store.objects.values())
    assert a[:64] not in stored and b[:64] not in stored
    assert (
        hashlib.sha256(a).digest() not in stored
        and hashlib.sha256(a).hexdigest().encode() not in stored
    )
    # The same content under another name: nothing new is stored.
    before = dict(store.objects)
    gid2 = backup(pool, "w", data)
    assert pool.last_writer.packs == 0
    assert {k for k in store.objects if k not in before} == {
        k for k in store.objects if k.endswith(gid2)
    }
    assert read_back(S3Pool("p", store, key), "w", gid2) == data  # type: ignore[arg-type]


def test_an_index_that_does_not_open_counts_as_absent() -> None:
    store = MemoryStore()
    key = MasterKey.generate()
    pool = S3Pool("p", store, key)  # type: ignore[arg-type]
    data = os.urandom(3 * CHUNK)
    backup(pool, "v", data)
    (index,) = [k for k in store.objects if k.startswith(INDEX_PREFIX)]
    store.objects[index] = store.objects[index][:-1] + bytes([store.objects[index][-1] ^ 1])
    other = S3Pool("p", store, key)  # type: ignore[arg-type]
    gid = backup(other, "v", data)
    assert other.last_writer is not None and other.last_writer.packs == 1
    assert read_back(other, "v", gid) == data


def test_a_manifest_of_another_key_is_damaged_not_dropped() -> None:
    store = MemoryStore()
    backup(S3Pool("p", store, MasterKey.generate()), "v", os.urandom(CHUNK))  # type: ignore[arg-type]
    other = S3Pool("p", store, MasterKey.generate())  # type: ignore[arg-type]
    # Its host id is another: it is none of this host's, and every host's scan (the
    # garbage collection's) reports it damaged.
    assert other.scan() == PoolScan([], [])
    found = other.scan(every_host=True)
    assert found.manifests == []
    assert len(found.damaged) == 1
    assert "does not open" in found.damaged[0].reason


def test_two_hosts_with_one_volume_name_share_chunks_not_chains() -> None:
    store = MemoryStore()
    key = MasterKey.generate()
    host_a = S3Pool("p", store, key, client="hosta")  # type: ignore[arg-type]
    host_b = S3Pool("p", store, key, client="hostb")  # type: ignore[arg-type]
    data = os.urandom(4 * CHUNK)
    gid_a = backup(host_a, "web1", data)
    gid_b = backup(host_b, "web1", data)
    # The chunks are shared: host B stored its manifest only.
    assert host_b.last_writer is not None and host_b.last_writer.packs == 0
    assert [m.generation_id for m in host_a.generations("web1")] == [gid_a]
    assert [m.generation_id for m in host_b.generations("web1")] == [gid_b]
    everyone = host_a.scan(every_host=True)
    assert sorted(m.generation_id for m in everyone.manifests) == sorted([gid_a, gid_b])
    # Host A's retention removes its own generation; host B's is there, whole.
    host_a.remove_generation("web1", gid_a)
    assert host_a.generations("web1") == []
    fresh_b = S3Pool("p", store, key, client="hostb")  # type: ignore[arg-type]
    assert read_back(fresh_b, "web1", gid_b) == data
    # Nothing of the shared packs is collectable: host B's chain references them.
    swept = sweep(host_a, timedelta(0), now=time.time() + 3600)
    assert swept.marked == () and swept.deleted == ()
    # A manifest moved into another host's place does not open there.
    (key_b,) = [k for k in store.objects if k.endswith(gid_b)]
    host_a_place = key_b.replace(key.host_id("hostb"), key.host_id("hosta"))
    store.objects[host_a_place] = store.objects[key_b]
    moved = S3Pool("p", store, key, client="hosta").scan()  # type: ignore[arg-type]
    assert moved.manifests == [] and len(moved.damaged) == 1


class FailingStore(MemoryStore):
    """A store whose ``fail_at``-th pack PUT fails as a volume server's fault would."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at
        self.pack_puts = 0

    def put(self, key: str, data: bytes) -> None:
        if key.startswith(DATA_PREFIX):
            self.pack_puts += 1
            if self.pack_puts == self.fail_at:
                raise StoreFailed(target=self.target, op="putting", key=key, detail="HTTP 500")
        super().put(key, data)


def test_a_failed_pack_upload_fails_the_generation_and_commits_nothing() -> None:
    # Packs go up in a worker while the next one fills: the failure of one still
    # reaches the writer, and no manifest names packs that did not land.
    for fail_at in (1, 2, 3):
        store = FailingStore(fail_at)
        pool = S3Pool("p", store, MasterKey.generate())  # type: ignore[arg-type]
        data = os.urandom(3 * PACK_BYTES)  # three full packs
        with pytest.raises(StoreFailed):
            backup(pool, "v", data)
        assert not [k for k in store.objects if k.startswith("snapshots/")], fail_at
        assert pool.generations("v") == []
    # And without a fault, the same backup commits every pack before its manifest.
    store = FailingStore(0)
    pool = S3Pool("p", store, MasterKey.generate())  # type: ignore[arg-type]
    data = os.urandom(3 * PACK_BYTES + CHUNK)
    gid = backup(pool, "v", data)
    assert store.pack_puts == 4 and pool.last_writer is not None
    assert (pool.last_writer.packs, pool.last_writer.reused) == (4, 0)
    assert read_back(pool, "v", gid) == data
