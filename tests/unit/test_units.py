"""Sizes and durations: what users type, and what reasons print."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockguard.core.units import (
    GiB,
    KiB,
    MiB,
    TiB,
    format_duration,
    format_rate,
    format_size,
    parse_duration,
    parse_size,
)
from blockguard.errors import InvalidInput


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64KiB", 64 * KiB),
        ("10G", 10 * GiB),
        ("1.5 TiB", int(1.5 * TiB)),
        ("600GB", 600 * 10**9),
        ("100 MB", 100 * 10**6),
        ("4096", 4096),
        ("512B", 512),
        ("2m", 2 * MiB),
        (" 3 gib ", 3 * GiB),
        (4096, 4096),
        (0, 0),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "ten", "10 XB", "-5G", "1.2.3G", "G10", True, -1, 1.5])
def test_parse_size_rejects_and_names_the_text(text: object) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_size(text)  # type: ignore[arg-type]  # deliberately wrong types too
    assert repr(text) in str(info.value) or str(text) in str(info.value)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("15m", 900),
        ("4h", 4 * 3600),
        ("1d", 86400),
        ("1h30m", 5400),
        ("1h 30m", 5400),
        ("2w", 14 * 86400),
        ("1.5h", 5400),
        ("10 minutes", 600),
        (42, 42),
        (2.5, 2.5),
        (timedelta(minutes=3), 180),
    ],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["", "15", "15M", "4H", "1x", "1h1h", "-5m", "m5", True, -3])
def test_parse_duration_rejects_and_names_the_text(text: object) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_duration(text)  # type: ignore[arg-type]  # deliberately wrong types too
    assert repr(text) in str(info.value) or str(text) in str(info.value)


def test_capital_m_is_not_minutes() -> None:
    with pytest.raises(InvalidInput, match="MiB"):
        parse_duration("15M")
    assert parse_size("15M") == 15 * MiB


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (2.5, "2.5s"),
        (59, "59s"),
        (312, "5m12s"),
        (300, "5m"),
        (6000, "1h40m"),
        (3605, "1h5s"),
        (2 * 86400 + 3 * 3600, "2d3h"),
        (timedelta(minutes=100), "1h40m"),
    ],
)
def test_format_duration(seconds: float | timedelta, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (64 * KiB, "64.0 KiB"),
        (12 * GiB, "12.0 GiB"),
        (3 * TiB, "3.0 TiB"),
    ],
)
def test_format_size(nbytes: int, text: str) -> None:
    assert format_size(nbytes) == text


def test_format_rate() -> None:
    assert format_rate(100 * MiB) == "100.0 MiB/s"


@given(st.integers(min_value=60, max_value=400 * 86400))
def test_duration_format_parse_round_trip(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)).total_seconds() == seconds


@given(st.integers(min_value=0, max_value=2**60))
def test_size_format_parse_is_close(nbytes: int) -> None:
    # One decimal in the largest unit: within 5% (plus rounding of tiny sizes).
    back = parse_size(format_size(nbytes).replace(" ", ""))
    assert abs(back - nbytes) <= max(0.05 * nbytes, 1)
