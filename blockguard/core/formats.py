"""How the vocabulary's quantities are written for people: sizes, rates, durations, times.

One formatter for the daemon's messages and the CLI's tables alike. :mod:`.vocab` offers
these names too; the CLI imports this module by itself (the layers let it import the
vocabulary, this module and nothing else of the core), because the vocabulary's enums and
patterns (enum, re) were a fifth of a ``blockguardctl status`` call that only prints
sizes and ages (issue 16).
Sizes are binary; durations parse back with :func:`blockguard.core.units.parse_duration`.
It imports nothing but ``time``.
"""

from __future__ import annotations

import time

TYPE_CHECKING = False  # typing is not imported to run (issue 16)
if TYPE_CHECKING:
    # Not imported to run: datetime is a millisecond of every blockguardctl call.
    from datetime import timedelta

#: +infinity: ``not -_INF < x < _INF`` is ``not math.isfinite(x)`` (nan compares false),
#: without importing math.
_INF = float("inf")

_BINARY_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_size(nbytes: float) -> str:
    """A byte count in binary units with one decimal: ``"12.0 GiB"``, ``"512 B"``.

    :param nbytes: the number of bytes.
    """
    value = float(nbytes)
    if abs(value) < 1024:
        return f"{value:.0f} B"
    for unit in _BINARY_UNITS:
        value /= 1024
        if abs(value) < 1024 or unit == _BINARY_UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def format_rate(bytes_per_second: float) -> str:
    """A throughput: ``"95.4 MiB/s"``.

    :param bytes_per_second: the throughput in bytes per second.
    """
    return f"{format_size(bytes_per_second)}/s"


def format_duration(value: timedelta | float) -> str:
    """A duration, compactly: ``"5m12s"``, ``"1h40m"``, ``"2d3h"``, ``"2.5s"``, ``"0s"``.

    Durations of a minute or more are rounded to whole seconds, shorter ones to a tenth of a
    second; zero components are left out.

    :param value: a timedelta or a number of seconds.
    """
    seconds = value.total_seconds() if hasattr(value, "total_seconds") else float(value)
    if not -_INF < seconds < _INF:
        return "forever"
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if round(seconds, 1) < 60:
        text = f"{round(seconds, 1):.1f}".rstrip("0").rstrip(".")
        return f"{sign}{text}s"
    whole = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, whole = divmod(whole, size)
        if count:
            parts.append(f"{count}{unit}")
    return sign + "".join(parts)


def format_time(unix: float) -> str:
    """A point in time, local: ``"2026-12-01 18:45:11"``; ``"-"`` for 0 (never, none)."""
    if not unix:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix))


def format_ago(unix: float, now: float | None = None) -> str:
    """A point in time relative to now, coarsely: ``"3m ago"``, ``"in 2h"``, ``"-"`` for 0.

    Two units at most (``"1h5m ago"``): enough to compare with an RPO at a glance.

    :param now: the present (default: the clock).
    """
    if not unix:
        return "-"
    delta = (time.time() if now is None else now) - unix
    span = abs(delta)
    text = format_duration(span if span < 60 else round(span))
    if span >= 60:
        # Seconds are noise beside minutes, and so on: keep the two largest units.
        parts = [p + u for p, u in _split_units(text)]
        text = "".join(parts[:2])
    return f"{text} ago" if delta > 0 else f"in {text}"


def _split_units(text: str) -> list[tuple[str, str]]:
    parts: list[tuple[str, str]] = []
    number = ""
    for char in text:
        if char.isdigit() or char == ".":
            number += char
        else:
            parts.append((number, char))
            number = ""
    return parts
