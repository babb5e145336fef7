"""Faults of an object-store target that really happen, through blockguardctl only (issue
12): the real daemon on a private bus, a real SeaweedFS cluster, loop devices.

- A pack's PUT cut in the middle: a real TCP proxy in front of the S3 gateway
  (:mod:`tests.support.cutproxy`) lets two pack PUTs through and resets every later one
  after 1 MiB (a dropped connection; the client's retries are cut too). Unlike a volume
  server killed (``test_s3_target.py``: SeaweedFS assigns the upload elsewhere and the
  job completes), the writer's failure branch runs for sure: the job fails by name, no
  manifest is written, the committed generation restores bit-exact, and the next
  transfer stores only the packs that did not get there.
- A bucket over its quota (SeaweedFS's ``s3.bucket.quota``, enforced): PUTs are refused
  (with a plain 500 InternalError: see docs/design/s3.md), the job fails by name naming
  the target, and the next run once the quota is lifted recovers.
- A tampered pack (a byte flipped through the raw client): the restore fails naming the
  pack and the generation, and the device's bytes are those the restore had written
  before it met the pack (each from a chunk that passed its checks) or its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.host.test_remote_targets import ctl
from tests.host.test_remote_transfer import as_json, ok
from tests.host.test_s3_target import (
    BUCKET,
    URL,
    credentials_file,
    failed_job,
    restore_from,
    transfer,
)
from tests.support.cutproxy import CutProxy
from tests.support.daemon import Daemon, EngineHarness
from tests.support.devices import MiB, sha256_of, write_random
from tests.support.seaweed import HOST, SeaweedCluster
from tests.timeouts import scaled

pytestmark = pytest.mark.root

SIZE = 64 * MiB
PACK = 8 * MiB
POOL_SIZE = 600 * MiB
#: The first backup's packs (random bytes: every chunk is new).
FULL_PACKS = SIZE // PACK
#: The bytes the second backup changes: this many packs of new chunks.
CHANGED = 48 * MiB
CHANGED_PACKS = CHANGED // PACK


@pytest.fixture
def bucket(seaweed: SeaweedCluster) -> SeaweedCluster:
    seaweed.client().create_bucket(Bucket=BUCKET)  # type: ignore[attr-defined]
    return seaweed


def keys(cluster: SeaweedCluster, prefix: str) -> list[str]:
    """The keys under ``prefix`` of the test bucket, through the raw client."""
    client = cluster.client()
    found: list[str] = []
    token: dict[str, str] = {}
    while True:
        page = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix, **token)  # type: ignore[attr-defined]
        found.extend(o["Key"] for o in page.get("Contents", []))
        if not page.get("IsTruncated"):
            return found
        token = {"ContinuationToken": page["NextContinuationToken"]}


def protected(daemon: Daemon, endpoint: str, tmp: Path, loopdev: Callable[..., str]) -> str:
    """Target fleet at ``endpoint`` (a credentials file in ``tmp``), pool p1, volume db of
    SIZE random bytes backed up; returns the volume's device."""
    creds = credentials_file(tmp / "s3-credentials")
    ok(daemon, "target", "add", "fleet", URL, "--endpoint", endpoint,
       "--credentials", str(creds))  # fmt: skip
    ok(daemon, "pool", "create", "p1", loopdev(POOL_SIZE, "pool.img"))
    volume = loopdev(SIZE, "db.img")
    write_random(volume, 0, SIZE, seed=61)
    ok(daemon, "protect", volume, "db", "--rpo", "1h")
    ok(daemon, "objectives", "db", "--target", "fleet")
    ok(daemon, "backup", "db")
    return volume


def restores_bit_exact(
    daemon: Daemon, sums: dict[str, str], loopdev: Callable[..., str], tag: str
) -> None:
    for n, (generation, digest) in enumerate(sums.items()):
        device = loopdev(SIZE, f"restore-{tag}-{n}.img")
        restore_from(daemon, generation, device)
        assert sha256_of(device) == digest, generation


def test_a_pack_put_cut_mid_transfer_fails_by_name_and_the_next_run_sends_the_rest(
    bucket: SeaweedCluster, engine: EngineHarness, loopdev: Callable[..., str], tmp_path: Path
) -> None:
    with CutProxy((HOST, bucket.s3.port)) as proxy:
        daemon = engine.start()
        volume = protected(daemon, proxy.endpoint, tmp_path, loopdev)
        first = transfer(daemon, "db")
        assert first["packs_sent"] == FULL_PACKS, first
        sums = {first["generation"]: sha256_of(volume)}
        manifests = keys(bucket, "site-a/snapshots/")
        assert len(manifests) == 1, manifests

        write_random(volume, 8 * MiB, CHANGED, seed=62)
        ok(daemon, "backup", "db")
        # Two of the incremental's packs get through; every later pack PUT (the
        # client's retries too) is reset after 1 MiB of it.
        proxy.cut_requests(f"PUT /{BUCKET}/site-a/data/", passes=2, after=1 * MiB)
        error = failed_job(daemon, "transfer", "db")
        assert proxy.cut > 0, (proxy.matched, proxy.cut)
        # The store was reached and a PUT dropped: WireClosed, naming the target and
        # the pack it was putting (not "cannot reach").
        assert error["name"] == "org.blockguard1.Error.WireClosed", error
        assert "connection to object store fleet" in error["message"], error
        assert f"while putting {BUCKET}/site-a/data/" in error["message"], error
        # No manifest for the failed generation; only the two packs that passed were
        # stored (a cut PUT leaves nothing); the plan still wants the incremental.
        assert keys(bucket, "site-a/snapshots/") == manifests
        stored = len(keys(bucket, "site-a/data/")) - FULL_PACKS
        assert stored == 2, stored
        plan = as_json(daemon, "plan", "db")["plan"]["remote"]
        assert plan["method"] == "incremental" and plan["up_to_date"] is False, plan
        # The committed generation restores bit-exact (GETs pass the proxy).
        restores_bit_exact(daemon, sums, loopdev, "cut")

        # The next run, the link healed, succeeds by itself and sends only the rest.
        proxy.heal()
        second = transfer(daemon, "db")
        assert second["method"] == "incremental", second
        assert second["packs_sent"] == CHANGED_PACKS - stored, second
        assert second["chunks_reused"] > 0, second
        assert second["bytes_uploaded"] < (CHANGED - stored * PACK) * 1.02, second
        assert len(keys(bucket, "site-a/data/")) == FULL_PACKS + CHANGED_PACKS
        sums[second["generation"]] = sha256_of(volume)
        assert as_json(daemon, "target", "show", "fleet")["target"]["state"] == "ok"
        restores_bit_exact(daemon, sums, loopdev, "healed")


def test_a_bucket_over_its_quota_fails_by_name_and_the_next_run_recovers(
    bucket: SeaweedCluster, engine: EngineHarness, loopdev: Callable[..., str], tmp_path: Path
) -> None:
    daemon = engine.start()
    volume = protected(daemon, bucket.endpoint, tmp_path, loopdev)
    first = transfer(daemon, "db")
    sums = {first["generation"]: sha256_of(volume)}
    write_random(volume, 8 * MiB, CHANGED, seed=63)
    ok(daemon, "backup", "db")

    # A quota far below what the bucket holds: once the master has the usage (volume
    # heartbeats, a few seconds late) the gateway refuses every write to the bucket.
    assert "updated quota" in bucket.shell(f"s3.bucket.quota -name={BUCKET} -op=set -sizeMB=1")
    deadline = time.monotonic() + scaled(60)
    while "read only" not in bucket.shell("s3.bucket.quota.enforce -apply"):
        assert time.monotonic() < deadline, "the quota was never enforced"
        time.sleep(1)
    error = failed_job(daemon, "transfer", "db")
    # SeaweedFS says 500 InternalError, nothing of a quota: a retryable StoreFailed that
    # names the target and the object it could not store.
    assert error["name"] == "org.blockguard1.Error.StoreFailed", error
    assert "object store fleet failed while putting" in error["message"], error
    assert f"{BUCKET}/site-a/" in error["message"], error
    assert len(keys(bucket, "site-a/snapshots/")) == 1
    assert as_json(daemon, "plan", "db")["plan"]["remote"]["method"] == "incremental"

    # The admin lifts the quota: the next run succeeds by itself.
    bucket.shell(f"s3.bucket.quota -name={BUCKET} -op=remove")
    assert "read only" not in bucket.shell("s3.bucket.quota.enforce -apply")
    second = transfer(daemon, "db")
    assert second["method"] == "incremental", second
    sums[second["generation"]] = sha256_of(volume)
    restores_bit_exact(daemon, sums, loopdev, "quota")


def test_a_tampered_pack_fails_the_restore_by_name(
    bucket: SeaweedCluster, engine: EngineHarness, loopdev: Callable[..., str], tmp_path: Path
) -> None:
    daemon = engine.start()
    volume = protected(daemon, bucket.endpoint, tmp_path, loopdev)
    sent = transfer(daemon, "db")
    generation = sent["generation"]
    gid = generation.split("@", 1)[1]

    # One byte flipped in the middle of a pack, through the raw client.
    client = bucket.client()
    victim = sorted(keys(bucket, "site-a/data/"))[0]
    pack_id = victim.rsplit("/", 1)[1]
    body = bytearray(client.get_object(Bucket=BUCKET, Key=victim)["Body"].read())  # type: ignore[attr-defined]
    body[len(body) // 2] ^= 0x01
    client.put_object(Bucket=BUCKET, Key=victim, Body=bytes(body))  # type: ignore[attr-defined]

    device = loopdev(SIZE, "restore.img")
    write_random(device, 0, SIZE, seed=64)
    before = device_bytes(device)
    job = as_json(daemon, "restore", generation, "--from", "fleet", "--target", device,
                  "--no-wait")["job"]  # fmt: skip
    waited = ctl(daemon, "--json", "jobs", "wait", str(job["id"]))
    assert waited.returncode != 0, waited.stdout
    found = json.loads(waited.stdout)["job"]
    assert found["state"] == "failed", found
    error = found["error"]
    assert error["name"] == "org.blockguard1.Error.TamperedPack", error
    assert f"pack {pack_id} of generation" in error["message"], error
    assert gid in error["message"], error
    # Each 64 KiB of the device is either its old bytes or the volume's: the restore
    # wrote only chunks that passed their checks, nothing of the tampered pack.
    after, wanted = device_bytes(device), device_bytes(volume)
    step = 64 * 1024
    for at in range(0, SIZE, step):
        piece = after[at : at + step]
        assert piece in (before[at : at + step], wanted[at : at + step]), at


def device_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
