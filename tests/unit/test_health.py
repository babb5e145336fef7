"""The health decision (core/health.py), the alert center and the metrics exposition."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from blockguard.core.health import (
    MESSAGE_IDS,
    AlertKind,
    Level,
    PoolFacts,
    Thresholds,
    VolumeFacts,
    assess,
    retry_delay,
    transitions,
)
from blockguard.engine import metrics
from blockguard.engine import service as svc
from blockguard.engine.alerts import AlertCenter
from blockguard.engine.events import EventHub
from blockguard.errors import InvalidInput
from tests.timeouts import scaled

NOW = 1_800_000_000.0
T = Thresholds(pool_free_percent=20, failed_backups=3, rpo_grace=0.1)


def kinds(health) -> set[tuple[str, str]]:
    return {(c.kind.value, c.subject) for c in health.conditions}


def test_all_well_is_ok() -> None:
    vol = VolumeFacts(
        "db", "p1", rpo_seconds=900, rto_seconds=300, last_success=NOW - 60, estimate_upper=100
    )
    health = assess([vol], [PoolFacts("p1", 1000, 500)], T, NOW)
    assert health.level is Level.OK and not health.conditions
    row = health.volumes[0]
    assert row["rpo_age_seconds"] == 60 and row["rpo_seconds"] == 900 and row["level"] == "ok"


def test_rpo_missed_only_past_the_grace() -> None:
    within = VolumeFacts("db", rpo_seconds=900, last_success=NOW - 980)
    past = VolumeFacts("db", rpo_seconds=900, last_success=NOW - 1000)
    assert assess([within], [], T, NOW).level is Level.OK
    health = assess([past], [], T, NOW)
    assert health.level is Level.CRITICAL
    assert kinds(health) == {("rpo-missed", "db")}
    assert "16m40s ago" in health.conditions[0].message


def test_changed_data_rpo_and_no_backup_have_no_age_limit() -> None:
    never = VolumeFacts("db", rpo_seconds=900, last_success=None)
    amount = VolumeFacts("web", rpo_seconds=None, last_success=NOW - 1e6)
    assert assess([never, amount], [], T, NOW).level is Level.OK


def test_estimate_past_rto_or_infeasible_plan_is_critical() -> None:
    slow = VolumeFacts("db", rto_seconds=60, estimate_upper=61)
    plan = VolumeFacts("web", infeasible="RTO 1m cannot be met: a full takes 5m")
    health = assess([slow, plan], [], T, NOW)
    assert health.level is Level.CRITICAL
    assert kinds(health) == {("objective-infeasible", "db"), ("objective-infeasible", "web")}
    assert "a full takes 5m" in next(c for c in health.conditions if c.subject == "web").message


def test_failures_tracker_and_pool_are_warnings() -> None:
    two = VolumeFacts("a", failures_in_row=2)
    three = VolumeFacts("b", failures_in_row=3, last_error="device vanished")
    lost = VolumeFacts("c", tracker_state="lost")
    pools = [PoolFacts("full", 1000, 199), PoolFacts("roomy", 1000, 200), PoolFacts("new", 0, 0)]
    health = assess([two, three, lost], pools, T, NOW)
    assert health.level is Level.WARNING
    assert kinds(health) == {
        ("backups-failing", "b"),
        ("tracker-lost", "c"),
        ("pool-space-low", "full"),
    }
    low = next(c for c in health.conditions if c.kind is AlertKind.POOL_SPACE_LOW)
    assert low.details["free_percent"] == 19.9 and low.details["threshold_percent"] == 20


def test_thin_pool_metadata_nearly_full_alerts_naming_it() -> None:
    """Data free does not hide a thin pool whose metadata is nearly full."""
    meta_low = PoolFacts("m", 1000, 900, metadata_capacity=4096 * 1024, metadata_free=4096 * 50)
    both = PoolFacts("b", 1000, 100, metadata_capacity=1000, metadata_free=10)
    fine = PoolFacts("f", 1000, 900, metadata_capacity=1000, metadata_free=900)
    health = assess([], [meta_low, both, fine], T, NOW)
    assert kinds(health) == {("pool-space-low", "m"), ("pool-space-low", "b")}
    by = {c.subject: c for c in health.conditions}
    assert "thin pool metadata" in by["m"].message and "% <" in by["m"].message
    assert by["m"].details["low"] == ["metadata"]
    assert by["m"].details["metadata_free_percent"] == 4.88
    assert by["b"].details["low"] == ["space", "metadata"]
    row = next(r for r in health.pools if r["name"] == "m")
    assert (row["metadata_size_bytes"], row["metadata_free_bytes"]) == (4096 * 1024, 4096 * 50)
    assert row["level"] == "warning"


def test_degraded_pool_warns_without_an_alert() -> None:
    health = assess([], [PoolFacts("p", 1000, 900, "degraded")], T, NOW)
    assert health.level is Level.WARNING and not health.conditions


def test_transitions_raise_new_and_resolve_gone() -> None:
    a = VolumeFacts("a", failures_in_row=3)
    cond = assess([a], [], T, NOW).conditions
    raised, resolved = transitions([], cond)
    assert [c.key for c in raised] == ["backups-failing:a"] and resolved == []
    assert transitions(["backups-failing:a"], cond) == ([], [])
    assert transitions(["backups-failing:a"], []) == ([], ["backups-failing:a"])


def test_retry_delay_doubles_up_to_the_cap() -> None:
    assert [retry_delay(n, 60, 3600) for n in range(9)] == [
        0,
        60,
        120,
        240,
        480,
        960,
        1920,
        3600,
        3600,
    ]
    assert retry_delay(10_000, 60, 3600) == 3600


def test_thresholds_refuse_nonsense() -> None:
    with pytest.raises(InvalidInput, match="150"):
        Thresholds(pool_free_percent=150)
    with pytest.raises(InvalidInput, match="failed backups"):
        Thresholds(failed_backups=0)


def test_message_ids_are_distinct_uuids() -> None:
    assert set(MESSAGE_IDS) == set(AlertKind)
    ids = list(MESSAGE_IDS.values())
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


# --- the alert center ---------------------------------------------------------------------


def hook(directory: Path, name: str, body: str) -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def lines(path: Path, count: int, timeout: float = 10) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = path.read_text().splitlines() if path.exists() else []
        if len(found) >= count or time.monotonic() > deadline:
            return [json.loads(x) for x in found]
        time.sleep(0.02)


def test_alert_center_raises_once_resolves_once_and_survives_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hooks = tmp_path / "alert.d"
    out = tmp_path / "calls"
    hook(hooks, "10-record", f"cat >> {out}\n")
    hook(hooks, "20-fails", "echo broken >&2; exit 4\n")
    hook(hooks, "30-hangs", "sleep 30\n")
    hook(hooks, "record.bak~", f"cat >> {out}\n")  # not a run-parts name: never run
    hook(hooks, "40-open", f"cat >> {out}\n").chmod(0o777)  # anyone may change it: not run
    events = EventHub()
    seen: list[object] = []
    events.subscribe(seen.append)
    three = assess([VolumeFacts("db", failures_in_row=3)], [], T, NOW).conditions

    center = AlertCenter(tmp_path, events, hooks, hook_timeout=0.5)
    center.update(three)
    center.update(three)
    center.close(wait=10)
    calls = lines(out, 1)
    assert len(calls) == 1
    assert calls[0]["kind"] == "backups-failing" and calls[0]["state"] == "raised"
    assert calls[0]["volume"] == "db" and calls[0]["details"]["failures"] == 3
    assert calls[0]["message_id"] == MESSAGE_IDS[AlertKind.BACKUPS_FAILING]
    signals = [e for e in seen if isinstance(e, svc.AlertChanged)]
    assert [(e.kind, e.state) for e in signals] == [("backups-failing", "raised")]

    again = AlertCenter(tmp_path, events, hooks, hook_timeout=0.5)
    again.update(three)  # still going on after a restart: not raised again
    again.update([])
    again.close(wait=10)
    calls = lines(out, 2)
    assert [c["state"] for c in calls] == ["raised", "resolved"]
    assert calls[1]["message"].startswith("resolved: ")
    logged = caplog.text
    assert "40-open is not run" in logged and "mode 777" in logged
    assert "20-fails exited 4" in logged and "broken" in logged
    assert "30-hangs failed" in logged


def test_no_hook_directory_is_fine(tmp_path: Path) -> None:
    center = AlertCenter(tmp_path, EventHub(), tmp_path / "absent", hook_timeout=1)
    center.fire(AlertKind.DRILL_MISSED_RTO, "db", "drill restore took 5m > RTO 1m")
    center.close()
    assert center.active_records() == []


# --- metrics ------------------------------------------------------------------------------


def test_metrics_parse_back_with_prometheus_client(tmp_path: Path) -> None:
    vols = [
        VolumeFacts(
            "db",
            "p1",
            rpo_seconds=900,
            rto_seconds=300,
            last_success=NOW - 60,
            estimate_upper=42.5,
            generations=3,
            bytes_stored=12345,
        ),
        VolumeFacts('we"ird\\name', "p1", failures_in_row=4),
    ]
    health = assess(vols, [PoolFacts("p1", 1000, 100)], T, NOW)
    active = [{"kind": "pool-space-low", "subject": "p1"}]
    text = metrics.render(
        health, [("backup", "done"), ("backup", "failed"), ("backup", "done")], active
    )
    path = tmp_path / "blockguard.prom"
    assert metrics.write(path, text)
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"
    assert not metrics.write(tmp_path / "absent" / "x.prom", text)
    families = {f.name: f for f in text_string_to_metric_families(path.read_text())}

    def value(name: str, **labels: str) -> float:
        found = [s.value for s in families[name].samples if s.labels.items() >= labels.items()]
        assert len(found) == 1, (name, labels, families[name].samples)
        return found[0]

    assert value("blockguard_health") == 1  # a volume failing, a pool low: warnings
    assert value("blockguard_volume_last_success_timestamp_seconds", volume="db") == NOW - 60
    assert value("blockguard_volume_rpo_age_seconds", volume="db") == 60
    assert value("blockguard_volume_restore_estimate_upper_seconds", volume="db") == 42.5
    assert value("blockguard_volume_rto_seconds", volume="db") == 300
    assert value("blockguard_volume_generations", volume="db") == 3
    assert value("blockguard_volume_stored_bytes", volume="db") == 12345
    assert value("blockguard_volume_backup_failures_in_row", volume='we"ird\\name') == 4
    assert value("blockguard_pool_free_bytes", pool="p1") == 100
    assert value("blockguard_pool_size_bytes", pool="p1") == 1000
    assert value("blockguard_jobs", kind="backup", state="done") == 2
    assert value("blockguard_job_failures", kind="backup") == 1
    assert value("blockguard_alert_active", kind="pool-space-low", subject="p1") == 1


def test_alerts_reach_the_journal_with_their_message_id(tmp_path: Path) -> None:
    """Under systemd the daemon logs through JournalHandler: an alert's entry carries the
    kind's MESSAGE_ID and the ALERT fields (journald itself is not needed to see that)."""
    import logging

    from blockguard.daemon.logsetup import _journal_handler

    handler = _journal_handler()
    if handler is None:
        pytest.skip("systemd-python is not installed")
    sent: list[dict[str, object]] = []
    # journal.send's own signature: the message is the positional MESSAGE.
    handler.send = lambda MESSAGE, **fields: sent.append({"MESSAGE": MESSAGE, **fields})
    logger = logging.getLogger("blockguard.engine.alerts")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        center = AlertCenter(tmp_path, EventHub(), tmp_path / "none", hook_timeout=1)
        low = assess([], [PoolFacts("p1", 1000, 1)], T, NOW).conditions
        center.update(low)
        center.update([])
        center.close()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    entries = [e for e in sent if e.get("ALERT") == "pool-space-low"]
    assert [e["ALERT_STATE"] for e in entries] == ["raised", "resolved"]
    assert all(e["MESSAGE_ID"] == MESSAGE_IDS[AlertKind.POOL_SPACE_LOW] for e in entries)
    assert entries[0]["POOL"] == "p1" and entries[0]["PRIORITY"] == "4"  # warning
    assert "pool p1" in str(entries[0]["MESSAGE"])


def test_monitor_pokes_on_health_events_but_not_on_its_own_space_news() -> None:
    from blockguard.engine import health as engine_health

    monitor = engine_health.HealthMonitor(lambda: None, interval=0)
    monitor.on_event(svc.VolumeChanged("db"))  # every refresh: not a reason
    assert not monitor._wake.is_set()
    engine_health._publishing.active = True
    try:
        monitor.on_event(svc.PoolChanged("p1"))
    finally:
        engine_health._publishing.active = False
    assert not monitor._wake.is_set()
    monitor.on_event(svc.PoolChanged("p1"))
    assert monitor._wake.is_set()
    monitor._wake.clear()
    monitor.on_event(svc.BackupFailed("db", "Environment", "disk gone"))
    assert monitor._wake.is_set()


def test_space_news_carries_the_pool_info_the_assessment_read(tmp_path: Path) -> None:
    """One look at a pool's space per assessment: the PoolChanged it sends carries what
    it read, so the D-Bus Pool object is refreshed without asking the pool again (on an
    lvm pool each look is a vgs and a dmsetup table and status)."""
    from types import SimpleNamespace

    from blockguard.engine.health import HealthKeeper
    from blockguard.engine.settings import Settings

    events = EventHub()
    sent: list[svc.ServiceEvent] = []
    events.subscribe(sent.append)
    looks: list[str] = []
    free = [600]

    def info(name: str, space_of: svc.PoolInfo | None = None) -> svc.PoolInfo:
        if space_of is not None:
            return space_of
        looks.append(name)
        return svc.PoolInfo(name, "lvm", (), 1000, free[0])

    pools = SimpleNamespace(names=lambda: ["p1"], info=info, events=events)
    catalog = SimpleNamespace(list_jobs=lambda **_: [])
    volumes = SimpleNamespace(catalog=catalog, all_infos=lambda: [], last_plan={})
    settings = Settings(state_dir=tmp_path, mount_root=tmp_path, metrics_file=None)
    center = AlertCenter(tmp_path, events, tmp_path / "none", hook_timeout=1)
    keeper = HealthKeeper(settings, volumes, pools, center)  # type: ignore[arg-type]
    try:
        keeper.assess()
        news = [e for e in sent if isinstance(e, svc.PoolChanged)]
        assert looks == ["p1"]
        assert news == [svc.PoolChanged("p1", svc.PoolInfo("p1", "lvm", (), 1000, 600))]
        sent.clear()
        keeper.assess()  # the same space: no news
        assert looks == ["p1", "p1"] and not [e for e in sent if isinstance(e, svc.PoolChanged)]
        free[0] = 400
        keeper.assess()
        news = [e for e in sent if isinstance(e, svc.PoolChanged)]
        assert len(looks) == 3 and news and news[0].info is not None and news[0].info.free == 400
        free[0] = 100
        keeper.assess(reuse_space=True)  # after a backup that stored and freed nothing
        assert len(looks) == 3
        assert keeper.facts(reuse_space=True)[1][0].free == 400
    finally:
        center.close()


def test_monitor_reads_the_pools_again_unless_every_poke_said_their_space_held() -> None:
    from blockguard.engine import health as engine_health

    calls: list[bool] = []
    done = threading.Semaphore(0)

    def assess(*, reuse_space: bool) -> None:
        calls.append(reuse_space)
        done.release()

    monitor = engine_health.HealthMonitor(assess, interval=0)
    monitor.start()
    try:
        monitor.poke(space=False)  # the first assessment reads them all the same
        assert done.acquire(timeout=scaled(10)) and calls == [False]
        for event, reuse in (
            (svc.BackupFinished("db", "db@2", "incremental", 0, space_changed=False), True),
            (svc.BackupFinished("db", "db@3", "incremental", 65536), False),
            (svc.BackupFailed("db", "Environment", "disk gone"), False),
        ):
            monitor.on_event(event)
            assert done.acquire(timeout=scaled(10))
            assert calls[-1] is reuse, event
    finally:
        monitor.stop()
