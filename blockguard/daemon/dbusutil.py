"""What every D-Bus object of blockguardd shares: error mapping, authorisation, conversions.

One decorator, :func:`handler`, wraps every D-Bus method and property getter. It

- turns a :class:`~blockguard.errors.BlockguardError` into a named D-Bus error
  (``org.blockguard1.Error.NotFound`` ...) with the error's plain message;
- logs any other exception with its traceback and gives the client only
  ``org.blockguard1.Error.Internal`` with a plain message;
- checks that the caller may change things, unless the method is marked ``read_only=True``
  (authorisation is the default, as in firewalld).

The caller's identity comes from the bus (``GetConnectionCredentials``), never from the
message body. dbus-fast does not pass the message to method implementations, so a message
handler records the current method call in a context variable that the task running the
method inherits (asyncio copies the context when it creates the task).
"""

import asyncio
import contextvars
import functools
import grp
import inspect
import logging
import os
import pwd
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusSignature
from dbus_fast.errors import DBusError

from blockguard.core.vocab import scalar_signature
from blockguard.daemon import audit
from blockguard.errors import BlockguardError, InternalError, NotAuthorized

log = logging.getLogger(__name__)

BUS_NAME = "org.blockguard1"
ROOT_PATH = "/org/blockguard1"
IFACE_PREFIX = "org.blockguard1"
DEFAULT_ADMIN_GROUP = "blockguard"

# D-Bus types used in the interfaces (dbus-fast reads the signature from Annotated).
Str = Annotated[str, DBusSignature("s")]
Bool = Annotated[bool, DBusSignature("b")]
UInt32 = Annotated[int, DBusSignature("u")]
UInt64 = Annotated[int, DBusSignature("t")]
Double = Annotated[float, DBusSignature("d")]
ObjPath = Annotated[str, DBusSignature("o")]
ObjPaths = Annotated[list[str], DBusSignature("ao")]
Strs = Annotated[list[str], DBusSignature("as")]
VarDict = Annotated[dict[str, Variant], DBusSignature("a{sv}")]
VarDicts = Annotated[list[dict[str, Variant]], DBusSignature("aa{sv}")]
SecondsDict = Annotated[dict[str, float], DBusSignature("a{sd}")]
ErrorPair = Annotated[list[str], DBusSignature("(ss)")]
#: (id, method, parent, created unix time, bytes, state, running number)
GENERATION_SIGNATURE = "(sssttsu)"
GenerationStructs = Annotated[list[list[Any]], DBusSignature(f"a{GENERATION_SIGNATURE}")]
#: (pool, name, device) of each swap-in
SwapIns = Annotated[list[list[Any]], DBusSignature("a(sss)")]
#: (path, {"size": t, "state": s, <perf figure>: d ...})
PoolDevices = Annotated[list[list[Any]], DBusSignature("a(sa{sv})")]

_current_call: contextvars.ContextVar[Message | None] = contextvars.ContextVar(
    "blockguard_current_call", default=None
)


def record_current_call(msg: Message) -> bool:
    """Message handler (``bus.add_message_handler``) remembering the method call being run.

    :returns: False, so dbus-fast goes on to dispatch the message normally.
    """
    if msg.message_type == MessageType.METHOD_CALL:
        _current_call.set(msg)
    return False


def current_sender() -> str:
    """The unique bus name of the sender of the method call being run ("" outside one)."""
    msg = _current_call.get()
    return (msg.sender or "") if msg is not None else ""


# --- path names ----------------------------------------------------------------------


def escape_path_element(name: str) -> str:
    """Make ``name`` usable as one object-path element (systemd's bus-label escaping).

    ASCII letters and digits stay; every other byte becomes ``_`` and two hex digits; the
    empty string becomes ``_``.
    """
    if not name:
        return "_"
    out = []
    for byte in name.encode():
        char = chr(byte)
        if char.isascii() and char.isalnum():
            out.append(char)
        else:
            out.append(f"_{byte:02x}")
    return "".join(out)


def unescape_path_element(element: str) -> str:
    """Inverse of :func:`escape_path_element`."""
    if element == "_":
        return ""
    raw = bytearray()
    i = 0
    while i < len(element):
        if element[i] == "_":
            raw.append(int(element[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.append(ord(element[i]))
            i += 1
    return raw.decode()


def volume_path(name: str) -> str:
    return f"{ROOT_PATH}/volume/{escape_path_element(name)}"


def pool_path(name: str) -> str:
    return f"{ROOT_PATH}/pool/{escape_path_element(name)}"


def job_path(job_id: int) -> str:
    return f"{ROOT_PATH}/job/{job_id}"


# --- values ----------------------------------------------------------------------------


def to_variant(value: Any) -> Variant:
    """Wrap a plain Python value (JSON-like) into a Variant with a natural signature.

    Integers become ``t`` (``x`` if negative), floats ``d``, lists of strings ``as``,
    mappings of floats ``a{sd}``, other mappings ``a{sv}``, other lists ``av``.
    """
    if isinstance(value, Variant):
        return value
    if signature := scalar_signature(value):
        return Variant(signature, value)
    if isinstance(value, Mapping):
        if value and all(isinstance(v, float) for v in value.values()):
            return Variant("a{sd}", {str(k): v for k, v in value.items()})
        return Variant("a{sv}", to_vardict(value))
    if isinstance(value, list | tuple):
        if all(isinstance(v, str) for v in value):
            return Variant("as", list(value))
        return Variant("av", [to_variant(v) for v in value])
    if value is None:
        return Variant("s", "")
    raise TypeError(f"cannot put {type(value).__name__} into a D-Bus variant")


def to_vardict(mapping: Mapping[str, Any]) -> dict[str, Variant]:
    """A mapping as ``a{sv}``; entries whose value is None are left out."""
    return {str(k): to_variant(v) for k, v in mapping.items() if v is not None}


def from_variant(value: Any) -> Any:
    """Unwrap Variants recursively into plain Python values."""
    if isinstance(value, Variant):
        return from_variant(value.value)
    if isinstance(value, dict):
        return {k: from_variant(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_variant(v) for v in value]
    return value


# --- authorisation -----------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """The sender of a method call and what the bus knows of it."""

    sender: str
    uid: int
    pid: int | None = None
    groups: frozenset[int] | None = None


class Authorizer:
    """Decides whether the sender of the current call may change things.

    Root may; so may members of ``admin_group`` (primary or supplementary). The policy
    file of the bus says the same; this is the second line of defence.

    :param bus: the daemon's connection, used to ask the bus who the caller is.
    :param admin_group: name of the group whose members may change things.
    """

    def __init__(self, bus: MessageBus, admin_group: str = DEFAULT_ADMIN_GROUP) -> None:
        self.bus = bus
        self.admin_group = admin_group

    def _admin_gid(self) -> int | None:
        try:
            return grp.getgrnam(self.admin_group).gr_gid
        except KeyError:
            return None

    async def identify(self, action: str) -> Caller:
        """Who sent the current call, as the bus says (``GetConnectionCredentials``).

        :raises NotAuthorized: the caller cannot be identified (fail closed).
        """
        msg = _current_call.get()
        if msg is None or not msg.sender:
            raise NotAuthorized(detail=f"{action}: the caller could not be identified")
        reply = await self.bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="GetConnectionCredentials",
                signature="s",
                body=[msg.sender],
            )
        )
        if reply.message_type == MessageType.ERROR:
            raise NotAuthorized(detail=f"the bus does not know the caller {msg.sender}")
        creds = from_variant(reply.body[0])
        groups = creds.get("UnixGroupIDs")
        pid = creds.get("ProcessID")
        return Caller(
            sender=msg.sender,
            uid=int(creds["UnixUserID"]),
            pid=None if pid is None else int(pid),
            groups=None if groups is None else frozenset(groups),
        )

    def check(self, caller: Caller, action: str) -> None:
        """Raise :class:`NotAuthorized` unless ``caller`` may do ``action``."""
        if caller.uid == 0:
            return
        gid = self._admin_gid()
        if gid is not None:
            groups = caller.groups
            if groups is None:
                groups = frozenset(self._groups_of_user(caller.uid))
            if gid in groups:
                return
        log.warning("refused %s to uid %s (%s)", action, caller.uid, caller.sender)
        raise NotAuthorized(
            detail=f"{action} needs root or membership of group {self.admin_group} "
            f"(the caller has uid {caller.uid})"
        )

    async def require(self, action: str) -> Caller:
        """Raise :class:`NotAuthorized` unless the current caller may do ``action``."""
        caller = await self.identify(action)
        self.check(caller, action)
        return caller

    @staticmethod
    def _groups_of_user(uid: int) -> set[int]:
        try:
            user = pwd.getpwuid(uid)
        except KeyError:
            return set()
        return set(os.getgrouplist(user.pw_name, user.pw_gid))


# --- the one decorator -------------------------------------------------------------------


def _audit(
    method: str,
    caller: Caller | None,
    names: list[str],
    args: tuple[Any, ...],
    outcome: str,
    error: str = "",
    result: Any = None,
) -> None:
    """Write the audit entry of a call; a failure to do so never changes its outcome."""
    try:
        who = audit.CallerId() if caller is None else audit.CallerId(caller.uid, caller.pid)
        summary = audit.summarise_arguments(names, args)
        audit.record(method, who, summary, outcome, error, result)
    except Exception:
        log.exception("writing the audit entry of %s failed", method)


def internal_error(exc: BaseException, what: str) -> DBusError:
    """Log ``exc`` with its traceback; return the plain error a client may see."""
    log.error("unexpected error in %s", what, exc_info=exc)
    plain = InternalError(detail=f"{type(exc).__name__} in {what}")
    return DBusError(plain.dbus_name, plain.message)


def as_dbus_error(exc: BaseException, what: str) -> DBusError:
    """The D-Bus error a client gets for ``exc``."""
    if isinstance(exc, DBusError):
        return exc
    if isinstance(exc, BlockguardError):
        return DBusError(exc.dbus_name, exc.message)
    return internal_error(exc, what)


def handler(*, read_only: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a D-Bus method or property getter: error mapping, authorisation, audit.

    :param read_only: the method changes nothing, so anyone may call it. Every method not
        marked so requires root or the admin group, and each call of it, accepted or
        refused, leaves an audit entry (:mod:`blockguard.daemon.audit`, whose
        ``MUTATING_METHODS`` must list it). Property getters must be read-only.

    The object must have an ``authorizer`` attribute (an :class:`Authorizer`) unless
    every handler on it is read-only.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        what = fn.__name__
        if inspect.iscoroutinefunction(fn):
            arg_names = list(inspect.signature(fn).parameters)[1:]

            @functools.wraps(fn)
            async def async_wrapper(self: Any, *args: Any) -> Any:
                if read_only:
                    try:
                        return await fn(self, *args)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        raise as_dbus_error(exc, what) from None
                caller: Caller | None = None
                try:
                    caller = await self.authorizer.identify(what)
                    self.authorizer.check(caller, what)
                    result = await fn(self, *args)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    error = as_dbus_error(exc, what)
                    _audit(what, caller, arg_names, args, audit.REFUSED, error.type)
                    raise error from None
                _audit(what, caller, arg_names, args, audit.ACCEPTED, result=result)
                return result

            async_wrapper.read_only = read_only  # type: ignore[attr-defined]
            return async_wrapper

        if not read_only:
            raise TypeError(f"{what}: a method that changes things must be async")

        @functools.wraps(fn)
        def sync_wrapper(self: Any, *args: Any) -> Any:
            try:
                return fn(self, *args)
            except Exception as exc:
                raise as_dbus_error(exc, what) from None

        sync_wrapper.read_only = True  # type: ignore[attr-defined]
        return sync_wrapper

    return decorate
