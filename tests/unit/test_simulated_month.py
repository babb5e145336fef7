"""A month of simulated time: scheduler + planner + restore model together, no devices.

Each scenario runs a volume with a synthetic write pattern over a month on an accelerated
clock (a loop over 5-minute ticks), backs up whenever the scheduler says so, with the method
and placement the planner picks, and checks the objectives after every backup.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest

from blockguard.core.objectives import (
    ChangedDataRPO,
    DailyRPO,
    IntervalRPO,
    RecoveryObjectives,
)
from blockguard.core.perftable import DeviceSpeed
from blockguard.core.planner import plan_backup
from blockguard.core.restore_model import (
    Chain,
    estimate_chain,
)
from blockguard.core.scheduler import schedule
from blockguard.core.units import GiB, MiB
from blockguard.core.vocab import GenerationKind, RestoreMode
from blockguard.core.what_if import ChangeSets, bytes_restorable_within

MB = 10**6
EXTENT = 64 * MiB  # the simulated tracker's granularity
VOLUME_EXTENTS = 4096  # 256 GiB
VOLUME_BYTES = VOLUME_EXTENTS * EXTENT
START = datetime(2026, 3, 1, tzinfo=UTC)  # Europe/Berlin springs forward on March 29
END = START + timedelta(days=31)
TICK = timedelta(minutes=5)

SPEEDS = {
    "hdd": DeviceSpeed(160 * MB, 150 * MB, 12 * MB, 12 * MB),
    "ssd": DeviceSpeed(520 * MB, 480 * MB, 180 * MB, 150 * MB),
    "nvme": DeviceSpeed(2500 * MB, 2000 * MB, 900 * MB, 800 * MB),
}
REPLACEMENT = DeviceSpeed(600 * MB, 600 * MB, 300 * MB, 300 * MB)

Pattern = Callable[[random.Random, datetime], list[int]]


def steady(rng: random.Random, now: datetime) -> list[int]:
    """Three random extents every tick, anywhere on the volume (~54 GiB a day)."""
    return [rng.randrange(VOLUME_EXTENTS) for _ in range(3)]


def bursty(rng: random.Random, now: datetime) -> list[int]:
    """Mostly idle; now and then a burst of 6-25 GiB (a batch job, an upgrade)."""
    if rng.random() < 0.01:
        start = rng.randrange(VOLUME_EXTENTS)
        return [(start + i) % VOLUME_EXTENTS for i in range(rng.randrange(100, 400))]
    return [rng.randrange(VOLUME_EXTENTS)] if rng.random() < 0.2 else []


def hot_spot(rng: random.Random, now: datetime) -> list[int]:
    """A database rewriting the same 2.5 GiB over and over, plus a little elsewhere."""
    writes = [1000 + rng.randrange(40) for _ in range(4)]
    if rng.random() < 0.05:
        writes.append(rng.randrange(VOLUME_EXTENTS))
    return writes


def growing(rng: random.Random, now: datetime) -> list[int]:
    """Appends: the write rate grows through the month, new data at the end of the used area."""
    day = (now - START).total_seconds() / 86400
    count = 1 + int(day / 3)
    return [rng.randrange(VOLUME_EXTENTS) for _ in range(count)]


@dataclass
class Scenario:
    name: str
    pattern: Pattern
    objectives: RecoveryObjectives
    candidates: list[str]
    expect: set[GenerationKind] = field(default_factory=set)
    always_infeasible: bool = False


def _rto(minutes: float) -> timedelta:
    return timedelta(minutes=minutes)


HOURLY = IntervalRPO(timedelta(hours=1))
SCENARIOS = [
    Scenario(
        "steady, RPO 1h, RTO 5m swap-in, ssd first",
        steady,
        RecoveryObjectives(rpo=HOURLY, rto=_rto(5), restore_mode=RestoreMode.SWAP_IN),
        ["ssd", "hdd"],
        set(GenerationKind),
    ),
    Scenario(
        "hot-spot, RPO 1h, RTO 5m swap-in, hdd only",
        hot_spot,
        RecoveryObjectives(rpo=HOURLY, rto=_rto(5), restore_mode=RestoreMode.SWAP_IN),
        ["hdd"],
        {GenerationKind.INCREMENTAL, GenerationKind.DIFFERENTIAL},
    ),
    Scenario(
        "bursty, RPO 4 GiB changed, RTO 10m swap-in, hdd first",
        bursty,
        RecoveryObjectives(
            rpo=ChangedDataRPO(4 * GiB), rto=_rto(10), restore_mode=RestoreMode.SWAP_IN
        ),
        ["hdd", "ssd"],
        {GenerationKind.INCREMENTAL, GenerationKind.FULL},
    ),
    Scenario(
        "growing, RPO daily 02:30 Berlin, RTO 30m copy, hdd first",
        growing,
        RecoveryObjectives(
            rpo=DailyRPO(2, 30, "Europe/Berlin"), rto=_rto(30), restore_mode=RestoreMode.COPY
        ),
        ["hdd", "ssd", "nvme"],
        {GenerationKind.INCREMENTAL, GenerationKind.FULL},
    ),
    Scenario(
        "steady, no RPO, RTO 5m swap-in, hdd first",
        steady,
        RecoveryObjectives(rto=_rto(5), restore_mode=RestoreMode.SWAP_IN),
        ["hdd", "ssd"],
        {GenerationKind.INCREMENTAL, GenerationKind.FULL},
    ),
    Scenario(
        "hot-spot, RPO 30m, RTO 20m copy, ssd first",
        hot_spot,
        RecoveryObjectives(
            rpo=IntervalRPO(timedelta(minutes=30)), rto=_rto(20), restore_mode=RestoreMode.COPY
        ),
        ["ssd", "hdd", "nvme"],
        {GenerationKind.INCREMENTAL, GenerationKind.DIFFERENTIAL},
    ),
    Scenario(
        "steady, RPO 1h, RTO 15m copy, hdd only (infeasible)",
        steady,
        RecoveryObjectives(rpo=HOURLY, rto=_rto(15), restore_mode=RestoreMode.COPY),
        ["hdd"],
        {GenerationKind.FULL},
        always_infeasible=True,
    ),
]


def _best_possible(chain: Chain | None, changes: ChangeSets, scenario: Scenario) -> float:
    """Brute force over every method and device: the lowest restore time any could give."""
    methods = list(GenerationKind) if chain is not None else [GenerationKind.FULL]
    return min(
        estimate_chain(
            (chain or Chain(changes.volume_bytes, device)).with_backup(
                method, changes.nbytes(method), device, changes.scattered
            ),
            SPEEDS,
            scenario.objectives.restore_mode,
            REPLACEMENT,
        ).seconds
        for method in methods
        for device in scenario.candidates
    )


def run_month(scenario: Scenario, seed: int = 5) -> Counter[GenerationKind]:
    rng = random.Random(seed)
    objectives = scenario.objectives
    rto = objectives.rto
    since_backup: set[int] = set()
    since_full: set[int] = set()
    chain: Chain | None = None
    last: datetime | None = None
    counts: Counter[GenerationKind] = Counter()
    backups: list[datetime] = []
    now = START
    while now < END:
        written = scenario.pattern(rng, now)
        since_backup.update(written)
        since_full.update(written)
        tick_bytes = len(set(written)) * EXTENT
        changed = len(since_backup) * EXTENT
        restorable = None
        if objectives.rpo is None:
            restorable = bytes_restorable_within(
                rto, chain, scenario.candidates[0], SPEEDS, objectives.restore_mode, REPLACEMENT
            )
        when = schedule(
            objectives,
            last_backup=last,
            changed_bytes=changed,
            restorable_bytes=restorable,
            now=now,
            zone=ZoneInfo("Europe/Berlin"),
        )
        if when.due:
            # The RPO is never exceeded by more than what one tick wrote.
            if isinstance(objectives.rpo, ChangedDataRPO):
                assert changed <= objectives.rpo.nbytes + tick_bytes, (scenario.name, now)
            if objectives.rpo is None and last is not None:
                assert changed <= restorable + tick_bytes, (scenario.name, now)
            changes = ChangeSets(
                incremental_bytes=changed,
                differential_bytes=len(since_full) * EXTENT,
                volume_bytes=VOLUME_BYTES,
            )
            decision = plan_backup(
                chain,
                changes,
                SPEEDS,
                objectives,
                candidates=scenario.candidates,
                copy_target=REPLACEMENT,
            )
            best = _best_possible(chain, changes, scenario)
            chain = (chain or Chain(VOLUME_BYTES, decision.device_id)).with_backup(
                decision.method, decision.nbytes, decision.device_id, changes.scattered
            )
            after = estimate_chain(chain, SPEEDS, objectives.restore_mode, REPLACEMENT)
            assert after.seconds == pytest.approx(decision.estimate.seconds)
            if rto is not None:
                if best <= rto.total_seconds():
                    # Some method could meet the RTO, so the chosen one does.
                    assert after.seconds <= rto.total_seconds(), (scenario.name, now, decision)
                    assert decision.feasible
                else:
                    assert not decision.feasible, (scenario.name, now, decision)
                    assert decision.needed_rate is not None
            if scenario.always_infeasible:
                assert not decision.feasible
            counts[decision.method] += 1
            since_backup.clear()
            if decision.method is GenerationKind.FULL:
                since_full.clear()
            last = now
            backups.append(now)
        now += TICK

    gaps = [b - a for a, b in pairwise(backups)]
    if isinstance(objectives.rpo, IntervalRPO):
        assert max(gaps) <= objectives.rpo.interval + TICK, scenario.name
        assert len(backups) >= (END - START) / (objectives.rpo.interval + TICK)
    if isinstance(objectives.rpo, DailyRPO):
        assert max(gaps) <= timedelta(hours=25) + TICK, scenario.name
        # After the first (immediate) full: one run per local day, the DST day included.
        daily = backups[1:]
        local_days = {b.astimezone(ZoneInfo("Europe/Berlin")).date() for b in daily}
        assert len(local_days) == len(daily) == 31, scenario.name
    return counts


def test_simulated_month() -> None:
    totals: Counter[GenerationKind] = Counter()
    for scenario in SCENARIOS:
        counts = run_month(scenario)
        totals.update(counts)
        print(f"{scenario.name}: " + ", ".join(f"{m.value} {counts[m]}" for m in GenerationKind))
        for method in scenario.expect:
            assert counts[method] > 0, (scenario.name, method, counts)
    print("all scenarios: " + ", ".join(f"{m.value} {totals[m]}" for m in GenerationKind))
    assert all(totals[m] > 0 for m in GenerationKind), totals
