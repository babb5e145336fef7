"""The CLI's own D-Bus messages (cli.wire) are dbus-fast's, byte for byte, and it reads
what dbus-fast writes as dbus-fast reads it: the client talks to a bus whose other
clients (blockguardd among them) use dbus-fast. The real bus and daemon are in
tests/daemon and tests/cli; this holds every type of the specification."""

from __future__ import annotations

import io
from typing import Any

import pytest
from dbus_fast import Message
from dbus_fast import Variant as TheirVariant
from dbus_fast._private.unmarshaller import Unmarshaller
from dbus_fast.constants import MessageType

from blockguard.cli import wire

#: (signature, body) in dbus-fast's values; cli.wire gets the same with its own Variant.
BODIES: list[tuple[str, list[Any]]] = [
    ("", []),
    ("s", ["db"]),
    ("s", ["é ünïcode ✓"]),
    ("ssasb", ["p1", "", ["/dev/a", "/dev/b"], True]),
    ("sbb", ["p1", False, True]),
    ("as", [[]]),
    (
        "sa{sv}",
        [
            "db",
            {
                "rpo": TheirVariant("s", "15m"),
                "generations": TheirVariant("t", 3),
                "full": TheirVariant("b", True),
                "rate": TheirVariant("d", 1.5),
                "offset": TheirVariant("x", -2),
            },
        ],
    ),
    ("t", [(1 << 64) - 1]),
    (
        "ynqiuxtdgo",
        [255, -32768, 65535, -(1 << 31), (1 << 32) - 1, -(1 << 63), 7, -0.25, "a{sv}", "/o/p"],
    ),
    ("ay", [b"\x00\x01\xff"]),
    ("aay", [[b"", b"ab"]]),
    ("(sa{sv})ai", [["x", {}], [1, 2, 3]]),
    (
        "a(sssttsu)",
        [[["db@1", "full", "", 1, 2, "ok", 1], ["db@2", "incremental", "db@1", 3, 4, "ok", 2]]],
    ),
    ("a{sa{sv}}", [{"a": {"b": TheirVariant("as", ["q", "r"])}, "c": {}}]),
    ("a{oa{sa{sv}}}", [{"/a": {"i": {"P": TheirVariant("ad", [1.0, 2.5])}}}]),
    ("v", [TheirVariant("(ss)", ["a", "b"])]),
    ("v", [TheirVariant("v", TheirVariant("t", 9))]),
    ("aai", [[[1], [], [2, 3]]]),
    ("a{tb}", [{1: True, 2: False}]),
]


def _ours(value: Any) -> Any:
    if isinstance(value, TheirVariant):
        return wire.Variant(value.signature, _ours(value.value))
    if isinstance(value, dict):
        return {k: _ours(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_ours(v) for v in value]
    return value


def _same(value: Any) -> Any:
    """Either side's values in one shape: variants as tuples, structs as lists."""
    if isinstance(value, TheirVariant | wire.Variant):
        return ("variant", value.signature, _same(value.value))
    if isinstance(value, dict):
        return {k: _same(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_same(v) for v in value]
    return value


def _kind(value: Any) -> str:
    return "variant" if isinstance(value, TheirVariant | wire.Variant) else type(value).__name__


def _theirs(signature: str, body: list[Any], serial: int = 7) -> bytes:
    message = Message(
        destination="org.blockguard1",
        path="/org/blockguard1",
        interface="org.blockguard1.Manager",
        member="Call",
        signature=signature,
        body=body,
        serial=serial,
    )
    return bytes(message._marshall(False))


@pytest.mark.parametrize(("signature", "body"), BODIES, ids=[f"{s!r}" for s, _ in BODIES])
def test_a_method_call_is_dbus_fasts_bytes(signature: str, body: list[Any]) -> None:
    ours = wire.method_call(
        7,
        "org.blockguard1",
        "/org/blockguard1",
        "org.blockguard1.Manager",
        "Call",
        signature,
        _ours(body),
    )
    assert ours == _theirs(signature, body)


@pytest.mark.parametrize(("signature", "body"), BODIES, ids=[f"{s!r}" for s, _ in BODIES])
def test_a_message_reads_as_dbus_fast_reads_it(signature: str, body: list[Any]) -> None:
    data = _theirs(signature, body)
    unmarshaller = Unmarshaller(io.BytesIO(data))
    unmarshaller.unmarshall()
    theirs = unmarshaller.message
    assert wire.message_length(data[:16]) == len(data)
    ours = wire.parse_message(data)
    assert (ours.message_type, ours.serial, ours.member, ours.signature) == (
        MessageType.METHOD_CALL.value,
        7,
        "Call",
        signature,
    )
    assert (ours.path, ours.interface, ours.destination) == (
        theirs.path,
        theirs.interface,
        theirs.destination,
    )
    assert _same(ours.body) == _same(theirs.body)
    # Structs come back as tuples, as dbus-fast gives them.
    assert [_kind(v) for v in ours.body] == [_kind(v) for v in theirs.body]


@pytest.mark.parametrize(("signature", "body"), BODIES, ids=[f"{s!r}" for s, _ in BODIES])
def test_dbus_fasts_variants_are_written_as_ours(signature: str, body: list[Any]) -> None:
    # Client is a library too: a caller may hand it dbus-fast's Variants.
    assert wire.method_call(
        7, "org.blockguard1", "/org/blockguard1", "org.blockguard1.Manager", "Call", signature, body
    ) == _theirs(signature, body)


def test_replies_and_errors_carry_their_header_fields() -> None:
    for kind, extra in (
        (MessageType.METHOD_RETURN, {}),
        (MessageType.ERROR, {"error_name": "org.blockguard1.Error.NotFound"}),
    ):
        data = bytes(
            Message(
                message_type=kind,
                reply_serial=41,
                destination=":1.9",
                signature="s",
                body=["volume db does not exist"],
                serial=3,
                **extra,
            )._marshall(False)
        )
        ours = wire.parse_message(data)
        assert ours.message_type == kind.value and ours.reply_serial == 41
        assert ours.destination == ":1.9" and ours.signature == "s" and ours.serial == 3
        assert ours.error_name == extra.get("error_name")
        assert ours.body == ["volume db does not exist"]


@pytest.mark.parametrize(
    ("signature", "body"),
    [("t", [-1]), ("y", [256]), ("s", [3]), ("v", ["not a variant"]), ("(ss)", [["a"]]), ("s", [])],
)
def test_a_value_its_signature_cannot_carry_is_refused(signature: str, body: list[Any]) -> None:
    with pytest.raises(wire.WireError):
        wire.method_call(1, "d", "/p", "i.f", "M", signature, body)


@pytest.mark.parametrize("signature", ["a", "(", "()", "{ss}", "a{s}", "a{sss}", "z", "(s"])
def test_a_bad_signature_is_refused(signature: str) -> None:
    with pytest.raises(wire.WireError):
        wire.split_signature(signature)


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: b"X" + data[1:],  # not an endianness mark
        lambda data: data[:3] + b"\x02" + data[4:],  # protocol version 2
        lambda data: data[:-3],  # cut short
        lambda data: data + b"\0" * 8,  # longer than its header says
    ],
    ids=["endianness", "version", "short", "long"],
)
def test_bytes_that_are_not_a_message_are_refused(damage: Any) -> None:
    data = _theirs("sa{sv}", ["db", {"a": TheirVariant("s", "b")}])
    with pytest.raises(wire.WireError):
        wire.parse_message(damage(data))


def test_a_big_endian_message_reads_too() -> None:
    # dbus-fast writes little-endian only; this is a method return "s" "hi", serial 5,
    # reply to 2, written big-endian by hand as the specification lays it out.
    fields = (
        b"\x05\x01u\x00"
        + (2).to_bytes(4, "big")  # REPLY_SERIAL u 2
        + b"\x08\x01g\x00\x01s\x00"  # SIGNATURE g "s"
    )
    head = b"B\x02\x00\x01" + (7).to_bytes(4, "big") + (5).to_bytes(4, "big")
    head += len(fields).to_bytes(4, "big") + fields
    head += b"\0" * (-len(head) % 8)
    data = head + (2).to_bytes(4, "big") + b"hi\x00"
    message = wire.parse_message(data)
    assert (message.message_type, message.serial, message.reply_serial) == (2, 5, 2)
    assert message.body == ["hi"]
