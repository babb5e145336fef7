"""Remote objectives (issue 11): stored with the volume's set, checked as their local
namesakes, and given to the planner with the target they are for."""

from __future__ import annotations

from datetime import timedelta

import pytest

from blockguard.core.objective_sets import merge_given, parse_given, remote_of
from blockguard.core.vocab import RestoreMode
from blockguard.errors import InvalidObjectives


def test_remote_keys_are_stored_and_parsed_apart_from_the_local_ones() -> None:
    merged = merge_given(
        {"rpo": "1h"},
        {
            "remote_target": "offsite",
            "remote_rpo": "daily 02:00",
            "remote_rto": "2h",
            "remote_generations": "3",
        },
    )
    assert merged["rpo"] == "1h"
    local = parse_given(merged)
    assert local is not None and local.rto is None
    remote = remote_of(merged)
    assert remote is not None and remote.target == "offsite"
    assert remote.generations == 3
    assert remote.objectives is not None
    assert remote.objectives.rto == timedelta(hours=2)
    # A restore from a target is always a copy: the RTO refers to it.
    assert remote.objectives.restore_mode is RestoreMode.COPY


def test_a_target_alone_is_a_copy_on_request() -> None:
    remote = remote_of(merge_given({"rpo": "1h"}, {"remote_target": "offsite"}))
    assert remote is not None and remote.objectives is None
    assert "on request" in remote.describe()


def test_no_remote_target_no_remote_objectives() -> None:
    assert remote_of({"rpo": "1h"}) is None


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({"remote_rto": "5m"}, "need a remote_target"),
        ({"remote_target": "a b"}, "remote_target 'a b'"),
        ({"remote_target": "x", "remote_rpo": "soon"}, "remote_rpo 'soon'"),
        ({"remote_target": "x", "remote_rto": "99d"}, "remote_rto '99d'"),
        ({"remote_target": "x", "remote_generations": 0}, "remote_generations 0"),
    ],
)
def test_bad_remote_objectives_are_refused_by_name(given: dict, named: str) -> None:
    current = {"rpo": "1h"}
    with pytest.raises(InvalidObjectives, match=named):
        merge_given(current, given)
    assert current == {"rpo": "1h"}


def test_clearing_the_target_under_remote_objectives_is_refused() -> None:
    stored = merge_given({"rpo": "1h"}, {"remote_target": "x", "remote_rto": "1h"})
    with pytest.raises(InvalidObjectives, match="need a remote_target"):
        merge_given(stored, {"remote_target": ""})
    cleared = merge_given(stored, {"remote_target": "", "remote_rto": ""})
    assert remote_of(cleared) is None


def test_blockguardctl_objectives_sends_the_remote_keys() -> None:
    from blockguard.cli.actions import _objectives
    from blockguard.cli.main import build_parser

    args = build_parser().parse_args(
        [
            "objectives",
            "db",
            "--target",
            "offsite",
            "--remote-rto",
            "2h",
            "--remote-generations",
            "3",
        ]
    )
    sent = {k: v.value for k, v in _objectives(args).items()}
    assert sent == {"remote_target": "offsite", "remote_rto": "2h", "remote_generations": 3}
    assert args.target == "db"
    # protect names no target: its own arguments are untouched.
    protect = build_parser().parse_args(["protect", "/dev/loop9", "db", "--rpo", "1h"])
    assert {k: v.value for k, v in _objectives(protect).items()} == {"rpo": "1h"}
