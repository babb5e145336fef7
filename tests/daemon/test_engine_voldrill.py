"""Scheduled restore drills of volumes, with the real engine on loop devices (dir pool, scan
tracking), driven over the bus and through blockguardctl.

A volume with an RTO is drilled by the scheduler once it has a generation (weekly by
default): its newest generation restored into scratch space on its pool, read back against
the stored checksums, timed against the RTO, the scratch removed; ``status`` and ``volume
show`` give the last drill. A drill made slow by a fault (every generation read of the
drill takes 1.5 s more, as from a slow pool disk) misses an RTO of 1 s: it raises the
one-shot ``drill-missed-rto`` alert and the next backup becomes a full instead of an
incremental. A drill that finds a damaged chunk fails, alerts, and the next backup is a
full too.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import time
from collections.abc import Callable
from typing import Any

from dbus_fast.aio import MessageBus

from blockguard.cli.client import JOB, VOLUME, Client, plain
from tests.support.daemon import Daemon, EngineHarness, run_job
from tests.support.devices import MiB, sha256_of, write_random
from tests.timeouts import scaled

from .test_cli import ctl
from .test_daemon import _watch
from .test_engine_corrupt import flip, gen_dir

SIZE = 16 * MiB
POOL_SIZE = 400 * MiB
VOLUME_PATH = "/org/blockguard1/volume/db"


def flat(text: str) -> str:
    """CLI output with rich's line wrapping undone (it wraps at spaces)."""
    return " ".join(text.split())


def _samples(daemon: Daemon) -> list[tuple[str, str, str]]:
    conn = sqlite3.connect(daemon.state_dir / "catalog.db")
    try:
        return conn.execute("SELECT volume, mode, source FROM path_samples").fetchall()
    finally:
        conn.close()


def _write_rates(daemon: Daemon, volume: str) -> list[float]:
    conn = sqlite3.connect(daemon.state_dir / "catalog.db")
    try:
        rows = conn.execute(
            "SELECT write_rate FROM path_samples WHERE volume = ? AND source = 'drill'", (volume,)
        )
        return [r for (r,) in rows]
    finally:
        conn.close()


def _no_scratch_left(daemon: Daemon) -> None:
    assert not list(daemon.state_dir.rglob("@vdrill*"))
    assert not list(daemon.state_dir.rglob("bg-drill-scratch*"))
    attached = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    mine = [line for line in attached.splitlines() if str(daemon.state_dir) in line]
    assert not [line for line in mine if "@vdrill" in line or "bg-drill" in line], mine


def _wait_drill(client: Client, timeout: float = 60) -> dict[str, Any]:
    """The first drill job's final properties (the scheduler starts it by itself)."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        drills = [p for p in client.objects(JOB).values() if p["Kind"] == "drill"]
        if drills and all(p["State"] in ("done", "failed") for p in drills):
            assert len(drills) == 1, drills
            return plain(drills[0])
        assert time.monotonic() < deadline, drills
        time.sleep(0.1)


def test_scheduled_drill_restores_verifies_and_is_shown(
    engine: EngineHarness, loopdev: Callable[..., str]
) -> None:
    pool_disk = loopdev(POOL_SIZE, "pool.img")
    volume = loopdev(SIZE, "db.img")
    write_random(volume, 0, SIZE, seed=1)
    daemon = engine.start(BLOCKGUARD_SCHEDULER_INTERVAL="0.2")
    assert ctl(daemon, "pool", "create", "p1", pool_disk).returncode == 0
    out = ctl(daemon, "protect", volume, "db", "--rto", "1h", "--restore-mode", "swap-in")
    assert out.returncode == 0, out.stderr
    with Client(daemon.address) as client:
        # Only an RTO: the first full is due at once, then the first drill (never drilled).
        job = _wait_drill(client)
        assert job["State"] == "done", job["Error"]
        assert job["Target"] == "db"
        result = job["Result"]
        gens = plain(client.call("ListGenerations", "s", "db"))
        assert [g[1] for g in gens] == ["full"]
        assert result["result"] == "ok" and result["problem"] == ""
        assert result["generation"] == gens[0][0]
        assert result["mode"] == "swap-in" and result["rto_seconds"] == 3600.0
        assert result["verified_bytes"] == SIZE  # every byte read back and checked
        assert result["measured_seconds"] > 0 and result["predicted_seconds"] >= 0

        props = plain(client.properties(VOLUME_PATH, VOLUME))
        last = props["LastDrill"]
        assert last["result"] == "ok" and last["generation"] == gens[0][0]
        assert last["measured_seconds"] == result["measured_seconds"]
        # The next one is a week after this one (the default with an RTO).
        assert props["NextDrill"] == int(last["at"] + 7 * 86400)
        assert ("db", "swap-in", "drill") in _samples(daemon)

    status = ctl(daemon, "status")
    assert status.returncode == 0, status.stderr
    text = flat(status.stdout)
    assert "restore drill failed" not in text
    assert "db: last restore drill " in text and f"ok, {gens[0][0]} restored in" in text
    assert "against RTO 1h" in text, text
    shown = flat(ctl(daemon, "volume", "show", "db").stdout)
    assert "last drill" in shown and f"ok, {gens[0][0]} restored in" in shown, shown
    _no_scratch_left(daemon)

    # Drills off: none is scheduled any more; a bad value is named and changes nothing.
    bad = ctl(daemon, "objectives", "db", "--drill", "fortnightly")
    assert bad.returncode == 2 and "'fortnightly'" in bad.stderr, bad.stderr
    with Client(daemon.address) as client:
        assert "drill" not in plain(client.properties(VOLUME_PATH, VOLUME))["Objectives"]
    assert ctl(daemon, "objectives", "db", "--drill", "off").returncode == 0
    with Client(daemon.address) as client:
        props = plain(client.properties(VOLUME_PATH, VOLUME))
        assert props["Objectives"]["drill"] == "off" and props["NextDrill"] == 0
    assert "Traceback" not in daemon.log()


def _drill_watching_signals(daemon: Daemon) -> tuple[subprocess.CompletedProcess, list[Any]]:
    """``blockguardctl volume drill db`` while collecting blockguardd's signals."""
    done: dict[str, subprocess.CompletedProcess] = {}

    async def action(_bus: MessageBus) -> None:
        done["out"] = await asyncio.to_thread(ctl, daemon, "volume", "drill", "db")

    def until(seen: list[Any]) -> bool:
        # _watch waits for the action before it waits for this.
        return any(m.member == "Alert" for m in seen)

    seen = asyncio.run(_watch(daemon.address, action, until))
    alerts = [m.body[:5] for m in seen if m.member == "Alert"]
    return done["out"], alerts


def test_slow_drill_alerts_and_makes_the_next_backup_a_full(
    engine: EngineHarness, loopdev: Callable[..., str]
) -> None:
    pool_disk = loopdev(POOL_SIZE, "pool.img")
    volume = loopdev(SIZE, "db.img")
    write_random(volume, 0, SIZE, seed=1)
    daemon = engine.start(BLOCKGUARD_TEST_DRILL_DELAY="1.5")
    assert ctl(daemon, "pool", "create", "p1", pool_disk).returncode == 0
    assert (
        ctl(daemon, "protect", volume, "db", "--rto", "1s", "--restore-mode", "swap-in").returncode
        == 0
    )
    with Client(daemon.address) as client:
        backup = run_job(client, client.call("BackupNow", "s", "db"))
        assert backup["State"] == "done", backup["Error"]
        write_random(volume, 4 * MiB, 64 * 1024, seed=2)
        before = plain(client.call("Plan", "s", "db"))
        assert before["method"] == "incremental", before["reasons"]

    out, alerts = _drill_watching_signals(daemon)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "more than the RTO 1s" in flat(out.stderr), out.stderr
    # kind, subject, state, severity, message
    assert len(alerts) == 1, alerts
    assert alerts[0][:4] == ["drill-missed-rto", "db", "raised", "warning"], alerts
    assert alerts[0][4].startswith("volume db: restore drill failed: the restore of db@")
    assert "restore drill failed" in daemon.log()

    with Client(daemon.address) as client:
        last = plain(client.properties(VOLUME_PATH, VOLUME))["LastDrill"]
        assert last["result"] == "failed" and "more than the RTO" in last["problem"]
        assert last["measured_seconds"] > last["rto_seconds"] == 1.0
        # The measurement entered the calibration as a sample of the restore path.
        assert ("db", "swap-in", "drill") in _samples(daemon)
        after = plain(client.call("Plan", "s", "db"))
        assert after["method"] == "full", after["reasons"]
        assert any("a restore drill measured" in r for r in after["reasons"]), after["reasons"]

        status = flat(ctl(daemon, "status").stdout)
        assert "restore drill failed: db" in status, status
        assert "failed, db@" in status and "against RTO 1s: the restore of" in status

    # The last drill is kept in the job history: a restarted daemon knows it, and plans by it.
    daemon.stop()
    daemon = engine.start(BLOCKGUARD_TEST_DRILL_DELAY="1.5")
    with Client(daemon.address) as client:
        again = plain(client.properties(VOLUME_PATH, VOLUME))["LastDrill"]
        assert again == last
        assert plain(client.call("Plan", "s", "db"))["method"] == "full"

        backup = run_job(client, client.call("BackupNow", "s", "db"))
        assert backup["State"] == "done", backup["Error"]
        assert backup["Result"]["method"] == "full", backup["Result"]["reasons"]
        # Is the promise kept again? The new full is drilled an hour after the failed drill.
        props = plain(client.properties(VOLUME_PATH, VOLUME))
        assert props["NextDrill"] == int(last["at"] + 3600)
        # The drilled chain is no longer the one a new incremental extends.
        write_random(volume, 8 * MiB, 64 * 1024, seed=3)
        assert plain(client.call("Plan", "s", "db"))["method"] == "incremental"
    _no_scratch_left(daemon)
    assert "Traceback" not in daemon.log()


def test_drill_that_finds_damage_alerts_and_makes_the_next_backup_a_full(
    engine: EngineHarness, loopdev: Callable[..., str]
) -> None:
    pool_disk = loopdev(POOL_SIZE, "pool.img")
    volume = loopdev(SIZE, "db.img")
    write_random(volume, 0, SIZE, seed=1)
    daemon = engine.start()
    assert ctl(daemon, "pool", "create", "p1", pool_disk).returncode == 0
    assert (
        ctl(
            daemon,
            "protect",
            volume,
            "db",
            "--rto",
            "1h",
            "--rpo",
            "1h",
            "--restore-mode",
            "swap-in",
        ).returncode
        == 0
    )
    with Client(daemon.address) as client:
        run_job(client, client.call("BackupNow", "s", "db"))
        write_random(volume, 4 * MiB, 64 * 1024, seed=2)
        inc = run_job(client, client.call("BackupNow", "s", "db"))
        assert inc["Result"]["method"] == "incremental", inc["Result"]["reasons"]
        newest = str(inc["Result"]["generation"])
        flip(gen_dir(daemon, newest) / "chunks", 4096)

    out, alerts = _drill_watching_signals(daemon)
    assert out.returncode != 0 and "checksum mismatch" in out.stderr, out.stderr
    assert newest in out.stderr
    assert len(alerts) == 1, alerts
    assert alerts[0][:4] == ["drill-failed", "db", "raised", "critical"], alerts
    assert "checksum mismatch" in alerts[0][4]

    with Client(daemon.address) as client:
        last = plain(client.properties(VOLUME_PATH, VOLUME))["LastDrill"]
        assert last["result"] == "failed" and newest in last["problem"]
        states = {g[0]: g[5] for g in plain(client.call("ListGenerations", "s", "db"))}
        assert states[newest] == "corrupt"
        assert plain(client.call("Plan", "s", "db"))["method"] == "full"
    _no_scratch_left(daemon)
    assert "Traceback" not in daemon.log()


def test_drill_is_refused_while_the_volume_is_busy_and_without_generations(
    engine: EngineHarness, loopdev: Callable[..., str]
) -> None:
    pool_disk = loopdev(POOL_SIZE, "pool.img")
    volume = loopdev(SIZE, "db.img")
    daemon = engine.start(BLOCKGUARD_TEST_BACKUP_DELAY="3")
    assert ctl(daemon, "pool", "create", "p1", pool_disk).returncode == 0
    out = ctl(daemon, "protect", volume, "db", "--rto", "1h", "--restore-mode", "copy")
    assert out.returncode == 0, out.stderr
    none = ctl(daemon, "volume", "drill", "db")
    assert none.returncode == 3 and "generation" in none.stderr, none.stderr
    with Client(daemon.address) as client:
        job = client.call("BackupNow", "s", "db")
        busy = ctl(daemon, "volume", "drill", "db")
        assert busy.returncode == 4 and "is running" in busy.stderr, busy.stderr
        assert run_job(client, job)["State"] == "done"
        drill = run_job(client, client.call("DrillVolume", "s", "db"))
        assert drill["State"] == "done", drill["Error"]
        # Copy mode: a real copy into scratch space on the pool, every chunk read back and
        # checked; the sample keeps the scratch's write rate.
        result = drill["Result"]
        assert result["result"] == "ok" and result["mode"] == "copy"
        assert result["verified_bytes"] == SIZE
        assert ("db", "copy", "drill") in _samples(daemon)
        assert _write_rates(daemon, "db") and all(r > 0 for r in _write_rates(daemon, "db"))
        # The refusals started nothing: the one drill job is the one asked for last.
        assert [p["Kind"] for p in client.objects(JOB).values()].count("drill") == 1
    _no_scratch_left(daemon)


def test_a_restore_stops_the_drill_of_its_volume(
    engine: EngineHarness, loopdev: Callable[..., str]
) -> None:
    pool_disk = loopdev(POOL_SIZE, "pool.img")
    volume = loopdev(SIZE, "db.img")
    target = loopdev(SIZE, "new.img")
    write_random(volume, 0, SIZE, seed=1)
    # Every generation read of a drill takes a minute: only a stop ends it in time.
    daemon = engine.start(BLOCKGUARD_TEST_DRILL_DELAY="60")
    assert ctl(daemon, "pool", "create", "p1", pool_disk).returncode == 0
    assert (
        ctl(daemon, "protect", volume, "db", "--rto", "1h", "--restore-mode", "swap-in").returncode
        == 0
    )
    with Client(daemon.address) as client:
        backup = run_job(client, client.call("BackupNow", "s", "db"))
        assert backup["State"] == "done", backup["Error"]
        drill = client.call("DrillVolume", "s", "db")
        deadline = time.monotonic() + scaled(30)
        while client.properties(drill, JOB)["State"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)

        restore = run_job(client, client.call("Restore", "ssssb", "db", "", "copy", target, False))
        assert restore["State"] == "done", restore["Error"]
        assert sha256_of(target, SIZE) == sha256_of(volume)
        stopped = run_job(client, drill)
        assert stopped["State"] == "failed" and "cancelled" in stopped["Error"][1]
        last = plain(client.properties(VOLUME_PATH, VOLUME))["LastDrill"]
        assert last["result"] == "stopped" and "for a restore" in last["problem"]
    # A drill stopped for a restore is no alarm.
    assert "restore drill failed" not in daemon.log()
    assert "restore drill failed" not in flat(ctl(daemon, "status").stdout)
    _no_scratch_left(daemon)


def test_a_daemon_stopped_during_a_drill_leaves_no_scratch_behind(
    engine: EngineHarness, loopdev: Callable[..., str]
) -> None:
    pool_disk = loopdev(POOL_SIZE, "pool.img")
    volume = loopdev(SIZE, "db.img")
    write_random(volume, 0, SIZE, seed=1)
    daemon = engine.start(BLOCKGUARD_TEST_DRILL_DELAY="60")
    assert ctl(daemon, "pool", "create", "p1", pool_disk).returncode == 0
    assert (
        ctl(daemon, "protect", volume, "db", "--rto", "1h", "--restore-mode", "swap-in").returncode
        == 0
    )
    with Client(daemon.address) as client:
        assert run_job(client, client.call("BackupNow", "s", "db"))["State"] == "done"
        drill = client.call("DrillVolume", "s", "db")
        deadline = time.monotonic() + scaled(30)
        while not list(daemon.state_dir.rglob("@vdrill*")):  # its scratch clone exists
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.properties(drill, JOB)["State"] == "running"
    assert daemon.stop() == 0
    # (The pool area is unmounted now: what is left attached is what counts.)
    attached = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert "@vdrill" not in attached, attached
