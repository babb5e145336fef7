"""Work nobody waits for runs at a lower CPU priority.

On Linux the nice value belongs to a thread, and the commands a thread starts inherit
it. The aftermath of a backup (the ``lvremove`` of the snapshot a new reference
replaced) ran at the priority of the backups and restores that clients wait for: under
TCG with one CPU, a backup started right after another one shared the CPU with the
first one's aftermath (an lvremove of 1.7 s there) and took about twice its own time.
Lowered, it runs in the gaps. Only for work that holds no lock a client call takes
(the health assessment does: a Health call would wait behind it).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

#: The nice value of background work (the scheduler's weight 110 against 1024 at 0).
NICE = 10


def lower_this_thread(nice: int = NICE) -> None:
    """Lower the calling thread's priority to ``nice`` (never raise it); for a thread
    that does only background work from now on. Failures are logged, not raised."""
    try:
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as exc:
        log.debug("cannot lower the priority of thread %s: %s", threading.current_thread(), exc)


def run_in_background(work: Callable[[], object], name: str) -> threading.Thread:
    """Run ``work`` in a new daemon thread of lowered priority; its errors are logged."""

    def body() -> None:
        lower_this_thread()
        try:
            work()
        except Exception:
            log.exception("background work %s failed", name)

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    return thread
