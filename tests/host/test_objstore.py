"""ObjectStore (blockguard/storage/remote/objstore.py) against a real SeaweedFS cluster:
objects round-trip, and each fault the cluster can be made to show comes back as a
named error, with nothing committed lost."""

from __future__ import annotations

import os
import threading
import time

import pytest

from blockguard.errors import (
    BlockguardError,
    DataError,
    NotAuthorized,
    NotFound,
    StoreFailed,
    TargetUnreachable,
)
from blockguard.storage.remote.objstore import MULTIPART_THRESHOLD, Credentials, ObjectStore
from tests.support.seaweed import ADMIN, OTHER, REGION, SeaweedCluster
from tests.timeouts import scaled

BUCKET = "bg-objstore"
MiB = 1024 * 1024


def store(
    cluster: SeaweedCluster,
    *,
    prefix: str = "host1",
    key: str = ADMIN.access_key,
    secret: str = ADMIN.secret_key,
    bucket: str = BUCKET,
) -> ObjectStore:
    return ObjectStore(
        target="s3t",
        endpoint=cluster.endpoint,
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
