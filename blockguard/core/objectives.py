"""Recovery objectives: what the administrator asks for (the seed's setup screen, Fig. 2).

The RPO (how much may be lost) is one of an interval, a daily hour in local time, or an
amount of changed data; the RTO (how long a restore may take) is a duration that refers to a
restore mode, copy (the default: the backup is copied back onto the volume's device or a
new one) or swap-in (the backup becomes the volume). A restore that names no mode is done
in the mode its volume's RTO refers to, so the RTO is held against the restore an admin
gets by default. Either or both may be given. Everything here validates on
construction, so an invalid ``RecoveryObjectives`` cannot exist.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from blockguard.core.retention import TIERS, RetentionPolicy
from blockguard.core.units import (
    EiB,
    MiB,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)
from blockguard.core.vocab import DEFAULT_GENERATIONS, MAX_GENERATIONS, RestoreMode
from blockguard.errors import InvalidInput, InvalidObjectives

MIN_INTERVAL = timedelta(minutes=1)
#: What an RTO refers to unless the objectives say otherwise, and so the restore an admin
#: gets without naming a mode: a copy. It is the restore the seed's RTO describes (the
#: changed data copied back at the slower of the pool's read and the target's write
#: speed), it puts the data back where the applications expect it, and it leaves nothing
#: behind on the pool (a swap-in keeps pool space and a device until it is released).
DEFAULT_RESTORE_MODE = RestoreMode.COPY
#: What the RTO of objectives stored without a restore mode refers to: they were stored by
#: a blockguard whose default was swap-in (before 2026-12), and keep the meaning they had.
#: Objectives stored since always carry their mode when they have an RTO.
LEGACY_RESTORE_MODE = RestoreMode.SWAP_IN
MAX_INTERVAL = timedelta(days=365)
MIN_RTO = timedelta(seconds=1)
MAX_RTO = timedelta(days=30)
MIN_CHANGED_BYTES = MiB
MAX_CHANGED_BYTES = EiB
#: Restore drills of a volume (issue 14): at most hourly (a drill restores the whole
#: volume, so more often would load the pool more than the backups do), at least yearly.
MIN_DRILL_INTERVAL = timedelta(hours=1)
MAX_DRILL_INTERVAL = timedelta(days=365)
#: A volume with an RTO is drilled this often unless its objectives say otherwise.
DEFAULT_DRILL_INTERVAL = timedelta(weeks=1)
#: The words a drill objective may be given as, besides an interval.
DRILL_WORDS: dict[str, timedelta | None] = {
    "daily": timedelta(days=1),
    "weekly": timedelta(weeks=1),
    "off": None,
}


_HOUR_RE = re.compile(r"([0-9]{1,2}):([0-9]{2})")


@dataclass(frozen=True)
class IntervalRPO:
    """Back up at least every ``interval``."""

    interval: timedelta

    def __post_init__(self) -> None:
        if not isinstance(self.interval, timedelta):
            raise InvalidObjectives(detail=f"RPO interval {self.interval!r} is not a duration")
        if self.interval < MIN_INTERVAL or self.interval > MAX_INTERVAL:
            raise InvalidObjectives(
                detail=f"RPO interval {format_duration(self.interval)} is outside "
                f"{format_duration(MIN_INTERVAL)}..{format_duration(MAX_INTERVAL)}"
            )

    def describe(self) -> str:
        """Human description, e.g. ``"every 15m"``."""
        return f"every {format_duration(self.interval)}"


@dataclass(frozen=True)
class DailyRPO:
    """Back up once a day at ``hour:minute`` local wall-clock time in ``tz``.

    ``tz`` is an IANA zone name; ``None`` means the system's local zone. On a day when the
    wall time does not exist (spring forward) the run happens right after the gap; when it
    exists twice (fall back) it happens at the first of the two. Either way, once.
    """

    hour: int
    minute: int = 0
    tz: str | None = None

    def __post_init__(self) -> None:
        for name, value, top in (("hour", self.hour, 23), ("minute", self.minute, 59)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
                raise InvalidObjectives(
                    detail=f"RPO daily {name} {value!r} is not an integer in 0..{top}"
                )
        if self.tz is not None:
            try:
                ZoneInfo(self.tz)
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise InvalidObjectives(
                    detail=f"RPO time zone {self.tz!r} is not a known IANA zone name"
                ) from exc

    @property
    def at(self) -> str:
        """The wall time as ``"HH:MM"``."""
        return f"{self.hour:02d}:{self.minute:02d}"

    def describe(self) -> str:
        """Human description, e.g. ``"daily at 02:30 Europe/Berlin"``."""
        return f"daily at {self.at} {self.tz or 'local time'}"


@dataclass(frozen=True)
class ChangedDataRPO:
    """Back up when ``nbytes`` of the volume have changed since the last backup."""

    nbytes: int

    def __post_init__(self) -> None:
        if isinstance(self.nbytes, bool) or not isinstance(self.nbytes, int):
            raise InvalidObjectives(detail=f"RPO changed-data amount {self.nbytes!r} is not bytes")
        if not MIN_CHANGED_BYTES <= self.nbytes <= MAX_CHANGED_BYTES:
            raise InvalidObjectives(
                detail=f"RPO changed-data amount {format_size(self.nbytes)} is outside "
                f"{format_size(MIN_CHANGED_BYTES)}..{format_size(MAX_CHANGED_BYTES)}"
            )

    def describe(self) -> str:
        """Human description, e.g. ``"after 10.0 GiB changed"``."""
        return f"after {format_size(self.nbytes)} changed"


RPO = IntervalRPO | DailyRPO | ChangedDataRPO


@dataclass(frozen=True)
class RecoveryObjectives:
    """The objectives of one volume or group.

    :param rpo: the recovery point objective, or ``None``.
    :param rto: the recovery time objective, or ``None``.
    :param restore_mode: what the RTO refers to.
    :param generations: how many of the newest generations to keep (at least 1): the
        keep-last rule of retention.
    :param keep_hourly: keep the newest generation of each of this many hours (0: no rule).
    :param keep_daily: likewise for days.
    :param keep_weekly: likewise for ISO weeks.
    :param keep_monthly: likewise for months (see :mod:`blockguard.core.retention`).
    """

    rpo: RPO | None = None
    rto: timedelta | None = None
    restore_mode: RestoreMode = DEFAULT_RESTORE_MODE
    generations: int = DEFAULT_GENERATIONS
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0

    def __post_init__(self) -> None:
        if self.rpo is None and self.rto is None:
            raise InvalidObjectives(detail="give an RPO, an RTO or both; neither was given")
        if self.rpo is not None and not isinstance(
            self.rpo, IntervalRPO | DailyRPO | ChangedDataRPO
        ):
            raise InvalidObjectives(detail=f"RPO {self.rpo!r} is not an interval, hour or amount")
        if self.rto is not None:
            if not isinstance(self.rto, timedelta):
                raise InvalidObjectives(detail=f"RTO {self.rto!r} is not a duration")
            if self.rto < MIN_RTO or self.rto > MAX_RTO:
                raise InvalidObjectives(
                    detail=f"RTO {format_duration(self.rto)} is outside "
                    f"{format_duration(MIN_RTO)}..{format_duration(MAX_RTO)}"
                )
        try:
            mode = RestoreMode(self.restore_mode)
        except ValueError as exc:
            raise InvalidObjectives(
                detail=f"restore mode {self.restore_mode!r} is not one of "
                f"{', '.join(m.value for m in RestoreMode)}"
            ) from exc
        object.__setattr__(self, "restore_mode", mode)
        g = self.generations
        if isinstance(g, bool) or not isinstance(g, int) or not 1 <= g <= MAX_GENERATIONS:
            raise InvalidObjectives(
                detail=f"generations {g!r} is not an integer in 1..{MAX_GENERATIONS}"
            )
        for tier in TIERS:
            n = getattr(self, f"keep_{tier}")
            if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_GENERATIONS:
                raise InvalidObjectives(
                    detail=f"keep_{tier} {n!r} is not an integer in 0..{MAX_GENERATIONS}"
                )

    def retention(self, tz: str | None = None) -> RetentionPolicy:
        """The retention policy these objectives ask for, its buckets in zone ``tz``.

        :param tz: IANA zone name; ``None``: the zone of a daily RPO, else local time.
        """
        if tz is None and isinstance(self.rpo, DailyRPO):
            tz = self.rpo.tz
        return RetentionPolicy(
            last=self.generations,
            hourly=self.keep_hourly,
            daily=self.keep_daily,
            weekly=self.keep_weekly,
            monthly=self.keep_monthly,
            tz=tz,
        )

    def describe(self) -> str:
        """One line for display, e.g. ``"RPO every 1h, RTO 5m (copy), 7 generations"``."""
        parts = []
        if self.rpo is not None:
            parts.append(f"RPO {self.rpo.describe()}")
        if self.rto is not None:
            parts.append(f"RTO {format_duration(self.rto)} ({self.restore_mode.value})")
        parts.append(f"{self.generations} generations")
        tiers = [f"{t} {getattr(self, 'keep_' + t)}" for t in TIERS if getattr(self, "keep_" + t)]
        if tiers:
            parts.append(f"keep {' '.join(tiers)}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly form for the catalog; :meth:`from_dict` reads it back."""
        rpo: dict[str, Any] | None
        match self.rpo:
            case IntervalRPO(interval=interval):
                rpo = {"kind": "interval", "seconds": interval.total_seconds()}
            case DailyRPO() as daily:
                rpo = {"kind": "daily", "at": daily.at, "tz": daily.tz}
            case ChangedDataRPO(nbytes=nbytes):
                rpo = {"kind": "changed", "bytes": nbytes}
            case _:
                rpo = None
        return {
            "rpo": rpo,
            "rto_seconds": None if self.rto is None else self.rto.total_seconds(),
            "restore_mode": self.restore_mode.value,
            "generations": self.generations,
            **{f"keep_{tier}": getattr(self, f"keep_{tier}") for tier in TIERS},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RecoveryObjectives:
        """Rebuild objectives stored with :meth:`to_dict`.

        :param data: the stored mapping.
        :raises InvalidObjectives: if the mapping is malformed or its values are invalid.
        """
        if not isinstance(data, Mapping):
            raise InvalidObjectives(detail=f"stored objectives {data!r} are not a mapping")
        try:
            raw_rpo = data.get("rpo")
            rpo: RPO | None
            if raw_rpo is None:
                rpo = None
            elif raw_rpo["kind"] == "interval":
                rpo = IntervalRPO(timedelta(seconds=float(raw_rpo["seconds"])))
            elif raw_rpo["kind"] == "daily":
                rpo = parse_daily(raw_rpo["at"], raw_rpo.get("tz"))
            elif raw_rpo["kind"] == "changed":
                rpo = ChangedDataRPO(int(raw_rpo["bytes"]))
            else:
                raise InvalidObjectives(detail=f"stored RPO kind {raw_rpo['kind']!r} is unknown")
            rto_seconds = data.get("rto_seconds")
            rto = None if rto_seconds is None else timedelta(seconds=float(rto_seconds))
            return cls(
                rpo=rpo,
                rto=rto,
                restore_mode=RestoreMode(data.get("restore_mode", LEGACY_RESTORE_MODE.value)),
                generations=data.get("generations", DEFAULT_GENERATIONS),
                # Records from before time tiers have no keep_* keys: no tier rule.
                **{f"keep_{tier}": data.get(f"keep_{tier}", 0) for tier in TIERS},  # type: ignore[arg-type]  # checked in __post_init__
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidObjectives(
                detail=f"stored objectives {dict(data)!r} are malformed: {exc}"
            ) from exc


def parse_daily(text: str, tz: str | None = None) -> DailyRPO:
    """Parse a wall time ``"HH:MM"`` (24-hour) into a :class:`DailyRPO`.

    :param text: the time of day, e.g. ``"02:30"``.
    :param tz: IANA zone name, or ``None`` for local time.
    :raises InvalidObjectives: if the time does not parse or is out of range (``"25:00"``).
    """
    match = _HOUR_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise InvalidObjectives(detail=f"daily hour {text!r} is not HH:MM (e.g. 02:30)")
    hour, minute = int(match.group(1)), int(match.group(2))
    if hour > 23 or minute > 59:
        raise InvalidObjectives(detail=f"daily hour {text!r} is not a time of day (00:00..23:59)")
    return DailyRPO(hour, minute, tz)


def parse_rpo(text: str, tz: str | None = None) -> RPO:
    """Parse an RPO as typed by a user.

    Accepted forms: ``"every 15m"`` or ``"15m"`` (interval); ``"daily 02:30"``,
    ``"at 02:30"`` or ``"02:30"`` (daily hour); ``"changed 10GiB"`` or ``"10G"`` (amount of
    changed data). Without a keyword, a duration with lower-case units wins over a size.

    :param text: the user's text.
    :param tz: zone name for a daily hour (``None``: local time).
    :raises InvalidObjectives: naming the text, if it is none of the forms or out of range.
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidObjectives(detail=f"RPO {text!r} is empty")
    words = text.strip().split(None, 1)
    keyword = words[0].lower()
    rest = words[1] if len(words) == 2 else ""
    try:
        if keyword == "every":
            return IntervalRPO(parse_duration(rest))
        if keyword in ("daily", "at"):
            return parse_daily(rest, tz)
        if keyword == "changed":
            return ChangedDataRPO(parse_size(rest))
    except InvalidObjectives:
        raise
    except InvalidInput as exc:
        raise InvalidObjectives(detail=f"RPO {text!r}: {exc.fields.get('detail', exc)}") from exc
    body = text.strip()
    if _HOUR_RE.fullmatch(body):
        return parse_daily(body, tz)
    try:
        return IntervalRPO(parse_duration(body))
    except InvalidObjectives:
        raise
    except InvalidInput:
        pass
    try:
        return ChangedDataRPO(parse_size(body))
    except InvalidObjectives:
        raise
    except InvalidInput as exc:
        raise InvalidObjectives(
            detail=f"RPO {text!r} is not an interval (15m, every 4h), a daily hour "
            "(02:30, daily 02:30) or an amount of changed data (10GiB, changed 10G)"
        ) from exc


def parse_rto(text: str | float | timedelta) -> timedelta:
    """Parse an RTO duration (``"5m"``, ``"1h30m"``); the range is checked by the objectives.

    :param text: the user's text, seconds, or a timedelta.
    :raises InvalidObjectives: naming the text if it does not parse.
    """
    try:
        return parse_duration(text)
    except InvalidInput as exc:
        raise InvalidObjectives(detail=f"RTO {text!r}: {exc.fields.get('detail', exc)}") from exc


def parse_drill(text: str) -> timedelta | None:
    """Parse how often a volume's restore drill runs; ``None`` means drills are off.

    Accepted forms: ``"daily"``, ``"weekly"``, ``"off"``, or an interval (``"3d"``,
    ``"every 12h"``) of :data:`MIN_DRILL_INTERVAL` .. :data:`MAX_DRILL_INTERVAL`.

    :param text: the user's text.
    :raises InvalidObjectives: naming the text, if it is none of the forms or out of range.
    """
    forms = (
        f"{', '.join(DRILL_WORDS)} or an interval such as 3d or every 12h "
        f"({format_duration(MIN_DRILL_INTERVAL)}..{format_duration(MAX_DRILL_INTERVAL)})"
    )
    if not isinstance(text, str) or not text.strip():
        raise InvalidObjectives(detail=f"drill {text!r} is not {forms}")
    body = text.strip()
    if body.lower() in DRILL_WORDS:
        return DRILL_WORDS[body.lower()]
    words = body.split(None, 1)
    if words[0].lower() == "every":
        body = words[1] if len(words) == 2 else ""
    try:
        interval = parse_duration(body)
    except InvalidInput as exc:
        raise InvalidObjectives(detail=f"drill {text!r} is not {forms}") from exc
    if not MIN_DRILL_INTERVAL <= interval <= MAX_DRILL_INTERVAL:
        raise InvalidObjectives(
            detail=f"drill {text!r} is outside "
            f"{format_duration(MIN_DRILL_INTERVAL)}..{format_duration(MAX_DRILL_INTERVAL)}"
        )
    return interval


def parse_objectives(
    rpo: str | None = None,
    rto: str | None = None,
    *,
    generations: str | int | None = None,
    restore_mode: str | None = None,
    tz: str | None = None,
    keep: Mapping[str, str | int | None] | None = None,
) -> RecoveryObjectives:
    """Build objectives from user strings (CLI, D-Bus); ``None``/empty means "not given".

    :param rpo: see :func:`parse_rpo`.
    :param rto: see :func:`parse_rto`.
    :param generations: number of generations to keep (default 7).
    :param restore_mode: ``"copy"`` (default, :data:`DEFAULT_RESTORE_MODE`) or ``"swap-in"``.
    :param tz: zone name for a daily-hour RPO (default: local time).
    :param keep: time tiers by name (``{"daily": 7, "weekly": "4"}``); absent means 0.
    :raises InvalidObjectives: naming the offending value.
    """
    gens = _whole("generations", generations, DEFAULT_GENERATIONS)
    keep = dict(keep or {})
    unknown = sorted(set(keep) - set(TIERS))
    if unknown:
        raise InvalidObjectives(
            detail=f"keep tiers {unknown} are unknown; known: {', '.join(TIERS)}"
        )
    tiers = {f"keep_{t}": _whole(f"keep_{t}", keep.get(t), 0) for t in TIERS}
    mode = restore_mode or DEFAULT_RESTORE_MODE
    return RecoveryObjectives(
        rpo=parse_rpo(rpo, tz) if rpo else None,
        rto=parse_rto(rto) if rto else None,
        restore_mode=mode,  # type: ignore[arg-type]  # validated and coerced in __post_init__
        generations=gens,
        **tiers,
    )


def _whole(name: str, value: str | int | None, default: int) -> int:
    """A count as given (digits as text, or an int); the range is checked by the objectives."""
    if value is None or value == "":
        return default
    if isinstance(value, str):
        if not (value.strip().isascii() and value.strip().isdigit()):
            raise InvalidObjectives(detail=f"{name} {value!r} is not a whole number")
        return int(value.strip())
    return value
