"""Scheduler: interval, daily hour across DST, changed-data and RTO triggers, groups."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest

from blockguard.core.objectives import (
    ChangedDataRPO,
    DailyRPO,
    IntervalRPO,
    RecoveryObjectives,
)
from blockguard.core.scheduler import (
    ScheduleDecision,
    Trigger,
    daily_occurrence,
    group_schedule,
    group_startable,
    local_zone,
    schedule,
    startable,
)
from blockguard.core.units import GiB, MiB
from blockguard.errors import InvalidInput

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
BERLIN = ZoneInfo("Europe/Berlin")
HOURLY = RecoveryObjectives(rpo=IntervalRPO(timedelta(hours=1)))


def test_first_backup_is_due_at_once() -> None:
    decision = schedule(HOURLY, last_backup=None, changed_bytes=0, now=T0)
    assert decision.due and decision.trigger is Trigger.FIRST and decision.next_due == T0


def test_interval() -> None:
    early = schedule(HOURLY, last_backup=T0, changed_bytes=5, now=T0 + timedelta(minutes=59))
    assert not early.due
    assert early.next_due == T0 + timedelta(hours=1)
    on_time = schedule(HOURLY, last_backup=T0, changed_bytes=5, now=T0 + timedelta(hours=1))
    assert on_time.due and on_time.trigger is Trigger.INTERVAL and on_time.missed == 0
    assert "last backup 1h ago >= RPO interval 1h" in on_time.reason


def test_missed_interval_runs_after_downtime_run_once() -> None:
    back_up = T0 + timedelta(hours=10, minutes=5)
    decision = schedule(HOURLY, last_backup=T0, changed_bytes=1, now=back_up)
    assert decision.due and decision.missed == 9
    assert "9 more runs missed, run once" in decision.reason
    # Once that one backup is taken, the next is an interval later, not immediately.
    after = schedule(
        HOURLY, last_backup=back_up, changed_bytes=1, now=back_up + timedelta(minutes=1)
    )
    assert not after.due and after.next_due == back_up + timedelta(hours=1)


def _run_clock(
    objectives: RecoveryObjectives,
    start: datetime,
    end: datetime,
    step: timedelta = timedelta(minutes=1),
) -> Iterator[datetime]:
    """Advance a clock; back up (instantly) whenever due. Yields each backup's time."""
    last: datetime | None = start - timedelta(seconds=1)
    now = start
    while now < end:
        if schedule(objectives, last_backup=last, changed_bytes=1, now=now).due:
            last = now
            yield now
        now += step


def test_daily_hour_in_the_spring_forward_gap_runs_once_after_the_gap() -> None:
    # Europe/Berlin skips 02:00-03:00 local on 2026-03-29: 02:30 does not exist that day.
    daily = RecoveryObjectives(rpo=DailyRPO(2, 30, "Europe/Berlin"))
    runs = list(
        _run_clock(
            daily, datetime(2026, 3, 27, 12, tzinfo=UTC), datetime(2026, 3, 31, 12, tzinfo=UTC)
        )
    )
    local = [r.astimezone(BERLIN) for r in runs]
    assert [r.date().day for r in local] == [28, 29, 30, 31]
    assert [(r.hour, r.minute) for r in local] == [(2, 30), (3, 30), (2, 30), (2, 30)]
    assert runs[1] == datetime(2026, 3, 29, 1, 30, tzinfo=UTC)


def test_daily_hour_in_the_fall_back_overlap_runs_once_at_its_first_occurrence() -> None:
    # 2026-10-25: Europe/Berlin goes 03:00 CEST back to 02:00 CET; 02:30 happens twice.
    daily = RecoveryObjectives(rpo=DailyRPO(2, 30, "Europe/Berlin"))
    runs = list(
        _run_clock(
            daily, datetime(2026, 10, 24, 12, tzinfo=UTC), datetime(2026, 10, 26, 12, tzinfo=UTC)
        )
    )
    assert runs == [
        datetime(2026, 10, 25, 0, 30, tzinfo=UTC),  # 02:30 CEST, the first of the two
        datetime(2026, 10, 26, 1, 30, tzinfo=UTC),  # 02:30 CET
    ]


def test_daily_runs_at_the_same_wall_time_across_dst_in_new_york() -> None:
    daily = RecoveryObjectives(rpo=DailyRPO(23, 15, "America/New_York"))
    runs = list(
        _run_clock(
            daily,
            datetime(2026, 3, 6, tzinfo=UTC),
            datetime(2026, 3, 12, tzinfo=UTC),
            step=timedelta(minutes=5),
        )
    )
    local = [r.astimezone(ZoneInfo("America/New_York")) for r in runs]
    assert len(runs) == 6
    assert {(r.hour, r.minute) for r in local} == {(23, 15)}
    gaps = {b - a for a, b in pairwise(runs)}
    assert gaps == {timedelta(hours=24), timedelta(hours=23)}  # 23 h across spring forward


def test_daily_missed_runs_collapse_and_next_due_is_reported() -> None:
    daily = RecoveryObjectives(rpo=DailyRPO(2, 0, "UTC"))
    last = datetime(2026, 5, 1, 2, 0, tzinfo=UTC)
    now = datetime(2026, 5, 4, 9, 0, tzinfo=UTC)
    decision = schedule(daily, last_backup=last, changed_bytes=0, now=now)
    assert decision.due and decision.trigger is Trigger.DAILY
    assert decision.next_due == datetime(2026, 5, 4, 2, 0, tzinfo=UTC)
    assert decision.missed == 2
    served = schedule(daily, last_backup=now, changed_bytes=0, now=now + timedelta(minutes=1))
    assert not served.due and served.next_due == datetime(2026, 5, 5, 2, 0, tzinfo=UTC)


def test_daily_without_zone_uses_the_given_local_zone() -> None:
    daily = RecoveryObjectives(rpo=DailyRPO(2, 30))
    now = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
    decision = schedule(
        daily, last_backup=now, changed_bytes=0, now=now, zone=ZoneInfo("Asia/Tokyo")
    )
    assert decision.next_due == datetime(2026, 7, 1, 17, 30, tzinfo=UTC)  # 02:30 JST next day


def test_daily_occurrence_is_one_instant_per_local_day() -> None:
    rpo = DailyRPO(2, 30)
    days = [datetime(2026, 3, 28).date() + timedelta(days=i) for i in range(3)]
    instants = [daily_occurrence(rpo, day, BERLIN) for day in days]
    assert [i - instants[0] for i in instants] == [
        timedelta(0),
        timedelta(hours=24),  # 02:30 CET, then the gap's 02:30 read as CET = 03:30 CEST
        timedelta(hours=47),  # 02:30 CEST
    ]


def test_changed_data_rpo() -> None:
    objectives = RecoveryObjectives(rpo=ChangedDataRPO(10 * GiB))
    below = schedule(objectives, last_backup=T0, changed_bytes=10 * GiB - 1, now=T0)
    assert not below.due and below.next_due is None
    reached = schedule(objectives, last_backup=T0, changed_bytes=10 * GiB, now=T0)
    assert reached.due and reached.trigger is Trigger.CHANGED_DATA
    assert "changed 10.0 GiB >= RPO amount 10.0 GiB" in reached.reason


def test_rto_only_backs_up_when_changes_reach_what_is_still_restorable() -> None:
    objectives = RecoveryObjectives(rto=timedelta(minutes=5))
    not_yet = schedule(
        objectives, last_backup=T0, changed_bytes=100 * MiB, restorable_bytes=2 * GiB, now=T0
    )
    assert not not_yet.due
    due = schedule(
        objectives, last_backup=T0, changed_bytes=2 * GiB, restorable_bytes=2 * GiB, now=T0
    )
    assert due.due and due.trigger is Trigger.RTO_HEADROOM
    assert "within RTO 5m" in due.reason and "2.0 GiB" in due.reason
    # A tenth is kept in reserve for the writes between the check and the snapshot.
    reserve = {"last_backup": T0, "restorable_bytes": 10 * GiB, "now": T0}
    assert schedule(objectives, changed_bytes=9 * GiB, **reserve).due
    assert not schedule(objectives, changed_bytes=9 * GiB - 1, **reserve).due
    assert not schedule(objectives, changed_bytes=9 * GiB, rto_margin=0.05, **reserve).due
    with pytest.raises(InvalidInput, match="margin"):
        schedule(objectives, changed_bytes=1, rto_margin=1.0, **reserve)
    # No headroom left but nothing changed: nothing to protect.
    idle = schedule(objectives, last_backup=T0, changed_bytes=0, restorable_bytes=0, now=T0)
    assert not idle.due
    with pytest.raises(InvalidInput, match="restorable"):
        schedule(objectives, last_backup=T0, changed_bytes=1, now=T0)


def test_rpo_takes_precedence_over_the_rto_trigger() -> None:
    objectives = RecoveryObjectives(rpo=IntervalRPO(timedelta(hours=1)), rto=timedelta(minutes=5))
    decision = schedule(
        objectives, last_backup=T0, changed_bytes=9 * GiB, restorable_bytes=GiB, now=T0
    )
    assert not decision.due and decision.trigger is Trigger.INTERVAL


def test_naive_times_and_bad_counts_are_refused() -> None:
    with pytest.raises(InvalidInput, match="time zone"):
        schedule(HOURLY, last_backup=None, changed_bytes=0, now=datetime(2026, 1, 1))
    with pytest.raises(InvalidInput, match="time zone"):
        schedule(HOURLY, last_backup=datetime(2026, 1, 1), changed_bytes=0, now=T0)
    with pytest.raises(InvalidInput, match="-1"):
        schedule(HOURLY, last_backup=T0, changed_bytes=-1, now=T0)


def test_group_runs_at_one_common_time() -> None:
    a = ScheduleDecision(False, T0 + timedelta(minutes=30), Trigger.INTERVAL, "a")
    b = ScheduleDecision(False, T0 + timedelta(minutes=10), Trigger.DAILY, "b")
    c = ScheduleDecision(False, None, Trigger.CHANGED_DATA, "c")
    group = group_schedule({"a": a, "b": b, "c": c})
    assert not group.due and group.next_due == T0 + timedelta(minutes=10)
    c_due = ScheduleDecision(True, None, Trigger.CHANGED_DATA, "c full")
    group = group_schedule({"a": a, "b": b, "c": c_due})
    assert group.due and "c: c full" in group.reasons
    with pytest.raises(InvalidInput):
        group_schedule({})


def test_no_two_jobs_on_one_volume() -> None:
    assert startable(["v1", "v2", "v3"], running={"v2"}) == ["v1", "v3"]
    assert group_startable(["v1", "v3"], running={"v2"})
    assert not group_startable(["v1", "v2"], running={"v2"})


def test_local_zone_follows_tz(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Australia/Adelaide")
    assert local_zone() == ZoneInfo("Australia/Adelaide")
    monkeypatch.setenv("TZ", "Not/AZone")
    zone = local_zone()  # falls back to /etc/localtime or UTC, never a fixed offset from now
    assert zone.utcoffset(datetime(2026, 1, 1)) is not None
