"""Time-tiered retention in the objectives: stored, checked, merged, read back, typed."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from blockguard.cli.actions import retention_text
from blockguard.cli.main import build_parser
from blockguard.core.objective_sets import merge_given, parse_given, retention_of
from blockguard.core.objectives import (
    DailyRPO,
    IntervalRPO,
    RecoveryObjectives,
    parse_objectives,
)
from blockguard.core.retention import TIERS, RetentionPolicy
from blockguard.core.vocab import RETENTION_TIERS
from blockguard.errors import InvalidObjectives


def test_objectives_round_trip_with_tiers() -> None:
    obj = RecoveryObjectives(
        rpo=IntervalRPO(timedelta(hours=1)),
        generations=3,
        keep_daily=7,
        keep_weekly=4,
        keep_monthly=12,
    )
    stored = json.loads(json.dumps(obj.to_dict()))
    assert stored["keep_daily"] == 7 and stored["keep_hourly"] == 0
    assert RecoveryObjectives.from_dict(stored) == obj
    assert obj.retention() == RetentionPolicy(last=3, daily=7, weekly=4, monthly=12)
    assert obj.describe().endswith("3 generations, keep daily 7 weekly 4 monthly 12")


def test_records_from_before_tiers_still_read() -> None:
    old = {
        "rpo": {"kind": "interval", "seconds": 900.0},
        "rto_seconds": 300.0,
        "restore_mode": "swap-in",
        "generations": 5,
    }
    obj = RecoveryObjectives.from_dict(old)
    assert obj.generations == 5
    assert (obj.keep_hourly, obj.keep_daily, obj.keep_weekly, obj.keep_monthly) == (0, 0, 0, 0)
    assert obj.retention() == RetentionPolicy(last=5)


def test_a_daily_rpo_zone_is_the_bucket_zone() -> None:
    obj = RecoveryObjectives(rpo=DailyRPO(2, 30, "Europe/Berlin"), keep_daily=7)
    assert obj.retention().tz == "Europe/Berlin"
    assert obj.retention("UTC").tz == "UTC"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("keep_daily", -1),
        ("keep_weekly", 1.5),
        ("keep_monthly", "3"),
        ("keep_hourly", True),
        ("keep_daily", 10001),
    ],
)
def test_bad_tier_values_are_named(field: str, value: object) -> None:
    with pytest.raises(InvalidObjectives, match=f"{field} {value!r}".replace(".", r"\.")):
        RecoveryObjectives(rto=timedelta(minutes=5), **{field: value})  # type: ignore[arg-type]  # the point


def test_parse_objectives_takes_tiers_as_text() -> None:
    obj = parse_objectives(rpo="1h", keep={"daily": "7", "weekly": 4})
    assert (obj.keep_daily, obj.keep_weekly) == (7, 4)
    with pytest.raises(InvalidObjectives, match="keep_daily '-1' is not a whole number"):
        parse_objectives(rpo="1h", keep={"daily": "-1"})
    with pytest.raises(InvalidObjectives, match="yearly"):
        parse_objectives(rpo="1h", keep={"yearly": 1})


def test_set_objectives_keys() -> None:
    merged = merge_given({"rpo": "every 1h"}, {"keep_daily": 7, "keep_weekly": "4"})
    assert merged == {"rpo": "every 1h", "keep_daily": 7, "keep_weekly": 4}
    parsed = parse_given(merged)
    assert parsed is not None and (parsed.keep_daily, parsed.keep_weekly) == (7, 4)
    assert retention_of(merged) == RetentionPolicy(last=7, daily=7, weekly=4)
    assert retention_of({**merged, "generations": 2, "tz": "UTC"}) == RetentionPolicy(
        last=2, daily=7, weekly=4, tz="UTC"
    )
    assert merge_given(merged, {"keep_daily": ""}) == {"rpo": "every 1h", "keep_weekly": 4}
    # Tiers alone are a valid set (like generations alone): retention without objectives.
    assert retention_of(merge_given({}, {"keep_monthly": 6})).monthly == 6


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("keep_daily", -1, "keep_daily -1 is not a whole number in 0..10000"),
        ("keep_daily", "-1", "keep_daily '-1' is not a whole number in 0..10000"),
        ("keep_weekly", 2.5, "keep_weekly 2.5 must be a whole number"),
        ("keep_monthly", True, "keep_monthly True must be a whole number"),
        ("keep_hourly", (1 << 64) - 1, "keep_hourly 18446744073709551615 is not"),
        ("keep_yearly", 1, "unknown keys \\['keep_yearly'\\]"),
    ],
)
def test_set_objectives_refuses_bad_tiers_by_name(key: str, value: object, named: str) -> None:
    before = {"rpo": "every 1h", "keep_daily": 3}
    with pytest.raises(InvalidObjectives, match=named):
        merge_given(before, {key: value})
    assert before == {"rpo": "every 1h", "keep_daily": 3}


def test_cli_options() -> None:
    args = build_parser().parse_args(
        ["objectives", "db", "--keep-last", "3", "--keep-daily", "7", "--keep-monthly", ""]
    )
    assert (args.generations, args.keep_daily, args.keep_monthly) == (3, 7, "")
    assert args.keep_hourly is None and args.keep_weekly is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["objectives", "db", "--keep-weekly", "-2"])


def test_the_cli_words_retention_as_the_policy_does() -> None:
    assert tuple(TIERS) == RETENTION_TIERS  # the CLI knows the tiers from the vocabulary
    for given in (
        {},
        {"generations": 3},
        {"generations": 2, "keep_daily": 7, "keep_monthly": 12},
        {"keep_weekly": 4, "tz": "UTC"},
    ):
        assert retention_text(given) == retention_of(given).describe()
