"""Concurrent prune + backup from two hosts into one bucket, through blockguardctl
(issue 12): two daemons running at once, each on its own private bus with its own state
directory and client id, one SeaweedFS bucket, one master key. Every round both hosts
change their volume (half of it to bytes both hosts share, so their packs are deduped
across hosts while the other one prunes), back up a full, and transfer at the same time;
each transfer's retention (2 generations kept there) frees that host's older generation
and its sweep (a grace of 1 s) marks and deletes what no generation of any host
references. After every round, every generation each host lists restores bit-exact."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.host.test_remote_targets import ctl
from tests.host.test_remote_transfer import as_json, ok
from tests.host.test_s3_target import BUCKET, URL, credentials_file
from tests.support.bus import PERMISSIVE, NotifyListener, start_bus
from tests.support.daemon import Daemon, EngineHarness
from tests.support.devices import MiB, sha256_of, write_random
from tests.support.seaweed import SeaweedCluster

pytestmark = pytest.mark.root

SIZE = 16 * MiB
ROUNDS = 20
GRACE = "1"
POOL_SIZE = 400 * MiB


@pytest.fixture
def bucket(seaweed: SeaweedCluster) -> SeaweedCluster:
    seaweed.client().create_bucket(Bucket=BUCKET)  # type: ignore[attr-defined]
    return seaweed


@pytest.fixture
def second_engine(tmp_path: Path) -> Iterator[EngineHarness]:
    """Another host: its own private bus, notify socket and state directory."""
    with ExitStack() as stack:
        shared = Path(tempfile.mkdtemp(prefix="bg-bus-"))
        stack.callback(shutil.rmtree, shared, True)
        shared.chmod(0o755)
        bus = stack.enter_context(start_bus(shared, PERMISSIVE))
        root = tmp_path / "host-b"
        root.mkdir()
        notify = NotifyListener(str(root / "notify"), str(root / "notify"))
        stack.callback(notify.close)
        harness = EngineHarness(bus, root, notify)
        stack.callback(harness.cleanup)
        yield harness


def wait_done(daemon: Daemon, job: dict[str, Any]) -> dict[str, Any]:
    waited = ctl(daemon, "--json", "jobs", "wait", str(job["id"]))
    found = json.loads(waited.stdout)["job"]
    assert found["state"] == "done", found
    return found["result"]  # type: ignore[no-any-return]


def test_two_hosts_prune_and_back_up_at_once(
    bucket: SeaweedCluster,
    engine: EngineHarness,
    second_engine: EngineHarness,
    loopdev: Callable[..., str],
    tmp_path: Path,
) -> None:
    creds = credentials_file(tmp_path / "s3-credentials")
    key = tmp_path / "key.txt"
    hosts: dict[str, Daemon] = {}
    volumes: dict[str, str] = {}
    restore_to: dict[str, str] = {}
    sums: dict[str, dict[str, str]] = {"hosta": {}, "hostb": {}}
    for host, harness in (("hosta", engine), ("hostb", second_engine)):
        daemon = harness.start(BLOCKGUARD_S3_GC_GRACE=GRACE, BLOCKGUARD_S3_GC_INTERVAL="0")
        extra = ("--key", str(key)) if key.exists() else ()
        ok(daemon, "target", "add", "fleet", URL, "--endpoint", bucket.endpoint,
           "--credentials", str(creds), "--client", host, *extra)  # fmt: skip
        if not key.exists():
            ok(daemon, "key", "export", "--output", str(key))
        ok(daemon, "pool", "create", "p1", loopdev(POOL_SIZE, f"{host}-pool.img"))
        volumes[host] = loopdev(SIZE, f"{host}-web1.img")
        restore_to[host] = loopdev(SIZE, f"{host}-restore.img")
        write_random(volumes[host], 0, SIZE, seed=len(host) + ord(host[-1]))
        ok(daemon, "protect", volumes[host], "web1", "--rpo", "1h")
        ok(daemon, "objectives", "web1", "--target", "fleet", "--generations", "1",
           "--remote-generations", "2")  # fmt: skip
        hosts[host] = daemon

    swept = {"gc_marked": 0, "gc_deleted": 0}
    started = time.monotonic()
    for n in range(ROUNDS):
        for host, volume in volumes.items():
            # The first half: bytes both hosts write this round; the second, this host's.
            write_random(volume, 0, SIZE // 2, seed=1000 + n)
            write_random(volume, SIZE // 2, SIZE // 4, seed=2000 + 10 * n + len(sums[host]))
            ok(hosts[host], "backup", "web1", "--full")
        jobs = {h: as_json(d, "transfer", "web1", "--no-wait")["job"] for h, d in hosts.items()}
        for host, job in jobs.items():
            sent = wait_done(hosts[host], job)
            assert "gc_error" not in sent, sent
            for figure in swept:
                swept[figure] += sent[figure]
            sums[host][sent["generation"]] = sha256_of(volumes[host])
        for host, daemon in hosts.items():
            listed = as_json(daemon, "target", "import", "fleet")["import"]
            assert listed["damaged"] == [], listed
            generations = [g["generation"] for g in listed["generations"]]
            assert len(generations) == min(n + 1, 2), (host, n, generations)
            for generation in generations:
                ok(daemon, "restore", generation, "--from", "fleet",
                   "--target", restore_to[host], "--force")  # fmt: skip
                assert sha256_of(restore_to[host]) == sums[host][generation], (host, n)
    print(f"{ROUNDS} rounds of two hosts in {time.monotonic() - started:.1f} s, {swept}")
    # The sweeps did collect while the other host backed up (not a test of nothing).
    assert swept["gc_marked"] > 0 and swept["gc_deleted"] > 0, swept
