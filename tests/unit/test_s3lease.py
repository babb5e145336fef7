"""Writer leases on an in-memory object store whose clock a test moves (the fault: a
writer that could not renew for longer than its timeout): its commit fails with
LeaseLost and stores no manifest, its lease is gone afterwards, and the next backup
commits; a lease is sealed and names its writer (one that does not open counts as
started at the beginning of time, never as expired early). The sweep's side is
tests/host/test_s3_lease.py, on a real store."""

from __future__ import annotations

import array
import os
from datetime import UTC, datetime, timedelta

import pytest
import xxhash

from blockguard.core.vocab import GenerationKind
from blockguard.errors import LeaseLost
from blockguard.storage.manifest import VolumeIdentity
from blockguard.storage.pool.base import GenerationSpec
from blockguard.storage.pool.s3pool import SNAPSHOT_PREFIX, S3Pool
from blockguard.storage.remote.keys import MasterKey
from blockguard.storage.remote.s3lease import LEASE_PREFIX, read_leases
from tests.unit.test_s3chunks import CHUNK, MemoryStore, backup, read_back


class MovableClockStore(MemoryStore):
    """A store whose clock runs ``ahead`` seconds of this host's."""

    ahead = 0.0

    def put(self, key: str, data: bytes) -> None:
        super().put(key, data)
        self.modified[key] = datetime.now(tz=UTC) + timedelta(seconds=self.ahead)


def sums_of(data: bytes) -> array.array[int]:
    return array.array(
        "Q", [xxhash.xxh3_64_intdigest(data[o : o + CHUNK]) for o in range(0, len(data), CHUNK)]
    )


def test_a_writer_whose_lease_lapsed_commits_nothing() -> None:
    store = MovableClockStore()
    key = MasterKey.generate()
    pool = S3Pool("p", store, key, lease_timeout=600)  # type: ignore[arg-type]
    data = os.urandom(4 * CHUNK)
    spec = GenerationSpec(VolumeIdentity("v", len(data), "7:0"), GenerationKind.FULL, CHUNK)
    sums = sums_of(data)
    writer = pool.begin_generation(spec)
    assert [k for k in store.objects if k.startswith(LEASE_PREFIX)]
    writer.write_chunks(0, memoryview(data), list(sums))
    # Eleven minutes pass on the store without a renewal (the link was down).
    store.ahead = 660
    with writer, pytest.raises(LeaseLost) as caught:
        writer.commit(sums)
    assert "not renewed for" in str(caught.value) and "nothing was committed" in str(caught.value)
    assert not [k for k in store.objects if k.startswith(SNAPSHOT_PREFIX)]
    assert not [k for k in store.objects if k.startswith(LEASE_PREFIX)]
    assert pool.generations("v") == []
    # The next run commits (its chunks go up again if a collection took them).
    gid = backup(pool, "v", data)
    assert read_back(pool, "v", gid) == data


def test_leases_are_sealed_and_report_their_writer() -> None:
    store = MemoryStore()
    key = MasterKey.generate()
    pool = S3Pool("p", store, key, client="hosta", lease_timeout=30)  # type: ignore[arg-type]
    data = os.urandom(2 * CHUNK)
    spec = GenerationSpec(VolumeIdentity("v", len(data), "7:0"), GenerationKind.FULL, CHUNK)
    with pool.begin_generation(spec) as writer:
        (found,) = read_leases(store, key.blob_key(), 600)  # type: ignore[arg-type]
        assert found.client == "hosta" and found.timeout == 30 and found.started is not None
        assert found.name.startswith(key.host_id("hosta") + "/")
        # Another key (or the store changing it) does not open it: its start is unknown.
        (other,) = read_leases(store, MasterKey.generate().blob_key(), 600)  # type: ignore[arg-type]
        assert other.started is None and other.timeout == 600
        writer.abort()
    assert read_leases(store, key.blob_key(), 600) == []  # type: ignore[arg-type]
