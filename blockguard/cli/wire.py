"""D-Bus messages on the wire, for the CLI: marshalling, unmarshalling, nothing else.

A call of ``blockguardctl`` sends a few method calls and reads their replies; even
dbus-fast's message layer alone (its constants are enums, its errors and signatures pull
in more) was a fifth of a ``status`` call's start-up in an installed venv (issue 16).
The D-Bus wire format is small (the specification's "Message Protocol"), so this module
writes and reads it with the standard library's ``struct`` only: every type of the
specification (``ybnqiuxtdsogh``, arrays, structs, dict entries, variants), little- or
big-endian in, little-endian out. Values come back as dbus-fast gives them (a struct is a
tuple, ``ay`` is bytes, ``a{..}`` a dict, a variant a :class:`Variant`), so the CLI reads
them the same way. ``tests/unit/test_cli_wire.py`` holds it to dbus-fast's bytes.
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False  # typing is not imported to run (issue 16: ~2 ms of a call)
if TYPE_CHECKING:
    from typing import Any

#: Message types (``MessageType`` of the specification).
METHOD_CALL, METHOD_RETURN, ERROR, SIGNAL = 1, 2, 3, 4
#: Header fields: code -> (name, signature).
_FIELDS = {
    1: ("path", "o"),
    2: ("interface", "s"),
    3: ("member", "s"),
    4: ("error_name", "s"),
    5: ("reply_serial", "u"),
    6: ("destination", "s"),
    7: ("sender", "s"),
    8: ("signature", "g"),
    9: ("unix_fds", "u"),
}
_FIELD_CODES = {name: (code, sig) for code, (name, sig) in _FIELDS.items()}
#: The fixed-size types: struct format and size (a boolean travels as a uint32).
_FIXED = {
    "y": ("B", 1),
    "b": ("I", 4),
    "n": ("h", 2),
    "q": ("H", 2),
    "i": ("i", 4),
    "u": ("I", 4),
    "x": ("q", 8),
    "t": ("Q", 8),
    "d": ("d", 8),
    "h": ("I", 4),
}
_ALIGN = {**{k: size for k, (_, size) in _FIXED.items()}, "s": 4, "o": 4, "g": 1, "v": 1}
_ALIGN.update({"a": 4, "(": 8, "{": 8})
#: The longest message the specification allows (128 MiB).
MAX_MESSAGE = 1 << 27


class WireError(ValueError):
    """Bytes that are not a D-Bus message, or a value its signature cannot carry."""


class Variant:
    """A value with its D-Bus signature (``v``), as dbus-fast's ``Variant``."""

    __slots__ = ("signature", "value")

    def __init__(self, signature: str, value: Any) -> None:
        if len(split_signature(signature)) != 1:
            raise WireError(f"a variant holds one complete type, not {signature!r}")
        self.signature = signature
        self.value = value

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Variant):
            return NotImplemented
        return self.signature == other.signature and self.value == other.value

    __hash__ = None  # type: ignore[assignment]  # mutable, as its value may be

    def __repr__(self) -> str:
        return f"Variant({self.signature!r}, {self.value!r})"


_SPLIT: dict[str, list[str]] = {}


def split_signature(signature: str) -> list[str]:
    """The complete types of ``signature``: ``"sa{sv}(ii)"`` -> ``["s", "a{sv}", "(ii)"]``.

    :raises WireError: for a signature that does not parse.
    """
    known = _SPLIT.get(signature)
    if known is not None:
        return known
    types = []
    i = 0
    while i < len(signature):
        if signature[i] == "{":
            raise WireError(f"signature {signature!r} has a dict entry outside an array")
        end = _type_end(signature, i)
        types.append(signature[i:end])
        i = end
    _SPLIT[signature] = types
    return types


def _type_end(signature: str, i: int) -> int:
    """The index after the complete type that starts at ``signature[i]``."""
    if i >= len(signature):
        raise WireError(f"signature {signature!r} ends inside a type")
    char = signature[i]
    if char in _FIXED or char in "sogv":
        return i + 1
    if char == "a":
        return _type_end(signature, i + 1)
    if char in "({":
        if char == "{" and (i == 0 or signature[i - 1] != "a"):
            raise WireError(f"signature {signature!r} has a dict entry outside an array")
        close = ")" if char == "(" else "}"
        j = i + 1
        count = 0
        while j < len(signature) and signature[j] != close:
            j = _type_end(signature, j)
            count += 1
        if j >= len(signature) or count == 0 or (char == "{" and count != 2):
            raise WireError(f"signature {signature!r} has a bad struct or dict entry")
        return j + 1
    raise WireError(f"signature {signature!r} holds an unknown type {char!r}")


# --- writing ------------------------------------------------------------------------------


def _pad(buf: bytearray, align: int) -> None:
    buf.extend(bytes(-len(buf) % align))


def _write(buf: bytearray, sig: str, value: Any) -> None:
    """Append ``value`` of the complete type ``sig`` (offsets count from the message start)."""
    char = sig[0]
    fixed = _FIXED.get(char)
    if fixed is not None:
        fmt, size = fixed
        _pad(buf, size)
        try:
            buf.extend(struct.pack("<" + fmt, value))
        except struct.error as exc:
            raise WireError(f"{value!r} does not fit D-Bus type {sig!r}: {exc}") from None
    elif char in "so":
        if not isinstance(value, str):
            raise WireError(f"{value!r} is not text for D-Bus type {sig!r}")
        data = value.encode()
        _pad(buf, 4)
        buf.extend(struct.pack("<I", len(data)))
        buf.extend(data)
        buf.append(0)
    elif char == "g":
        if not isinstance(value, str) or not value.isascii():
            raise WireError(f"{value!r} is not a signature")
        data = value.encode()
        buf.append(len(data))
        buf.extend(data)
        buf.append(0)
    elif char == "v":
        # A Variant, or one of dbus-fast's (a library caller of Client may hold those).
        signature = getattr(value, "signature", None)
        if not isinstance(signature, str) or len(split_signature(signature)) != 1:
            raise WireError(f"a 'v' value must be a Variant, not {type(value).__name__}")
        _write(buf, "g", signature)
        _write(buf, signature, value.value)
    elif char == "a":
        _pad(buf, 4)
        at = len(buf)
        buf.extend(b"\0\0\0\0")
        element = sig[1:]
        _pad(buf, _ALIGN[element[0]])  # the padding before the first element is not counted
        start = len(buf)
        if element[0] == "{":
            key, val = split_signature(element[1:-1])
            for k, v in value.items():
                _pad(buf, 8)
                _write(buf, key, k)
                _write(buf, val, v)
        elif element == "y":
            buf.extend(value)
        else:
            for item in value:
                _write(buf, element, item)
        buf[at : at + 4] = struct.pack("<I", len(buf) - start)
    elif char == "(":
        _pad(buf, 8)
        fields = split_signature(sig[1:-1])
        if len(value) != len(fields):
            raise WireError(f"{value!r} does not have the {len(fields)} fields of {sig!r}")
        for field, item in zip(fields, value, strict=True):
            _write(buf, field, item)
    else:
        raise WireError(f"cannot write D-Bus type {sig!r}")


def method_call(
    serial: int,
    destination: str,
    path: str,
    interface: str,
    member: str,
    signature: str = "",
    body: list[Any] | tuple[Any, ...] = (),
) -> bytes:
    """The bytes of one method call message (little-endian, no flags)."""
    types = split_signature(signature)
    if len(types) != len(body):
        raise WireError(f"signature {signature!r} wants {len(types)} values, got {len(body)}")
    data = bytearray()
    for sig, value in zip(types, body, strict=True):
        _write(data, sig, value)
    fields = [
        (1, Variant("o", path)),
        (2, Variant("s", interface)),
        (3, Variant("s", member)),
        (6, Variant("s", destination)),
    ]
    if signature:
        fields.append((8, Variant("g", signature)))
    head = bytearray(b"l\x01\x00\x01")
    head.extend(struct.pack("<II", len(data), serial))
    _write(head, "a(yv)", fields)
    _pad(head, 8)
    return bytes(head + data)


# --- reading ------------------------------------------------------------------------------


class Message:
    """A message received: its type, header fields and body (values as dbus-fast's)."""

    __slots__ = tuple(["message_type", "flags", "serial", "body", *_FIELD_CODES])

    def __init__(self) -> None:
        self.message_type = 0
        self.flags = 0
        self.serial = 0
        self.body: list[Any] = []
        for name in _FIELD_CODES:
            setattr(self, name, None)
        self.signature = ""


class _Reader:
    __slots__ = ("data", "end", "order", "pos")

    def __init__(self, data: bytes, order: str) -> None:
        self.data = data
        self.order = order
        self.pos = 0
        self.end = len(data)

    def align(self, size: int) -> None:
        self.pos += -self.pos % size
        if self.pos > self.end:
            raise WireError("a message ends before its values")

    def read(self, sig: str) -> Any:
        """The value of the complete type ``sig`` at the current position."""
        char = sig[0]
        fixed = _FIXED.get(char)
        if fixed is not None:
            fmt, size = fixed
            self.align(size)
            self._need(size)
            (value,) = struct.unpack_from(self.order + fmt, self.data, self.pos)
            self.pos += size
            return bool(value) if char == "b" else value
        if char in "so":
            length = self.read("u")
            return self._text(length)
        if char == "g":
            self._need(1)
            length = self.data[self.pos]
            self.pos += 1
            return self._text(length)
        if char == "v":
            signature = self.read("g")
            if len(split_signature(signature)) != 1:
                raise WireError(f"a variant's signature {signature!r} is not one type")
            return Variant(signature, self.read(signature))
        if char == "a":
            length = self.read("u")
            element = sig[1:]
            self.align(_ALIGN[element[0]])
            end = self.pos + length
            if length > MAX_MESSAGE or end > self.end:
                raise WireError("an array is longer than its message")
            if element == "y":
                value = bytes(self.data[self.pos : end])
                self.pos = end
                return value
            if element[0] == "{":
                key, val = split_signature(element[1:-1])
                mapping = {}
                while self.pos < end:
                    self.align(8)
                    k = self.read(key)
                    mapping[k] = self.read(val)
                return mapping
            items = []
            while self.pos < end:
                items.append(self.read(element))
            return items
        if char == "(":
            self.align(8)
            return tuple([self.read(field) for field in split_signature(sig[1:-1])])
        raise WireError(f"cannot read D-Bus type {sig!r}")

    def _need(self, size: int) -> None:
        if self.pos + size > self.end:
            raise WireError("a message ends before its values")

    def _text(self, length: int) -> str:
        self._need(length + 1)
        text = bytes(self.data[self.pos : self.pos + length]).decode()
        self.pos += length + 1
        return text


def message_length(head: bytes) -> int:
    """The whole length of the message whose first 16 bytes are ``head``.

    :raises WireError: if they are not the start of a D-Bus message.
    """
    order = _order(head[0])
    body_length, _serial, fields_length = struct.unpack_from(order + "III", head, 4)
    length = 16 + fields_length + (-(16 + fields_length) % 8) + body_length
    if length > MAX_MESSAGE:
        raise WireError(f"a message of {length} bytes is longer than D-Bus allows")
    return length


def _order(mark: int) -> str:
    if mark == ord("l"):
        return "<"
    if mark == ord("B"):
        return ">"
    raise WireError(f"not a D-Bus message (endianness mark {mark!r})")


def parse_message(data: bytes) -> Message:
    """The message in ``data`` (exactly one whole message, see :func:`message_length`).

    :raises WireError: if it does not parse.
    """
    reader = _Reader(data, _order(data[0]))
    message = Message()
    message.message_type = data[1]
    message.flags = data[2]
    if data[3] != 1:
        raise WireError(f"D-Bus protocol version {data[3]} is not 1")
    reader.pos = 4
    body_length = reader.read("u")
    message.serial = reader.read("u")
    try:
        for code, value in reader.read("a(yv)"):
            name_sig = _FIELDS.get(code)
            if name_sig is not None:
                setattr(message, name_sig[0], value.value)
        reader.align(8)
        if reader.pos + body_length != len(data):
            raise WireError("a message's length does not match its header")
        message.body = [reader.read(sig) for sig in split_signature(message.signature or "")]
    except (UnicodeDecodeError, struct.error) as exc:
        raise WireError(f"a message does not parse: {exc}") from None
    return message
