"""An S3 object store as a backup target through blockguardctl only (issue 12): the real
daemon on a private bus, a real SeaweedFS cluster (master, two volume servers, filer, S3
gateway), loop devices.

Three "hosts" (three daemons, each with its own state directory, one after the other on
the test's bus) share one bucket and one master key: the second host's full of a volume
identical to the first host's uploads < 5 % of its size (the chunks are in the bucket
already), and a third, fresh host with only the exported key and the bucket restores
both bit-exact. Faults: credentials others may read and a wrong secret are refused by
name at ``target add`` (nothing recorded); the gateway stopped and the key revoked fail
a transfer by name (nothing recorded), and the next transfer recovers by itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.host.test_remote_targets import ctl
from tests.host.test_remote_transfer import as_json, done_jobs, ok
from tests.support.bus import NotifyListener
from tests.support.daemon import Daemon, EngineHarness
from tests.support.devices import MiB, sha256_of, write_random
from tests.support.seaweed import ADMIN, SeaweedCluster
from tests.timeouts import scaled

pytestmark = pytest.mark.root

SIZE = 32 * MiB
POOL_SIZE = 400 * MiB
BUCKET = "fleet"
URL = f"s3://{BUCKET}/site-a"


def failed_job(daemon: Daemon, *args: str) -> dict[str, Any]:
    """Start a job with ``args`` and return its failure (state failed, the error)."""
    job = as_json(daemon, *args, "--no-wait")["job"]
    waited = ctl(daemon, "--json", "jobs", "wait", str(job["id"]))
    assert waited.returncode != 0, waited.stdout
    found = json.loads(waited.stdout)["job"]
    assert found["state"] == "failed", found
    return found["error"]  # type: ignore[no-any-return]


def credentials_file(path: Path, secret: str = ADMIN.secret_key, mode: int = 0o600) -> Path:
    path.write_text(
        f"[default]\naws_access_key_id = {ADMIN.access_key}\naws_secret_access_key = {secret}\n"
    )
    path.chmod(mode)
    return path


def add_target(daemon: Daemon, cluster: SeaweedCluster, creds: Path, *extra: str) -> Any:
    ok(daemon, "target", "add", "fleet", URL, "--endpoint", cluster.endpoint,
       "--credentials", str(creds), *extra)  # fmt: skip
    return as_json(daemon, "target", "show", "fleet")["target"]


def protect(daemon: Daemon, loopdev: Callable[..., str], name: str, seed: int) -> str:
    """Pool p1 and volume ``name`` (random bytes of ``seed``) sent to target fleet."""
    ok(daemon, "pool", "create", "p1", loopdev(POOL_SIZE, f"pool-{name}.img"))
    volume = loopdev(SIZE, f"{name}.img")
    write_random(volume, 0, SIZE, seed=seed)
    ok(daemon, "protect", volume, name, "--rpo", "1h")
    ok(daemon, "objectives", name, "--target", "fleet", "--remote-rto", "1h")
    return volume


def transfer(daemon: Daemon, volume: str) -> dict[str, Any]:
    job = as_json(daemon, "transfer", volume)["job"]
    assert job["state"] == "done", job
    return job["result"]  # type: ignore[no-any-return]


def restore_from(daemon: Daemon, generation: str, device: str) -> dict[str, Any]:
    job = as_json(daemon, "restore", generation, "--from", "fleet", "--target", device)["job"]
    assert job["state"] == "done", job
    return job["result"]  # type: ignore[no-any-return]


def another_host(engine: EngineHarness, notify: NotifyListener, root: Path) -> EngineHarness:
    root.mkdir()
    return EngineHarness(engine.bus, root, notify)


@pytest.fixture
def bucket(seaweed: SeaweedCluster) -> SeaweedCluster:
    seaweed.client().create_bucket(Bucket=BUCKET)  # type: ignore[attr-defined]
    return seaweed


def test_two_hosts_share_one_bucket_and_a_third_restores_bit_exact(
    bucket: SeaweedCluster,
    engine: EngineHarness,
    loopdev: Callable[..., str],
    tmp_path: Path,
    notify_socket: NotifyListener,
) -> None:
    creds = credentials_file(tmp_path / "s3-credentials")
    key = tmp_path / "key.txt"

    # Host A: the target is registered with the store's measured figures.
    first = engine.start()
    shown = add_target(first, bucket, creds)
    assert (shown["kind"], shown["endpoint"], shown["bucket"], shown["prefix"]) == (
        "s3",
        bucket.endpoint,
        BUCKET,
        "site-a",
    )
    assert shown["credentials"] == str(creds)
    assert shown["link_down"] > 0 and shown["link_up"] > 0 and shown["link_round_trip"] > 0
    text = ok(first, "target", "show", "fleet").stdout
    assert "PUT" in text and "GET" in text and bucket.endpoint in text
    assert ADMIN.secret_key not in text + json.dumps(shown)
    listed = ok(first, "target", "list").stdout
    assert "fleet" in listed and URL in listed
    # The probe's objects are gone: only what backups write is in the bucket.
    assert _keys(bucket, "site-a/probe/") == []

    volume_a = protect(first, loopdev, "web1", seed=7)
    ok(first, "backup", "web1")
    plan = as_json(first, "plan", "web1")["plan"]["remote"]
    assert (plan["target"], plan["method"]) == ("fleet", "full"), plan
    sent = transfer(first, "web1")
    assert sent["method"] == "full" and sent["generation"] == plan["source"]
    # Random data does not compress: every chunk went up once.
    assert SIZE <= sent["bytes_uploaded"] < SIZE * 1.02, sent
    assert sent["chunks_reused"] == 0 and sent["seconds"] > 0, sent
    assert as_json(first, "plan", "web1")["plan"]["remote"]["up_to_date"] is True
    ok(first, "key", "export", "--output", str(key))
    sum_a = sha256_of(volume_a)
    first.stop()

    # Host B: the same key, the same bucket; an identical volume costs its manifest.
    host_b = another_host(engine, notify_socket, tmp_path / "host-b")
    try:
        second = host_b.start()
        add_target(second, bucket, creds, "--key", str(key))
        volume_b = protect(second, loopdev, "web2", seed=7)
        ok(second, "backup", "web2")
        deduped = transfer(second, "web2")
        assert deduped["method"] == "full", deduped
        assert deduped["bytes_uploaded"] < SIZE * 0.05, deduped
        assert deduped["chunks_reused"] > 0 and deduped["packs_sent"] == 0, deduped
        web2 = deduped["generation"]
        sum_b = sha256_of(volume_b)
        assert sum_b == sum_a
    finally:
        host_b.cleanup()

    # Host C: nothing but the exported key and the bucket.
    host_c = another_host(engine, notify_socket, tmp_path / "host-c")
    try:
        third = host_c.start()
        add_target(third, bucket, creds, "--key", str(key))
        found = as_json(third, "target", "import", "fleet")["import"]
        assert sorted(g["volume"] for g in found["generations"]) == ["web1", "web2"]
        assert found["damaged"] == []
        for generation in (web2, sent["generation"]):
            device = loopdev(SIZE, f"restore-{generation.split('@')[0]}.img")
            restored = restore_from(third, generation, device)
            assert sha256_of(device) == sum_a
            assert restored["predicted_seconds"] > 0 and restored["from_target"] == "fleet"
    finally:
        host_c.cleanup()


def test_named_errors_commit_nothing_and_the_next_run_recovers(
    bucket: SeaweedCluster,
    engine: EngineHarness,
    loopdev: Callable[..., str],
    tmp_path: Path,
) -> None:
    daemon = engine.start()
    # Credentials others may read, and a wrong secret: refused by name, nothing recorded.
    loose = credentials_file(tmp_path / "loose", mode=0o644)
    out = ctl(daemon, "target", "add", "fleet", URL, "--endpoint", bucket.endpoint,
              "--credentials", str(loose))  # fmt: skip
    assert out.returncode != 0 and "credentials file" in out.stderr and "0644" in out.stderr
    assert ADMIN.secret_key not in out.stderr
    wrong = credentials_file(tmp_path / "wrong", secret="not-the-secret")
    error = failed_job(daemon, "target", "add", "fleet", URL, "--endpoint", bucket.endpoint,
                       "--credentials", str(wrong))  # fmt: skip
    assert error["name"] == "org.blockguard1.Error.NotAuthorized", error
    assert "not-the-secret" not in json.dumps(error)
    creds = credentials_file(tmp_path / "s3-credentials")
    assert as_json(daemon, "target", "list")["targets"] == []

    # Added, removed (nothing refers to it yet), added again.
    add_target(daemon, bucket, creds)
    ok(daemon, "target", "remove", "fleet")
    assert as_json(daemon, "target", "list")["targets"] == []
    add_target(daemon, bucket, creds)
    volume = protect(daemon, loopdev, "db", seed=3)
    ok(daemon, "backup", "db")
    first = transfer(daemon, "db")
    sums = {first["generation"]: sha256_of(volume)}

    write_random(volume, 4 * MiB, 2 * MiB, seed=4)
    ok(daemon, "backup", "db")
    # The gateway is down: TargetUnreachable, nothing recorded.
    bucket.s3.kill()
    error = failed_job(daemon, "transfer", "db")
    assert error["name"] == "org.blockguard1.Error.TargetUnreachable", error
    assert as_json(daemon, "plan", "db")["plan"]["remote"]["method"] == "incremental"
    assert as_json(daemon, "target", "show", "fleet")["target"]["state"] == "unreachable"
    bucket.restart(bucket.s3)

    # The key is revoked (its file now holds a wrong secret): NotAuthorized, nothing lost.
    credentials_file(creds, secret="revoked")
    error = failed_job(daemon, "transfer", "db")
    assert error["name"] == "org.blockguard1.Error.NotAuthorized", error
    assert "revoked" not in json.dumps(error)
    credentials_file(creds)

    # The next run recovers by itself; every committed generation restores bit-exact.
    second = transfer(daemon, "db")
    assert second["method"] == "incremental", second
    sums[second["generation"]] = sha256_of(volume)
    assert as_json(daemon, "target", "show", "fleet")["target"]["state"] == "ok"
    for generation, digest in sums.items():
        device = loopdev(SIZE, f"restore-{len(digest)}-{generation[-8:]}.img")
        restore_from(daemon, generation, device)
        assert sha256_of(device) == digest, generation


def _keys(cluster: SeaweedCluster, prefix: str) -> list[str]:
    listed = cluster.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)  # type: ignore[attr-defined]
    return [o["Key"] for o in listed.get("Contents", [])]


def test_retention_on_the_target_collects_what_no_generation_references(
    bucket: SeaweedCluster, engine: EngineHarness, loopdev: Callable[..., str], tmp_path: Path
) -> None:
    # A grace of 0 s: a pack no generation references is marked by one sweep and
    # deleted by the next (each transfer runs one after its commit).
    daemon = engine.start(BLOCKGUARD_S3_GC_GRACE="0", BLOCKGUARD_S3_GC_INTERVAL="0")
    add_target(daemon, bucket, credentials_file(tmp_path / "s3-credentials"))
    volume = protect(daemon, loopdev, "db", seed=11)
    # One generation here and one there: each round's full replaces the previous one.
    ok(daemon, "objectives", "db", "--generations", "1", "--remote-generations", "1")
    rounds = []
    for n in range(3):
        write_random(volume, 0, SIZE, seed=20 + n)
        ok(daemon, "backup", "db", "--full")
        rounds.append(transfer(daemon, "db"))
        assert rounds[-1]["method"] == "full", rounds[-1]
    # Round 2 freed round 1's generation and marked its packs; round 3 freed round 2's,
    # deleted round 1's packs and marked round 2's.
    assert [len(r["freed"]) for r in rounds] == [0, 1, 1], rounds
    assert [r["gc_marked"] for r in rounds][1:] == [rounds[1]["gc_marked"]] * 2, rounds
    assert rounds[1]["gc_marked"] > 0 and rounds[1]["gc_deleted"] == 0, rounds
    assert rounds[2]["gc_deleted"] == rounds[1]["gc_marked"], rounds
    # What is left: round 2's marked packs and round 3's, and round 3 restores bit-exact.
    packs = [k for k in _keys(bucket, "site-a/data/")]
    assert len(packs) == rounds[1]["gc_marked"] + rounds[2]["packs_sent"], packs
    device = loopdev(SIZE, "restore.img")
    restore_from(daemon, rounds[2]["generation"], device)
    assert sha256_of(device) == sha256_of(volume)


def test_the_sweep_runs_on_its_own_schedule_and_by_hand(
    bucket: SeaweedCluster, engine: EngineHarness, loopdev: Callable[..., str], tmp_path: Path
) -> None:
    """The default interval (hours): the first transfer sweeps the never-swept bucket,
    the next ones do not (they say when the next sweep is due); ``target gc`` sweeps at
    once: it marks the freed generation's packs, deletes them the next time (grace 0),
    and what is kept restores bit-exact. A target that does not exist is named."""
    daemon = engine.start(BLOCKGUARD_S3_GC_GRACE="0")
    add_target(daemon, bucket, credentials_file(tmp_path / "s3-credentials"))
    volume = protect(daemon, loopdev, "db", seed=51)
    ok(daemon, "objectives", "db", "--generations", "1", "--remote-generations", "1")
    rounds = []
    for n in range(2):
        write_random(volume, 0, SIZE, seed=60 + n)
        ok(daemon, "backup", "db", "--full")
        rounds.append(transfer(daemon, "db"))
    assert "gc_marked" in rounds[0] and "gc_due_in" not in rounds[0], rounds[0]
    assert rounds[1]["freed"] and "gc_marked" not in rounds[1], rounds[1]
    assert 0 < rounds[1]["gc_due_in"] <= 21600, rounds[1]
    freed_packs = rounds[0]["packs_sent"]
    assert len(_keys(bucket, "site-a/data/")) == freed_packs + rounds[1]["packs_sent"]

    marked = as_json(daemon, "target", "gc", "fleet")["job"]
    assert marked["state"] == "done" and marked["kind"] == "target", marked
    assert marked["result"]["gc_marked"] == freed_packs, marked
    assert marked["result"]["gc_deleted"] == 0 and marked["result"]["gc_held"] == 0, marked
    swept = ok(daemon, "target", "gc", "fleet").stdout
    assert f"sweep of target fleet done: swept: 0 pack(s) marked, {freed_packs} deleted" in swept
    assert len(_keys(bucket, "site-a/data/")) == rounds[1]["packs_sent"]
    device = loopdev(SIZE, "restore.img")
    restore_from(daemon, rounds[1]["generation"], device)
    assert sha256_of(device) == sha256_of(volume)

    missing = ctl(daemon, "target", "gc", "nosuch")
    assert missing.returncode != 0 and "nosuch" in missing.stderr, missing


def test_a_volume_server_killed_during_an_upload(
    bucket: SeaweedCluster, engine: EngineHarness, loopdev: Callable[..., str], tmp_path: Path
) -> None:
    big = 96 * MiB  # twelve 8 MiB packs: seconds of uploads at this store's PUT rate
    daemon = engine.start()
    add_target(daemon, bucket, credentials_file(tmp_path / "s3-credentials"))
    ok(daemon, "pool", "create", "p1", loopdev(3 * POOL_SIZE, "pool.img"))
    volume = loopdev(big, "db.img")
    write_random(volume, 0, big, seed=5)
    ok(daemon, "protect", volume, "db", "--rpo", "1h")
    ok(daemon, "objectives", "db", "--target", "fleet")
    ok(daemon, "backup", "db")
    digest = sha256_of(volume)

    job = as_json(daemon, "transfer", "db", "--no-wait")["job"]
    deadline = time.monotonic() + scaled(120)
    while not _keys(bucket, "site-a/data/"):
        assert time.monotonic() < deadline, "no pack reached the store"
        time.sleep(0.05)
    killed = bucket.kill_volume_server(0)
    waited = json.loads(ctl(daemon, "--json", "jobs", "wait", str(job["id"])).stdout)["job"]
    committed = []
    if waited["state"] == "done":
        committed.append(waited["result"]["generation"])
    else:
        # Failed by name, nothing recorded; the next run (server still down) recovers.
        assert waited["error"]["name"] in (
            "org.blockguard1.Error.StoreFailed",
            "org.blockguard1.Error.TargetUnreachable",
        ), waited["error"]
        assert as_json(daemon, "plan", "db")["plan"]["remote"]["method"] == "full"
        committed.append(transfer(daemon, "db")["generation"])
    assert as_json(daemon, "plan", "db")["plan"]["remote"]["up_to_date"] is True

    # Once the server is back, every committed generation restores bit-exact.
    bucket.restart(killed)
    for n, generation in enumerate(committed):
        device = loopdev(big, f"restore-{n}.img")
        restore_from(daemon, generation, device)
        assert sha256_of(device) == digest, generation


def test_the_remote_rpo_sends_to_the_store_by_itself(
    bucket: SeaweedCluster, engine: EngineHarness, loopdev: Callable[..., str], tmp_path: Path
) -> None:
    daemon = engine.start(BLOCKGUARD_SCHEDULER_INTERVAL="0.2")
    add_target(daemon, bucket, credentials_file(tmp_path / "s3-credentials"))
    volume = protect(daemon, loopdev, "db", seed=9)
    ok(daemon, "objectives", "db", "--remote-rpo", "changed 1MiB")
    deadline = time.monotonic() + scaled(120)
    # The scheduler backs the volume up (its first full is due) and then sends it.
    while "transfer" not in (done := done_jobs(daemon)):
        assert time.monotonic() < deadline, daemon.log()[-4000:]
        time.sleep(0.2)
    assert done == ["backup", "transfer"], done
    remote = as_json(daemon, "plan", "db")["plan"]["remote"]
    assert remote["reasons"] == ["the newest generation is there"], remote
    sent = as_json(daemon, "target", "import", "fleet")["import"]["generations"]
    assert [g["volume"] for g in sent] == ["db"]
    device = loopdev(SIZE, "restore.img")
    restore_from(daemon, sent[0]["generation"], device)
    assert sha256_of(device) == sha256_of(volume)


def protect_on(
    daemon: Daemon, loopdev: Callable[..., str], host: str, name: str, seed: int, target: str
) -> str:
    """Pool p1 and volume ``name`` of ``host`` (random bytes of ``seed``), sent to
    ``target`` (files named by host: two hosts may protect one volume name)."""
    ok(daemon, "pool", "create", "p1", loopdev(POOL_SIZE, f"{host}-pool.img"))
    volume = loopdev(SIZE, f"{host}-{name}.img")
    write_random(volume, 0, SIZE, seed=seed)
    ok(daemon, "protect", volume, name, "--rpo", "1h")
    ok(daemon, "objectives", name, "--target", target)
    return volume


def test_two_hosts_with_one_volume_name_own_their_chains(
    bucket: SeaweedCluster,
    engine: EngineHarness,
    loopdev: Callable[..., str],
    tmp_path: Path,
    notify_socket: NotifyListener,
) -> None:
    """Hosts A and B (client ids hosta, hostb) both protect a volume web1 into one
    bucket; host A's keep-last retention and garbage collection (grace 0 s) run over it:
    every generation of host B still restores bit-exact, and a fresh host C restores
    each host's by naming the host (``target add --client HOST``, as for ssh targets)."""
    creds = credentials_file(tmp_path / "s3-credentials")
    key = tmp_path / "key.txt"
    sums: dict[str, str] = {}

    # Host B: a full and an incremental of its web1, whose first bytes are host A's.
    host_b = another_host(engine, notify_socket, tmp_path / "host-b")
    try:
        b = host_b.start(BLOCKGUARD_S3_GC_GRACE="0", BLOCKGUARD_S3_GC_INTERVAL="0")
        add_target(b, bucket, creds, "--client", "hostb")
        ok(b, "key", "export", "--output", str(key))
        volume_b = protect_on(b, loopdev, "b", "web1", seed=31, target="fleet")
        b_gens = []
        for n in range(2):
            ok(b, "backup", "web1")
            b_gens.append(transfer(b, "web1"))
            sums[b_gens[-1]["generation"]] = sha256_of(volume_b)
            write_random(volume_b, 4 * MiB, 2 * MiB, seed=40 + n)
        assert [g["method"] for g in b_gens] == ["full", "incremental"], b_gens
    finally:
        host_b.cleanup()

    # Host A: the same key and volume name; one generation kept there, and a sweep
    # after each transfer. Its first full is host B's first bytes: deduplicated.
    a = engine.start(BLOCKGUARD_S3_GC_GRACE="0", BLOCKGUARD_S3_GC_INTERVAL="0")
    add_target(a, bucket, creds, "--client", "hosta", "--key", str(key))
    volume_a = protect_on(a, loopdev, "a", "web1", seed=31, target="fleet")
    ok(a, "objectives", "web1", "--generations", "1", "--remote-generations", "1")
    a_gens = []
    for n in range(3):
        if n:
            write_random(volume_a, 0, SIZE, seed=50 + n)
        ok(a, "backup", "web1", "--full")
        a_gens.append(transfer(a, "web1"))
        assert a_gens[-1]["method"] == "full", a_gens[-1]
    # Host A's chain is its own: its first full chained onto nothing of host B's and
    # stored no pack (the chunks are shared); its retention freed its own generations.
    assert a_gens[0]["packs_sent"] == 0 and a_gens[0]["chunks_reused"] > 0, a_gens[0]
    assert [len(g["freed"]) for g in a_gens] == [0, 1, 1], a_gens
    freed = {f for g in a_gens for f in g["freed"]}
    assert not freed & set(sums), (freed, sums)
    listed = as_json(a, "target", "import", "fleet")["import"]["generations"]
    assert [g["generation"] for g in listed] == [a_gens[-1]["generation"]]
    sum_a = sha256_of(volume_a)
    a.stop()

    # Host C: only the key and the bucket; one registration per host it restores.
    host_c = another_host(engine, notify_socket, tmp_path / "host-c")
    try:
        c = host_c.start()
        for host in ("hosta", "hostb"):
            ok(c, "target", "add", f"fleet-{host}", URL, "--endpoint", bucket.endpoint,
               "--credentials", str(creds), "--client", host, "--key", str(key))  # fmt: skip
        seen = {
            host: as_json(c, "target", "import", f"fleet-{host}")["import"]
            for host in ("hosta", "hostb")
        }
        assert [g["generation"] for g in seen["hosta"]["generations"]] == [a_gens[-1]["generation"]]
        assert sorted(g["generation"] for g in seen["hostb"]["generations"]) == sorted(sums)
        assert seen["hosta"]["damaged"] == [] and seen["hostb"]["damaged"] == []
        restored = {}
        for host, generation in [("hosta", a_gens[-1]["generation"])] + [
            ("hostb", g) for g in sums
        ]:
            device = loopdev(SIZE, f"c-{host}-{generation[-8:]}.img")
            job = as_json(c, "restore", generation, "--from", f"fleet-{host}",
                          "--target", device)["job"]  # fmt: skip
            assert job["state"] == "done", job
            restored[generation] = sha256_of(device)
        assert restored == {a_gens[-1]["generation"]: sum_a} | sums
    finally:
        host_c.cleanup()
