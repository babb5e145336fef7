"""Recovery objectives: validation with clear errors, storage round trip, user parsing."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockguard.core.objectives import (
    ChangedDataRPO,
    DailyRPO,
    IntervalRPO,
    RecoveryObjectives,
    RestoreMode,
    parse_daily,
    parse_objectives,
    parse_rpo,
)
from blockguard.core.units import GiB, MiB
from blockguard.errors import InvalidInput, InvalidObjectives


def test_defaults_and_either_objective() -> None:
    only_rto = RecoveryObjectives(rto=timedelta(minutes=5))
    assert only_rto.rpo is None
    assert only_rto.restore_mode is RestoreMode.COPY  # the restore an admin gets by default
    assert only_rto.generations == 7
    only_rpo = RecoveryObjectives(rpo=IntervalRPO(timedelta(hours=1)))
    assert only_rpo.rto is None


def test_neither_rpo_nor_rto_is_refused() -> None:
    with pytest.raises(InvalidObjectives, match="neither was given"):
        RecoveryObjectives()


def test_invalid_objectives_is_an_invalid_input() -> None:
    # The CLI and D-Bus map InvalidInput to a usage error; objectives errors must be one.
    assert issubclass(InvalidObjectives, InvalidInput)


@pytest.mark.parametrize(
    ("build", "named"),
    [
        (lambda: IntervalRPO(timedelta(0)), "0s"),
        (lambda: IntervalRPO(timedelta(seconds=-60)), "-1m"),
        (lambda: IntervalRPO(timedelta(seconds=59)), "59s"),
        (lambda: IntervalRPO(timedelta(days=366)), "366d"),
        (lambda: RecoveryObjectives(rto=timedelta(0)), "0s"),
        (lambda: RecoveryObjectives(rto=timedelta(seconds=0.5)), "0.5s"),
        (lambda: RecoveryObjectives(rto=timedelta(days=31)), "31d"),
        (lambda: RecoveryObjectives(rto=timedelta(hours=1), generations=0), "generations 0"),
        (lambda: RecoveryObjectives(rto=timedelta(hours=1), generations=-2), "generations -2"),
        (lambda: RecoveryObjectives(rto=timedelta(hours=1), generations=10001), "10001"),
        (lambda: RecoveryObjectives(rto=timedelta(hours=1), generations=True), "True"),
        (lambda: RecoveryObjectives(rto=timedelta(hours=1), restore_mode="teleport"), "teleport"),
        (lambda: DailyRPO(24, 0), "hour 24"),
        (lambda: DailyRPO(2, 60), "minute 60"),
        (lambda: DailyRPO(2, 30, "Mars/Olympus"), "Mars/Olympus"),
        (lambda: ChangedDataRPO(0), "0 B"),
        (lambda: ChangedDataRPO(-5), "-5 B"),
        (lambda: ChangedDataRPO(1000), "1000 B"),
    ],
)
def test_bad_values_are_refused_with_the_value_named(
    build: Callable[[], object], named: str
) -> None:
    with pytest.raises(InvalidObjectives) as info:
        build()
    assert named in str(info.value)


def test_limits_themselves_are_accepted() -> None:
    assert IntervalRPO(timedelta(minutes=1)).interval == timedelta(minutes=1)
    assert IntervalRPO(timedelta(days=365)).interval == timedelta(days=365)
    assert RecoveryObjectives(rto=timedelta(seconds=1)).rto == timedelta(seconds=1)
    assert RecoveryObjectives(rto=timedelta(days=30), generations=10000).generations == 10000
    assert ChangedDataRPO(MiB).nbytes == MiB


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("15m", IntervalRPO(timedelta(minutes=15))),
        ("every 4h", IntervalRPO(timedelta(hours=4))),
        ("1h30m", IntervalRPO(timedelta(minutes=90))),
        ("02:30", DailyRPO(2, 30, "Europe/Berlin")),
        ("daily 23:59", DailyRPO(23, 59, "Europe/Berlin")),
        ("at 0:05", DailyRPO(0, 5, "Europe/Berlin")),
        ("10G", ChangedDataRPO(10 * GiB)),
        ("changed 64MiB", ChangedDataRPO(64 * MiB)),
        ("15M", ChangedDataRPO(15 * MiB)),
    ],
)
def test_parse_rpo_forms(text: str, expected: object) -> None:
    assert parse_rpo(text, "Europe/Berlin") == expected


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("25:00", "'25:00'"),
        ("daily 25:00", "'25:00'"),
        ("12:61", "'12:61'"),
        ("daily noon", "'noon'"),
        ("every soon", "'soon'"),
        ("changed lots", "'lots'"),
        ("whenever", "'whenever'"),
        ("", "''"),
        ("30s", "30s"),
    ],
)
def test_parse_rpo_errors_name_the_text(text: str, named: str) -> None:
    with pytest.raises(InvalidObjectives) as info:
        parse_rpo(text)
    assert named in str(info.value)


def test_parse_daily_keeps_zone_and_formats_back() -> None:
    daily = parse_daily("2:30", "America/New_York")
    assert (daily.hour, daily.minute, daily.tz, daily.at) == (2, 30, "America/New_York", "02:30")


def test_parse_objectives_from_user_strings() -> None:
    objectives = parse_objectives("every 1h", "5m", generations="14", restore_mode="copy")
    assert objectives == RecoveryObjectives(
        rpo=IntervalRPO(timedelta(hours=1)),
        rto=timedelta(minutes=5),
        restore_mode=RestoreMode.COPY,
        generations=14,
    )
    assert objectives.describe() == "RPO every 1h, RTO 5m (copy), 14 generations"


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"rpo": "1h", "generations": "seven"}, "'seven'"),
        ({"rpo": "1h", "generations": "0"}, "generations 0"),
        ({"rto": "soon"}, "'soon'"),
        ({"rto": "-5m"}, "'-5m'"),
        ({"rto": "0s"}, "RTO 0s"),
        ({"rto": "40d"}, "RTO 40d"),
        ({"rto": "5m", "restore_mode": "clone"}, "'clone'"),
        ({}, "neither"),
    ],
)
def test_parse_objectives_errors(kwargs: dict[str, str], named: str) -> None:
    with pytest.raises(InvalidObjectives) as info:
        parse_objectives(**kwargs)
    assert named in str(info.value)


_rpos = st.one_of(
    st.none(),
    st.integers(60, 365 * 86400).map(lambda s: IntervalRPO(timedelta(seconds=s))),
    st.builds(
        DailyRPO,
        st.integers(0, 23),
        st.integers(0, 59),
        st.sampled_from([None, "UTC", "Europe/Berlin", "America/New_York"]),
    ),
    st.integers(MiB, 2**50).map(ChangedDataRPO),
)


@st.composite
def _objectives(draw: st.DrawFn) -> RecoveryObjectives:
    rpo = draw(_rpos)
    rto = draw(st.none() if rpo is None else st.none() | st.integers(1, 30 * 86400))
    if rpo is None:
        rto = draw(st.integers(1, 30 * 86400))
    return RecoveryObjectives(
        rpo=rpo,
        rto=None if rto is None else timedelta(seconds=rto),
        restore_mode=draw(st.sampled_from(list(RestoreMode))),
        generations=draw(st.integers(1, 10000)),
    )


@given(_objectives())
def test_storage_round_trip_through_json(objectives: RecoveryObjectives) -> None:
    stored = json.loads(json.dumps(objectives.to_dict()))
    assert RecoveryObjectives.from_dict(stored) == objectives


@pytest.mark.parametrize(
    "stored",
    [
        {"rpo": {"kind": "sometimes"}, "rto_seconds": 60},
        {"rpo": {"kind": "interval"}, "rto_seconds": 60},
        {"rpo": None, "rto_seconds": "abc"},
        {"rpo": None, "rto_seconds": None},
        {"rpo": {"kind": "daily", "at": "24:00", "tz": None}},
        "not a mapping",
    ],
)
def test_from_dict_rejects_malformed(stored: object) -> None:
    with pytest.raises(InvalidObjectives):
        RecoveryObjectives.from_dict(stored)  # type: ignore[arg-type]  # deliberately wrong
