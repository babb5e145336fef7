"""S3Pool's packs go up several at once (s3upload.py) and come down ahead of the reads
(s3fetch.py), on an in-memory object store whose PUTs and GETs of packs can be held:
the bytes still read back exact, a chunk is still stored once when its first pack is
still on its way, a failed PUT fails the backup before its manifest (and the next
backup stores everything), and a restore fetches each pack once."""

from __future__ import annotations

import os
import threading

import pytest

from blockguard.errors import StoreFailed, TamperedPack
from blockguard.storage.pool.s3pool import S3Pool
from blockguard.storage.remote.keys import MasterKey
from blockguard.storage.remote.s3chunks import DATA_PREFIX, PACK_BYTES, slots_of
from blockguard.storage.remote.s3fetch import FETCH_THREADS
from blockguard.storage.remote.s3upload import UPLOAD_THREADS
from tests.timeouts import scaled
from tests.unit.test_s3chunks import CHUNK, MemoryStore, backup, read_back

PACK_CHUNKS = PACK_BYTES // CHUNK


class HeldStore(MemoryStore):
    """Holds each PUT (or GET) of a pack until ``want`` of them are in flight at once (or
    a long wait passes: the test then fails on the count, not on the time), and keeps the
    most seen in flight."""

    def __init__(self, want_puts: int = 1, want_gets: int = 1) -> None:
        super().__init__()
        self._cond = threading.Condition()
        self._in_flight = {"put": 0, "get": 0}
        self._want = {"put": want_puts, "get": want_gets}
        self.most = {"put": 0, "get": 0}
        self.pack_gets: list[str] = []
        self.fail_put: int | None = None  # the pack PUT (0-based) that fails
        self._pack_puts = 0

    def _hold(self, op: str) -> None:
        with self._cond:
            self._in_flight[op] += 1
            self.most[op] = max(self.most[op], self._in_flight[op])
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._in_flight[op] >= self._want[op], timeout=scaled(20))
            # Released together: the next ones do not wait for the ones gone.
            self._want[op] = 1

    def hold_gets(self, want: int) -> None:
        with self._cond:
            self._want["get"] = want

    def _done(self, op: str) -> None:
        with self._cond:
            self._in_flight[op] -= 1

    def put(self, key: str, data: bytes) -> None:
        if not key.startswith(DATA_PREFIX):
            return super().put(key, data)
        with self._cond:
            number, self._pack_puts = self._pack_puts, self._pack_puts + 1
        self._hold("put")
        try:
            if number == self.fail_put:
                raise StoreFailed(target=self.target, op="storing", key=key, detail="500")
            super().put(key, data)
        finally:
            self._done("put")

    def get(self, key: str) -> bytes:
        if not key.startswith(DATA_PREFIX):
            return super().get(key)
        self.pack_gets.append(key)
        self._hold("get")
        try:
            return super().get(key)
        finally:
            self._done("get")


def indexed_packs(pool: S3Pool) -> dict[str, list[bytes]]:
    pool.index.refresh()
    return pool.index.packs()


def test_packs_go_up_at_once_and_read_back_exact() -> None:
    store = HeldStore(want_puts=UPLOAD_THREADS)
    pool = S3Pool("p", store, MasterKey.generate())  # type: ignore[arg-type]
    data = os.urandom((UPLOAD_THREADS + 1) * PACK_BYTES)
    gid = backup(pool, "v", data)
    assert store.most["put"] == UPLOAD_THREADS
    assert pool.last_writer is not None and pool.last_writer.packs == UPLOAD_THREADS + 1
    assert read_back(pool, "v", gid) == data


def test_a_chunk_whose_pack_is_on_its_way_is_not_stored_again() -> None:
    # Chunk 0 comes again in the second pack while the first pack's PUT is held until
    # the second one's starts: it is referenced, not stored twice.
    store = HeldStore(want_puts=2)
    pool = S3Pool("p", store, MasterKey.generate())  # type: ignore[arg-type]
    chunks = [os.urandom(CHUNK) for _ in range(2 * PACK_CHUNKS)]
    chunks[PACK_CHUNKS + 5] = chunks[0]
    data = b"".join(chunks)
    gid = backup(pool, "v", data)
    assert store.most["put"] == 2
    packs = indexed_packs(pool)
    stored = [cid for ids in packs.values() for cid in ids]
    assert len(packs) == 2
    assert len(stored) == len(set(stored)) == 2 * PACK_CHUNKS - 1
    assert read_back(pool, "v", gid) == data


def test_a_failed_pack_fails_the_backup_before_its_manifest() -> None:
    store = HeldStore()
    store.fail_put = 1
    key = MasterKey.generate()
    pool = S3Pool("p", store, key)  # type: ignore[arg-type]
    data = os.urandom(3 * PACK_BYTES)
    with pytest.raises(StoreFailed, match="storing"):
        backup(pool, "v", data)
    assert pool.generations("v") == []
    assert not [k for k in store.objects if k.startswith("snapshots/")]
    assert not [t for t in threading.enumerate() if t.name.startswith("blockguard-put")]
    # The next run stores what is missing (the failed pack's chunks) and restores exact.
    store.fail_put = None
    again = S3Pool("p", store, key)  # type: ignore[arg-type]
    gid = backup(again, "v", data)
    assert read_back(again, "v", gid) == data


def test_a_restore_fetches_packs_ahead_each_once() -> None:
    store = HeldStore()
    key = MasterKey.generate()
    data = os.urandom(6 * PACK_BYTES)
    gid = backup(S3Pool("p", store, key), "v", data)  # type: ignore[arg-type]
    # Each GET of a pack waits until a second one is on its way: only a read-ahead
    # lets the first read finish.
    store.hold_gets(2)
    fresh = S3Pool("p", store, key)  # type: ignore[arg-type]
    assert read_back(fresh, "v", gid) == data
    assert 2 <= store.most["get"] <= FETCH_THREADS
    assert sorted(store.pack_gets) == sorted(set(store.pack_gets))
    assert len(store.pack_gets) == 6
    assert not [t for t in threading.enumerate() if t.name.startswith("blockguard-get")]


def test_a_tampered_pack_fetched_ahead_is_named_when_read() -> None:
    store = HeldStore()
    key = MasterKey.generate()
    data = os.urandom(3 * PACK_BYTES)
    pool = S3Pool("p", store, key)  # type: ignore[arg-type]
    gid = backup(pool, "v", data)
    # The pack of the last chunk: fetched ahead while the first ones are read.
    ids, _ = slots_of(pool.manifest("v", gid))
    last = pool.index.get(ids[-1])
    assert last is not None
    victim = next(k for k in store.objects if k.endswith(last.pack_id))
    sealed = bytearray(store.objects[victim])
    sealed[-1] ^= 1
    store.objects[victim] = bytes(sealed)
    with pytest.raises(TamperedPack) as caught:
        read_back(S3Pool("p", store, key), "v", gid)  # type: ignore[arg-type]
    assert caught.value.fields["pack"] == last.pack_id
    assert caught.value.fields["generation"] == gid
