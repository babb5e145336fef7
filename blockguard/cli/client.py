"""A small synchronous D-Bus client of blockguardd for the CLI (dbus-fast underneath).

dbus-fast is the largest part of a call's start-up, so only its message layer is used
(:mod:`blockguard.cli.bus`: a blocking connection, no event loop) and it is imported when
the first call connects, not with this module: ``--help``, ``--version`` and usage errors
never pay for it (issue 16).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from blockguard.cli.bus import Connection, message_layer
from blockguard.core.vocab import scalar_signature

if TYPE_CHECKING:
    from dbus_fast.signature import Variant

BUS_NAME = "org.blockguard1"
ROOT_PATH = "/org/blockguard1"
MANAGER = "org.blockguard1.Manager"
VOLUME = "org.blockguard1.Volume"
POOL = "org.blockguard1.Pool"
JOB = "org.blockguard1.Job"


def _variant_type() -> type[Variant]:
    message_layer()
    from dbus_fast.signature import Variant

    return Variant


def plain(value: Any) -> Any:
    """Variants and nested containers as plain, JSON-friendly Python values."""
    return _plain(value, _variant_type())


def _plain(value: Any, variant_type: type[Variant]) -> Any:
    if isinstance(value, variant_type):
        return _plain(value.value, variant_type)
    if isinstance(value, dict):
        return {str(k): _plain(v, variant_type) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, variant_type) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


def variant(value: Any) -> Variant:
    """A CLI value as a Variant for ``a{sv}`` arguments (anything not a scalar as text)."""
    variant_type = _variant_type()
    signature = scalar_signature(value)
    return variant_type(signature, value) if signature else variant_type("s", str(value))


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
        bus = self._connected()
        from dbus_fast.constants import MessageType
        from dbus_fast.message import Message

        reply = bus.call(
            Message(
                destination=destination,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=list(body),
            )
        )
        if reply.message_type == MessageType.ERROR:
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
