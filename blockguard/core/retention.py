"""Which generations to delete when only N are kept (pure: no devices, no pool).

A generation can only be restored with the generations it depends on: an incremental
needs its parent chain down to the full, a differential its base full. Keeping N therefore
keeps the N newest generations *and everything they depend on*; everything else goes.

A delta that changed nothing (``empty``) holds the same content as the generation it
builds on, so it does not count towards N: backups of an idle volume must not push real
generations out. An empty one is kept only while it is the newest generation or a kept
one depends on it (the daemon builds an incremental after an empty incremental on the
empty one's parent, so empty ones do not pile up in a chain).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from blockguard.core.vocab import GenerationKind


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


def select_for_deletion(generations: Iterable[GenerationRef], keep: int) -> list[str]:
    """Ids to delete so that the ``keep`` newest generations stay restorable.

    :param generations: all generations of one volume, in any order.
    :param keep: how many of the newest to keep (at least 1).
    :returns: ids to delete, oldest first; never one a kept generation depends on.
    """
    if keep < 1:
        raise ValueError("keep must be at least 1")
    ordered: Sequence[GenerationRef] = sorted(
        generations, key=lambda g: (g.created, g.generation_id)
    )
    by_id = {g.generation_id: g for g in ordered}
    counted = [g for g in ordered if not g.empty]
    roots = counted[-keep:] + list(ordered[-1:])
    kept: set[str] = set()
    for gen in roots:
        kept.add(gen.generation_id)
        kept |= dependencies(gen, by_id)
    return [g.generation_id for g in ordered if g.generation_id not in kept]
