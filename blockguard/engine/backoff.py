"""Back-off for a backup target that is down (issue 11, "Faults").

A transfer that cannot reach its target (:class:`~blockguard.errors.TargetUnreachable`,
or the link ended: :class:`~blockguard.errors.WireError`) is not tried again at every
scheduler look: each failure in a row doubles the wait (1, 2, 4 ... minutes), capped
at the volume's remote RPO interval and at an hour. A success resets it. A transfer
asked by hand (``blockguardctl transfer V``) is not held: the administrator says
the target is back. The state is this daemon's (kept in memory): after a restart the
first look tries at once, which is what a restarted daemon should do anyway.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from blockguard.core.health import retry_delay

#: The first wait after a failure, and the longest.
FIRST_WAIT = 60.0
MAX_WAIT = 3600.0


@dataclass(frozen=True)
class TargetRetry:
    """A target's failures in a row and when the scheduler may try it again."""

    failures: int
    last_failure: float
    retry_at: float
    reason: str


def retry_wait(failures: int, cap: float = MAX_WAIT) -> float:
    """The wait after ``failures`` failures in a row: doubling from :data:`FIRST_WAIT`
    (the rule of the scheduler's back-off for failing volumes), at most ``cap`` and
    :data:`MAX_WAIT` (and at least a second)."""
    return retry_delay(max(failures, 1), FIRST_WAIT, max(1.0, min(cap, MAX_WAIT)))


class TargetBackoff:
    """The back-off of every target of this daemon (thread-safe: jobs end in their
    worker threads, the scheduler reads it in its own)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._retries: dict[str, TargetRetry] = {}

    def failed(self, target: str, now: float, reason: str, cap: float = MAX_WAIT) -> TargetRetry:
        """A transfer to ``target`` could not reach it at ``now``."""
        with self._lock:
            before = self._retries.get(target)
            failures = 1 if before is None else before.failures + 1
            retry = TargetRetry(failures, now, now + retry_wait(failures, cap), reason)
            self._retries[target] = retry
            return retry

    def succeeded(self, target: str) -> None:
        """A conversation with ``target`` worked: no more waiting."""
        with self._lock:
            self._retries.pop(target, None)

    def wait(self, target: str, now: float) -> float:
        """Seconds until the scheduler may try ``target`` again (0: now)."""
        with self._lock:
            retry = self._retries.get(target)
        return 0.0 if retry is None else max(0.0, retry.retry_at - now)

    def retry_of(self, target: str) -> TargetRetry | None:
        with self._lock:
            return self._retries.get(target)

    def describe(self, target: str) -> dict[str, Any]:
        """What ``target show`` tells of it (nothing when it is not held)."""
        retry = self.retry_of(target)
        if retry is None:
            return {}
        return {
            "failures": retry.failures,
            "last_failure": retry.last_failure,
            "retry_at": retry.retry_at,
            "retry_reason": retry.reason,
        }
