"""Stored objective sets: key-by-key checks, merge semantics; device-mapper detection; CLI."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import pytest

from blockguard.cli.main import U64_MAX, bounded_int, build_parser
from blockguard.core.objective_sets import (
    check_value,
    clean_given,
    generations_of,
    merge_given,
    parse_given,
    restore_mode_of,
)
from blockguard.core.objectives import DEFAULT_GENERATIONS
from blockguard.core.vocab import RestoreMode
from blockguard.errors import InvalidObjectives
from blockguard.storage.dm import driver_loaded

BASE = {"rpo": "every 15m", "generations": 9}


def test_only_the_keys_given_change() -> None:
    # A set with an RTO stores what it refers to: the default, copy, unless given.
    assert merge_given(BASE, {"rto": "2.1s"}) == {**BASE, "rto": "2.1s", "restore_mode": "copy"}
    assert merge_given(BASE, {"generations": 12}) == {"rpo": "every 15m", "generations": 12}
    assert merge_given(BASE, {"generations": "3"}) == {"rpo": "every 15m", "generations": 3}
    assert merge_given(BASE, {"tz": "UTC"}) == {**BASE, "tz": "UTC"}
    assert merge_given({}, {"generations": 4}) == {"generations": 4}
    assert merge_given(BASE, {"rpo": ""}) == {"generations": 9}
    assert merge_given(BASE, {"rpo": "", "generations": ""}) == {}
    assert merge_given({}, {"restore_mode": "copy"}) == {"restore_mode": "copy"}


def test_the_restore_mode_is_copy_by_default_and_stored_with_every_rto() -> None:
    new = clean_given({"rto": "5m"})
    assert new == {"rto": "5m", "restore_mode": "copy"}
    assert restore_mode_of(new) is RestoreMode.COPY
    assert parse_given(new).restore_mode is RestoreMode.COPY  # type: ignore[union-attr]
    assert clean_given({"rto": "5m", "restore_mode": "swap-in"})["restore_mode"] == "swap-in"
    # Without an RTO nothing is added, and a restore is a copy unless the set says so.
    assert clean_given({"rpo": "every 1h"}) == {"rpo": "every 1h"}
    assert restore_mode_of({"rpo": "every 1h"}) is RestoreMode.COPY
    assert restore_mode_of({}) is RestoreMode.COPY
    assert restore_mode_of({"generations": 3, "restore_mode": "swap-in"}) is RestoreMode.SWAP_IN


def test_sets_stored_before_the_mode_was_kept_mean_swap_in_until_changed() -> None:
    # Stored by a blockguard whose default was swap-in: an RTO without a mode.
    old = {"rpo": "every 1h", "rto": "5m"}
    assert restore_mode_of(old) is RestoreMode.SWAP_IN
    assert parse_given(old).restore_mode is RestoreMode.SWAP_IN  # type: ignore[union-attr]
    # Changing other keys, or the RTO itself, keeps that meaning and writes it out...
    assert merge_given(old, {"generations": 3})["restore_mode"] == "swap-in"
    assert merge_given(old, {"rto": "10m"})["restore_mode"] == "swap-in"
    # ...naming a mode or clearing it (back to the default) changes it.
    assert merge_given(old, {"restore_mode": "copy"})["restore_mode"] == "copy"
    assert merge_given(old, {"restore_mode": ""})["restore_mode"] == "copy"
    # Without an RTO left there is nothing to keep.
    assert merge_given(old, {"rto": ""}) == {"rpo": "every 1h"}


def test_a_new_set_stores_only_the_keys_given_and_refuses_bad_sets() -> None:
    # What Protect stores: the defaults (7 generations) apply when read, not when stored.
    assert clean_given({"rpo": "every 15m"}) == {"rpo": "every 15m"}
    for bad in ({}, {"rpo": "0m"}, {"rto": -3}, {"rpo": "15m", "generations": 0}, {"x": 1}):
        with pytest.raises(InvalidObjectives):
            clean_given(bad)


def test_sets_without_rpo_or_rto_plan_nothing_but_keep_generations() -> None:
    assert parse_given({"generations": 4}) is None
    assert generations_of({"generations": 4}) == 4
    assert generations_of({}) == DEFAULT_GENERATIONS
    parsed = parse_given({"rto": 2.5, "generations": "11"})
    assert parsed is not None and parsed.generations == 11
    assert parsed.rto is not None and parsed.rto.total_seconds() == 2.5


@pytest.mark.parametrize(
    "key,value",
    [
        ("rto", (1 << 64) - 1),
        ("rto", 0),
        ("rto", -1),
        ("rto", math.nan),
        ("rto", math.inf),
        ("rto", 1e308),
        ("rto", True),
        ("rto", "0s"),
        ("rto", "31d"),
        ("rto", "99999999999999999999d"),
        ("rto", "1e400m"),
        ("rto", ["5m"]),
        ("rpo", "every 0m"),
        ("rpo", "every 99999999999999999999d"),
        ("rpo", "changed 99999999999999999999P"),
        ("rpo", 900),
        ("rpo", "x" * 201),
        ("rpo", "5m\n"),
        ("generations", (1 << 64) - 1),
        ("generations", 0),
        ("generations", -1),
        ("generations", 10_001),
        ("generations", "9" * 30),
        ("generations", "٣"),
        ("generations", 7.0),
        ("generations", True),
        ("restore_mode", "teleport"),
        ("tz", "../../etc/passwd"),
        ("tz", "Mars/Base"),
        ("tz", 1),
        ("colour", "blue"),
    ],
)
def test_every_bad_value_is_named(key: str, value: Any) -> None:
    with pytest.raises(InvalidObjectives) as info:
        check_value(key, value)
    assert key in str(info.value)
    with pytest.raises(InvalidObjectives):
        merge_given(BASE, {key: value})


def test_merge_refuses_empty_and_non_dicts() -> None:
    for given in ({}, None, ["rto"], "rto=5m"):
        with pytest.raises(InvalidObjectives):
            merge_given(BASE, given)


def test_device_mapper_is_the_driver_not_the_node(tmp_path: Path) -> None:
    misc = tmp_path / "misc"
    devices = tmp_path / "devices"
    nomod = tmp_path / "no-module"
    misc.write_text(" 237 loop-control\n 229 fuse\n")
    devices.write_text("Block devices:\n  7 loop\n259 blkext\n")
    assert not driver_loaded((misc, devices), nomod)
    misc.write_text(" 237 loop-control\n 236 device-mapper\n")
    assert driver_loaded((misc, devices), nomod)
    misc.write_text("")
    devices.write_text("Block devices:\n  7 loop\n253 device-mapper\n")
    assert driver_loaded((misc, devices), nomod)
    devices.write_text("")
    (tmp_path / "dm_mod").mkdir()
    assert driver_loaded((misc, devices), tmp_path / "dm_mod")
    assert not driver_loaded((tmp_path / "missing",), nomod)


def test_cli_numbers_are_bounded_before_any_call() -> None:
    parse = bounded_int("generations", 1, 10_000, clearable=True)
    assert parse("9") == 9 and parse("") == ""
    for bad in (str(1 << 64), "0", "-1", "1e3", "٣", "abc", "10001", " "):
        with pytest.raises(argparse.ArgumentTypeError, match="generations"):
            parse(bad)
    chunk = bounded_int("chunk size", 0, U64_MAX)
    assert chunk(str(U64_MAX)) == U64_MAX
    with pytest.raises(argparse.ArgumentTypeError):
        chunk(str(U64_MAX + 1))
    args = build_parser().parse_args(["protect", "/dev/x", "v", "--pool", "p", "--rto", "5m"])
    assert (args.pool, args.rto, args.chunk_size) == ("p", "5m", 0)
