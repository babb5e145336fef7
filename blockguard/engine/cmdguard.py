"""The daemon's command runner: nothing else runs while a volume's table is being swapped.

Why: dm-era answers a status query (``dmsetup status``, and every ``lvs`` of the LV's VG
asks for it) through its worker thread, which is stopped while the device is suspended;
the query holds the device's table reference while it waits, and the resume that would
restart the worker waits for that reference to go: a deadlock (seen with Debian 12's
6.1 kernel: ``lvm`` blocked in ``era_status``/``perform_rpc``, ``dmsetup resume`` in
``dm_swap_table``). So a thread that suspends and reloads a device (a point-in-time copy
being put in place or taken away, era tracking being attached or detached) holds
:meth:`GuardedRunner.exclusive`; commands of other threads wait until it is done (a
fraction of a second), commands of that thread run. Programs outside the daemon are not
covered: an administrator's ``lvs`` at the wrong moment can still hang; see the notes.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from blockguard.storage.runner import CommandResult, Runner


class GuardedRunner(Runner):
    """A :class:`Runner` with an exclusive section (see the module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._cond = threading.Condition()
        self._owner: int | None = None
        self._depth = 0
        self._running = 0  # commands of threads other than the owner

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Only this thread runs commands in the body (re-entrant); waits for the
        commands other threads are running to finish first."""
        me = threading.get_ident()
        with self._cond:
            if self._owner != me:
                self._cond.wait_for(lambda: self._owner is None and self._running == 0)
                self._owner = me
            self._depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if self._depth == 0:
                    self._owner = None
                    self._cond.notify_all()

    @contextlib.contextmanager
    def section(self) -> Iterator[None]:
        """Talk to the kernel as a command would (a command, or a dm ioctl): held back
        while another thread is exclusive, and counted so that it waits for this."""
        me = threading.get_ident()
        with self._cond:
            mine = self._owner == me
            if not mine:
                self._cond.wait_for(lambda: self._owner is None)
                self._running += 1
        try:
            yield
        finally:
            if not mine:
                with self._cond:
                    self._running -= 1
                    self._cond.notify_all()

    def run(self, argv: Sequence[str], **kwargs: Any) -> CommandResult:
        with self.section():
            return super().run(argv, **kwargs)


def exclusive(cmd: Runner) -> contextlib.AbstractContextManager[None]:
    """``cmd.exclusive()`` for a guarded runner, nothing for another one."""
    if isinstance(cmd, GuardedRunner):
        return cmd.exclusive()
    return contextlib.nullcontext()
