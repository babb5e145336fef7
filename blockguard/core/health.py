"""Health of the protected volumes and pools: a pure decision from facts the engine gathers.

The engine collects, per volume, the time of its last successful backup, its objectives,
the upper restore estimate, the failed backups in a row and the tracker's state, and per
pool its size and free space; :func:`assess` turns them into a :class:`Health` with one
level (``ok`` < ``warning`` < ``critical``) and the :class:`Condition`\\ s that hold now.
Each condition is an alert of one kind about one subject; :func:`transitions` says which
alerts start and which end between two assessments, so each is raised once.

Levels: a missed objective (RPO age past its objective, a restore estimate past the RTO
or a plan that cannot meet it) is ``critical``; pool space below the threshold, backups
failing in a row and lost change tracking are ``warning`` (nothing is lost yet, but it
will be). Nothing here reads a clock: ``now`` is given.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from blockguard.core.units import format_duration, format_size
from blockguard.errors import InvalidInput


class Level(enum.IntEnum):
    """How bad it is; also the exit code of ``blockguardctl status --check``."""

    OK = 0
    WARNING = 1
    CRITICAL = 2

    @property
    def label(self) -> str:
        return self.name.lower()


class AlertKind(enum.StrEnum):
    """The kinds of alert; each has its own journal MESSAGE_ID (:data:`MESSAGE_IDS`)."""

    POOL_SPACE_LOW = "pool-space-low"
    OBJECTIVE_INFEASIBLE = "objective-infeasible"
    RPO_MISSED = "rpo-missed"
    BACKUPS_FAILING = "backups-failing"
    TRACKER_LOST = "tracker-lost"
    #: one-shot: a restore drill's restore took longer than a volume's RTO allows
    DRILL_MISSED_RTO = "drill-missed-rto"
    #: one-shot: a restore drill could not restore or verify the newest generation
    DRILL_FAILED = "drill-failed"


#: Stable journal MESSAGE_IDs, one per alert kind (``journalctl MESSAGE_ID=...``). Never
#: change one: monitoring matches on them. Raised and resolved share the id; the journal
#: field ALERT_STATE tells them apart.
MESSAGE_IDS: Mapping[AlertKind, str] = {
    AlertKind.POOL_SPACE_LOW: "3a1d5f0e8c2b4f7a9e61b0c4d2f8a713",
    AlertKind.OBJECTIVE_INFEASIBLE: "7c4e2a9b1d3f4e86a05b9c7d1e2f3a48",
    AlertKind.RPO_MISSED: "b5e81c3d9a2f47e0b6c4d8e1f2a3b5c6",
    AlertKind.BACKUPS_FAILING: "e2d4f6a8b0c14e3f9a5b7c9d1e3f5a70",
    AlertKind.TRACKER_LOST: "91f3b5d7e9a14c2e8b6d0f2a4c6e8b19",
    AlertKind.DRILL_MISSED_RTO: "4d6f8b0a2c5e4f71b3d5e7f9a1c3e5b2",
    AlertKind.DRILL_FAILED: "8e2b4d6f0a1c4e3b9d7f5a3c1e9b7d52",
}

SEVERITY: Mapping[AlertKind, Level] = {
    AlertKind.POOL_SPACE_LOW: Level.WARNING,
    AlertKind.OBJECTIVE_INFEASIBLE: Level.CRITICAL,
    AlertKind.RPO_MISSED: Level.CRITICAL,
    AlertKind.BACKUPS_FAILING: Level.WARNING,
    AlertKind.TRACKER_LOST: Level.WARNING,
    AlertKind.DRILL_MISSED_RTO: Level.WARNING,
    AlertKind.DRILL_FAILED: Level.CRITICAL,
}


@dataclass(frozen=True)
class Thresholds:
    """When a condition counts as an alert.

    :param pool_free_percent: a pool with less free space than this share (0-100) of its
        size is low on space.
    :param failed_backups: this many failed backups of a volume in a row raise an alert.
    :param rpo_grace: an RPO is missed when the last success is older than the RPO times
        ``1 + rpo_grace`` (a backup due now needs time to run).
    """

    pool_free_percent: float = 10.0
    failed_backups: int = 3
    rpo_grace: float = 0.1

    def __post_init__(self) -> None:
        if not 0 <= self.pool_free_percent <= 100:
            raise InvalidInput(detail=f"pool free threshold {self.pool_free_percent}% not 0..100")
        if self.failed_backups < 1:
            raise InvalidInput(detail=f"failed backups threshold {self.failed_backups} < 1")
        if self.rpo_grace < 0:
            raise InvalidInput(detail=f"RPO grace {self.rpo_grace} is negative")


@dataclass(frozen=True)
class VolumeFacts:
    """What the engine knows of one volume now.

    :param rpo_seconds: the RPO as an age limit (an interval; a day for a daily hour);
        ``None`` without one or for an amount of changed data.
    :param rto_seconds: the RTO, ``None`` without one.
    :param last_success: unix time of the newest usable generation's point in time.
    :param estimate_upper: upper restore estimate (s) of the newest state, if known.
    :param infeasible: why the planner cannot meet the objectives ("" if it can).
    :param failures_in_row: failed backups since the last successful one.
    :param last_error: the newest failure's message.
    :param tracker_state: exact | initialising | lost | stopped | detached.
    """

    name: str
    pool: str = ""
    rpo_seconds: float | None = None
    rto_seconds: float | None = None
    last_success: float | None = None
    estimate_upper: float | None = None
    infeasible: str = ""
    failures_in_row: int = 0
    last_error: str = ""
    tracker_state: str = "exact"
    generations: int = 0
    bytes_stored: int = 0


@dataclass(frozen=True)
class PoolFacts:
    name: str
    capacity: int
    free: int
    state: str = "ok"
    #: The thin pool's metadata (0: the pool has none): when it fills, every write
    #: into the thin pool fails however much data space is free.
    metadata_capacity: int = 0
    metadata_free: int = 0


@dataclass(frozen=True)
class Condition:
    """An alert that holds now: of ``kind``, about ``subject`` (a volume or pool name)."""

    kind: AlertKind
    subject: str
    message: str
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.kind.value}:{self.subject}"

    @property
    def severity(self) -> Level:
        return SEVERITY[self.kind]


@dataclass(frozen=True)
class Health:
    """The assessment: the worst level, the conditions, and one status row per subject."""

    level: Level
    conditions: tuple[Condition, ...]
    volumes: tuple[Mapping[str, Any], ...]
    pools: tuple[Mapping[str, Any], ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "level": self.level.label,
            "code": int(self.level),
            "volumes": [dict(v) for v in self.volumes],
            "pools": [dict(p) for p in self.pools],
            "alerts": [
                {
                    "kind": c.kind.value,
                    "subject": c.subject,
                    "severity": c.severity.label,
                    "message": c.message,
                }
                for c in self.conditions
            ],
        }


def next_time_change(vols: list[VolumeFacts], t: Thresholds, now: float) -> float | None:
    """The earliest time after ``now`` at which time alone changes the assessment (a
    volume's RPO becomes missed), or ``None``: until something happens, nothing will.

    :param vols: the volumes' facts.
    :param t: the thresholds (the RPO grace).
    :param now: the assessment's time.
    """
    times = []
    for v in vols:
        if v.rpo_seconds is None or v.last_success is None or v.tracker_state == "detached":
            continue
        at = v.last_success + v.rpo_seconds * (1 + t.rpo_grace)
        if at > now:
            times.append(at)
    return min(times, default=None)


def _volume_conditions(v: VolumeFacts, t: Thresholds, now: float) -> list[Condition]:
    found = []
    if v.rpo_seconds is not None and v.tracker_state != "detached":
        age = None if v.last_success is None else max(0.0, now - v.last_success)
        if age is not None and age > v.rpo_seconds * (1 + t.rpo_grace):
            found.append(
                Condition(
                    AlertKind.RPO_MISSED,
                    v.name,
                    f"volume {v.name}: last successful backup {format_duration(age)} ago, "
                    f"RPO {format_duration(v.rpo_seconds)}",
                    {"rpo_age_seconds": round(age, 3), "rpo_seconds": v.rpo_seconds},
                )
            )
    if v.infeasible or (
        v.rto_seconds is not None
        and v.estimate_upper is not None
        and v.estimate_upper > v.rto_seconds
    ):
        reason = v.infeasible or (
            f"restore estimate up to {format_duration(v.estimate_upper or 0)} "
            f"> RTO {format_duration(v.rto_seconds or 0)}"
        )
        found.append(
            Condition(
                AlertKind.OBJECTIVE_INFEASIBLE,
                v.name,
                f"volume {v.name}: {reason}",
                {"rto_seconds": v.rto_seconds, "estimate_upper_seconds": v.estimate_upper},
            )
        )
    if v.failures_in_row >= t.failed_backups:
        found.append(
            Condition(
                AlertKind.BACKUPS_FAILING,
                v.name,
                f"volume {v.name}: {v.failures_in_row} backups failed in a row"
                + (f"; last: {v.last_error}" if v.last_error else ""),
                {"failures": v.failures_in_row, "last_error": v.last_error},
            )
        )
    if v.tracker_state == "lost":
        found.append(
            Condition(
                AlertKind.TRACKER_LOST,
                v.name,
                f"volume {v.name}: change tracking lost; the next backup is a full",
                {},
            )
        )
    return found


def _pool_condition(p: PoolFacts, t: Thresholds) -> Condition | None:
    """Low space, low thin pool metadata, or both: one alert naming which."""
    low: list[str] = []
    details: dict[str, Any] = {"threshold_percent": t.pool_free_percent}
    if p.capacity > 0:
        percent = 100.0 * p.free / p.capacity
        details |= {
            "free_bytes": p.free,
            "size_bytes": p.capacity,
            "free_percent": round(percent, 2),
        }
        if percent < t.pool_free_percent:
            low.append(
                f"{format_size(p.free)} free of {format_size(p.capacity)} "
                f"({percent:.1f}% < {t.pool_free_percent:g}%)"
            )
    if p.metadata_capacity > 0:
        mpercent = 100.0 * p.metadata_free / p.metadata_capacity
        details |= {
            "metadata_free_bytes": p.metadata_free,
            "metadata_size_bytes": p.metadata_capacity,
            "metadata_free_percent": round(mpercent, 2),
        }
        if mpercent < t.pool_free_percent:
            low.append(
                f"thin pool metadata {format_size(p.metadata_free)} free of "
                f"{format_size(p.metadata_capacity)} ({mpercent:.1f}% < {t.pool_free_percent:g}%)"
            )
    if not low:
        return None
    details["low"] = ["metadata" if x.startswith("thin pool metadata") else "space" for x in low]
    return Condition(AlertKind.POOL_SPACE_LOW, p.name, f"pool {p.name}: " + "; ".join(low), details)


def volume_row(v: VolumeFacts, now: float, conditions: Sequence[Condition]) -> dict[str, Any]:
    """One volume's status as ``status`` shows it (numbers; the CLI formats them)."""
    level = max((c.severity for c in conditions), default=Level.OK)
    return {
        "name": v.name,
        "pool": v.pool,
        "level": level.label,
        "last_success": v.last_success or 0,
        "rpo_age_seconds": -1 if v.last_success is None else max(0.0, now - v.last_success),
        "rpo_seconds": -1 if v.rpo_seconds is None else v.rpo_seconds,
        "estimate_upper_seconds": -1 if v.estimate_upper is None else v.estimate_upper,
        "rto_seconds": -1 if v.rto_seconds is None else v.rto_seconds,
        "failures_in_row": v.failures_in_row,
        "tracker_state": v.tracker_state,
        "generations": v.generations,
        "bytes_stored": v.bytes_stored,
        "problems": [c.message for c in conditions],
    }


def assess(
    volumes: Iterable[VolumeFacts],
    pools: Iterable[PoolFacts],
    thresholds: Thresholds,
    now: float,
) -> Health:
    """The health of everything now (see the module docstring)."""
    conditions: list[Condition] = []
    vol_rows = []
    for v in sorted(volumes, key=lambda x: x.name):
        mine = _volume_conditions(v, thresholds, now)
        conditions.extend(mine)
        vol_rows.append(volume_row(v, now, mine))
    pool_rows = []
    for p in sorted(pools, key=lambda x: x.name):
        low = _pool_condition(p, thresholds)
        if low is not None:
            conditions.append(low)
        pool_rows.append(
            {
                "name": p.name,
                "size_bytes": p.capacity,
                "free_bytes": p.free,
                "metadata_size_bytes": p.metadata_capacity,
                "metadata_free_bytes": p.metadata_free,
                "state": p.state,
                "level": (Level.WARNING if low or p.state != "ok" else Level.OK).label,
            }
        )
    level = max((c.severity for c in conditions), default=Level.OK)
    if any(p.state != "ok" for p in pools):
        level = max(level, Level.WARNING)
    return Health(level, tuple(conditions), tuple(vol_rows), tuple(pool_rows))


def transitions(
    active: Iterable[str], conditions: Iterable[Condition]
) -> tuple[list[Condition], list[str]]:
    """Which alerts start and which end.

    :param active: keys (:attr:`Condition.key`) of the alerts raised and not yet resolved.
    :param conditions: what holds now.
    :returns: the conditions to raise (new keys) and the keys to resolve (gone), sorted.
    """
    before = set(active)
    now = {c.key: c for c in conditions}
    raised = [now[k] for k in sorted(now.keys() - before)]
    resolved = sorted(before - now.keys())
    return raised, resolved


def retry_delay(failures: int, base: float, cap: float) -> float:
    """Seconds to wait before the scheduler tries a failing volume again: ``base``
    doubled for each failure in a row after the first, at most ``cap`` (0 with none)."""
    if failures <= 0:
        return 0.0
    # 2**n overflows float for large n; the cap is reached long before 64 doublings.
    return float(min(cap, base * 2 ** min(failures - 1, 64)))
