"""Alerts, health and metrics of the real daemon (dir pool, scan tracking, loop devices).

Each condition is brought about, not waited for: the pool fills past the free-space
threshold by a real backup, the RPO is missed by moving the health clock forward (the
``BLOCKGUARD_TEST_CLOCK_FILE`` hook), backups fail by an injected fault at their commit
(``BLOCKGUARD_TEST_FAIL_AT=before-commit@2+``: the first backup succeeds, every later
one fails). A hook script in the test's alert directory appends what it gets on stdin to
a file: each alert must arrive exactly once, with the right JSON.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from blockguard.cli.client import POOL, Client, plain, variant
from blockguard.core.health import MESSAGE_IDS, AlertKind
from tests.support.bus import REPO
from tests.support.daemon import Daemon, EngineHarness, run_job
from tests.support.devices import MiB, write_random
from tests.timeouts import scaled

SIZE = 64 * MiB


def ctl(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "blockguard.cli.main", "--bus", address, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=scaled(60), env=env)


def hook_calls(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_calls(path: Path, count: int, timeout: float = 30) -> list[dict[str, Any]]:
    """The hook's calls, once there are at least ``count`` of them."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        calls = hook_calls(path)
        if len(calls) >= count:
            return calls
        assert time.monotonic() < deadline, f"{len(calls)} hook calls, wanted {count}: {calls}"
        time.sleep(0.05)


def of(calls: list[dict[str, Any]], kind: str, state: str = "raised") -> list[dict[str, Any]]:
    return [c for c in calls if c["kind"] == kind and c["state"] == state]


class SignalLog:
    """dbus-monitor collecting the daemon's Alert signals."""

    def __init__(self, address: str, out: Path) -> None:
        self.out = out
        with open(out, "w") as sink:
            self.proc = subprocess.Popen(
                [
                    "dbus-monitor",
                    "--address",
                    address,
                    "type='signal',interface='org.blockguard1.Manager',member='Alert'",
                ],
                stdout=sink,
                stderr=subprocess.DEVNULL,
            )

    def count(self, text: str) -> int:
        return self.out.read_text().count(text)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(scaled(10))


def test_alerts_hooks_metrics_and_check_codes(
    engine: EngineHarness, loopdev: Callable[..., str], tmp_path: Path
) -> None:
    pool_disk = loopdev(400 * MiB, "pool.img")
    volume = loopdev(SIZE, "db.img")
    hooks = tmp_path / "alert.d"
    hooks.mkdir()
    calls_file = tmp_path / "hook-calls"
    hook = hooks / "50-record"
    hook.write_text(f"#!/bin/sh\ncat >> {calls_file}\n")
    hook.chmod(0o755)
    broken = hooks / "60-broken"  # a failing hook is logged and changes nothing
    broken.write_text("#!/bin/sh\nexit 3\n")
    broken.chmod(0o755)
    clock = tmp_path / "clock"
    clock.write_text("0")
    metrics_dir = tmp_path / "textfile"
    metrics_dir.mkdir()
    metrics_file = metrics_dir / "blockguard.prom"

    daemon: Daemon = engine.start(
        BLOCKGUARD_ALERT_DIR=str(hooks),
        BLOCKGUARD_ALERT_POOL_FREE_PERCENT="90",
        BLOCKGUARD_TEST_CLOCK_FILE=str(clock),
        BLOCKGUARD_METRICS_FILE=str(metrics_file),
        BLOCKGUARD_TEST_FAIL_AT="before-commit@2+",
    )
    signals = SignalLog(daemon.address, tmp_path / "signals")
    try:
        with Client(daemon.address) as client:
            client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
            objectives = {
                "rpo": variant("every 15m"),
                "rto": variant("1h"),
                "restore_mode": variant("copy"),  # swap-in would be estimated at 0 s
            }
            client.call("Protect", "sstssa{sv}", volume, "db", 0, "", "", objectives)
            pool = next(iter(client.objects(POOL).values()))
            assert pool["Free"] > 0.9 * pool["Capacity"], pool  # the threshold is not crossed

            check = ctl(daemon.address, "status", "--check")
            assert check.returncode == 0, check.stdout + check.stderr
            assert check.stdout.startswith("BLOCKGUARD OK"), check.stdout
            assert hook_calls(calls_file) == []

            # 1. A full backup fills the pool past the threshold: pool-space-low, once.
            write_random(volume, 0, SIZE, seed=11)
            job = run_job(client, client.call("BackupNow", "s", "db"))
            assert job["State"] == "done", job["Error"]
            generation = str(job["Result"]["generation"])
            calls = wait_calls(calls_file, 1)
            low = of(calls, "pool-space-low")
            assert len(low) == 1, calls
            pool = next(iter(client.objects(POOL).values()))
            assert low[0]["pool"] == "p1" and low[0]["subject_type"] == "pool"
            assert low[0]["severity"] == "warning"
            assert low[0]["message_id"] == MESSAGE_IDS[AlertKind.POOL_SPACE_LOW]
            assert low[0]["details"]["threshold_percent"] == 90
            assert low[0]["details"]["free_percent"] < 90
            assert low[0]["details"]["size_bytes"] == pool["Capacity"]
            check = ctl(daemon.address, "status", "--check")
            assert check.returncode == 1, check.stdout + check.stderr
            assert "pool p1" in check.stdout and "WARNING" in check.stdout

            # 2. An hour passes (on the health clock): the RPO of 15m is missed, once.
            clock.write_text("3600")
            check = ctl(daemon.address, "status", "--check")
            assert check.returncode == 2, check.stdout + check.stderr
            assert check.stdout.startswith("BLOCKGUARD CRITICAL"), check.stdout
            assert "RPO 15m" in check.stdout
            summary = plain(client.call("GetStatus"))["summary"]
            assert "health critical: 2 alerts" in summary, summary
            plain(client.call("GetHealth"))  # assessed again: nothing new
            # What blockguardctl status asks: both in one call, the same answers.
            both = plain(client.call("GetStatusAndHealth"))  # assessed again: nothing new
            assert both["health"]["level"] == "critical", both
            assert "health critical: 2 alerts" in both["status"]["summary"], both
            assert both["health"]["summary"] == both["status"]["summary"]
            assert both["status"]["volumes"] == 1 and both["status"]["pools"] == 1, both
            calls = wait_calls(calls_file, 2)
            missed = of(calls, "rpo-missed")
            assert len(missed) == 1, calls
            assert missed[0]["volume"] == "db" and missed[0]["severity"] == "critical"
            assert missed[0]["details"]["rpo_seconds"] == 900
            assert missed[0]["details"]["rpo_age_seconds"] >= 3600
            assert missed[0]["message_id"] == MESSAGE_IDS[AlertKind.RPO_MISSED]

            # ... and when the clock is back, it is resolved, once.
            clock.write_text("0")
            health = plain(client.call("GetHealth"))
            assert health["level"] == "warning", health
            calls = wait_calls(calls_file, 3)
            assert len(of(calls, "rpo-missed", "resolved")) == 1, calls

            # 3. Backups fail (the injected fault): the third in a row alerts, once.
            for attempt in range(4):
                failed = run_job(client, client.call("BackupNow", "s", "db"))
                assert failed["State"] == "failed", (attempt, failed)
                assert "test fault injected" in failed["Error"][1]
                plain(client.call("GetHealth"))
                if attempt == 1:
                    assert of(hook_calls(calls_file), "backups-failing") == []
            calls = wait_calls(calls_file, 4)
            failing = of(calls, "backups-failing")
            assert len(failing) == 1, calls
            assert failing[0]["volume"] == "db" and failing[0]["details"]["failures"] == 3
            assert "test fault injected" in failing[0]["details"]["last_error"]

            # The metrics file, as node_exporter's textfile collector would read it.
            health = plain(client.call("GetHealth"))
            text = metrics_file.read_text()
            families = {f.name: f for f in text_string_to_metric_families(text)}

            def value(name: str, **labels: str) -> float:
                found = [
                    s.value for s in families[name].samples if s.labels.items() >= labels.items()
                ]
                assert len(found) == 1, (name, labels, found)
                return found[0]

            gens = plain(client.call("ListGenerations", "s", "db"))
            assert [g[0] for g in gens] == [generation]
            pool = next(iter(client.objects(POOL).values()))
            assert value("blockguard_volume_generations", volume="db") == 1
            assert value("blockguard_volume_stored_bytes", volume="db") == gens[0][4]
            assert (
                value("blockguard_volume_last_success_timestamp_seconds", volume="db")
                == (gens[0][3])
            )
            assert value("blockguard_volume_rpo_seconds", volume="db") == 900
            assert value("blockguard_volume_rto_seconds", volume="db") == 3600
            assert value("blockguard_volume_restore_estimate_upper_seconds", volume="db") > 0
            assert value("blockguard_volume_backup_failures_in_row", volume="db") == 4
            # The same assessment wrote the file and answered GetHealth.
            assert value("blockguard_pool_size_bytes", pool="p1") == pool["Capacity"]
            assert (
                value("blockguard_pool_free_bytes", pool="p1") == (health["pools"][0]["free_bytes"])
            )
            assert 0 < health["pools"][0]["free_bytes"] < 0.9 * pool["Capacity"]
            assert value("blockguard_jobs", kind="backup", state="done") == 1
            assert value("blockguard_jobs", kind="backup", state="failed") == 4
            assert value("blockguard_job_failures", kind="backup") == 4
            assert value("blockguard_health") == 1
            assert value("blockguard_alert_active", kind="backups-failing", subject="db") == 1
            assert health["level"] == "warning"

            check = ctl(daemon.address, "status")
            assert check.returncode == 0, check.stderr
            assert "db" in check.stdout and "ago" in check.stdout and "p1" in check.stdout
            as_json = json.loads(ctl(daemon.address, "--json", "status").stdout)
            row = as_json["health"]["volumes"][0]
            assert row["name"] == "db" and row["failures_in_row"] == 4
            assert row["rpo_seconds"] == 900 and row["last_success"] == gens[0][3]
    finally:
        daemon.stop()  # waits for the hooks already queued
        signals.stop()

    # Exactly one call per alert, all told, and the same once in the journal fields.
    calls = hook_calls(calls_file)
    assert sorted((c["kind"], c["state"]) for c in calls) == [
        ("backups-failing", "raised"),
        ("pool-space-low", "raised"),
        ("rpo-missed", "raised"),
        ("rpo-missed", "resolved"),
    ], calls
    log = daemon.log()
    for kind, expected in (
        (AlertKind.POOL_SPACE_LOW, 1),
        (AlertKind.RPO_MISSED, 2),
        (AlertKind.BACKUPS_FAILING, 1),
    ):
        assert log.count(f"MESSAGE_ID={MESSAGE_IDS[kind]}") == expected, kind
    assert "alert hook" in log and "60-broken exited 3" in log
    assert signals.count('string "backups-failing"') == 1
    assert signals.count('string "pool-space-low"') == 1
    assert signals.count('string "rpo-missed"') == 2

    # Nobody answers: unknown.
    check = ctl(daemon.address, "status", "--check")
    assert check.returncode == 3, check.stdout + check.stderr
    assert check.stdout.startswith("BLOCKGUARD UNKNOWN"), check.stdout


def test_failing_scheduled_backups_back_off_but_backup_now_runs(
    engine: EngineHarness, loopdev: Callable[..., str], tmp_path: Path
) -> None:
    """Every backup fails; the scheduler may look five times a second. After the first
    failure it holds the volume back (an hour here): it does not even look at it again
    within that time, let alone retry; BackupNow still runs at once."""
    pool_disk = loopdev(400 * MiB, "pool.img")
    volume = loopdev(16 * MiB, "db.img")
    daemon = engine.start(
        BLOCKGUARD_SCHEDULER_INTERVAL="0.2",
        BLOCKGUARD_TEST_FAIL_AT="before-commit@1+",
        BLOCKGUARD_RETRY_BASE="3600",
    )
    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
        write_random(volume, 0, 16 * MiB, seed=5)
        client.call("Protect", "sstssa{sv}", volume, "db", 0, "", "", {})
        # The first full is due at once.
        client.call("SetObjectives", "sa{sv}", "db", {"rpo": variant("every 1h")})

        def backups() -> list[dict[str, Any]]:
            found = client.objects("org.blockguard1.Job").values()
            return [j for j in found if j["Kind"] == "backup"]

        def held_plans() -> int:
            return len(re.findall(r"next look at db: .*held back 3[56]\d\ds", daemon.log()))

        deadline = time.monotonic() + scaled(60)
        while not held_plans():
            assert time.monotonic() < deadline, daemon.log()[-3000:]
            time.sleep(0.1)
        looks = daemon.log().count("looking at db ")
        time.sleep(scaled(2.0))  # ten scheduler floors
        jobs = backups()
        assert len(jobs) == 1 and jobs[0]["State"] == "failed", jobs
        assert daemon.log().count("looking at db ") == looks, daemon.log()[-3000:]

        plans = held_plans()
        manual = run_job(client, client.call("BackupNow", "s", "db"))
        assert manual["State"] == "failed" and "test fault injected" in manual["Error"][1]
        # The second failure renews the hold (planned from its time), still no retry.
        while held_plans() <= plans:
            assert time.monotonic() < deadline, daemon.log()[-3000:]
            time.sleep(0.1)
        time.sleep(scaled(1.0))
        assert len(backups()) == 2


def test_infeasible_objective_alerts_once_and_resolves(
    engine: EngineHarness, loopdev: Callable[..., str], tmp_path: Path
) -> None:
    """An RTO of 1 s for a copy restore of 32 MiB at the harness's 8 MiB/s cannot be met;
    relaxed to an hour, it can."""
    pool_disk = loopdev(400 * MiB, "pool.img")
    volume = loopdev(32 * MiB, "db.img")
    hooks = tmp_path / "alert.d"
    hooks.mkdir()
    calls_file = tmp_path / "hook-calls"
    (hooks / "record").write_text(f"#!/bin/sh\ncat >> {calls_file}\n")
    (hooks / "record").chmod(0o755)
    daemon = engine.start(BLOCKGUARD_ALERT_DIR=str(hooks))
    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
        write_random(volume, 0, 32 * MiB, seed=9)
        tight = {"rto": variant("1s"), "restore_mode": variant("copy")}
        client.call("Protect", "sstssa{sv}", volume, "db", 0, "", "", tight)
        job = run_job(client, client.call("BackupNow", "s", "db"))
        assert job["State"] == "done", job["Error"]
        check = ctl(daemon.address, "status", "--check")
        assert check.returncode == 2, check.stdout + check.stderr
        calls = wait_calls(calls_file, 1)
        assert [(c["kind"], c["state"]) for c in calls] == [("objective-infeasible", "raised")]
        assert calls[0]["volume"] == "db" and calls[0]["severity"] == "critical"
        assert calls[0]["details"]["rto_seconds"] == 1
        assert calls[0]["details"]["estimate_upper_seconds"] > 1

    # A restart does not raise again what is still going on (the daemon assesses at start).
    daemon.stop()
    daemon = engine.start(BLOCKGUARD_ALERT_DIR=str(hooks))
    with Client(daemon.address) as client:
        assert plain(client.call("GetHealth"))["level"] == "critical"
        assert len(hook_calls(calls_file)) == 1
        client.call("SetObjectives", "sa{sv}", "db", {"rto": variant("1h")})
        check = ctl(daemon.address, "status", "--check")
        assert check.returncode == 0, check.stdout + check.stderr
        calls = wait_calls(calls_file, 2)
        assert [(c["kind"], c["state"]) for c in calls] == [
            ("objective-infeasible", "raised"),
            ("objective-infeasible", "resolved"),
        ]
    daemon.stop()
    assert len(hook_calls(calls_file)) == 2
