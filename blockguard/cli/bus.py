"""A blocking D-Bus connection for the CLI, on dbus-fast's message layer (issue 16).

A call of ``blockguardctl`` makes one connection and a few method calls, one at a time.
dbus-fast's asyncio bus did that in a private event loop, but importing the ``dbus_fast``
package costs more than the whole Python start-up: its ``__init__`` loads the asyncio
bus, the service and introspection layers, and asyncio with them (measured on the host:
``import dbus_fast`` +60 ms of CPU over ``python -c pass``, its message, auth, address and
unmarshaller modules alone +13 ms). So this module uses only those: dbus-fast
authenticates (:class:`~dbus_fast.auth.AuthExternal`), parses the address, marshals and
unmarshals every message; what is here is the blocking socket between them.

To import a submodule without running the package's ``__init__``, :func:`message_layer`
puts the package in ``sys.modules`` unexecuted, with a module ``__getattr__`` that runs
the real ``__init__`` (in the same module object) the first time anything else asks the
package for a name: ``from dbus_fast import Variant`` or ``import dbus_fast.aio`` later in
the same process get the whole package, as usual. When the package is imported already,
it is used as it is.

Addresses are parsed here too, as dbus-fast's ``parse_address`` does: its module imports
urllib.parse, and ipaddress with it, for one unquote (4 ms of a call's start-up in a
venv installed from a wheel).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

from blockguard.errors import EnvironmentProblem, InvalidInput

if TYPE_CHECKING:
    from dbus_fast.message import Message

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


def _defer_package_init() -> None:
    spec = importlib.util.find_spec("dbus_fast")
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError("No module named 'dbus_fast'", name="dbus_fast")
    package = importlib.util.module_from_spec(spec)
    loader = spec.loader

    def finish(name: str) -> Any:
        # Once: the real __init__ defines every public name (its submodules are reused).
        del package.__getattr__
        loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = finish  # type: ignore[method-assign]
    sys.modules["dbus_fast"] = package


def message_layer() -> ModuleType:
    """``dbus_fast.message`` (and the modules it needs), without the package's asyncio
    layers unless something in the process imported them already."""
    if "dbus_fast" not in sys.modules:
        _defer_package_init()
    import dbus_fast.message

    return dbus_fast.message


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
    message_layer()
    from dbus_fast.errors import InvalidAddressError

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
        message_layer()
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


def _open(address: str) -> socket.socket:
    """A socket connected to the first address of ``address`` that answers (the
    transports dbus-fast's buses know: unix path or abstract, tcp)."""
    from dbus_fast.errors import InvalidAddressError

    last: OSError | None = None
    for transport, options in parse_address(address):
        if transport == "unix" and ("path" in options or "abstract" in options):
            family = socket.AF_UNIX
            target: Any = options.get("path") or b"\0" + options["abstract"].encode()
            if len(os.fsencode(target)) > _UNIX_PATH_MAX:
                raise InvalidAddressError(f"its socket path is longer than {_UNIX_PATH_MAX} bytes")
        elif transport == "tcp":
            family = socket.AF_INET
            port = options.get("port", "0")
            if not port.isdigit() or int(port) > 65535:
                raise InvalidAddressError(f"got tcp transport with invalid port: {port!r}")
            target = (options.get("host", ""), int(port))
        else:
            raise InvalidAddressError(f"got unknown address transport: {transport}")
        sock = socket.socket(family, socket.SOCK_STREAM)
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
        message_layer()
        from dbus_fast.errors import InvalidAddressError

        source = address_source(address)
        resolved = address
        try:
            resolved = bus_address(address)
            self._sock = _open(resolved)
        except InvalidAddressError as exc:
            raise InvalidInput(
                detail=f"bus address {resolved!r} ({source}) is not a D-Bus address: {exc}; "
                f"a valid one looks like {EXAMPLE_ADDRESS}"
            ) from exc
        except OSError as exc:
            raise _unreachable(resolved, source, exc.strerror or str(exc)) from exc
        self._serial = 0
        try:
            self._hello()
        # Something that is not a bus: refused or garbled authentication (AuthError and
        # UnicodeDecodeError are ValueErrors), a message that does not parse, silence.
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

    def _hello(self) -> None:
        from dbus_fast._private.unmarshaller import Unmarshaller
        from dbus_fast.message import Message

        self._authenticate()
        self._unmarshaller = Unmarshaller(None, self._sock, False)
        hello = Message(destination=DBUS_NAME, path=DBUS_PATH, interface=DBUS_NAME, member="Hello")
        self.unique_name = str(self.call(hello).body[0])

    def _authenticate(self) -> None:
        from dbus_fast.auth import Authenticator, AuthExternal
        from dbus_fast.errors import AuthError

        auth = AuthExternal()
        self._sock.sendall(b"\0" + Authenticator._format_line(auth._authentication_start()))
        while True:
            # The bus answers each line of ours with one line and sends nothing else
            # before BEGIN, so a line is everything received until CRLF.
            received = b""
            while not received.endswith(b"\r\n"):
                chunk = self._sock.recv(4096)
                if not chunk:
                    raise AuthError("the bus closed the connection during authentication")
                received += chunk
            response = auth._receive_line(received.decode("ascii").rstrip("\r\n"))
            self._sock.sendall(Authenticator._format_line(response))
            if response == "BEGIN":
                return

    def call(self, message: Message) -> Message:
        """Send a method call; its reply (a method return or an error)."""
        from dbus_fast.constants import MessageType

        self._serial += 1
        message.serial = self._serial
        self._sock.sendall(message._marshall(False))
        while True:
            reply = self._receive()
            if reply.reply_serial == message.serial and reply.message_type in (
                MessageType.METHOD_RETURN,
                MessageType.ERROR,
            ):
                return reply

    def _receive(self) -> Message:
        while True:
            try:
                message = self._unmarshaller.unmarshall()
            except EOFError:
                raise ConnectionResetError("the bus closed the connection") from None
            if message is not None:
                return message

    def close(self) -> None:
        self._sock.close()


def _unreachable(address: str, source: str, reason: str) -> EnvironmentProblem:
    return EnvironmentProblem(
        detail=f"cannot reach the daemon at {address} ({source}): {reason}; is dbus running, "
        "and is the address right?"
    )
