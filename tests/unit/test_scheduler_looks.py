"""When the scheduler looks at a volume (refreshes it: device work), with a fake registry.

No objectives: never. An interval RPO: at its due time, not before. An amount of changed
data: on a delay between the floor and the ceiling that follows the change rate. A
decision renewed by an event is planned without a look.
"""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from blockguard.core.scheduler import ScheduleDecision, Trigger, poll_delay
from blockguard.engine import service as svc
from blockguard.engine.scheduling import Scheduler

T0 = 1_800_000_000.0


class FakeVolumes:
    """The part of VolumeRegistry the scheduler uses; ``decide`` makes each refresh's
    decision from the time and the volume's changed bytes."""

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock
        self.vols: dict[str, Any] = {}
        self.last_due: dict[str, ScheduleDecision | None] = {}
        self.drill_due: dict[str, Any] = {}
        self.refreshed: list[str] = []
        self.changed: dict[str, int] = {}
        self.rpo: dict[str, Any] = {}
        self.catalog = SimpleNamespace(list_volumes=lambda: list(self.vols.values()))

    def add(self, name: str, rpo: Any) -> None:
        self.vols[name] = SimpleNamespace(name=name, group=None, tracker_backend="scan")
        self.rpo[name] = rpo
        self.changed[name] = 0
        self.decide(name)

    def decide(self, name: str) -> None:
        rpo, now = self.rpo[name], self.clock[0]
        if rpo is None:
            self.last_due[name] = None
        elif isinstance(rpo, float):  # an interval from T0
            at = datetime.fromtimestamp(T0 + rpo, UTC)
            due = now >= T0 + rpo
            self.last_due[name] = ScheduleDecision(due, at, Trigger.INTERVAL, "interval")
        else:  # an amount
            changed = self.changed[name]
            self.last_due[name] = ScheduleDecision(
                changed >= rpo,
                None,
                Trigger.CHANGED_DATA,
                "amount",
                changed_bytes=changed,
                limit_bytes=rpo,
            )

    def refresh(self, name: str) -> None:
        self.refreshed.append(name)
        self.decide(name)


def make(clock: list[float]) -> tuple[FakeVolumes, Scheduler, list[str]]:
    volumes = FakeVolumes(clock)
    started: list[str] = []
    sched = Scheduler(
        volumes,  # type: ignore[arg-type]
        started.append,
        lambda: set(),
        interval=30,
        max_interval=300,
        clock=lambda: clock[0],
    )
    return volumes, sched, started


def run_until(sched: Scheduler, clock: list[float], end: float) -> None:
    """Wake up as the loop would (at each planned look, at most MAX_SLEEP apart)."""
    while True:
        sched.tick()
        nxt = min(sched.next_wake(), clock[0] + 300)
        if nxt > end:
            return
        clock[0] = max(clock[0], nxt)


def test_no_objectives_never_looked_at_and_interval_at_its_due_time() -> None:
    clock = [T0 + 10]
    volumes, sched, started = make(clock)
    volumes.add("quiet", None)
    volumes.add("hourly", 6 * 3600.0)
    sched.tick()
    assert sched.look_at["quiet"] == math.inf
    assert sched.look_at["hourly"] == T0 + 6 * 3600
    assert sched.next_wake() == T0 + 6 * 3600
    run_until(sched, clock, T0 + 6 * 3600 - 1)
    assert volumes.refreshed == [] and started == []
    clock[0] = T0 + 6 * 3600
    sched.tick()
    assert volumes.refreshed == ["hourly"] and started == ["hourly"]


def test_amount_polls_between_floor_and_ceiling_by_change_rate() -> None:
    clock = [T0]
    volumes, sched, started = make(clock)
    volumes.add("amount", 1024 * 2**20)
    run_until(sched, clock, T0 + 3000)
    # Nothing changes: a look every ceiling (300 s), ten in 3000 s.
    assert len(volumes.refreshed) == 10 and started == []

    # Now 1 MiB/s: the first look after the writer starts comes within the ceiling; then
    # at half the time the rest needs at the measured rate, never under the floor.
    volumes.refreshed.clear()
    start = clock[0]
    times = [start]
    while not started:
        clock[0] = sched.next_wake()
        times.append(clock[0])
        volumes.changed["amount"] = int((clock[0] - start) * 2**20)
        sched.tick()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(30 <= g <= 300 for g in gaps), gaps
    assert gaps[0] == 300 and gaps[-1] == 30, gaps
    # Caught at most one floor of writing late, with a look every 30 s it took 35 looks.
    assert 1024 * 2**20 <= volumes.changed["amount"] < (1024 + 30) * 2**20
    assert len(volumes.refreshed) <= 10, gaps


def test_renewed_decision_is_planned_without_a_look() -> None:
    clock = [T0 + 10]
    volumes, sched, _ = make(clock)
    volumes.add("quiet", None)
    sched.tick()
    # Objectives set elsewhere (SetObjectives refreshes): the event brings the decision.
    volumes.rpo["quiet"] = 3600.0
    volumes.decide("quiet")
    sched.on_event(svc.VolumeChanged("quiet"))
    sched.tick()
    assert volumes.refreshed == []
    assert sched.look_at["quiet"] == T0 + 3600


def test_poll_delay_bounds() -> None:
    assert poll_delay(0, 100, 0.0, 30, 300) == 300
    assert poll_delay(0, 100, 1000.0, 30, 300) == 30  # due within the floor
    assert poll_delay(0, 1000, 1.0, 30, 300) == 300  # 1000 s away: the ceiling
    assert poll_delay(0, 200, 1.0, 30, 300) == 100  # half of 200 s
    assert poll_delay(0, 200, 1.0, 30, 10) == 30  # a ceiling under the floor is the floor
