"""Which generations are unusable, given the ones found damaged (pure: no pool, no I/O).

A generation is restored with everything it depends on (its parent chain down to the
full, see :mod:`.retention`), so a damaged generation makes every generation that
depends on it unusable too, and so does a dependency that is not there at all. The pool
reports what it found damaged; this module decides what that means for the others.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from blockguard.core.retention import GenerationRef, dependencies
from blockguard.core.vocab import GenerationKind


class DamageCause(enum.StrEnum):
    """Why a generation is unusable, which decides the error raised when it is used."""

    METADATA = "metadata"  # manifest, checksum array or data file (CorruptMetadata)
    CHECKSUM = "checksum"  # a stored chunk does not match its checksum (ChecksumMismatch)


@dataclass(frozen=True)
class Damage:
    """Why one generation cannot be used.

    :param source: the damaged generation itself, or the dependency that is damaged.
    :param reason: what is wrong with ``source``, for a person.
    :param chunk: the damaged chunk, when a checksum found it.
    """

    source: str
    cause: DamageCause
    reason: str
    chunk: int | None = None

    def describe(self, generation_id: str) -> str:
        """The reason as said of ``generation_id`` (itself or a dependent)."""
        if self.source == generation_id:
            return self.reason
        return f"it depends on {self.source}, which is corrupt: {self.reason}"


def unusable(
    generations: Iterable[GenerationRef],
    damaged: Mapping[str, Damage],
    *,
    known: Iterable[str] = (),
) -> dict[str, Damage]:
    """Every generation that cannot be restored, with the damage that causes it.

    :param generations: the readable generations of one volume.
    :param damaged: generations found damaged (by id; they may be unreadable, so not in
        ``generations``).
    :param known: ids that exist although they are not in ``generations`` (e.g. an
        unreadable manifest whose damage is in ``damaged``); any other dependency that
        is not in ``generations`` is missing, which makes its dependents unusable.
    :returns: by id, each damaged generation and each dependent of one; a dependent is
        blamed on its nearest damaged (or missing) dependency.
    """
    refs = list(generations)
    by_id = {g.generation_id: g for g in refs}
    present = set(by_id) | set(damaged) | set(known)
    result: dict[str, Damage] = dict(damaged)
    for gen in refs:
        if gen.generation_id in result:
            continue
        needed = dependencies(gen, by_id)
        bad = [d for d in needed if d in damaged or d not in present]
        if not bad:
            continue
        # Ids sort by time: the newest bad dependency is the nearest one in the chain.
        nearest = max(bad)
        if nearest in damaged:
            result[gen.generation_id] = damaged[nearest]
        else:
            result[gen.generation_id] = Damage(
                nearest, DamageCause.METADATA, f"generation {nearest} is missing from the pool"
            )
    return result


def full_required_reason(
    generations: Iterable[GenerationRef],
    corrupt: Mapping[str, Damage],
    created: Mapping[str, float],
) -> str | None:
    """Why the next backup must be a full, or None.

    The next delta would build on the newest full and the generations since it; when
    one of them (or anything newer than the newest usable full) is corrupt, only a
    full made from the volume itself gives a restorable chain again.

    :param generations: the readable generations of one volume.
    :param corrupt: what :func:`unusable` returned.
    :param created: creation time of each id in ``corrupt`` that is not in
        ``generations`` (unreadable manifests); ids missing here count as newest.
    """
    refs = list(generations)
    fulls = [g for g in refs if g.kind is GenerationKind.FULL and g.generation_id not in corrupt]
    newest_full = max(fulls, key=lambda g: (g.created, g.generation_id), default=None)
    when = {g.generation_id: g.created for g in refs}
    recent = sorted(
        gid
        for gid in corrupt
        if newest_full is None
        or (when.get(gid, created.get(gid, float("inf"))), gid)
        > (newest_full.created, newest_full.generation_id)
    )
    if not recent:
        return None
    first = recent[0]
    damage = corrupt[first]
    return f"generation {first} is corrupt ({damage.describe(first)})"
