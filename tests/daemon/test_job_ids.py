"""Jobs an admin handles: ids go on counting across a daemon restart (an id seen before it
never names another job after it), and a cancelled backup commits nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from blockguard.cli.client import JOB, Client, RemoteError
from tests.support.bus import REPO
from tests.support.daemon import EngineHarness, run_job
from tests.support.devices import MiB, write_random
from tests.timeouts import scaled

CLI = [sys.executable, "-m", "blockguard.cli.main"]


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


def test_a_cancelled_backup_commits_nothing(engine: EngineHarness, loopdev: object) -> None:
    pool_disk = loopdev(400 * MiB, "pool.img")  # type: ignore[operator]
    volume = loopdev(32 * MiB, "db.img")  # type: ignore[operator]
    write_random(volume, 0, 32 * MiB, seed=7)
    # Slow (a pause per extent written), so that the cancel lands while it copies.
    daemon = engine.start(BLOCKGUARD_TEST_BACKUP_DELAY="0.3")
    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
        client.call("Protect", "sstssa{sv}", volume, "db", 0, "", "", {})
        path = client.call("BackupNow", "s", "db")
        job_id = int(path.rsplit("/", 1)[-1])
        deadline = time.monotonic() + scaled(60)
        while client.properties(path, JOB)["BytesDone"] == 0:
            assert time.monotonic() < deadline, "the backup never started copying"
            time.sleep(0.02)
        # Through the CLI: it asks, waits until the job stopped and says what was left.
        cancel = subprocess.run(
            [*CLI, "--bus", daemon.address, "jobs", "cancel", str(job_id)],
            capture_output=True,
            text=True,
            timeout=scaled(60),
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert cancel.returncode == 0, cancel.stderr
        assert f"job {job_id} was cancelled on request" in cancel.stdout, cancel.stdout
        props = run_job(client, path)
        assert props["State"] == "failed"
        assert props["Error"][0] == "org.blockguard1.Error.Cancelled"
        assert "nothing was committed" in props["Error"][1]
        assert client.call("ListGenerations", "s", "db") == []
        with pytest.raises(RemoteError) as ended:
            client.call("CancelJob", "t", job_id)
        assert "already ended" in ended.value.message
        with pytest.raises(RemoteError) as missing:
            client.call("CancelJob", "t", 999_999)
        assert missing.value.name == "org.blockguard1.Error.NotFound"
        again = run_job(client, client.call("BackupNow", "s", "db"))
        assert again["State"] == "done", again["Error"]
        gens = client.call("ListGenerations", "s", "db")
        assert [(g[1], g[6]) for g in gens] == [("full", 1)]
