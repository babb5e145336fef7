"""Writer leases against a real SeaweedFS cluster (docs/design/s3.md, "Garbage collection
with several writers"): a backup whose lease is live and older than the grace keeps the
chunks it reused through grace-0 sweeps (its lease renewed past its own timeout) and
its generation restores bit-exact afterwards; a lease whose writer was killed expires,
is reported and removed, and no longer holds the collection back."""

from __future__ import annotations

import array
import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import xxhash

from blockguard.core.vocab import GenerationKind
from blockguard.storage.manifest import VolumeIdentity
from blockguard.storage.pool.base import GenerationSpec
from blockguard.storage.pool.s3pool import S3Pool
from blockguard.storage.remote.keys import MasterKey
from blockguard.storage.remote.objstore import Credentials, ObjectStore
from blockguard.storage.remote.s3chunks import DATA_PREFIX
from blockguard.storage.remote.s3gc import sweep
from blockguard.storage.remote.s3lease import LEASE_PREFIX, RENEWALS_PER_TIMEOUT
from tests.support.seaweed import ADMIN, REGION, SeaweedCluster
from tests.timeouts import scaled

pytestmark = pytest.mark.root

MiB = 1 << 20
CHUNK = 64 << 10
SIZE = 24 * MiB  # three 8 MiB packs
BUCKET = "bg-lease"
PREFIX = "fleet"
NO_GRACE = timedelta(0)
REPO = Path(__file__).resolve().parents[2]


def new_store(cluster: SeaweedCluster) -> ObjectStore:
    return ObjectStore(
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


def checksums(data: bytes) -> array.array[int]:
    return array.array(
        "Q", [xxhash.xxh3_64_intdigest(data[o : o + CHUNK]) for o in range(0, len(data), CHUNK)]
    )


def backup(pool: S3Pool, name: str, data: bytes) -> str:
    spec = GenerationSpec(VolumeIdentity(name, len(data), "7:0"), GenerationKind.FULL, CHUNK)
    sums = checksums(data)
    with pool.begin_generation(spec) as writer:
        writer.write_chunks(0, memoryview(data), list(sums))
        return writer.commit(sums).generation_id


def read_back(pool: S3Pool, name: str, gid: str) -> bytes:
    manifest = pool.manifest(name, gid)
    out = bytearray(manifest.volume.size)
    with pool.open_generation(manifest) as reader:
        reader.read_chunks(0, memoryview(out))
        assert list(reader.checksums()) == list(checksums(bytes(out)))
    return bytes(out)


def packs(pool: S3Pool) -> set[str]:
    return {info.key for info in pool.store.list(DATA_PREFIX)}


def test_a_live_lease_older_than_the_grace_keeps_what_its_writer_reused(
    bucket: SeaweedCluster,
) -> None:
    key = MasterKey.generate()
    data = random.Random(7).randbytes(SIZE)
    host_a = S3Pool("fleet", new_store(bucket), key, client="hosta")
    old = backup(host_a, "db", data)
    stored = packs(host_a)
    assert len(stored) == 3

    # Host B's long backup: it takes its lease, reads the index and reuses every chunk
    # of host A's generation, then goes on for longer than its lease timeout.
    timeout = scaled(4)
    host_b = S3Pool("fleet", new_store(bucket), key, client="hostb", lease_timeout=timeout)
    spec = GenerationSpec(VolumeIdentity("db", SIZE, "7:1"), GenerationKind.FULL, CHUNK)
    sums = checksums(data)
    writer = host_b.begin_generation(spec)
    assert writer.lease is not None
    writer.write_chunks(0, memoryview(data), list(sums))
    assert writer.reused == SIZE // CHUNK

    # Host A's retention frees its generation: no manifest references the packs now.
    host_a.remove_generation("db", old)
    first = sweep(host_a, NO_GRACE)
    assert len(first.marked) == 3 and first.deleted == ()
    # The lease outlives its own timeout because it is renewed (waited for by count).
    renewals = writer.lease.renewals
    deadline = time.monotonic() + scaled(120)
    while writer.lease.renewals < renewals + RENEWALS_PER_TIMEOUT + 1:
        assert time.monotonic() < deadline, "the lease was not renewed"
        time.sleep(0.2)
    # Grace 0, the mark is old enough: without the lease these sweeps delete the packs.
    for _ in range(2):
        held = sweep(host_a, NO_GRACE)
        assert held.deleted == ()
        assert len(held.held) == 1 and held.leases >= 1 and held.expired == ()
    assert packs(host_a) == stored

    gid = writer.commit(sums).generation_id
    assert host_a.store.list(LEASE_PREFIX) == []  # released after the manifest
    after = sweep(host_a, NO_GRACE)
    # Referenced again by host B's manifest: spared, nothing deleted.
    assert after.deleted == () and sorted(after.spared) == sorted(first.marked)
    assert packs(host_a) == stored
    fresh = S3Pool("fleet", new_store(bucket), key, client="hostb")
    assert read_back(fresh, "db", gid) == data


HOLDER = """
import json, sys, time
from blockguard.storage.remote.keys import MasterKey
from blockguard.storage.remote.objstore import Credentials, ObjectStore
from blockguard.storage.remote.s3lease import WriterLease
cfg = json.loads(sys.stdin.readline())
store = ObjectStore(target="s3t", endpoint=cfg["endpoint"], bucket=cfg["bucket"],
    prefix=cfg["prefix"], credentials=Credentials(cfg["access"], cfg["secret"]),
    region=cfg["region"])
key = MasterKey(bytes.fromhex(cfg["key"]))
lease = WriterLease(store, key.blob_key(), key.host_id("crashed"), "crashed", cfg["timeout"])
lease.acquire()
print("held", flush=True)
time.sleep(3600)
"""


def test_a_killed_writers_lease_expires_and_stops_holding_the_collection(
    bucket: SeaweedCluster,
) -> None:
    key = MasterKey.generate()
    host_a = S3Pool("fleet", new_store(bucket), key, client="hosta")
    gid = backup(host_a, "db", random.Random(8).randbytes(SIZE))
    stored = packs(host_a)
    timeout = scaled(3)
    cfg = {
        "endpoint": bucket.endpoint,
        "bucket": BUCKET,
        "prefix": PREFIX,
        "access": ADMIN.access_key,
        "secret": ADMIN.secret_key,
        "region": REGION,
        "key": key.raw().hex(),
        "timeout": timeout,
    }
    # A writer in its own process (another host's backup) takes a lease and is killed.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.write(json.dumps(cfg) + "\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "held"
        host_a.remove_generation("db", gid)
        first = sweep(host_a, NO_GRACE)
        assert len(first.marked) == 3
        held = sweep(host_a, NO_GRACE)
        assert held.deleted == () and len(held.held) == 1 and held.leases == 1
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # Not renewed any more: once its timeout passed (the store's clock), a sweep reports
    # it, removes it and deletes what it held back. Waited for, not timed.
    deadline = time.monotonic() + scaled(120)
    while True:
        swept = sweep(host_a, NO_GRACE)
        if swept.expired:
            break
        assert swept.deleted == (), "deleted while the lease was live"
        assert time.monotonic() < deadline, "the lease never expired"
        time.sleep(0.5)
    assert len(swept.expired) == 1 and swept.expired[0].startswith("crashed ")
    assert sorted(swept.deleted) == sorted(first.marked)
    assert packs(host_a) == set() and stored
    assert host_a.store.list(LEASE_PREFIX) == []
