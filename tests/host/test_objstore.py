"""ObjectStore (blockguard/storage/remote/objstore.py) against a real SeaweedFS cluster:
objects round-trip, and each fault the cluster can be made to show comes back as a
named error, with nothing committed lost."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from blockguard.errors import (
    BlockguardError,
    DataError,
    NotAuthorized,
    NotFound,
    StoreFailed,
    TargetUnreachable,
    WireClosed,
)
from blockguard.storage.remote.objstore import MULTIPART_THRESHOLD, Credentials, ObjectStore
from blockguard.storage.remote.s3fetch import FETCH_THREADS
from blockguard.storage.remote.s3upload import UPLOAD_THREADS
from blockguard.storage.remote.storeprobe import measure_store
from tests.support.cutproxy import CutProxy
from tests.support.seaweed import ADMIN, HOST, OTHER, REGION, SeaweedCluster
from tests.timeouts import scaled

T = TypeVar("T")
BUCKET = "bg-objstore"
MiB = 1024 * 1024


def store(
    cluster: SeaweedCluster,
    *,
    prefix: str = "host1",
    key: str = ADMIN.access_key,
    secret: str = ADMIN.secret_key,
    bucket: str = BUCKET,
    endpoint: str | None = None,
) -> ObjectStore:
    return ObjectStore(
        target="s3t",
        endpoint=endpoint or cluster.endpoint,
        bucket=bucket,
        prefix=prefix,
        credentials=Credentials(key, secret),
        region=REGION,
        timeout=scaled(30),
        retries=0,
    )


@pytest.fixture
def bucket(seaweed: SeaweedCluster) -> SeaweedCluster:
    seaweed.client().create_bucket(Bucket=BUCKET)  # type: ignore[attr-defined]
    return seaweed


def test_put_get_head_list_delete(bucket: SeaweedCluster) -> None:
    s = store(bucket)
    small, big = os.urandom(100_000), os.urandom(MULTIPART_THRESHOLD + 3 * MiB + 5)
    s.put("packs/a", small)
    s.put("packs/b", big)  # multipart
    s.put("manifests/m", b"m")
    assert s.get("packs/a") == small
    assert s.get("packs/b") == big
    assert s.get("packs/b", start=MiB + 1, length=4097) == big[MiB + 1 : MiB + 4098]
    assert s.get("packs/a", start=99_000) == small[99_000:]
    assert s.head("packs/b").size == len(big)
    assert [(o.key, o.size) for o in s.list("packs/")] == [
        ("packs/a", len(small)),
        ("packs/b", len(big)),
    ]
    # The prefix is the store's world: another host's prefix sees none of it.
    assert store(bucket, prefix="host2").list() == []
    raw = bucket.client().get_object(Bucket=BUCKET, Key="host1/packs/a")  # type: ignore[attr-defined]
    assert raw["Body"].read() == small
    s.delete("packs/a")
    with pytest.raises(NotFound, match="host1/packs/a"):
        s.get("packs/a")
    assert [o.key for o in s.list()] == ["manifests/m", "packs/b"]


def test_missing_key_and_bucket_are_not_found(bucket: SeaweedCluster) -> None:
    s = store(bucket)
    with pytest.raises(NotFound, match=r"object bg-objstore/host1/nope does not exist"):
        s.get("nope")
    with pytest.raises(NotFound, match="nope"):
        s.head("nope")
    with pytest.raises(NotFound, match="bucket no-such-bucket does not exist"):
        store(bucket, bucket="no-such-bucket").get("x")


def test_short_or_changed_object_is_a_data_error(bucket: SeaweedCluster) -> None:
    s = store(bucket)
    etag = s.put("p", b"x" * 1000)
    # S3 answers a range past the end with the bytes there are, and no error.
    with pytest.raises(DataError, match=r"object p on target s3t: 10 bytes from offset 990, 20"):
        s.get("p", start=990, length=20)
    assert s.get("p", etag=etag) == b"x" * 1000
    s.put("p", b"y" * 1000)  # another writer replaced it
    with pytest.raises(DataError, match="changed"):
        s.get("p", etag=etag)


def test_wrong_secret_and_other_tenant_are_not_authorized(bucket: SeaweedCluster) -> None:
    wrong = store(bucket, secret="not-the-secret-0001")
    with pytest.raises(NotAuthorized, match=ADMIN.access_key) as refused:
        wrong.put("p", b"data")
    assert "not-the-secret-0001" not in str(refused.value)
    assert "not-the-secret-0001" not in repr(wrong)
    with pytest.raises(NotAuthorized, match="SignatureDoesNotMatch"):
        wrong.get("p")
    other = store(bucket, key=OTHER.access_key, secret=OTHER.secret_key)
    with pytest.raises(NotAuthorized, match="AccessDenied"):
        other.list()
    with pytest.raises(NotAuthorized):
        other.put("p", b"data")
    assert store(bucket).list() == [], "a refused put stored something"


def test_gateway_stopped_is_unreachable_and_nothing_committed_is_lost(
    bucket: SeaweedCluster,
) -> None:
    s = store(bucket)
    data = os.urandom(2 * MiB)
    s.put("kept", data)
    bucket.s3.kill()
    with pytest.raises(TargetUnreachable, match=rf"target s3t at {bucket.endpoint}"):
        s.put("new", b"n")
    with pytest.raises(TargetUnreachable):
        s.get("kept")
    bucket.restart(bucket.s3)
    assert s.get("kept") == data
    assert [o.key for o in s.list()] == ["kept"]


def test_a_put_cut_in_the_middle_is_wire_closed_and_stores_nothing(
    bucket: SeaweedCluster,
) -> None:
    """A connection reset once 1 MiB of a PUT went up (a real TCP proxy in front of the
    gateway): WireClosed naming the target and the key, not "cannot reach"; nothing is
    stored under the key, and the same PUT succeeds once the link is healed."""
    with CutProxy((HOST, bucket.s3.port)) as proxy:
        s = store(bucket, endpoint=proxy.endpoint)
        s.put("before", b"b")
        proxy.cut_requests(f"PUT /{BUCKET}/host1/cut", after=1 * MiB)
        data = os.urandom(4 * MiB)
        with pytest.raises(
            WireClosed,
            match=rf"connection to object store s3t \({proxy.endpoint}\) ended while "
            rf"putting {BUCKET}/host1/cut \(connection reset by peer\)",
        ):
            s.put("cut", data)
        assert proxy.cut == 1
        assert [o.key for o in s.list()] == ["before"]
        proxy.heal()
        s.put("cut", data)
        assert s.get("cut") == data


def test_volume_server_killed_mid_upload(bucket: SeaweedCluster) -> None:
    """Each put either succeeds or fails with a named error; every put that succeeded
    reads back bit-exact once the server is back."""
    s = store(bucket)
    committed: dict[str, bytes] = {}
    failures: list[Exception] = []
    done = threading.Event()

    def upload() -> None:
        try:
            for i in range(40):
                size = MULTIPART_THRESHOLD + MiB if i % 10 == 9 else 2 * MiB + i
                data = os.urandom(size)
                try:
                    s.put(f"packs/{i:03d}", data)
                except BlockguardError as exc:
                    failures.append(exc)
                    continue
                committed[f"packs/{i:03d}"] = data
        except Exception as exc:  # an unnamed error fails the test below
            failures.append(exc)
        finally:
            done.set()

    writer = threading.Thread(target=upload)
    writer.start()
    deadline = time.monotonic() + scaled(120)
    while len(committed) < 5 and not done.is_set():
        assert time.monotonic() < deadline, "the upload did not start"
        time.sleep(0.05)
    killed = bucket.kill_volume_server(0)
    writer.join(scaled(600))
    assert not writer.is_alive()
    unnamed = [f for f in failures if not isinstance(f, BlockguardError)]
    assert unnamed == []
    assert all(isinstance(f, StoreFailed | TargetUnreachable) for f in failures), failures
    bucket.restart(killed)
    deadline = time.monotonic() + scaled(120)
    for key, data in committed.items():
        while True:
            try:
                assert s.get(key) == data, f"{key} came back with other bytes"
                break
            except StoreFailed:
                # The master learns of the restarted server's volumes by its heartbeat.
                assert time.monotonic() < deadline, f"{key} unreadable after the restart"
                time.sleep(0.5)
    print(f"{len(committed)} committed, {len(failures)} failed: {failures[:3]}")


def test_bucket_over_quota(bucket: SeaweedCluster) -> None:
    """SeaweedFS's bucket quota (weed shell) turns the bucket read-only; its gateway then
    answers a PUT with 500 InternalError, so the error is StoreFailed, not PoolSpaceLow
    (docs/design/s3.md). What was stored stays readable."""
    s = store(bucket)
    data = os.urandom(3 * MiB)
    s.put("first", data)
    assert "updated quota" in bucket.shell(f"s3.bucket.quota -name={BUCKET} -op=set -sizeMB=1")
    deadline = time.monotonic() + scaled(60)
    # Usage comes from the volume servers' heartbeats: a few seconds late.
    while "read only" not in bucket.shell("s3.bucket.quota.enforce -apply"):
        assert time.monotonic() < deadline, "the quota was never enforced"
        time.sleep(1)
    with pytest.raises(StoreFailed, match=r"object store s3t failed while putting .*HTTP 500"):
        s.put("second", b"z" * 100_000)
    assert s.get("first") == data
    assert [o.key for o in s.list()] == ["first"]


class InFlight(ObjectStore):
    """An ObjectStore that counts its PUTs and GETs of probe objects in flight; the first
    ``wait_for`` of each kind wait until that many are in flight together, so a probe
    that sends fewer at once breaks the barrier (and fails) instead of passing by luck."""

    def __init__(self, wait_for: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.lock = threading.Lock()
        self.started = {"put": 0, "get": 0}
        self.now = {"put": 0, "get": 0}
        self.most = {"put": 0, "get": 0}
        self.barriers = {k: threading.Barrier(wait_for, timeout=scaled(60)) for k in self.now}

    def _counted(self, kind: str, call: Callable[[], T]) -> T:
        with self.lock:
            self.started[kind] += 1
            first = self.started[kind] <= self.barriers[kind].parties
            self.now[kind] += 1
            self.most[kind] = max(self.most[kind], self.now[kind])
        try:
            if first:
                self.barriers[kind].wait()
            return call()
        finally:
            with self.lock:
                self.now[kind] -= 1

    def put(self, key: str, data: bytes) -> str | None:
        if len(data) < MiB:  # the small object of the latency figure: one at a time
            return super().put(key, data)
        return self._counted("put", lambda: super(InFlight, self).put(key, data))

    def get(self, key: str, *args: Any, **kwargs: Any) -> bytes:
        if "small" in key:
            return super().get(key, *args, **kwargs)
        return self._counted("get", lambda: super(InFlight, self).get(key, *args, **kwargs))


def test_the_probe_measures_at_the_writer_and_reader_concurrency(bucket: SeaweedCluster) -> None:
    """The store probe keeps as many PUTs and GETs in flight as the generation writer and
    reader do (s3upload.UPLOAD_THREADS, s3fetch.FETCH_THREADS), never more, and leaves
    nothing behind."""
    assert UPLOAD_THREADS == FETCH_THREADS  # one barrier size serves both
    s = InFlight(
        UPLOAD_THREADS,
        target="s3t",
        endpoint=bucket.endpoint,
        bucket=BUCKET,
        prefix="host1",
        credentials=Credentials(ADMIN.access_key, ADMIN.secret_key),
        region=REGION,
    )
    speed = measure_store(s, total=2 * UPLOAD_THREADS * MiB, object_bytes=MiB)
    assert not any(b.broken for b in s.barriers.values()), s.most
    assert s.most == {"put": UPLOAD_THREADS, "get": FETCH_THREADS}, s.most
    assert (speed.put_concurrency, speed.get_concurrency) == (UPLOAD_THREADS, FETCH_THREADS)
    assert speed.objects == 2 * UPLOAD_THREADS and speed.object_bytes == MiB
    assert speed.put_rate > 0 and speed.get_rate > 0 and speed.latency > 0
    assert s.list() == []
