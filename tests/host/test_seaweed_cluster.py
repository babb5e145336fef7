"""The SeaweedFS cluster fixture (tests/support/seaweed.py) is a real, working object
store: objects go through the S3 gateway to the volume servers and come back; the
identities are enforced; and what losing one of the two volume servers does is recorded
here, because the object-store target's fault tests build on it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.support.seaweed import (
    OTHER,
    OTHER_BUCKET,
    SeaweedCluster,
    require_seaweed,
    seaweed_cluster,
)
from tests.timeouts import scaled

# boto3 is a test extra; without it the tests skip (require_seaweed says why).
ClientError = pytest.importorskip("botocore.exceptions").ClientError
BUCKET = "bg-cluster"


def test_object_round_trip_through_the_gateway(seaweed: SeaweedCluster) -> None:
    assert len({p.pid for p in seaweed.processes}) == 5
    s3 = seaweed.client()
    s3.create_bucket(Bucket=BUCKET)
    data = os.urandom(3 * 1024 * 1024 + 17)  # chunked by the filer, not inlined
    s3.put_object(Bucket=BUCKET, Key="a/b", Body=data)
    assert s3.get_object(Bucket=BUCKET, Key="a/b")["Body"].read() == data
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="a/")["Contents"]
    assert [(o["Key"], o["Size"]) for o in listed] == [("a/b", len(data))]


def test_the_other_identity_is_another_tenant(seaweed: SeaweedCluster) -> None:
    admin, other = seaweed.client(), seaweed.client(OTHER)
    admin.create_bucket(Bucket=BUCKET)
    admin.put_object(Bucket=BUCKET, Key="k", Body=b"admin's")
    with pytest.raises(ClientError) as denied:
        other.get_object(Bucket=BUCKET, Key="k")
    assert denied.value.response["Error"]["Code"] == "AccessDenied"
    admin.create_bucket(Bucket=OTHER_BUCKET)
    other.put_object(Bucket=OTHER_BUCKET, Key="k", Body=b"other's")
    assert other.get_object(Bucket=OTHER_BUCKET, Key="k")["Body"].read() == b"other's"


def test_one_volume_server_killed(seaweed: SeaweedCluster) -> None:
    """Without replication (``000``) every object lives on one volume server. After one is
    SIGKILLed: objects on the survivor stay readable, those on the dead one fail with an
    error (never other bytes), and new PUTs work again once the master has dropped the
    dead server (its heartbeat times out)."""
    s3 = seaweed.client()
    s3.create_bucket(Bucket=BUCKET)
    objects = {f"o{i}": os.urandom(1024 * 1024 + i) for i in range(12)}
    for key, data in objects.items():
        s3.put_object(Bucket=BUCKET, Key=key, Body=data)
    seaweed.kill_volume_server(0)
    readable, failed = 0, 0
    for key, data in objects.items():
        try:
            got = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        except ClientError:
            failed += 1
            continue
        assert got == data, f"{key} came back with other bytes"
        readable += 1
    assert readable + failed == len(objects)
    assert readable > 0, "nothing readable from the surviving volume server"

    deadline = time.monotonic() + scaled(120)
    refused = 0
    while True:
        try:
            s3.put_object(Bucket=BUCKET, Key="after", Body=os.urandom(1024 * 1024))
            break
        except ClientError:
            refused += 1
            assert time.monotonic() < deadline, f"PUT refused {refused} times, never took"
            time.sleep(1)
    assert len(s3.get_object(Bucket=BUCKET, Key="after")["Body"].read()) == 1024 * 1024
    print(f"after the kill: {readable} readable, {failed} failed, {refused} PUTs refused")


def test_every_process_is_killed_when_the_body_fails(tmp_path: Path) -> None:
    require_seaweed()
    with pytest.raises(RuntimeError, match="the test failed"):  # noqa: SIM117 - the cluster must end inside
        with seaweed_cluster(tmp_path / "sw") as cluster:
            pids = [p.pid for p in cluster.processes]
            sockets = cluster.sockets
            raise RuntimeError("the test failed")
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # reaped, not a zombie
    assert sockets is not None and not sockets.exists()
