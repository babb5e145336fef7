"""When to back up (the seed's time management and Fig. 6), as pure functions of the clock.

A backup is due on the RPO interval, at the RPO's daily hour (local wall time, DST-safe),
when the changed bytes reach the RPO amount, or, with no RPO, when the changed bytes reach
what can still be restored within the RTO. Everything is computed from the last backup's
time, so runs missed during downtime collapse into one run now. All datetimes are
timezone-aware; the daemon passes ``now`` and the functions never read a clock.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from blockguard.core.objectives import (
    MIN_DRILL_INTERVAL,
    ChangedDataRPO,
    DailyRPO,
    IntervalRPO,
    RecoveryObjectives,
)
from blockguard.core.units import format_duration, format_size
from blockguard.errors import InvalidInput

#: With only an RTO, back up when the changes reach this much less than what is still
#: restorable: the tracker is polled, so changes keep arriving between the check and the
#: snapshot, and a backup that lands just past the limit would have to be a full.
RTO_MARGIN = 0.1


class Trigger(enum.StrEnum):
    """Why a backup is (or will be) due."""

    FIRST = "first"
    INTERVAL = "interval"
    DAILY = "daily"
    CHANGED_DATA = "changed-data"
    RTO_HEADROOM = "rto-headroom"
    NONE = "none"


@dataclass(frozen=True)
class ScheduleDecision:
    """Whether a backup is due now, and when the next one is.

    :param due: a backup should start now.
    :param next_due: when it is or becomes due by the clock (``<= now`` if due by the
        clock; ``None`` if only changed data can make it due).
    :param trigger: what makes it due.
    :param reason: human explanation with the numbers used.
    :param missed: how many scheduled runs passed unserved since the last backup beyond the
        one due now (they are not run separately).
    :param changed_bytes: with an amount trigger: the changed bytes the decision saw.
    :param limit_bytes: with an amount trigger: the changed bytes that make it due.
    """

    due: bool
    next_due: datetime | None
    trigger: Trigger
    reason: str
    missed: int = 0
    changed_bytes: int | None = None
    limit_bytes: int | None = None


def _aware(name: str, value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(detail=f"{name} {value.isoformat()} has no time zone")
    return value


def local_zone() -> tzinfo:
    """The system's local zone with its DST rules (``TZ``, else /etc/localtime, else UTC).

    A fixed-offset ``datetime.now().astimezone()`` zone would be wrong across a DST change.
    """
    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    try:
        with open("/etc/localtime", "rb") as f:
            return ZoneInfo.from_file(f, key="localtime")
    except (OSError, ValueError):
        return UTC


def zone_of(rpo: DailyRPO, default: tzinfo | None = None) -> tzinfo:
    """The zone of a daily RPO: its own, else ``default``, else the system's local zone."""
    if rpo.tz is not None:
        return ZoneInfo(rpo.tz)
    return default if default is not None else local_zone()


def daily_occurrence(rpo: DailyRPO, day: date, zone: tzinfo) -> datetime:
    """The instant the daily run of local ``day`` happens, in UTC.

    A wall time that does not exist that day (spring forward) maps to the instant just after
    the gap (02:30 becomes 03:30 summer time); one that exists twice (fall back) maps to its
    first occurrence. So every local day has exactly one run.

    :param rpo: the daily hour.
    :param day: the local calendar day.
    :param zone: the zone the hour is in.
    """
    # fold=0 is PEP 495's "earlier" reading: in a gap it uses the offset from before the
    # transition (landing after the gap), in an overlap it picks the first occurrence.
    wall = datetime(day.year, day.month, day.day, rpo.hour, rpo.minute, fold=0, tzinfo=zone)
    return wall.astimezone(UTC)


def last_daily_occurrence(rpo: DailyRPO, now: datetime, zone: tzinfo) -> datetime:
    """The latest daily run instant at or before ``now``."""
    day = now.astimezone(zone).date()
    for offset in range(3):
        at = daily_occurrence(rpo, day - timedelta(days=offset), zone)
        if at <= now:
            return at
    raise AssertionError("unreachable: a run happens every local day")  # pragma: no cover


def next_daily_occurrence(rpo: DailyRPO, after: datetime, zone: tzinfo) -> datetime:
    """The first daily run instant strictly after ``after``."""
    day = after.astimezone(zone).date()
    for offset in range(3):
        at = daily_occurrence(rpo, day + timedelta(days=offset), zone)
        if at > after:
            return at
    raise AssertionError("unreachable: a run happens every local day")  # pragma: no cover


def schedule(
    objectives: RecoveryObjectives,
    *,
    last_backup: datetime | None,
    changed_bytes: int,
    now: datetime,
    restorable_bytes: int | None = None,
    zone: tzinfo | None = None,
    rto_margin: float = RTO_MARGIN,
) -> ScheduleDecision:
    """Decide whether a backup of one volume (or group) is due now.

    :param objectives: the volume's objectives.
    :param last_backup: the point in time of the last backup (its snapshot), or ``None``.
    :param changed_bytes: bytes changed since the last backup (the tracker's count).
    :param now: the current time (timezone-aware).
    :param restorable_bytes: with an RTO and no RPO: how many changed bytes can still be
        restored within the RTO (:func:`blockguard.core.restore_model.bytes_restorable_within`).
    :param zone: zone for a daily RPO without its own (default: the system's local zone).
    :param rto_margin: with an RTO and no RPO, the fraction of ``restorable_bytes`` kept in
        reserve: the backup is due when the changes reach the rest.
    :raises InvalidInput: on naive datetimes or a negative byte count.
    """
    _aware("now", now)
    if isinstance(changed_bytes, bool) or not isinstance(changed_bytes, int) or changed_bytes < 0:
        raise InvalidInput(detail=f"changed bytes {changed_bytes!r} is not a byte count >= 0")
    if last_backup is None:
        return ScheduleDecision(True, now, Trigger.FIRST, "no backup yet: the first full is due")
    _aware("last backup", last_backup)

    rpo = objectives.rpo
    if isinstance(rpo, IntervalRPO):
        due_at = last_backup + rpo.interval
        age = now - last_backup
        if now >= due_at:
            missed = int(age / rpo.interval) - 1
            extra = f" ({missed} more runs missed, run once)" if missed > 0 else ""
            return ScheduleDecision(
                True,
                due_at,
                Trigger.INTERVAL,
                f"last backup {format_duration(age)} ago >= RPO interval "
                f"{format_duration(rpo.interval)}{extra}",
                missed,
            )
        return ScheduleDecision(
            False,
            due_at,
            Trigger.INTERVAL,
            f"last backup {format_duration(age)} ago < RPO interval "
            f"{format_duration(rpo.interval)}; next at {due_at.isoformat()}",
        )
    if isinstance(rpo, DailyRPO):
        tz = zone_of(rpo, zone)
        latest = last_daily_occurrence(rpo, now, tz)
        if last_backup < latest:
            missed = 0
            at = latest
            while True:
                at = last_daily_occurrence(rpo, at - timedelta(seconds=1), tz)
                if at <= last_backup or missed > 366:
                    break
                missed += 1
            extra = f" ({missed} more runs missed, run once)" if missed > 0 else ""
            return ScheduleDecision(
                True,
                latest,
                Trigger.DAILY,
                f"daily run at {rpo.at} ({latest.astimezone(tz).isoformat()}) "
                f"not yet served; last backup {last_backup.astimezone(tz).isoformat()}{extra}",
                missed,
            )
        upcoming = next_daily_occurrence(rpo, now, tz)
        return ScheduleDecision(
            False,
            upcoming,
            Trigger.DAILY,
            f"daily run at {rpo.at} served; next at {upcoming.astimezone(tz).isoformat()}",
        )
    if isinstance(rpo, ChangedDataRPO):
        return _by_amount(changed_bytes, rpo.nbytes, Trigger.CHANGED_DATA, "RPO amount")
    # No RPO: the RTO decides how much change may pile up (the seed, after Fig. 6).
    if restorable_bytes is None:
        raise InvalidInput(
            detail="objectives without an RPO need the bytes still restorable within the RTO"
        )
    if not 0 <= rto_margin < 1:
        raise InvalidInput(detail=f"RTO margin {rto_margin!r} is not in [0, 1)")
    return _by_amount(
        changed_bytes,
        int(max(0, restorable_bytes) * (1 - rto_margin)),
        Trigger.RTO_HEADROOM,
        f"amount still restorable within RTO {format_duration(objectives.rto or 0)}",
    )


def _by_amount(changed: int, limit: int, trigger: Trigger, what: str) -> ScheduleDecision:
    # Nothing changed means nothing to protect, even when the limit is 0.
    if changed > 0 and changed >= limit:
        return ScheduleDecision(
            True,
            None,
            trigger,
            f"changed {format_size(changed)} >= {what} {format_size(limit)}",
            changed_bytes=changed,
            limit_bytes=limit,
        )
    return ScheduleDecision(
        False,
        None,
        trigger,
        f"changed {format_size(changed)} < {what} {format_size(limit)}",
        changed_bytes=changed,
        limit_bytes=limit,
    )


def poll_delay(changed: int, limit: int, rate: float, floor: float, ceiling: float) -> float:
    """Seconds until an amount trigger (changed-data RPO, RTO headroom) is looked at again.

    Only a look at the tracker tells how much changed, and a look costs device work (a scan
    reads the volume, thin tracking reserves a metadata snapshot), so the look comes when
    the changes could reach the limit: half the time the recent change rate needs for the
    rest, so a steady writer is caught with at most half the remaining amount of overshoot.
    A volume that did not change is looked at every ``ceiling`` seconds; none more often
    than every ``floor`` seconds.

    :param changed: bytes changed at the last look.
    :param limit: the bytes that make the backup due.
    :param rate: bytes per second changed between the last two looks (0: none, unknown).
    :param floor: the shortest delay (``scheduler_interval``).
    :param ceiling: the longest delay (``scheduler_max_interval``).
    """
    ceiling = max(floor, ceiling)
    if rate <= 0:
        return ceiling
    eta = max(0, limit - changed) / rate
    return min(ceiling, max(floor, eta / 2))


@dataclass(frozen=True)
class GroupSchedule:
    """The one point in time at which all volumes of a group are backed up together."""

    due: bool
    next_due: datetime | None
    reasons: tuple[str, ...]


def group_schedule(decisions: Mapping[str, ScheduleDecision]) -> GroupSchedule:
    """Merge the decisions of a group's volumes into one common backup time.

    The group runs as soon as any member needs a backup, so that no member's RPO is missed;
    the next due time is the earliest of the members'.

    :param decisions: each member's decision by volume name.
    :raises InvalidInput: for an empty group.
    """
    if not decisions:
        raise InvalidInput(detail="a group without volumes has no schedule")
    due = [name for name, d in decisions.items() if d.due]
    times = [d.next_due for d in decisions.values() if d.next_due is not None]
    reasons = tuple(f"{name}: {d.reason}" for name, d in sorted(decisions.items()))
    return GroupSchedule(bool(due), min(times) if times else None, reasons)


@dataclass(frozen=True)
class DrillDecision:
    """Whether a volume's restore drill is due now, and when the next one is.

    :param due: a drill should start now.
    :param next_due: when it is or becomes due (``None``: drills are off, or there is
        nothing to drill yet).
    :param reason: human explanation with the numbers used.
    """

    due: bool
    next_due: datetime | None
    reason: str


def drill_schedule(
    interval: timedelta | None,
    *,
    last_drill: datetime | None,
    newest_generation: datetime | None,
    now: datetime,
    last_failed: bool = False,
) -> DrillDecision:
    """Decide whether the restore drill of one volume is due now.

    A volume is drilled every ``interval`` from its last drill; the first drill is due as
    soon as there is a generation to restore, and drills missed while the daemon was down
    collapse into one run now. After a failed drill, the next one is due as soon as a newer
    generation exists (the backup that was to fix it: is the promise kept again?), but not
    sooner than :data:`~blockguard.core.objectives.MIN_DRILL_INTERVAL` after the failed one.

    :param interval: how often (:func:`blockguard.core.objective_sets.drill_of`), or
        ``None`` when drills are off.
    :param last_drill: when the last drill of the volume started, or ``None``.
    :param newest_generation: the point in time of the newest generation, or ``None``.
    :param now: the current time (timezone-aware).
    :param last_failed: the last drill failed (missed the RTO, or could not restore).
    :raises InvalidInput: on naive datetimes or a non-positive interval.
    """
    _aware("now", now)
    if interval is None:
        return DrillDecision(False, None, "restore drills are off")
    if interval <= timedelta(0):
        raise InvalidInput(detail=f"drill interval {interval!r} is not positive")
    if newest_generation is None:
        return DrillDecision(False, None, "nothing to drill: the volume has no generation yet")
    if last_drill is None:
        return DrillDecision(True, now, "never drilled: the first restore drill is due")
    _aware("last drill", last_drill)
    due_at = last_drill + interval
    age = max(now - last_drill, timedelta(0))  # a clock set back must not print "-3m"
    every = format_duration(interval)
    if last_failed and _aware("newest generation", newest_generation) > last_drill:
        retry_at = min(due_at, last_drill + MIN_DRILL_INTERVAL)
        if now >= retry_at:
            return DrillDecision(
                True,
                retry_at,
                f"the last drill ({format_duration(age)} ago) failed and a newer generation "
                "exists: drill it",
            )
        return DrillDecision(
            False,
            retry_at,
            f"the last drill ({format_duration(age)} ago) failed; the newer generation is "
            f"drilled at {retry_at.isoformat()}",
        )
    if now >= due_at:
        return DrillDecision(
            True, due_at, f"last drill {format_duration(age)} ago >= drill interval {every}"
        )
    return DrillDecision(
        False,
        due_at,
        f"last drill {format_duration(age)} ago < drill interval {every}; "
        f"next at {due_at.isoformat()}",
    )


def startable(due: Iterable[str], running: Collection[str]) -> list[str]:
    """The due volumes that can start now: never two jobs on one volume at once.

    :param due: volumes (or groups' member lists flattened by the caller) that are due.
    :param running: volumes with a job in progress.
    """
    return [name for name in due if name not in running]


def group_startable(members: Iterable[str], running: Collection[str]) -> bool:
    """A group starts only when none of its members has a job running (one point in time)."""
    return not any(name in running for name in members)
