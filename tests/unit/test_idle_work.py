"""Work for a pool's idle time (:mod:`blockguard.engine.idle`): it runs only after the
pool was without any job for the quiet period, a job that comes pushes it back, one that
comes while it runs stops it before its next step, and a pool's work never waits for
another pool. The loop's step is driven with an explicit clock: nothing here is timed.
"""

from __future__ import annotations

import time

from blockguard.engine.idle import IdleWork

QUIET = 1000.0  # far above any test's own run time: only the clock given says "later"


def later(seconds: float = QUIET + 1) -> float:
    return time.monotonic() + seconds


def test_runs_only_after_the_quiet_period_and_once() -> None:
    ran: list[str] = []
    idle = IdleWork(lambda pool: False, QUIET)
    try:
        idle.after_job("p1", "ahead vol", lambda go_on: ran.append("vol"))
        assert not idle.run_due(time.monotonic()) and ran == []
        assert idle.pending("p1") == ["ahead vol"]
        assert idle.run_due(later()) and ran == ["vol"]
        assert not idle.run_due(later()) and idle.pending("p1") == []
    finally:
        idle.stop()


def test_a_busy_pool_or_a_new_job_pushes_it_back() -> None:
    ran: list[str] = []
    busy = {"p1"}
    idle = IdleWork(lambda pool: pool in busy, QUIET)
    try:
        idle.after_job("p1", "ahead a", lambda go_on: ran.append("a"))
        idle.after_job("p2", "ahead b", lambda go_on: ran.append("b"))
        # p1 has a job queued or running: only p2's work runs.
        assert idle.run_due(later()) and ran == ["b"]
        assert not idle.run_due(later())
        busy.clear()
        # Seen busy: the quiet period starts again from that look.
        assert not idle.run_due(later(QUIET / 2))
        idle.touch("p1")  # a job came (and went)
        assert not idle.run_due(later(QUIET / 2))
        assert idle.run_due(later(2 * QUIET + 1)) and ran == ["b", "a"]
    finally:
        idle.stop()


def test_a_job_that_comes_while_it_runs_stops_it_and_a_newer_request_replaces_it() -> None:
    answers: list[bool] = []
    idle = IdleWork(lambda pool: False, QUIET)

    def task(go_on) -> None:
        answers.append(go_on())
        idle.touch("p1")  # BackupNow of a volume of the pool
        answers.append(go_on())

    try:
        idle.after_job("p1", "ahead vol", lambda go_on: answers.append(False))
        idle.after_job("p1", "ahead vol", task)  # the same key: the newer one only
        assert idle.run_due(later()) and answers == [True, False]
        assert not idle.run_due(later(3 * QUIET))
    finally:
        idle.stop()


def test_a_failing_task_is_logged_and_a_stopped_one_runs_nothing(caplog) -> None:
    idle = IdleWork(lambda pool: False, QUIET)

    def fails(go_on) -> None:
        raise RuntimeError("lvcreate exploded")

    idle.after_job("p1", "ahead vol", fails)
    assert idle.run_due(later())
    assert "idle work ahead vol of pool p1 failed" in caplog.text
    idle.after_job("p1", "ahead vol", fails)
    idle.stop()
    assert not idle.run_due(later()) and idle.pending("p1") == []
    idle.after_job("p1", "ahead vol", fails)
    assert idle.pending("p1") == []
