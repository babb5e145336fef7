"""kill -9 of the real daemon in the middle of a backup, and what the next daemon makes of it.

The backup is slowed down by the engine's test hook (a sleep after each extent written), the
daemon is SIGKILLed while the job is copying, and a new daemon is started on the same state:
the job is reported failed, the committed generations still restore bit-exact, the partial
one left nothing behind on the pool, and tracking continues (the next backup is an
incremental again, and restores bit-exact).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from blockguard.cli.client import JOB, VOLUME, Client, RemoteError, plain
from tests.support.daemon import EngineHarness, run_job
from tests.support.devices import MiB, sha256_of, write_random
from tests.timeouts import scaled

SIZE = 64 * MiB


def restore_to(client: Client, generation: str, target: str) -> None:
    props = run_job(
        client, client.call("Restore", "ssssb", "db", generation, "copy", target, False)
    )
    assert props["State"] == "done", props["Error"]


def test_kill_9_during_a_backup(engine: EngineHarness, loopdev: Callable[..., str]) -> None:
    pool_disk = loopdev(400 * MiB, "pool.img")
    volume = loopdev(SIZE, "db.img")
    targets = [loopdev(SIZE, f"new{i}.img") for i in range(3)]
    daemon = engine.start(BLOCKGUARD_TEST_BACKUP_DELAY="0.3")
    points = []
    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
        client.call("Protect", "sstssa{sv}", volume, "db", 0, "", "", {})
        write_random(volume, 0, SIZE, seed=1)
        for n in range(2):
            if n:
                write_random(volume, 0, 4 * MiB, seed=2)
            props = run_job(client, client.call("BackupNow", "s", "db"))
            assert props["State"] == "done", props["Error"]
            points.append((props["Result"]["generation"], sha256_of(volume)))

        write_random(volume, 8 * MiB, 48 * MiB, seed=3)
        job = client.call("BackupNow", "s", "db")
        deadline = time.monotonic() + scaled(120)
        while True:
            props = client.properties(job, JOB)
            if props["State"] == "running" and 0 < props["BytesDone"] < props["BytesTotal"]:
                break
            assert time.monotonic() < deadline and props["State"] != "done", props
            time.sleep(0.02)
        # One job per volume: a second backup and an unprotect are refused meanwhile.
        for call in (
            lambda: client.call("BackupNow", "s", "db"),
            lambda: client.call("Unprotect", "sb", "db", False),
        ):
            with pytest.raises(RemoteError) as info:
                call()
            assert info.value.name == "org.blockguard1.Error.Busy"
        daemon.kill()
    current = sha256_of(volume)

    daemon = engine.start()
    with Client(daemon.address) as client:
        failed = [
            p
            for p in client.objects(JOB).values()
            if p["Kind"] == "backup" and p["State"] == "failed"
        ]
        assert len(failed) == 1, failed
        assert "daemon restarted" in failed[0]["Error"][1]

        gens = plain(client.call("ListGenerations", "s", "db"))
        assert [(g[0], g[1]) for g in gens] == [
            (points[0][0], "full"),
            (points[1][0], "incremental"),
        ]
        # The partial generation was collected when the pool was reopened.
        area = daemon.state_dir / "pools" / "p1" / "area-0" / "volumes" / "db"
        entries = sorted(p.name for p in area.iterdir())
        assert entries == sorted(g[0].split("@", 1)[1] for g in gens)
        assert all((area / e / "manifest.json").is_file() for e in entries)

        for (gen, sha), target in zip(points, targets, strict=False):
            restore_to(client, gen, target)
            assert sha256_of(target, SIZE) == sha

        volume_props = client.properties("/org/blockguard1/volume/db", VOLUME)
        assert volume_props["TrackerState"] == "exact"
        plan = plain(client.call("Plan", "s", "db"))
        assert plan["method"] == "incremental", plan["reasons"]
        assert plan["changed_bytes_since_backup"] == 48 * MiB
        props = run_job(client, client.call("BackupNow", "s", "db"))
        assert props["State"] == "done" and props["Result"]["method"] == "incremental"
        restore_to(client, str(props["Result"]["generation"]), targets[2])
        assert sha256_of(targets[2], SIZE) == current
    assert "Traceback" not in daemon.log()
