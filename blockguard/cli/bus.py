"""A blocking D-Bus connection for the CLI: a socket, EXTERNAL authentication, ``Hello``
and one method call at a time (issue 16).

A call of ``blockguardctl`` makes one connection and a few method calls, one at a time.
dbus-fast's asyncio bus did that in a private event loop, and even its message layer
alone (enums, its error and signature modules) cost more of a ``status`` call than
everything else of the client, so the messages are written and read by
:mod:`blockguard.cli.wire` and the socket is ``_socket``'s (``socket`` imports enum and
selectors to wrap it: 2 ms of a call). Nothing here imports dbus-fast, except to find the
session bus from DISPLAY when no address says where it is (rare, and dbus-fast knows how).

Addresses are parsed here too, as dbus-fast's ``parse_address`` does (its module imports
urllib.parse, and ipaddress with it, for one unquote); ``tests/unit/test_cli_bus.py``
holds both to the same answers.
"""

from __future__ import annotations

import _socket
import os

from blockguard.cli import wire

TYPE_CHECKING = False  # typing is not imported to run (issue 16)
if TYPE_CHECKING:
    from typing import Any

    from blockguard.errors import EnvironmentProblem

DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
#: The bytes a D-Bus address value may hold unescaped, and ``%`` (dbus-fast's set).
_VALUE_CHARS = frozenset("-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_/.%")
_HEX = frozenset("0123456789abcdefABCDEF")
#: What a bus address looks like, for the message that refuses one.
EXAMPLE_ADDRESS = "unix:path=/run/dbus/system_bus_socket"
#: The longest path ``connect`` takes for AF_UNIX (sun_path holds 108 bytes with its NUL).
_UNIX_PATH_MAX = 107
#: How long a bus may take to accept, authenticate and answer ``Hello``: something that is
#: not a bus (a socket of another program) may never answer, and the call must not hang.
CONNECT_TIMEOUT = 60.0


class InvalidAddressError(ValueError):
    """An address that is not a D-Bus address (dbus-fast's words in the message)."""


class AuthError(ValueError):
    """The bus refused EXTERNAL authentication, or answered something else."""


def _unquote(value: str) -> str:
    """``urllib.parse.unquote``: ``%XX`` is a byte, the bytes are UTF-8 (invalid ones
    replaced), a ``%`` without two hex digits after it stays as it is."""
    if "%" not in value:
        return value
    head, *rest = value.split("%")
    out = bytearray(head.encode())
    for part in rest:
        if len(part) >= 2 and part[0] in _HEX and part[1] in _HEX:
            out.append(int(part[:2], 16))
            out += part[2:].encode()
        else:
            out += b"%" + part.encode()
    return out.decode("utf-8", "replace")


def parse_address(address: str) -> list[tuple[str, dict[str, str]]]:
    """``dbus_fast._private.address.parse_address``: ``transport:key=value,...;...``.

    :raises InvalidAddressError: as dbus-fast's, with its messages.
    """
    addresses: list[tuple[str, dict[str, str]]] = []
    for entry in address.split(";"):
        if not entry:
            continue
        if ":" not in entry:
            raise InvalidAddressError("address did not contain a transport")
        transport, opt_string = entry.split(":", 1)
        options: dict[str, str] = {}
        for pair in opt_string.split(","):
            if not pair:
                continue
            if "=" not in pair:
                raise InvalidAddressError("address option did not contain a value")
            key, value = pair.split("=", 1)
            if not _VALUE_CHARS.issuperset(value):
                raise InvalidAddressError("address contains invalid characters")
            options[key] = _unquote(value)
            if key != "abstract" and "\x00" in options[key]:
                raise InvalidAddressError("address contains a NUL byte after decoding")
        addresses.append((transport, options))
    if not addresses:
        raise InvalidAddressError(f'address string contained no addresses: "{address}"')
    return addresses


def bus_address(address: str) -> str:
    """The address of ``"system"`` or ``"session"`` as dbus-fast finds it, or ``address``."""
    if address == "system":
        return (
            os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or "unix:path=/var/run/dbus/system_bus_socket"
        )
    if address == "session" and os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
        return os.environ["DBUS_SESSION_BUS_ADDRESS"]
    if address == "session":  # from DISPLAY and ~/.dbus: rare, and dbus-fast knows how
        from dbus_fast._private.address import get_bus_address
        from dbus_fast.constants import BusType

        return get_bus_address(BusType.SESSION)
    return address


def address_source(address: str) -> str:
    """Where the address that ``address`` stands for came from, in a message's words."""
    if address == "system":
        if os.environ.get("DBUS_SYSTEM_BUS_ADDRESS"):
            return "from DBUS_SYSTEM_BUS_ADDRESS"
        return "the system bus's default"
    if address == "session":
        if os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
            return "from DBUS_SESSION_BUS_ADDRESS"
        return "the session bus"
    if os.environ.get("BLOCKGUARD_BUS") == address:
        return "from --bus or BLOCKGUARD_BUS"
    return "from --bus"


def _open(address: str) -> _socket.socket:
    """A socket connected to the first address of ``address`` that answers (the
    transports dbus-fast's buses know: unix path or abstract, tcp)."""
    last: OSError | None = None
    for transport, options in parse_address(address):
        if transport == "unix" and ("path" in options or "abstract" in options):
            family = _socket.AF_UNIX
            target: object = options.get("path") or b"\0" + options["abstract"].encode()
            if len(os.fsencode(target)) > _UNIX_PATH_MAX:  # type: ignore[arg-type]
                raise InvalidAddressError(f"its socket path is longer than {_UNIX_PATH_MAX} bytes")
        elif transport == "tcp":
            family = _socket.AF_INET
            port = options.get("port", "0")
            if not port.isdigit() or int(port) > 65535:
                raise InvalidAddressError(f"got tcp transport with invalid port: {port!r}")
            target = (options.get("host", ""), int(port))
        else:
            raise InvalidAddressError(f"got unknown address transport: {transport}")
        sock = _socket.socket(family, _socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(target)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        return sock
    raise last if last is not None else InvalidAddressError(f"no address in {address!r}")


class Connection:
    """One authenticated connection to a bus (``Hello`` done); :meth:`call` sends a method
    call and waits for its reply, dropping anything else that arrives meanwhile (the
    ``NameAcquired`` signal the bus sends after ``Hello``).

    :param address: ``"system"`` (honours DBUS_SYSTEM_BUS_ADDRESS), ``"session"`` or an
        address such as ``unix:path=/run/dbus/system_bus_socket``.
    :raises InvalidInput: the address is not a D-Bus address (the user's input).
    :raises EnvironmentProblem: nothing at the address answers as a D-Bus bus.
    """

    def __init__(self, address: str) -> None:
        source = address_source(address)
        resolved = address
        try:
            resolved = bus_address(address)
            self._sock = _open(resolved)
        except InvalidAddressError as exc:
            from blockguard.errors import InvalidInput

            raise InvalidInput(
                detail=f"bus address {resolved!r} ({source}) is not a D-Bus address: {exc}; "
                f"a valid one looks like {EXAMPLE_ADDRESS}"
            ) from exc
        except OSError as exc:
            raise _unreachable(resolved, source, exc.strerror or str(exc)) from exc
        self._serial = 0
        self._received = b""
        try:
            self._authenticate()
            hello = self.call(DBUS_NAME, DBUS_PATH, DBUS_NAME, "Hello")
            if hello.message_type != wire.METHOD_RETURN or hello.signature != "s":
                raise AuthError(f"Hello was answered with {hello.error_name or hello.signature}")
            self.unique_name = hello.body[0]
        # Something that is not a bus: refused or garbled authentication (AuthError,
        # WireError and UnicodeDecodeError are ValueErrors), a message that does not
        # parse, silence.
        except (OSError, ValueError, IndexError) as exc:
            self.close()
            why = "it did not answer in time" if isinstance(exc, TimeoutError) else str(exc)
            raise _unreachable(
                resolved, source, f"it does not answer as a D-Bus bus ({why})"
            ) from exc
        except BaseException:
            self.close()
            raise
        self._sock.settimeout(None)  # a method call of the daemon may take as long as it takes

    def _authenticate(self) -> None:
        """SASL EXTERNAL as the process's uid, as dbus-fast's ``AuthExternal`` does
        (without unix fd passing, which no call of the CLI needs)."""
        uid = str(os.getuid()).encode().hex()
        self._sock.sendall(b"\0AUTH EXTERNAL " + uid.encode() + b"\r\n")
        # The bus answers our line with one line and sends nothing else before BEGIN, so
        # the answer is everything received until CRLF.
        received = b""
        while not received.endswith(b"\r\n"):
            chunk = self._sock.recv(4096)
            if not chunk:
                raise AuthError("the bus closed the connection during authentication")
            received += chunk
        answer = received.decode("ascii").rstrip("\r\n")
        if not answer.startswith("OK "):
            raise AuthError(f"authentication failed: {answer}")
        self._sock.sendall(b"BEGIN\r\n")

    def call(
        self,
        destination: str,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: list[Any] | tuple[Any, ...] = (),
    ) -> wire.Message:
        """Send a method call; its reply (a method return or an error)."""
        self._serial += 1
        serial = self._serial
        self._sock.sendall(
            wire.method_call(serial, destination, path, interface, member, signature, body)
        )
        while True:
            reply = self._receive()
            if reply.reply_serial == serial and reply.message_type in (
                wire.METHOD_RETURN,
                wire.ERROR,
            ):
                return reply

    def _receive(self) -> wire.Message:
        head = self._read(16)
        data = head + self._read(wire.message_length(head) - 16)
        return wire.parse_message(data)

    def _read(self, size: int) -> bytes:
        while len(self._received) < size:
            chunk = self._sock.recv(max(65536, size - len(self._received)))
            if not chunk:
                raise ConnectionResetError("the bus closed the connection")
            self._received += chunk
        data, self._received = self._received[:size], self._received[size:]
        return data

    def close(self) -> None:
        self._sock.close()


def _unreachable(address: str, source: str, reason: str) -> EnvironmentProblem:
    from blockguard.errors import EnvironmentProblem

    return EnvironmentProblem(
        detail=f"cannot reach the daemon at {address} ({source}): {reason}; is dbus running, "
        "and is the address right?"
    )
