"""The reference bookkeeping the device-mapper trackers (era, thin) share.

Both keep their references and the reasons they stopped vouching for some in a small state
saved as JSON (``_s.references``: reference -> what holds it, an era number or a snapshot
LV; ``_s.unknown``: reference -> reason). What a reference *holds* is each backend's own;
naming, listing, marking unknown and refusing an unknown one is the same.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import Any, Protocol

from blockguard.errors import TrackingLost
from blockguard.storage.tracking.base import ChangeSet, ChangeTracker, TrackerState


class KeptState(Protocol):
    """The part of a saved tracker state this bookkeeping reads and writes."""

    references: dict[str, Any]
    unknown: dict[str, str]


class KeptReferencesTracker(ChangeTracker):
    """A :class:`ChangeTracker` whose references live in a saved state ``_s``."""

    _s: KeptState

    @abc.abstractmethod
    def _save(self) -> None:
        """Write ``_s`` to disk (atomically)."""

    def _kept_state(self) -> TrackerState:
        """``exact``, or ``unknown`` with every unvouched reference and its reason."""
        if self._s.unknown:
            reasons = "; ".join(f"{r}: {why}" for r, why in sorted(self._s.unknown.items()))
            return TrackerState.unknown(reasons)
        return TrackerState.exact()

    def references(self) -> list[str]:
        return sorted(self._s.references)

    def mark_unknown(self, reason: str) -> None:
        for ref in self._s.references:
            self._s.unknown.setdefault(ref, reason)
        self._save()

    def changed(self, name: str) -> ChangeSet:
        return self.changed_many([name])[name]

    def _forget(self, name: str) -> None:
        """Drop reference ``name`` and its unknown mark, and save."""
        del self._s.references[name]
        self._s.unknown.pop(name, None)
        self._save()

    def _refuse_unknown(self, names: Iterable[str]) -> None:
        """:raises TrackingLost: one of ``names`` is not vouched for (names its reason)."""
        for n in names:
            if n in self._s.unknown:
                raise TrackingLost(volume=self.volume, reason=self._s.unknown[n])
