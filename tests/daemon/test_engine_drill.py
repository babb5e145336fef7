"""Restore drills over D-Bus: ``Drill`` runs a job on the real engine, and ``Plan`` and the
volume's ``RestoreEstimate`` go from "uncalibrated" to calibrated, with an upper estimate
and the breakdown by term; every real restore is then a sample too."""

from __future__ import annotations

import sqlite3

from blockguard.cli.client import VOLUME, Client, plain, variant
from tests.support.daemon import EngineHarness, run_job
from tests.support.devices import MiB, write_random

from .test_cli import ctl

VOLUME_SIZE = 16 * MiB
POOL_SIZE = 400 * MiB
TERMS = {"fixed", "generations", "extents", "transfer"}


def _samples(engine: EngineHarness) -> list[tuple[str, str, str]]:
    conn = sqlite3.connect(engine.tmp_path / "state" / "catalog.db")
    try:
        return conn.execute("SELECT volume, mode, source FROM path_samples").fetchall()
    finally:
        conn.close()


def test_drill_calibrates_the_plan(engine: EngineHarness, loopdev: object) -> None:
    pool_disk = loopdev(POOL_SIZE, "pool.img")  # type: ignore[operator]
    volume = loopdev(VOLUME_SIZE, "db.img")  # type: ignore[operator]
    target = loopdev(VOLUME_SIZE, "new.img")  # type: ignore[operator]
    daemon = engine.start()
    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
        path = client.call("Protect", "sstssa{sv}", volume, "db", 0, "", "", {})
        client.call(
            "SetObjectives", "sa{sv}", "db", {"rto": variant("1h"), "restore_mode": variant("copy")}
        )
        write_random(volume, 0, VOLUME_SIZE, seed=3)

        plan = plain(client.call("Plan", "s", "db"))
        assert plan["calibrated"] is False
        assert plan["calibration"].startswith("uncalibrated: no drill or restore")
        assert plan["restore_mode"] == "copy"
        assert plan["estimated_upper_seconds"] == plan["estimated_seconds"]
        assert set(plan["restore_breakdown"]) == TERMS
        shown = ctl(daemon, "plan", "db")
        assert shown.returncode == 0, shown.stderr
        assert "uncalibrated: no drill or restore" in shown.stdout

        job = run_job(client, client.call("Drill", "s", "p1"))
        assert job["State"] == "done", job["Error"]
        assert job["Kind"] == "drill"
        result = job["Result"]
        modes = {s["mode"] for s in result["samples"]}
        assert modes == {"copy", "swap-in"}
        assert len(result["terms"]) == 2  # one pool device, both modes fitted
        assert all(v == "" and source == "drill" for v, _, source in _samples(engine))

        plan = plain(client.call("Plan", "s", "db"))
        assert plan["calibrated"] is True, plan["calibration"]
        assert plan["calibration"].startswith("calibrated from 14 restore samples")
        assert plan["estimated_upper_seconds"] >= plan["estimated_seconds"] > 0
        assert set(plan["restore_breakdown"]) == TERMS
        assert sum(plan["restore_breakdown"].values()) == plan["estimated_seconds"]
        assert plan["restore_terms"]["samples"] == 14  # 7 shapes, each restored twice
        props = plain(client.properties(path, VOLUME))
        est = props["RestoreEstimate"]
        assert est["calibrated"] is True and est["mode"] == "copy"
        assert est["upper_seconds"] >= est["seconds"]
        shown = ctl(daemon, "plan", "db")
        assert "calibrated from 14 restore samples" in shown.stdout, shown.stdout
        assert "by term: fixed" in shown.stdout and "upper" in shown.stdout
        shown = ctl(daemon, "volume", "show", "db")
        assert "restore calibration" in shown.stdout and "calibrated from" in shown.stdout

        # A real restore is a sample of its own, with the promise it was made.
        backup = run_job(client, client.call("BackupNow", "s", "db"))
        assert backup["State"] == "done", backup["Error"]
        restore = run_job(client, client.call("Restore", "ssssb", "db", "", "copy", target, False))
        assert restore["State"] == "done", restore["Error"]
        assert restore["Result"]["calibrated"] is True
        assert restore["Result"]["upper_seconds"] >= restore["Result"]["predicted_seconds"] > 0
        assert ("db", "copy", "restore") in _samples(engine)

        # The drill left nothing of its own on the pool.
        assert not list((engine.tmp_path).rglob("@drill*"))

        # blockguardctl pool drill waits for the job and shows each restore and the terms.
        shown = ctl(daemon, "pool", "drill", "p1")
        assert shown.returncode == 0, shown.stderr
        assert "full+diff+2" in shown.stdout and "per generation" in shown.stdout
        assert not list((engine.tmp_path).rglob("@drill*"))
