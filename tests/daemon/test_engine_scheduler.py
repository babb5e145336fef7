"""The real daemon's scheduler: backups start by themselves when the objectives say so.

With an RPO of "2 MiB changed" the first full is due at once, then nothing is due until two
MiB have changed. The backups are slowed down so that each spans several scheduler ticks:
the volume still never gets a second job while one runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from blockguard.cli.client import JOB, Client, plain, variant
from tests.support.daemon import EngineHarness
from tests.support.devices import MiB, sha256_of, write_random
from tests.timeouts import scaled

SIZE = 32 * MiB


def wait_generations(client: Client, count: int, timeout: float = 15) -> list[list[object]]:
    deadline = time.monotonic() + scaled(timeout)
    while True:
        gens = plain(client.call("ListGenerations", "s", "db"))
        running = [p for p in client.objects(JOB).values() if p["State"] in ("queued", "running")]
        assert len(running) <= 1, running
        if len(gens) >= count and not running:
            return gens
        assert time.monotonic() < deadline, gens
        time.sleep(0.05)


def test_scheduler_backs_up_when_due(engine: EngineHarness, loopdev: Callable[..., str]) -> None:
    pool_disk = loopdev(400 * MiB, "pool.img")
    volume = loopdev(SIZE, "db.img")
    daemon = engine.start(BLOCKGUARD_SCHEDULER_INTERVAL="0.2", BLOCKGUARD_TEST_BACKUP_DELAY="0.3")
    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
        write_random(volume, 0, SIZE, seed=1)
        client.call("Protect", "sstssa{sv}", volume, "db", 0, "", "", {})
        client.call("SetObjectives", "sa{sv}", "db", {"rpo": variant("changed 2MiB")})

        gens = wait_generations(client, 1)
        assert [g[1] for g in gens] == ["full"]

        write_random(volume, 0, 1 * MiB, seed=2)
        time.sleep(1.0)  # five ticks: 1 MiB < 2 MiB, nothing is due
        assert len(plain(client.call("ListGenerations", "s", "db"))) == 1
        plan = plain(client.call("Plan", "s", "db"))
        assert "changed 1.0 MiB < RPO amount 2.0 MiB" in plan["schedule"], plan

        write_random(volume, 4 * MiB, 2 * MiB, seed=3)
        gens = wait_generations(client, 2)
        assert [g[1] for g in gens] == ["full", "incremental"]
        jobs = [p for p in client.objects(JOB).values() if p["Kind"] == "backup"]
        assert len(jobs) == 2 and all(p["State"] == "done" for p in jobs), jobs
        assert jobs[1]["Result"]["bytes"] == 3 * MiB

        target = loopdev(SIZE, "new.img")
        props = client.wait_job(
            client.call("Restore", "ssssb", "db", "", "copy", target, False), timeout=30
        )
        assert props["State"] == "done", props["Error"]
        assert sha256_of(target, SIZE) == sha256_of(volume)
