"""Time-tiered retention (keep last/hourly/daily/weekly/monthly): what a policy keeps and why."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockguard.core.retention import (
    GenerationRef,
    RetentionPolicy,
    bucket,
    choose,
    dependencies,
    select_for_deletion,
)
from blockguard.errors import InvalidObjectives

YEAR = [date(2025, 1, 1) + timedelta(days=i) for i in range(365)]


def at(day: date, hour: int = 2, tz: object = UTC) -> float:
    return datetime(day.year, day.month, day.day, hour, tzinfo=tz).timestamp()  # type: ignore[arg-type]  # a tzinfo


def gid(day: date) -> str:
    return f"g{day.isoformat()}"


def daily_fulls(days: list[date]) -> list[GenerationRef]:
    return [GenerationRef(gid(d), "full", None, None, at(d)) for d in days]


def weekly_chains(days: list[date]) -> list[GenerationRef]:
    """A full every Sunday, an incremental every other day (each on the day before)."""
    gens: list[GenerationRef] = []
    full: str | None = None
    for d in days:
        if d.isoweekday() == 7 or full is None:
            gens.append(GenerationRef(gid(d), "full", None, None, at(d)))
            full = gid(d)
        else:
            gens.append(GenerationRef(gid(d), "incremental", full, gens[-1].generation_id, at(d)))
    return gens


POLICY = RetentionPolicy(last=3, daily=7, weekly=4, monthly=12, tz="UTC")


def test_a_year_of_daily_backups_keeps_exactly_the_expected_days() -> None:
    choice = choose(daily_fulls(YEAR), POLICY)
    month_ends = [date(2025, m + 1, 1) - timedelta(days=1) for m in range(1, 12)]
    expected = (
        # daily 7 (and last 3 inside it): Dec 25..31
        {date(2025, 12, d) for d in range(25, 32)}
        # weekly 4: the newest of ISO weeks 2026-W01 (Dec 31), 2025-W52 (Sunday Dec 28),
        # W51 (Dec 21), W50 (Dec 14)
        | {date(2025, 12, 21), date(2025, 12, 14)}
        # monthly 12: the last day of each month of 2025 (Dec 31 already kept)
        | set(month_ends)
    )
    assert set(choice.kept) == {gid(d) for d in expected}
    assert len(choice.kept) == 20
    assert choice.deleted == [gid(d) for d in YEAR if d not in expected]
    assert choice.kept[gid(date(2025, 12, 31))] == (
        "last 1",
        "daily 2025-12-31",
        "weekly 2026-W01",
        "monthly 2025-12",
    )
    assert choice.kept[gid(date(2025, 12, 28))] == ("daily 2025-12-28", "weekly 2025-W52")
    assert choice.kept[gid(date(2025, 2, 28))] == ("monthly 2025-02",)


def test_chains_of_kept_generations_are_kept_with_a_reason() -> None:
    gens = weekly_chains(YEAR)
    by_id = {g.generation_id: g for g in gens}
    choice = choose(gens, POLICY)
    kept = set(choice.kept)
    for g in kept:
        assert dependencies(by_id[g], by_id) <= kept, g
    # Friday Jan 31 is kept as January's newest: an incremental on Sunday Jan 26's full,
    # so the whole week's chain stays.
    jan31 = gid(date(2025, 1, 31))
    assert choice.kept[jan31] == ("monthly 2025-01",)
    for d in range(26, 31):
        assert choice.kept[gid(date(2025, 1, d))] == (f"needed by {jan31}",)
    assert gid(date(2025, 1, 25)) in choice.deleted
    # Nothing else is kept: the rules' picks and what they need, exactly.
    picks = {g for g, r in choice.kept.items() if not r[0].startswith("needed by")}
    needed = set().union(*(dependencies(by_id[g], by_id) for g in picks))
    assert kept == picks | needed
    assert len(picks) == 20  # the same days as with daily fulls


def test_a_differential_keeps_only_its_base_full() -> None:
    days = YEAR[-10:]  # Dec 22 (Monday) .. Dec 31
    gens = [GenerationRef(gid(days[0]), "full", None, None, at(days[0]))]
    gens += [
        GenerationRef(gid(d), "differential", gid(days[0]), gid(days[0]), at(d)) for d in days[1:]
    ]
    choice = choose(gens, RetentionPolicy(last=1, tz="UTC"))
    assert set(choice.kept) == {gid(days[0]), gid(days[-1])}
    assert choice.kept[gid(days[0])] == (f"needed by {gid(days[-1])}",)


def test_several_backups_a_day_keep_the_newest_of_each_day() -> None:
    gens = [
        GenerationRef(f"g{d.day:02d}-{h:02d}", "full", None, None, at(d, h))
        for d in YEAR[-3:]
        for h in (0, 6, 12, 18)
    ]
    choice = choose(gens, RetentionPolicy(last=1, daily=3, hourly=2, tz="UTC"))
    assert set(choice.kept) == {"g31-18", "g31-12", "g30-18", "g29-18"}
    assert choice.kept["g31-12"] == ("hourly 2025-12-31 12:00+0000",)


def test_buckets_are_in_the_policy_zone() -> None:
    # 23:30 UTC on Dec 30 is already Dec 31 in Berlin (UTC+1 in winter).
    late = datetime(2025, 12, 30, 23, 30, tzinfo=UTC).timestamp()
    assert bucket(late, "daily", RetentionPolicy(1, tz="UTC").zone()) == "2025-12-30"
    assert bucket(late, "daily", RetentionPolicy(1, tz="Europe/Berlin").zone()) == "2025-12-31"
    gens = [
        GenerationRef(
            "a", "full", None, None, datetime(2025, 12, 30, 22, 0, tzinfo=UTC).timestamp()
        ),
        GenerationRef("b", "full", None, None, late),
    ]
    # In Berlin both are Dec 30 23:00 / Dec 31 00:30: two days; in UTC one day.
    assert set(choose(gens, RetentionPolicy(1, daily=2, tz="Europe/Berlin")).kept) == {"a", "b"}
    assert set(choose(gens, RetentionPolicy(1, daily=2, tz="UTC")).kept) == {"b"}


def test_the_hour_a_clock_change_repeats_is_two_buckets() -> None:
    # Berlin, 2025-10-26: 02:00..03:00 local happens twice (00:xx and 01:xx UTC).
    first = datetime(2025, 10, 26, 0, 30, tzinfo=UTC).timestamp()
    second = datetime(2025, 10, 26, 1, 30, tzinfo=UTC).timestamp()
    zone = RetentionPolicy(1, tz="Europe/Berlin").zone()
    assert bucket(first, "hourly", zone) == "2025-10-26 02:00+0200"
    assert bucket(second, "hourly", zone) == "2025-10-26 02:00+0100"


def test_empty_deltas_are_no_rule_s_pick_but_the_newest_stays() -> None:
    full = GenerationRef("f", "full", None, None, at(YEAR[0]))
    empties = [
        GenerationRef(f"e{i}", "incremental", "f", "f", at(d), empty=True)
        for i, d in enumerate(YEAR[1:5])
    ]
    choice = choose([full, *empties], RetentionPolicy(last=1, daily=7, tz="UTC"))
    # The full stands for the idle days; only the newest empty one stays (never zero).
    assert choice.kept == {"f": ("last 1", "daily 2025-01-01", "needed by e3"), "e3": ("newest",)}


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"last": 0}, "keep last 0"),
        ({"last": 1, "daily": -1}, "keep daily -1"),
        ({"last": 1, "weekly": 2.5}, "keep weekly 2.5"),
        ({"last": 1, "monthly": True}, "keep monthly True"),
        ({"last": 1, "hourly": "3"}, "keep hourly '3'"),
        ({"last": 1, "hourly": 10001}, "10001"),
        ({"last": 1, "tz": "Mars/Olympus"}, "Mars/Olympus"),
    ],
)
def test_bad_policies_are_refused_by_name(kwargs: dict, named: str) -> None:
    with pytest.raises(InvalidObjectives, match=named.replace("+", r"\+")):
        RetentionPolicy(**kwargs)


def test_an_int_still_means_keep_last() -> None:
    gens = daily_fulls(YEAR[:10])
    assert select_for_deletion(gens, 3) == select_for_deletion(gens, RetentionPolicy(last=3))
    assert select_for_deletion(gens, 3) == [gid(d) for d in YEAR[:7]]


policies = st.builds(
    RetentionPolicy,
    last=st.integers(1, 5),
    hourly=st.integers(0, 4),
    daily=st.integers(0, 4),
    weekly=st.integers(0, 3),
    monthly=st.integers(0, 3),
    tz=st.sampled_from(["UTC", "Europe/Berlin", "America/New_York"]),
)


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["full", "differential", "incremental"]),
            st.integers(60, 40 * 86400),
            st.booleans(),
        ),
        min_size=1,
        max_size=40,
    ),
    policy=policies,
)
def test_a_policy_never_breaks_a_chain_nor_keeps_nothing(
    steps: list, policy: RetentionPolicy
) -> None:
    gens: list[GenerationRef] = []
    t, full, previous = 1.7e9, None, None
    for i, (kind, gap, empty) in enumerate(steps):
        t += gap
        if kind == "full" or full is None:
            gens.append(GenerationRef(f"g{i:03d}", "full", None, None, t))
            full = previous = f"g{i:03d}"
            continue
        parent = full if kind == "differential" else previous
        gens.append(GenerationRef(f"g{i:03d}", kind, full, parent, t, empty=empty))
        if not empty:
            previous = f"g{i:03d}"
    by_id = {g.generation_id: g for g in gens}
    choice = choose(gens, policy)
    kept = set(choice.kept)
    assert gens[-1].generation_id in kept
    assert kept | set(choice.deleted) == set(by_id) and not kept & set(choice.deleted)
    for g in kept:
        assert dependencies(by_id[g], by_id) <= kept
    real = [g for g in gens if not g.empty]
    assert {g.generation_id for g in real[-policy.last :]} <= kept
    for tier in ("hourly", "daily", "weekly", "monthly"):
        picked = {r for reasons in choice.kept.values() for r in reasons if r.startswith(tier)}
        buckets = {bucket(g.created, tier, policy.zone()) for g in real}
        assert len(picked) == min(policy.count(tier), len(buckets))
