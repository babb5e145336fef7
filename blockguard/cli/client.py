"""A small synchronous D-Bus client of blockguardd for the CLI.

Start-up is most of a call's time (issue 16): the connection is a blocking socket and the
messages are written and read by :mod:`blockguard.cli.wire` (no event loop, no
dbus-fast), and this module imports nothing else that a call does not use.
"""

from __future__ import annotations

import time

from blockguard.cli.bus import Connection
from blockguard.cli.wire import ERROR, Variant

TYPE_CHECKING = False  # typing is not imported to run (issue 16)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

BUS_NAME = "org.blockguard1"
ROOT_PATH = "/org/blockguard1"
MANAGER = "org.blockguard1.Manager"
VOLUME = "org.blockguard1.Volume"
POOL = "org.blockguard1.Pool"
JOB = "org.blockguard1.Job"


def plain(value: Any) -> Any:
    """Variants and nested containers as plain, JSON-friendly Python values."""
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


def variant(value: Any) -> Variant:
    """A CLI value as a Variant for ``a{sv}`` arguments (anything not a scalar as text)."""
    from blockguard.core.vocab import scalar_signature

    signature = scalar_signature(value)
    return Variant(signature, value) if signature else Variant("s", str(value))


class RemoteError(Exception):
    """An error reply from the bus or the daemon: a D-Bus error name and its message."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


class Client:
    """Calls blockguardd; every call waits for its reply on one blocking connection.

    :param address: ``"system"`` (honours DBUS_SYSTEM_BUS_ADDRESS), ``"session"`` or an
        address such as ``unix:path=/run/dbus/system_bus_socket``.
    """

    def __init__(self, address: str = "system") -> None:
        self.address = address
        self._bus: Connection | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._bus is not None:
            self._bus.close()
            self._bus = None

    def _connected(self) -> Connection:
        if self._bus is None:
            self._bus = Connection(self.address)
        return self._bus

    def call(
        self,
        member: str,
        signature: str = "",
        *body: Any,
        path: str = ROOT_PATH,
        interface: str = MANAGER,
        destination: str = BUS_NAME,
    ) -> Any:
        """Call a method; returns the single return value, a list for several, None for none.

        :raises RemoteError: for an error reply.
        """
        reply = self._connected().call(destination, path, interface, member, signature, body)
        if reply.message_type == ERROR:
            text = reply.body[0] if reply.body else ""
            raise RemoteError(reply.error_name or "unknown", str(text))
        if not reply.body:
            return None
        return reply.body[0] if len(reply.body) == 1 else reply.body

    def properties(self, path: str, interface: str) -> dict[str, Any]:
        """All properties of one object, as plain values."""
        values = self.call(
            "GetAll", "s", interface, path=path, interface="org.freedesktop.DBus.Properties"
        )
        return plain(values)

    def objects(self, interface: str) -> dict[str, dict[str, Any]]:
        """Every object implementing ``interface``: path -> plain properties."""
        managed = self.call(
            "GetManagedObjects", path=ROOT_PATH, interface="org.freedesktop.DBus.ObjectManager"
        )
        return {
            path: plain(ifaces[interface])
            for path, ifaces in sorted(managed.items())
            if interface in ifaces
        }

    def wait_job(
        self,
        path: str,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        interval: float = 0.2,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Poll a job until it is done or failed; returns its final properties."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            props = self.properties(path, JOB)
            if on_progress is not None:
                on_progress(props)
            if props.get("State") in ("done", "failed"):
                return props
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {path} did not finish within {timeout} s")
            time.sleep(interval)


__all__ = ["Client", "RemoteError", "plain", "variant"]
