"""Opening catalogs: upgrades from older schemas, refusal of newer or foreign files."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import pytest

from blockguard.core.catalog import (
    CURRENT_VERSION,
    Catalog,
    PerfEntry,
    RemoteGenerationRow,
    link_perf_key,
)
from blockguard.core.catalog import schema as catalog_schema
from blockguard.errors import CorruptMetadata

V1_SCHEMA = Path(__file__).with_name("catalog_v1_schema.sql")


def _snapshot(path: Path) -> dict[str, bytes]:
    """Every file of the catalog (main, -wal, -shm) with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(path.parent.iterdir())}


def _shape(path: Path) -> dict[str, object]:
    """Tables with their columns, and index names: what a schema is, not how it is spelt."""
    conn = sqlite3.connect(path)
    try:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        shape: dict[str, object] = {
            t: [tuple(c[1:]) for c in conn.execute(f"PRAGMA table_info({t})")] for t in tables
        }
        shape["indexes"] = sorted(
            r[0]
            for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
            if not r[0].startswith("sqlite_autoindex")
        )
        return shape
    finally:
        conn.close()


def _make_v1(path: Path) -> dict[str, str]:
    """A v1 catalog with one of everything, written as blockguard v1 would have."""
    ids = {"full": str(uuid.uuid4()), "incr": str(uuid.uuid4()), "job": str(uuid.uuid4())}
    ids["running"] = str(uuid.uuid4())
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(V1_SCHEMA.read_text())
    conn.executescript(
        f"""
        PRAGMA user_version = 1;
        PRAGMA application_id = {catalog_schema.APPLICATION_ID};
        INSERT INTO groups VALUES ('db', '{{"rto_seconds": 600}}', 1.0);
        INSERT INTO pools VALUES ('fast', 'lvm', 'bg_fast', 'ok', '', 2.0);
        INSERT INTO pool_devices VALUES ('fast', '/dev/sdb', 8, 16, 1000, 'S1', 900, 'ok', 3.0);
        INSERT INTO volumes VALUES ('pg', '/dev/vg0/pg', 253, 3, 4096000, NULL, 65536, 'era',
            'exact', '', '{{"rpo_seconds": 3600}}', 'db', 'fast', 4.0);
        INSERT INTO perf VALUES ('serial:S1', 'pool', '/dev/sdb', 1000, 0, 'nvme', 'linear',
            2e9, 1e9, 3e8, 2e8, 65536, 5.0, 'probe');
        INSERT INTO generations VALUES ('{ids["full"]}', 'pg', 'fast', 'full', NULL, NULL,
            6.0, 100, 10, 'committed', 6.5, '{{"lv": "g1"}}', 'sha256:1');
        INSERT INTO generations VALUES ('{ids["incr"]}', 'pg', 'fast', 'incremental',
            '{ids["full"]}', '{ids["full"]}', 7.0, 5, 1, 'committed', 7.5, '{{}}', NULL);
        INSERT INTO jobs VALUES ('{ids["job"]}', 'backup', 'pg', 'done', 1.0, 100, 100,
            8.0, 8.1, 9.0, NULL);
        INSERT INTO jobs VALUES ('{ids["running"]}', 'verify', 'pg', 'running', 0.5, 50, 100,
            10.0, 10.1, NULL, NULL);
        INSERT INTO job_events (job, at, state, message) VALUES
            ('{ids["job"]}', 8.0, 'queued', ''), ('{ids["job"]}', 8.1, 'running', ''),
            ('{ids["job"]}', 9.0, 'done', ''), ('{ids["running"]}', 10.0, 'queued', '');
        """
    )
    conn.close()
    return ids


def test_v1_catalog_is_upgraded_with_its_data(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    ids = _make_v1(path)
    with Catalog(path) as c:
        assert c.schema_version == CURRENT_VERSION == 8
        assert c.integrity_problems() == []
        # v1 data is all there.
        vol = c.get_volume("pg")
        assert (vol.group, vol.pool, vol.tracker_state) == ("db", "fast", "exact")
        assert vol.objectives == {"rpo_seconds": 3600}
        assert c.get_group("db").objectives == {"rto_seconds": 600}
        assert c.list_pool_devices("fast")[0].identity.serial == "S1"
        assert c.get_perf("serial:S1", "pool").seq_read == 2e9
        gens = c.list_generations("pg")
        assert [g.id for g in gens] == [ids["full"], ids["incr"]]
        assert [g.id for g in c.restore_chain(ids["incr"])] == [ids["full"], ids["incr"]]
        job = c.get_job(ids["job"])
        assert (job.state, job.bytes_done, job.result, job.pool) == ("done", 100, None, None)
        assert [e.state for e in c.job_history(ids["job"])] == ["queued", "running", "done"]
        # v2 things work on the upgraded catalog.
        probe = c.create_job("probe", pool="fast")
        c.finish_job(probe.id, result={"seq_read": 2e9})
        assert c.get_job(probe.id).result == {"seq_read": 2e9}
        c.record_restore(
            "pg",
            ids["incr"],
            method="incremental",
            mode="swap-in",
            bytes_restored=105,
            measured_seconds=2.0,
            predicted_seconds=1.5,
        )
        assert c.recent_restores("pg")[0].predicted_seconds == 1.5
        # v3 things too: drill jobs and restore path samples round-trip.
        drill = c.create_job("drill", pool="fast")
        c.finish_job(drill.id, result={"samples": 2})
        assert c.get_job(drill.id).kind == "drill"
        for volume, source, seconds in (("", "drill", 0.5), ("pg", "restore", 2.0)):
            c.record_path_sample(
                volume=volume,
                pool_device="/dev/sdb",
                mode="swap-in",
                source=source,
                generations=3,
                chunks=40,
                extents=7,
                nbytes=4096000,
                measured_seconds=seconds,
                predicted_seconds=1.5,
            )
        got = c.path_samples("/dev/sdb", "swap-in")
        assert [(s.volume, s.source, s.measured_seconds) for s in got] == [
            ("pg", "restore", 2.0),
            ("", "drill", 0.5),
        ]
        assert (got[0].generations, got[0].chunks, got[0].extents, got[0].bytes) == (
            3,
            40,
            7,
            4096000,
        )
        assert c.path_samples("/dev/sdb", "copy") == []
        # v5 things too: target registration jobs, targets with their link.
        reg = c.create_job("target", volume="target:offsite")
        c.finish_job(reg.id, result={"target": "offsite"})
        assert c.get_job(reg.id).kind == "target"
        link = PerfEntry(
            link_perf_key("offsite"), "pool", 1.0, "probe", seq_read=2e7, seq_write=1e7
        )
        c.add_target(
            "offsite",
            url="ssh://bg@backup.example:2222",
            client_id="host1",
            pool="main",
            host_key="SHA256:" + "A" * 43,
            link=link,
            round_trip=0.02,
            space=(10, 20, 5),
        )
        got_target = c.get_target("offsite")
        assert (got_target.url, got_target.round_trip, got_target.space_free) == (
            "ssh://bg@backup.example:2222",
            0.02,
            10,
        )
        assert c.get_perf(link_perf_key("offsite"), "pool").seq_write == 1e7
        # v6: transfer jobs, generations on targets.
        sent = c.create_job("transfer", volume="db")
        c.finish_job(sent.id, result={"volume": "db"})
        assert c.get_job(sent.id).kind == "transfer"
        row = RemoteGenerationRow(
            "offsite", "db", "20261103T120501.123456Z-1a2b3c4d", "full", None, None,
            1.0, 8192, 4096, 1, 2.0, 0.5,
        )  # fmt: skip
        c.record_remote_generation(row)
        assert c.list_remote_generations("offsite", "db") == [row]
        # The interrupted v1 job is handled like any other after a restart.
        assert [j.id for j in c.mark_running_jobs_failed("restarted")] == [ids["running"]]
    # The upgraded catalog has exactly the shape of a new one.
    fresh = tmp_path / "fresh" / "catalog.db"
    Catalog(fresh).close()
    assert _shape(path) == _shape(fresh)


def test_failed_upgrade_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "catalog.db"
    _make_v1(path)
    before = _shape(path)
    broken = catalog_schema.Migration(
        CURRENT_VERSION + 1,
        "a step that fails half-way",
        ("CREATE TABLE extra (a)", "INSERT INTO nowhere VALUES (1)"),
    )
    monkeypatch.setattr(catalog_schema, "MIGRATIONS", (*catalog_schema.MIGRATIONS, broken))
    monkeypatch.setattr(catalog_schema, "CURRENT_VERSION", CURRENT_VERSION + 1)
    with pytest.raises(Exception, match="nowhere"):
        Catalog(path)
    monkeypatch.undo()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.close()
    assert _shape(path) == before  # neither the jobs rebuilds nor the new tables stayed


def test_newer_catalog_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    with Catalog(path) as c:
        c.add_group("keep")
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 9")
    conn.close()
    before = _snapshot(path)
    with pytest.raises(CorruptMetadata) as raised:
        Catalog(path)
    message = str(raised.value)
    assert str(path) in message
    assert (
        f"schema version 9 is newer than the newest this blockguard knows ({CURRENT_VERSION})"
        in message
    )
    assert _snapshot(path) == before


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"this is not sqlite at all" * 200, "not a database"),
        (None, "SQLite file with tables but not a blockguard catalog"),
        (None, "not a blockguard catalog \\(application id 0x1234\\)"),
    ],
)
def test_foreign_file_is_refused_and_left_untouched(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "catalog.db"
    if content is not None:
        path.write_bytes(content)
    else:
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE photos (name TEXT)")
        if "0x1234" in message:
            conn.execute("PRAGMA application_id = 4660")
        conn.commit()
        conn.close()
    before = _snapshot(path)
    with pytest.raises(CorruptMetadata, match=message) as raised:
        Catalog(path)
    assert str(path) in str(raised.value)
    assert _snapshot(path) == before


def test_unwritable_directory_is_an_environment_problem(tmp_path: Path) -> None:
    from blockguard.errors import EnvironmentProblem

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(EnvironmentProblem, match=f"cannot create the catalog {blocker}/"):
        Catalog(blocker / "state" / "catalog.db")
