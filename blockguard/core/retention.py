"""Which generations to keep and which to delete (pure: no devices, no pool).

A :class:`RetentionPolicy` says what to keep, like restic's and borg's ``--keep-*``:

- ``last`` N: the N newest generations (the objectives' ``generations``);
- ``hourly``/``daily``/``weekly``/``monthly`` N: the newest generation of each of the N
  newest hours/days/ISO weeks/months that have one (a bucket without a backup does not
  count, as in restic: ``daily 7`` keeps 7 days of backups, however far apart).

A generation is kept when any rule keeps it. Buckets are in the policy's time zone (an
IANA name, the same ``tz`` as a daily RPO), or the system's local time when it has none,
as borg does: "the backup of Tuesday" is Tuesday where the admin is. An hour that a
daylight-saving change repeats is two buckets (the UTC offset is part of the hour).

A generation can only be restored with the generations it depends on: an incremental
needs its parent chain down to the full, a differential its base full. Whatever a rule
keeps, everything it depends on is kept too (``needed by``); the newest generation is
always kept, so retention never leaves a volume with none.

A delta that changed nothing (``empty``) holds the same content as the generation it
builds on, so no rule counts it: backups of an idle volume must not push real
generations out (the real generation before them stands for those hours and days). An
empty one is kept only while it is the newest generation or a kept one depends on it
(the daemon builds an incremental after an empty incremental on the empty one's parent,
so empty ones do not pile up in a chain).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from blockguard.core.vocab import MAX_GENERATIONS, GenerationKind
from blockguard.errors import InvalidObjectives

#: The time tiers, finest first, with how a generation's time names its bucket.
TIERS: dict[str, Callable[[datetime], str]] = {
    "hourly": lambda t: t.strftime("%Y-%m-%d %H:00%z"),
    "daily": lambda t: t.strftime("%Y-%m-%d"),
    "weekly": lambda t: t.strftime("%G-W%V"),
    "monthly": lambda t: t.strftime("%Y-%m"),
}


@dataclass(frozen=True)
class RetentionPolicy:
    """What retention keeps of one volume; see the module docstring.

    :param last: the newest N generations (at least 1).
    :param hourly: the newest of each of the N newest hours with a generation (0: none).
    :param daily: likewise for days.
    :param weekly: likewise for ISO weeks (Monday to Sunday).
    :param monthly: likewise for calendar months.
    :param tz: IANA zone the buckets are in; ``None``: the system's local time.
    :raises InvalidObjectives: a count that is not an integer in range, an unknown zone.
    """

    last: int
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    tz: str | None = None

    def __post_init__(self) -> None:
        for name, low in (("last", 1), *((tier, 0) for tier in TIERS)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidObjectives(detail=f"keep {name} {value!r} is not a whole number")
            if not low <= value <= MAX_GENERATIONS:
                raise InvalidObjectives(
                    detail=f"keep {name} {value!r} is not a whole number "
                    f"in {low}..{MAX_GENERATIONS}"
                )
        if self.tz is not None:
            try:
                ZoneInfo(self.tz)
            except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
                raise InvalidObjectives(
                    detail=f"retention time zone {self.tz!r} is not a known IANA zone name"
                ) from exc

    def count(self, tier: str) -> int:
        """How many buckets of ``tier`` (a key of :data:`TIERS`) are kept."""
        return int(getattr(self, tier))

    def zone(self) -> tzinfo | None:
        """The zone of the buckets (``None``: local time)."""
        return None if self.tz is None else ZoneInfo(self.tz)

    def describe(self) -> str:
        """One line, e.g. ``"last 7, daily 7, weekly 4 (local time)"``."""
        parts = [f"last {self.last}"]
        parts += [f"{tier} {self.count(tier)}" for tier in TIERS if self.count(tier)]
        if len(parts) == 1:
            return parts[0]
        return f"{', '.join(parts)} ({self.tz or 'local time'})"

    def to_dict(self) -> dict[str, Any]:
        """The policy with snake_case keys (``keep_last`` ...) and ``tz`` (``""``: local)."""
        out: dict[str, Any] = {"keep_last": self.last}
        out.update({f"keep_{tier}": self.count(tier) for tier in TIERS})
        out["tz"] = self.tz or ""
        return out


@dataclass(frozen=True)
class GenerationRef:
    """The part of a generation that retention looks at."""

    generation_id: str
    kind: GenerationKind
    base_id: str | None
    parent_id: str | None
    created: float
    empty: bool = False  # a delta that stored no chunk

    def __post_init__(self) -> None:
        # Callers may give the stored spelling ("full"); it is checked and kept as the enum.
        object.__setattr__(self, "kind", GenerationKind(self.kind))


def dependencies(gen: GenerationRef, by_id: dict[str, GenerationRef]) -> set[str]:
    """Every generation ``gen`` needs to be restored (transitively), ``gen`` excluded.

    Ids that are not in ``by_id`` are still returned: a missing dependency is never
    something this function may hide.
    """
    needed: set[str] = set()
    todo = [d for d in (gen.parent_id, gen.base_id) if d]
    while todo:
        dep = todo.pop()
        if dep in needed:
            continue
        needed.add(dep)
        ref = by_id.get(dep)
        if ref is not None:
            todo.extend(d for d in (ref.parent_id, ref.base_id) if d)
    return needed


@dataclass(frozen=True)
class RetentionChoice:
    """What a policy keeps and why, and what it deletes.

    :param kept: kept id -> the reasons (``"last 1"``, ``"daily 2026-12-01"``,
        ``"newest"``, ``"needed by ID"``), oldest first.
    :param deleted: ids to delete, oldest first.
    """

    kept: dict[str, tuple[str, ...]] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)


def bucket(created: float, tier: str, zone: tzinfo | None) -> str:
    """The name of the ``tier`` bucket a generation made at ``created`` falls in.

    :param zone: the time zone; ``None``: the system's local time.
    """
    # astimezone(None) is the system's local zone, with its offset at that moment.
    return TIERS[tier](datetime.fromtimestamp(created, UTC).astimezone(zone))


def choose(generations: Iterable[GenerationRef], policy: RetentionPolicy) -> RetentionChoice:
    """Decide what ``policy`` keeps of one volume's generations, with the reasons.

    :param generations: all generations of one volume, in any order.
    :returns: the kept ones with why, the rest to delete; never a kept generation
        without what it depends on, never nothing kept (unless given nothing).
    """
    ordered: Sequence[GenerationRef] = sorted(
        generations, key=lambda g: (g.created, g.generation_id)
    )
    by_id = {g.generation_id: g for g in ordered}
    newest_first = [g for g in reversed(ordered) if not g.empty]
    reasons: dict[str, list[str]] = {}
    for i, gen in enumerate(newest_first[: policy.last]):
        reasons.setdefault(gen.generation_id, []).append(f"last {i + 1}")
    zone = policy.zone()
    for tier in TIERS:
        left, previous = policy.count(tier), None
        for gen in newest_first:
            if not left:
                break
            name = bucket(gen.created, tier, zone)
            if name != previous:
                reasons.setdefault(gen.generation_id, []).append(f"{tier} {name}")
                previous, left = name, left - 1
    if ordered and ordered[-1].generation_id not in reasons:
        reasons[ordered[-1].generation_id] = ["newest"]
    # Newest roots first, so a shared base names the newest generation that needs it.
    for gid in sorted(reasons, key=lambda g: (by_id[g].created, g), reverse=True):
        for dep in sorted(dependencies(by_id[gid], by_id)):
            if dep in by_id and not any(r.startswith("needed by") for r in reasons.get(dep, [])):
                reasons.setdefault(dep, []).append(f"needed by {gid}")
    kept = {
        g.generation_id: tuple(reasons[g.generation_id])
        for g in ordered
        if g.generation_id in reasons
    }
    return RetentionChoice(kept, [g.generation_id for g in ordered if g.generation_id not in kept])


def select_for_deletion(
    generations: Iterable[GenerationRef], keep: int | RetentionPolicy
) -> list[str]:
    """Ids to delete so that what ``keep`` asks for stays restorable.

    :param generations: all generations of one volume, in any order.
    :param keep: a policy, or how many of the newest to keep (at least 1).
    :returns: ids to delete, oldest first; never one a kept generation depends on.
    """
    if not isinstance(keep, RetentionPolicy):
        if keep < 1:
            raise ValueError("keep must be at least 1")
        keep = RetentionPolicy(last=keep)
    return choose(generations, keep).deleted
