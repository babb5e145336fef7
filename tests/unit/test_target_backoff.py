"""Back-off for a target that is down: each failure in a row doubles the wait (capped at
the remote RPO and an hour), a success resets it, the scheduler starts no transfer of
the target's volumes before the wait ends, and says why in its plan."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from blockguard.core.scheduler import ScheduleDecision
from blockguard.engine.backoff import FIRST_WAIT, MAX_WAIT, TargetBackoff, retry_wait
from blockguard.engine.scheduling import Scheduler
from blockguard.errors import TargetUnreachable


def test_waits_double_and_stop_at_the_cap() -> None:
    assert [retry_wait(n) for n in range(1, 8)] == [60, 120, 240, 480, 960, 1920, 3600]
    assert retry_wait(1000) == MAX_WAIT
    assert retry_wait(5, cap=300) == 300 and retry_wait(1, cap=300) == FIRST_WAIT
    assert retry_wait(3, cap=10 * MAX_WAIT) == 240


def test_a_failure_holds_the_target_and_a_success_releases_it() -> None:
    backoff = TargetBackoff()
    assert backoff.wait("offsite", 1000.0) == 0 and backoff.describe("offsite") == {}
    backoff.failed("offsite", 1000.0, "connection refused")
    second = backoff.failed("offsite", 1100.0, "connection refused")
    assert (second.failures, second.retry_at) == (2, 1100.0 + 2 * FIRST_WAIT)
    assert backoff.wait("offsite", 1150.0) == pytest.approx(2 * FIRST_WAIT - 50)
    assert backoff.wait("other", 1150.0) == 0
    shown = backoff.describe("offsite")
    assert shown["failures"] == 2 and shown["retry_at"] == second.retry_at
    assert shown["retry_reason"] == "connection refused"
    backoff.succeeded("offsite")
    assert backoff.wait("offsite", 1150.0) == 0 and backoff.describe("offsite") == {}


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def scheduler_with(backoff: TargetBackoff, clock: Clock) -> tuple[Scheduler, list[str]]:
    """A scheduler whose one volume has a transfer due to target offsite; its starts
    fail as an unreachable target does, recorded as the transfer job would."""
    due = ScheduleDecision(
        due=True, next_due=datetime.fromtimestamp(clock.now, UTC), trigger="interval",
        reason="remote RPO 1h missed",
    )  # fmt: skip
    volumes = SimpleNamespace(
        transfer_due={"vol": due}, last_due={"vol": None}, drill_due={}, catalog=None
    )
    attempts: list[str] = []

    def start_transfer(name: str) -> None:
        attempts.append(name)
        error = TargetUnreachable(target="offsite", address="192.0.2.2:22", reason="refused")
        backoff.failed("offsite", clock.now, str(error))

    scheduler = Scheduler(
        volumes,  # type: ignore[arg-type]  # the part of VolumeRegistry a look reads
        start_backup=lambda name: None,
        busy=set,
        interval=30.0,
        clock=clock,
        start_transfer=start_transfer,
        transfer_held=lambda name: backoff.wait("offsite", clock.now),
    )
    return scheduler, attempts


def test_the_scheduler_starts_no_transfer_before_the_back_off_ends() -> None:
    backoff, clock = TargetBackoff(), Clock()
    scheduler, attempts = scheduler_with(backoff, clock)
    assert scheduler.transfers(set(), {"vol"}) == ["vol"]
    assert attempts == ["vol"]
    failed_at = clock.now
    # Looks within the first wait start nothing; the plan says why and when.
    for offset in (1.0, 30.0, FIRST_WAIT - 1):
        clock.now = failed_at + offset
        at, why = scheduler.plan("vol", clock.now)
        assert "held back" in why and at == pytest.approx(backoff.retry_of("offsite").retry_at)
        assert scheduler.transfers(set(), {"vol"}) == []
    assert attempts == ["vol"]
    # The wait over: tried again, failed again: the next wait is twice as long.
    clock.now = backoff.retry_of("offsite").retry_at
    assert scheduler.transfers(set(), {"vol"}) == ["vol"]
    retry = backoff.retry_of("offsite")
    assert attempts == ["vol", "vol"] and retry.failures == 2
    assert retry.retry_at - clock.now == 2 * FIRST_WAIT
    clock.now += FIRST_WAIT
    assert scheduler.transfers(set(), {"vol"}) == []
    # A success (a transfer by hand, say) resets it: the next look starts at once.
    backoff.succeeded("offsite")
    assert scheduler.plan("vol", clock.now) == (clock.now, "transfer due")
    assert scheduler.transfers(set(), {"vol"}) == ["vol"]
