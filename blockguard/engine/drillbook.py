"""The last restore drill of each volume, and what its measurement says of the next plan.

See :mod:`blockguard.engine.voldrills` for the drills themselves. The last drill (when, ok
or failed and why, measured vs predicted, the RTO it was held against) is kept here and
read back from the job history after a restart. Its measurement bounds the plan: a chain
that contains the drilled one restores no quicker than the drill measured
(:func:`floors_of`), so after a drill that missed the RTO the next backup is one whose
restore fits.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from blockguard.core.catalog import Catalog
from blockguard.core.objectives import DEFAULT_RESTORE_MODE
from blockguard.core.vocab import GenerationKind
from blockguard.engine.jobs import JobKind
from blockguard.storage.copyengine import Progress
from blockguard.storage.manifest import Manifest

OK = "ok"
FAILED = "failed"
#: A drill stopped so that a restore of its volume need not wait (no alert).
STOPPED = "stopped"


@dataclass(frozen=True)
class DrillRecord:
    """The last restore drill of a volume, as ``status`` and ``LastDrill`` show it.

    :param at: unix time the drill started.
    :param result: ``ok``, ``failed`` or ``stopped`` (for a restore of the volume).
    :param problem: why it failed ("" when ok).
    :param measured_seconds: how long the restore took (-1: it did not finish).
    :param predicted_seconds: the planner's estimate of that restore (-1: unknown).
    :param upper_seconds: the planner's upper estimate (-1: unknown).
    :param rto_seconds: the RTO it was held against (0: the volume has none).
    :param mode: the restore mode drilled.
    :param generation: the public id of the generation restored ("" if unknown).
    :param chain: the pool ids of the generations the restore read, full first.
    """

    at: float
    result: str
    problem: str = ""
    measured_seconds: float = -1.0
    predicted_seconds: float = -1.0
    upper_seconds: float = -1.0
    rto_seconds: float = 0.0
    mode: str = ""
    generation: str = ""
    chain: tuple[str, ...] = ()
    verified_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        """For the job's result, ``status`` and the volume's ``LastDrill`` (D-Bus a{sv})."""
        found = asdict(self)
        found["chain"] = list(self.chain)
        return found

    @classmethod
    def from_result(cls, data: Any, at: float = 0.0) -> DrillRecord | None:
        """The record a drill job's result holds (None if it holds none)."""
        if not isinstance(data, dict):
            return None
        try:
            return cls(
                at=float(data.get("at", at)),
                result=str(data["result"]),
                problem=str(data.get("problem", "")),
                measured_seconds=float(data.get("measured_seconds", -1.0)),
                predicted_seconds=float(data.get("predicted_seconds", -1.0)),
                upper_seconds=float(data.get("upper_seconds", -1.0)),
                rto_seconds=float(data.get("rto_seconds", 0.0)),
                mode=str(data.get("mode", "")),
                generation=str(data.get("generation", "")),
                chain=tuple(str(g) for g in data.get("chain", ())),
                verified_bytes=int(data.get("verified_bytes", 0)),
            )
        except (KeyError, TypeError, ValueError):
            return None

    @classmethod
    def from_job(cls, job: Any) -> DrillRecord | None:
        """The record of a finished drill job of the catalog (None if it is not one)."""
        at = job.started or job.created
        if job.state == "done":
            return cls.from_result(job.result, at)
        if job.state in ("failed", "cancelled"):
            return cls(at=float(at), result=FAILED, problem=job.error or job.state)
        return None


class DrillBook:
    """The last drill of each volume: kept here, read back from the job history once."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._lock = threading.Lock()
        self._last: dict[str, DrillRecord | None] = {}
        #: drills queued or running: volume -> the stop request and the copy's progress
        self._stops: dict[str, tuple[threading.Event, Progress | None]] = {}

    def submitted(self, volume: str) -> threading.Event:
        """A drill of ``volume`` was submitted; returns the event that asks it to stop."""
        event = threading.Event()
        with self._lock:
            self._stops[volume] = (event, None)
        return event

    def running(self, volume: str, progress: Progress) -> None:
        """The drill's copy runs with ``progress`` (stopped at once if asked already)."""
        with self._lock:
            event, _ = self._stops.get(volume, (threading.Event(), None))
            self._stops[volume] = (event, progress)
        if event.is_set():
            progress.cancel()

    def ended(self, volume: str) -> None:
        with self._lock:
            self._stops.pop(volume, None)

    def busy(self) -> list[str]:
        """The volumes whose drill is queued or running."""
        with self._lock:
            return sorted(self._stops)

    def stop(self, volume: str) -> bool:
        """Ask the drill of ``volume`` to stop at its next extent; False if none runs."""
        with self._lock:
            found = self._stops.get(volume)
        if found is None:
            return False
        event, progress = found
        event.set()
        if progress is not None:
            progress.cancel()
        return True

    def last(self, volume: str) -> DrillRecord | None:
        with self._lock:
            if volume in self._last:
                return self._last[volume]
        record = None
        for job in self.catalog.list_jobs(
            volume=volume, kind=JobKind.DRILL.value, states=("done", "failed"), limit=5
        ):
            record = DrillRecord.from_job(job)
            if record is not None:
                break
        with self._lock:
            return self._last.setdefault(volume, record)

    def set(self, volume: str, record: DrillRecord) -> None:
        with self._lock:
            self._last[volume] = record

    def forget(self, volume: str) -> None:
        with self._lock:
            self._last.pop(volume, None)


def _ancestry(newest: Manifest, manifests: Sequence[Manifest]) -> list[str]:
    """The pool ids ``newest`` restores from, by parent links (newest first)."""
    by_id = {m.generation_id: m for m in manifests}
    found, at = [], newest
    while at is not None and at.generation_id not in found:
        found.append(at.generation_id)
        at = by_id.get(at.parent_id) if at.parent_id else None  # type: ignore[assignment]
    return found


def floors_of(
    record: DrillRecord | None, mode: str, manifests: Sequence[Manifest]
) -> dict[GenerationKind, float]:
    """What a drill's measurement says of the next backup: its chain restores no quicker
    than the drilled chain did when it contains that chain.

    An incremental extends the newest generation's chain; a differential makes
    [newest full, differential]; a full starts afresh.

    :param record: the volume's last drill.
    :param mode: the restore mode the objectives ask for (a drill of another mode says
        nothing about it).
    :param manifests: the volume's usable generations, oldest first.
    """
    if record is None or record.measured_seconds < 0 or record.mode != mode or not record.chain:
        return {}
    if not manifests:
        return {}
    floors: dict[GenerationKind, float] = {}
    drilled = set(record.chain)
    if drilled <= set(_ancestry(manifests[-1], manifests)):
        floors[GenerationKind.INCREMENTAL] = record.measured_seconds
    fulls = [m for m in manifests if m.is_full]
    if fulls and record.chain == (fulls[-1].generation_id,):
        floors[GenerationKind.DIFFERENTIAL] = record.measured_seconds
    return floors


def drill_mode(objectives: Any) -> str:
    """The mode a volume is drilled in: what its RTO refers to (copy by default)."""
    return (objectives.restore_mode if objectives is not None else DEFAULT_RESTORE_MODE).value
