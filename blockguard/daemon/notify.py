"""sd_notify(3) without libsystemd: one datagram per message to ``$NOTIFY_SOCKET``.

The protocol is newline-separated ``KEY=VALUE`` assignments in a single datagram sent to
the unix socket named by ``NOTIFY_SOCKET``; a name starting with ``@`` is in the abstract
namespace (the ``@`` stands for a leading NUL byte). Without ``NOTIFY_SOCKET`` (not run by
systemd) every call is a no-op. Watchdog pings go out at half of ``WATCHDOG_USEC``, and only
if ``WATCHDOG_PID`` is unset or names this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def _socket_address(name: str) -> str | bytes:
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


class Notifier:
    """Sends state changes to the service manager.

    :param environ: where to read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``
        (defaults to ``os.environ``).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET") or None
        self._watchdog_usec = 0
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self._watchdog_usec = int(usec)
        self._sock: socket.socket | None = None
        self._last_status: str | None = None
        self._watchdog_task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half the timeout), or None without a watchdog."""
        return self._watchdog_usec / 2e6 if self._watchdog_usec else None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines, e.g. ``notify(READY=1, STATUS="3 volumes")``.

        :returns: True if a message was sent. Errors are logged, never raised: the service
            must not die because the manager went away.
        """
        if self.address is None:
            return False
        # A newline inside a value would start a new assignment.
        payload = "\n".join(
            f"{key}={str(value).replace(chr(10), ' ')}" for key, value in fields.items()
        )
        try:
            if self._sock is None:
                # Non-blocking: this runs on the event loop, and a manager that does not
                # read (its queue holds only ~10 datagrams) must not stop the daemon.
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._sock.sendto(payload.encode(), _socket_address(self.address))
        except BlockingIOError:
            log.debug("sd_notify to %s dropped (its queue is full): %s", self.address, payload)
            return False
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify(READY=1, STATUS=status, MAINPID=os.getpid())

    def status(self, status: str) -> bool:
        """Send ``STATUS=`` if it differs from the last one sent."""
        if status == self._last_status:
            return False
        self._last_status = status
        return self.notify(STATUS=status)

    def stopping(self, status: str = "shutting down") -> bool:
        return self.notify(STOPPING=1, STATUS=status)

    def start_watchdog(self) -> None:
        """Ping ``WATCHDOG=1`` from the running loop: if the loop hangs, the pings stop."""
        interval = self.watchdog_interval
        if interval is None or self.address is None or self._watchdog_task is not None:
            return
        self._watchdog_task = asyncio.get_running_loop().create_task(self._watchdog(interval))

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notify(WATCHDOG=1)
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._watchdog_task is not None:
            self._watchdog_task.cancel()
            self._watchdog_task = None
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
