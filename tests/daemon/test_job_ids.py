"""Job ids go on counting across a daemon restart: an id seen before it never names
another job after it."""

from __future__ import annotations

from blockguard.cli.client import Client

from .conftest import EngineHarness, MiB, run_job


def test_a_restarted_daemon_numbers_jobs_on(engine: EngineHarness, loopdev: object) -> None:
    pool_disk = loopdev(400 * MiB, "pool.img")  # type: ignore[operator]
    volume = loopdev(16 * MiB, "db.img")  # type: ignore[operator]
    daemon = engine.start()
    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
        client.call("Protect", "sstssa{sv}", volume, "db", 0, "", "", {})
        first = client.call("BackupNow", "s", "db")
        assert run_job(client, first)["State"] == "done"
    daemon.stop()
    daemon = engine.start()
    with Client(daemon.address) as client:
        second = client.call("BackupNow", "s", "db")
        props = run_job(client, second)
        assert props["State"] == "done", props["Error"]
    first_id = int(first.rsplit("/", 1)[-1])
    assert int(second.rsplit("/", 1)[-1]) == first_id + 1
    assert props["Id"] == first_id + 1
