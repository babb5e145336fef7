"""Sizes, rates and durations: parsing what users type and formatting what they read.

Sizes follow the usual split: ``KiB``/``MiB``/... and the single letters ``K``/``M``/``G``/...
are binary (as in LVM and dd), ``kB``/``MB``/``GB``/... are decimal (as disk vendors and the
seed's own example, "600 GB at 100 MB/s", use them). Durations use lower-case units only
(``s``, ``m``, ``h``, ``d``, ``w``) so that "15m" (minutes) never collides with "15M" (MiB).
Everything is formatted in binary units; the formatters and parsers round-trip.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta

from blockguard.core.vocab import format_duration, format_rate, format_size
from blockguard.errors import InvalidInput

# The formatters live in the vocabulary, which the CLI may import too: one set of rules
# for every size and duration a user reads.
__all__ = ["format_duration", "format_rate", "format_size", "parse_duration", "parse_size"]

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4
PiB = 1024**5
EiB = 1024**6

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": KiB,
    "kib": KiB,
    "kb": 10**3,
    "m": MiB,
    "mib": MiB,
    "mb": 10**6,
    "g": GiB,
    "gib": GiB,
    "gb": 10**9,
    "t": TiB,
    "tib": TiB,
    "tb": 10**12,
    "p": PiB,
    "pib": PiB,
    "pb": 10**15,
    "e": EiB,
    "eib": EiB,
    "eb": 10**18,
}

_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*([A-Za-z]*)\s*")

_DURATION_UNITS: dict[str, int] = {
    "s": 1,
    "sec": 1,
    "secs": 1,
    "second": 1,
    "seconds": 1,
    "m": 60,
    "min": 60,
    "mins": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hr": 3600,
    "hrs": 3600,
    "hour": 3600,
    "hours": 3600,
    "d": 86400,
    "day": 86400,
    "days": 86400,
    "w": 7 * 86400,
    "week": 7 * 86400,
    "weeks": 7 * 86400,
}

_DURATION_TERM_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*([A-Za-z]+)\s*")


def parse_size(text: str | int) -> int:
    """Parse a size such as ``"64KiB"``, ``"10G"``, ``"1.5 TiB"``, ``"600GB"`` or ``4096``.

    :param text: the size as typed by a user, or a byte count as an ``int``.
    :returns: the size in bytes (fractions of a byte are rounded to the nearest byte).
    :raises InvalidInput: if the text is not a size or is negative; the message names it.
    """
    if isinstance(text, bool):
        raise InvalidInput(detail=f"size {text!r} is not a number of bytes")
    if isinstance(text, int):
        if text < 0:
            raise InvalidInput(detail=f"size {text} is negative")
        return text
    if not isinstance(text, str):
        raise InvalidInput(detail=f"size {text!r} is neither a string nor an integer")
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise InvalidInput(
            detail=f"size {text!r} does not parse (examples: 4096, 64KiB, 10G, 1.5 TiB, 600GB)"
        )
    number, unit = match.groups()
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise InvalidInput(
            detail=f"size {text!r} has an unknown unit {unit!r} "
            "(use B, KiB/MiB/GiB/TiB/PiB or K/M/G/T/P, or decimal kB/MB/GB/TB/PB)"
        )
    return round(float(number) * factor)


#: Durations from here on do not fit a timedelta (about 2.7 million years).
_MAX_SECONDS = timedelta.max.total_seconds() - 86400


def parse_duration(text: str | int | float | timedelta) -> timedelta:
    """Parse a duration such as ``"90s"``, ``"15m"``, ``"4h"``, ``"1d"`` or ``"1h30m"``.

    A bare number (``int``/``float``, not a string) is taken as seconds; a string must carry
    units, because "15" alone is ambiguous.

    :param text: the duration as typed by a user, a number of seconds, or a timedelta.
    :returns: the duration.
    :raises InvalidInput: if the text is not a duration or is negative; the message names it.
    """
    if isinstance(text, bool):
        raise InvalidInput(detail=f"duration {text!r} is not a duration")
    if isinstance(text, timedelta):
        seconds = text.total_seconds()
    elif isinstance(text, int | float):
        seconds = float(text)
    elif isinstance(text, str):
        seconds = _parse_duration_text(text)
    else:
        raise InvalidInput(detail=f"duration {text!r} is neither a string nor a number")
    if not math.isfinite(seconds):
        raise InvalidInput(detail=f"duration {text!r} is not finite")
    if seconds < 0:
        raise InvalidInput(detail=f"duration {text!r} is negative")
    if seconds >= _MAX_SECONDS:
        # timedelta itself would raise OverflowError, which is no message for a user.
        raise InvalidInput(detail=f"duration {text!r} is longer than any objective can be")
    return timedelta(seconds=seconds)


def _parse_duration_text(text: str) -> float:
    stripped = text.strip()
    if not stripped:
        raise InvalidInput(detail="duration '' is empty (examples: 90s, 15m, 4h, 1d, 1h30m)")
    pos = 0
    total = 0.0
    seen: set[int] = set()
    while pos < len(stripped):
        match = _DURATION_TERM_RE.match(stripped, pos)
        if match is None:
            raise InvalidInput(
                detail=f"duration {text!r} does not parse; every number needs a unit "
                "(examples: 90s, 15m, 4h, 1d, 1h30m)"
            )
        number, unit = match.groups()
        factor = _DURATION_UNITS.get(unit)
        if factor is None:
            raise InvalidInput(
                detail=f"duration {text!r} has an unknown unit {unit!r} "
                "(use lower-case s, m, h, d or w; 'M' would be MiB)"
            )
        if factor in seen:
            raise InvalidInput(detail=f"duration {text!r} gives the unit {unit!r} twice")
        seen.add(factor)
        total += float(number) * factor
        pos = match.end()
    return total
