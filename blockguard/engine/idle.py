"""Work for a pool's idle time: what the next backup would otherwise do in its own time
(an ``lvm`` pool's spare delta area, :meth:`PoolBackend.prepare_ahead`), done when no job
of the pool has run for a quiet period.

A backup that finishes asks for it (:meth:`IdleWork.after_job`); it runs only once the
pool has had no job running or queued (any volume of the pool, or the pool itself) for
:data:`QUIET` seconds since the last job of the pool ended or was asked for. A job that
comes in the meantime pushes it back; one that comes while it runs makes it stop before
its next LVM command (``go_on``). Nothing it does holds a lock a backup takes: a job
that comes during its one command at most waits for LVM's own VG lock, no longer than
making its own LV would take. Its errors are logged; it is never needed for correctness.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Seconds a pool must be without any job before its idle work runs.
QUIET = 5.0

IdleTask = Callable[[Callable[[], bool]], object]


class IdleWork:
    """See the module docstring.

    :param busy: whether a job of pool NAME is queued or running now.
    :param quiet: the quiet period, seconds.
    """

    def __init__(self, busy: Callable[[str], bool], quiet: float = QUIET) -> None:
        self._busy = busy
        self.quiet = quiet
        self._cond = threading.Condition()
        #: pool -> key -> the task (its argument: go_on)
        self._pending: dict[str, dict[str, IdleTask]] = {}
        #: pool -> monotonic time of its last job's start or end
        self._last: dict[str, float] = {}
        #: pool -> times a job of it came (go_on of a running task compares)
        self._arrivals: dict[str, int] = {}
        #: seconds until a pending task may be due (set by each look)
        self.wait_for = quiet
        self._thread: threading.Thread | None = None
        self._stopped = False

    def touch(self, pool: str) -> None:
        """A job of ``pool`` comes (or ends): the quiet period starts again, and a task
        running for it stops before its next step."""
        with self._cond:
            self._last[pool] = time.monotonic()
            self._arrivals[pool] = self._arrivals.get(pool, 0) + 1

    def after_job(self, pool: str, key: str, task: IdleTask) -> None:
        """Run ``task(go_on)`` once ``pool`` has been idle for the quiet period (a task of
        the same ``key`` not run yet is replaced)."""
        with self._cond:
            if self._stopped:
                return
            self._last[pool] = time.monotonic()
            self._pending.setdefault(pool, {})[key] = task
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="idle work", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def pending(self, pool: str) -> list[str]:
        with self._cond:
            return sorted(self._pending.get(pool, {}))

    def stop(self) -> None:
        """Run nothing more (a task running finishes its step)."""
        with self._cond:
            self._stopped = True
            self._pending.clear()
            self._cond.notify_all()

    def _take_due(self, now: float) -> tuple[str, str, IdleTask] | None:
        """The next task due at ``now``, taken off the list; else None, and
        :attr:`wait_for` says how long until one may be."""
        self.wait_for = self.quiet
        for pool, tasks in list(self._pending.items()):
            left = self._last.get(pool, 0.0) + self.quiet - now
            if left > 0:
                self.wait_for = min(self.wait_for, left)
                continue
            if self._busy(pool):
                # A job of the pool runs or waits: its end touches the pool again.
                self._last[pool] = now
                continue
            key, task = next(iter(tasks.items()))
            del tasks[key]
            if not tasks:
                del self._pending[pool]
            return pool, key, task
        return None

    def run_due(self, now: float) -> bool:
        """Run the next task due at ``now``, if any (the loop's step; tests call it
        with their own clock); whether one ran."""
        with self._cond:
            found = self._take_due(now)
            if found is None:
                return False
            pool, key, task = found
            arrivals = self._arrivals.get(pool, 0)

        def go_on() -> bool:
            with self._cond:
                return (
                    not self._stopped
                    and self._arrivals.get(pool, 0) == arrivals
                    and not self._busy(pool)
                )

        try:
            task(go_on)
        except Exception:
            log.exception("idle work %s of pool %s failed", key, pool)
        return True

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._stopped:
                    return
                if not self._pending:
                    self._cond.wait()
                    continue
            if self.run_due(time.monotonic()):
                continue
            with self._cond:
                if self._stopped:
                    return
                self._cond.wait(timeout=max(self.wait_for, 0.05))
