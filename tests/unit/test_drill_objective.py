"""The ``drill`` objective (how often a volume's restore drill runs) and when a drill is due."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from blockguard.core.objective_sets import check_value, drill_of, merge_given, parse_given
from blockguard.core.objectives import (
    DEFAULT_DRILL_INTERVAL,
    RecoveryObjectives,
    RestoreMode,
    parse_drill,
)
from blockguard.core.perftable import DeviceSpeed
from blockguard.core.planner import PlanDecision, plan_backup
from blockguard.core.restore_model import Chain, StoredDelta
from blockguard.core.scheduler import drill_schedule
from blockguard.core.vocab import GenerationKind
from blockguard.core.what_if import ChangeSets
from blockguard.errors import InvalidInput, InvalidObjectives

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MB = 10**6
GB = 10**9
WEEK = timedelta(weeks=1)


@pytest.mark.parametrize(
    "text,interval",
    [
        ("weekly", WEEK),
        ("Weekly", WEEK),
        ("daily", timedelta(days=1)),
        (" off ", None),
        ("3d", timedelta(days=3)),
        ("every 12h", timedelta(hours=12)),
        ("1h", timedelta(hours=1)),
        ("365d", timedelta(days=365)),
        ("2w", timedelta(weeks=2)),
    ],
)
def test_drill_forms(text: str, interval: timedelta | None) -> None:
    assert parse_drill(text) == interval
    assert check_value("drill", text) == text  # kept as typed


@pytest.mark.parametrize(
    "value",
    ["", "hourly", "59m", "366d", "every", "every day", "3", "-1d", "1e400d", "off off", 7, None],
)
def test_bad_drill_values_are_named_refusals(value: object) -> None:
    with pytest.raises(InvalidObjectives) as caught:
        check_value("drill", value)
    assert repr(value)[:40] in caught.value.message


def test_a_refused_drill_changes_nothing() -> None:
    stored = {"rto": "5m", "drill": "daily"}
    before = dict(stored)
    with pytest.raises(InvalidObjectives, match="'fortnightly'"):
        merge_given(stored, {"drill": "fortnightly", "rto": "10m"})
    assert stored == before


def test_drills_default_to_weekly_with_an_rto_and_off_without() -> None:
    assert DEFAULT_DRILL_INTERVAL == WEEK
    assert drill_of({"rto": "5m"}) == WEEK
    assert drill_of({"rpo": "every 1h"}) is None
    assert drill_of({}) is None
    assert drill_of({"rto": "5m", "drill": "off"}) is None
    assert drill_of({"rto": "5m", "drill": "daily"}) == timedelta(days=1)
    # A drill without an RTO still checks that the newest generation restores.
    assert drill_of({"rpo": "every 1h", "drill": "weekly"}) == WEEK
    assert drill_of({"rto": "5m", "drill": ""}) == WEEK  # cleared: back to the default


def test_drill_is_a_settable_key_that_the_planner_ignores() -> None:
    merged = merge_given({"rto": "5m", "restore_mode": "copy"}, {"drill": "daily"})
    assert merged == {"rto": "5m", "restore_mode": "copy", "drill": "daily"}
    parsed = parse_given(merged)
    assert parsed is not None and parsed.rto == timedelta(minutes=5)
    assert merge_given(merged, {"drill": ""}) == {"rto": "5m", "restore_mode": "copy"}


def test_first_drill_is_due_once_there_is_a_generation() -> None:
    nothing = drill_schedule(WEEK, last_drill=None, newest_generation=None, now=T0)
    assert not nothing.due and "no generation" in nothing.reason
    first = drill_schedule(WEEK, last_drill=None, newest_generation=T0, now=T0)
    assert first.due and first.next_due == T0 and "never drilled" in first.reason


def test_drill_is_due_on_its_interval_and_missed_ones_collapse() -> None:
    last = T0 - timedelta(days=3)
    early = drill_schedule(WEEK, last_drill=last, newest_generation=T0, now=T0)
    assert not early.due and early.next_due == last + WEEK
    assert "3d" in early.reason and "7d" in early.reason
    on_time = drill_schedule(WEEK, last_drill=last, newest_generation=T0, now=last + WEEK)
    assert on_time.due and on_time.next_due == last + WEEK
    # Down for a month: one drill now, the next a week after it.
    late = drill_schedule(WEEK, last_drill=last, newest_generation=T0, now=T0 + 4 * WEEK)
    assert late.due and late.next_due == last + WEEK


def test_after_a_failed_drill_the_next_generation_is_drilled_soon() -> None:
    last = T0 - timedelta(minutes=30)
    # Nothing newer yet: the interval counts as usual.
    same = drill_schedule(WEEK, last_drill=last, newest_generation=last, now=T0, last_failed=True)
    assert not same.due and same.next_due == last + WEEK
    # A newer generation (the backup that was to fix it), but within the hour after it.
    newer = T0 - timedelta(minutes=5)
    soon = drill_schedule(WEEK, last_drill=last, newest_generation=newer, now=T0, last_failed=True)
    assert not soon.due and soon.next_due == last + timedelta(hours=1)
    later = T0 + timedelta(minutes=31)
    due = drill_schedule(
        WEEK, last_drill=last, newest_generation=newer, now=later, last_failed=True
    )
    assert due.due and "failed and a newer generation exists" in due.reason
    ok = drill_schedule(WEEK, last_drill=last, newest_generation=newer, now=later)
    assert not ok.due  # after a drill that passed, only the interval counts


def test_drills_off_are_never_due() -> None:
    off = drill_schedule(None, last_drill=None, newest_generation=T0, now=T0)
    assert not off.due and off.next_due is None and "off" in off.reason


def test_naive_times_and_bad_intervals_are_refused() -> None:
    with pytest.raises(InvalidInput, match="no time zone"):
        drill_schedule(WEEK, last_drill=None, newest_generation=T0, now=T0.replace(tzinfo=None))
    with pytest.raises(InvalidInput, match="no time zone"):
        drill_schedule(WEEK, last_drill=T0.replace(tzinfo=None), newest_generation=T0, now=T0)
    with pytest.raises(InvalidInput, match="not positive"):
        drill_schedule(timedelta(0), last_drill=None, newest_generation=T0, now=T0)


# --- what a drill's measurement does to the plan ----------------------------------------


def _plan(floors: dict[GenerationKind, float] | None) -> PlanDecision:
    speeds = {"ssd": DeviceSpeed(500 * MB, 450 * MB, 200 * MB, 150 * MB)}
    chain = Chain(10 * GB, "ssd", (StoredDelta(GenerationKind.INCREMENTAL, 1 * MB, "ssd"),))
    changes = ChangeSets(1 * MB, 2 * MB, 10 * GB)
    objectives = RecoveryObjectives(rto=timedelta(minutes=5), restore_mode=RestoreMode.SWAP_IN)
    return plan_backup(chain, changes, speeds, objectives, floors=floors)


def test_a_drill_that_measured_more_than_the_rto_rules_out_what_extends_its_chain() -> None:
    assert _plan(None).method is GenerationKind.INCREMENTAL
    assert _plan({GenerationKind.INCREMENTAL: 299.0}).method is GenerationKind.INCREMENTAL
    slow = _plan({GenerationKind.INCREMENTAL: 301.0})
    assert slow.method is GenerationKind.DIFFERENTIAL and slow.feasible
    assert "a restore drill measured 5m1s for the chain it extends > RTO 5m" in slow.reasons[0]
    # A drill of the lone full bounds a differential on it too: only a new full is left.
    both = {GenerationKind.INCREMENTAL: 301.0, GenerationKind.DIFFERENTIAL: 301.0}
    assert _plan(both).method is GenerationKind.FULL


def test_when_nothing_fits_the_quickest_restore_counts_the_drill() -> None:
    speeds = {"hdd": DeviceSpeed(1 * MB, 1 * MB, 1 * MB, 1 * MB)}
    chain = Chain(10 * GB, "hdd", (StoredDelta(GenerationKind.INCREMENTAL, 1 * MB, "hdd"),))
    changes = ChangeSets(1 * MB, 2 * MB, 10 * GB)
    objectives = RecoveryObjectives(rto=timedelta(seconds=1), restore_mode=RestoreMode.COPY)
    plain = plan_backup(chain, changes, speeds, objectives, copy_target=speeds["hdd"])
    assert not plain.feasible
    floors = {m: 1e9 for m in (GenerationKind.INCREMENTAL, GenerationKind.DIFFERENTIAL)}
    bounded = plan_backup(
        chain, changes, speeds, objectives, copy_target=speeds["hdd"], floors=floors
    )
    assert not bounded.feasible and bounded.method is GenerationKind.FULL
