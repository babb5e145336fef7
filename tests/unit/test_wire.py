"""The remote protocol's frames and conversation: what arrives is what was sent, or a
named error; never half a frame, never an unbounded allocation, never a wrong pairing."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from blockguard.errors import (
    BlockguardError,
    NotAuthorized,
    PoolSpaceLow,
    WireClosed,
    WireCorrupt,
    WireFrameTooLarge,
    WireTruncated,
    WireVersionMismatch,
)
from blockguard.storage.remote.channel import (
    PROTOCOL_VERSIONS,
    Channel,
    error_meta,
    peer_error,
    versions_text,
)
from blockguard.storage.remote.wire import (
    HEADER_SIZE,
    MAGIC,
    Frame,
    FrameKind,
    FrameStream,
    encode_frame,
)
from tests.timeouts import scaled

REPO = Path(__file__).resolve().parents[2]
PEER = Path(__file__).with_name("wire_peer.py")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
frames = st.builds(
    Frame,
    kind=st.sampled_from(FrameKind),
    request_id=st.integers(0, 2**32 - 1),
    meta=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
    payload=st.binary(max_size=2000),
)


class Trickle(io.RawIOBase):
    """A reader that hands out at most ``step`` bytes a call (as a pipe may) and counts."""

    def __init__(self, data: bytes, step: int = 1) -> None:
        self.data, self.step, self.pos = data, step, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        n = min(self.step, size if size >= 0 else len(self.data))
        got = self.data[self.pos : self.pos + n]
        self.pos += len(got)
        return got


def stream_of(data: bytes, **kwargs: Any) -> FrameStream:
    return FrameStream(io.BytesIO(data), io.BytesIO(), peer="target t1", **kwargs)


def channel_reading(*replies: Frame) -> tuple[Channel, io.BytesIO]:
    """A channel whose peer's answers are scripted; returns it and what it wrote."""
    written = io.BytesIO()
    data = b"".join(encode_frame(f) for f in replies)
    return Channel(io.BytesIO(data), written, peer="target t1"), written


def frames_in(data: bytes) -> list[Frame]:
    stream, found = stream_of(data), []
    while True:
        try:
            found.append(stream.receive())
        except WireClosed:
            return found


HELLO = Frame(FrameKind.HELLO, 0, {"protocol": [1]})


# --- frames -----------------------------------------------------------------------------


@given(frames)
def test_every_frame_kind_round_trips(frame: Frame) -> None:
    data = encode_frame(frame)
    for reader in (io.BytesIO(data), Trickle(data, step=7)):
        got = FrameStream(reader, io.BytesIO()).receive()
        assert got == Frame(FrameKind(frame.kind), frame.request_id, frame.meta, frame.payload)


def test_frames_follow_each_other_on_one_stream() -> None:
    sent = [Frame(kind, i, {"n": i}, bytes([i]) * i) for i, kind in enumerate(FrameKind)]
    written = io.BytesIO()
    stream = FrameStream(io.BytesIO(), written)
    for frame in sent:
        stream.send(frame)
    assert frames_in(written.getvalue()) == sent


def test_an_oversized_length_is_refused_without_reading_the_body() -> None:
    head = struct.pack(">2sBBIIQ", MAGIC, FrameKind.RESPONSE, 0, 1, 3 << 30, 0)
    head += struct.pack(">I", xxhash.xxh3_64_intdigest(head) & 0xFFFFFFFF)
    reader = Trickle(head + b"\0" * 4096, step=4096)
    with pytest.raises(WireFrameTooLarge) as info:
        FrameStream(reader, io.BytesIO(), peer="target t1", max_body=1 << 20).receive()
    assert reader.pos == HEADER_SIZE
    assert str(info.value) == (
        f"connection to target t1: refused a frame of {3 << 30} bytes (at most {1 << 20})"
    )


def test_an_oversized_frame_is_not_sent() -> None:
    written = io.BytesIO()
    with pytest.raises(WireFrameTooLarge):
        FrameStream(io.BytesIO(), written, max_body=100).send(
            Frame(FrameKind.REQUEST, 1, {}, b"x" * 200)
        )
    assert written.getvalue() == b""


@pytest.mark.parametrize("step", [1, 1 << 20])
def test_a_stream_ending_at_any_byte_of_a_frame_raises_a_named_error(step: int) -> None:
    first = encode_frame(Frame(FrameKind.REQUEST, 1, {"op": "put"}, b"chunk"))
    second = encode_frame(Frame(FrameKind.REQUEST, 2, {"op": "commit"}, b"manifest"))
    for cut in range(len(second)):
        stream = FrameStream(Trickle(first + second[:cut], step), io.BytesIO(), peer="t1")
        assert stream.receive().request_id == 1
        expected = WireTruncated if cut else WireClosed
        with pytest.raises(WireClosed) as info:
            stream.receive()
        assert type(info.value) is expected, cut
        if cut:
            part, wanted = ("header", HEADER_SIZE) if cut < HEADER_SIZE else ("body", None)
            assert f"bytes of its {part})" in str(info.value)
            if wanted:
                assert f"({cut} of the {wanted} bytes" in str(info.value)
        else:
            assert str(info.value) == "connection to t1 ended between frames"


def test_a_flipped_bit_anywhere_in_a_frame_is_detected() -> None:
    data = encode_frame(Frame(FrameKind.RESPONSE, 5, {"generation": "g1"}, b"packed bytes"))
    for offset in range(len(data)):
        for bit in (0, 3, 7):
            flipped = bytearray(data)
            flipped[offset] ^= 1 << bit
            with pytest.raises(WireCorrupt):
                stream_of(bytes(flipped)).receive()


def test_a_login_banner_on_the_channel_is_named_not_parsed() -> None:
    data = b"Welcome to backup1! Last login: yesterday\n" + encode_frame(HELLO)
    with pytest.raises(WireCorrupt) as info:
        stream_of(data).receive()
    assert "b'Welcome to backu'" in str(info.value)


def test_malformed_bodies_are_refused() -> None:
    def framed(body: bytes) -> bytes:
        head = struct.pack(
            ">2sBBIIQ", MAGIC, FrameKind.HELLO, 0, 0, len(body), xxhash.xxh3_64_intdigest(body)
        )
        return head + struct.pack(">I", xxhash.xxh3_64_intdigest(head) & 0xFFFFFFFF) + body

    for body, words in [
        (b"", "has no meta"),
        (struct.pack(">I", 50) + b"{}", "overruns the body"),
        (struct.pack(">I", 3) + b"{x}", "not JSON"),
        (struct.pack(">I", 2) + b"[]", "not a JSON object"),
        (struct.pack(">I", 2000) + b"[" * 2000, "not JSON"),
    ]:
        with pytest.raises(WireCorrupt, match=words):
            stream_of(framed(body)).receive()


# --- the hello ----------------------------------------------------------------------------


def converse(
    client: Callable[[Channel], Any], target: Callable[[Channel], Any]
) -> tuple[object, object]:
    """Run both sides over two OS pipes, the target in a thread; returns what each
    returned or raised."""
    up_r, up_w = os.pipe()
    down_r, down_w = os.pipe()
    results: dict[str, object] = {}

    def side(name: str, fn: Callable[[Channel], Any], r: int, w: int) -> None:
        with open(r, "rb") as reader, open(w, "wb") as writer:
            try:
                results[name] = fn(Channel(reader, writer, peer=f"the {name}'s peer"))
            except BlockguardError as exc:
                results[name] = exc

    thread = threading.Thread(target=side, args=("target", target, up_r, down_w))
    thread.start()
    side("client", client, down_r, up_w)
    thread.join(scaled(30))
    assert not thread.is_alive()
    return results["client"], results["target"]


def test_both_sides_agree_on_the_highest_version_they_share() -> None:
    client, target = converse(lambda c: c.greet([1, 2, 5]), lambda t: t.answer_greeting([2, 3]))
    assert client == target == 2


@pytest.mark.parametrize(("client_speaks", "target_speaks"), [([1], [2]), ([2, 3], [1])])
def test_a_version_mismatch_names_both_versions_on_both_sides(
    client_speaks: list[int], target_speaks: list[int]
) -> None:
    client, target = converse(
        lambda c: c.greet(client_speaks), lambda t: t.answer_greeting(target_speaks)
    )
    mine, theirs = ", ".join(map(str, client_speaks)), ", ".join(map(str, target_speaks))
    assert isinstance(client, WireVersionMismatch)
    assert str(client) == (
        f"the client's peer speaks blockguard protocol version {theirs}, this side speaks "
        f"{mine}: install the same blockguard version on both hosts"
    )
    assert isinstance(target, WireVersionMismatch)
    assert f"version {mine}, this side speaks {theirs}:" in str(target)


def test_a_target_that_refuses_the_connection_is_named() -> None:
    refusal = Frame(FrameKind.ERROR, 0, error_meta(NotAuthorized(detail="unknown client c9")))
    channel, _ = channel_reading(refusal)
    with pytest.raises(NotAuthorized) as info:
        channel.greet()
    assert str(info.value) == "target t1: not authorized: unknown client c9"


def test_requests_wait_for_the_hello_and_a_hello_comes_first() -> None:
    channel, _ = channel_reading(Frame(FrameKind.RESPONSE, 1))
    with pytest.raises(ValueError, match="before the hello"):
        channel.request("list")
    with pytest.raises(WireCorrupt, match="a RESPONSE frame before hello"):
        channel.greet()


# --- requests and answers ------------------------------------------------------------------


def test_two_interleaved_requests_are_paired_by_id() -> None:
    channel, written = channel_reading(
        HELLO,
        Frame(FrameKind.RESPONSE, 2, {"stored": 2}, b"second"),
        Frame(FrameKind.ERROR, 1, error_meta(PoolSpaceLow(pool="p", free=1, needed=9))),
    )
    channel.greet()
    first = channel.request("put", {"pack": 0}, b"one")
    second = channel.request("put", {"pack": 1}, b"two")
    assert channel.response(second) == Frame(FrameKind.RESPONSE, 2, {"stored": 2}, b"second")
    with pytest.raises(PoolSpaceLow) as info:
        channel.response(first)
    assert str(info.value) == "target t1: pool p has 1 bytes free, 9 bytes needed"
    sent = frames_in(written.getvalue())
    assert [(f.kind, f.request_id, f.op, dict(f.args), f.payload) for f in sent[1:]] == [
        (FrameKind.REQUEST, 1, "put", {"pack": 0}, b"one"),
        (FrameKind.REQUEST, 2, "put", {"pack": 1}, b"two"),
    ]


@pytest.mark.parametrize("answered", [[1, 1], [7]])
def test_an_answer_to_no_outstanding_request_is_refused(answered: list[int]) -> None:
    replies = [Frame(FrameKind.RESPONSE, i) for i in answered]
    channel, _ = channel_reading(HELLO, *replies)
    channel.greet()
    first = channel.request("list")
    channel.request("list")
    if answered == [1, 1]:
        channel.response(first)
    with pytest.raises(WireCorrupt, match=f"an answer to request {answered[-1]}, which is not"):
        channel.response(2)


def test_a_replayed_or_reordered_request_is_refused_by_the_target() -> None:
    hello_and = [HELLO, Frame(FrameKind.REQUEST, 1, {"op": "list", "args": {}})]
    for again in (1, 0):
        channel, _ = channel_reading(*hello_and, Frame(FrameKind.REQUEST, again, {"op": "list"}))
        channel.answer_greeting()
        assert channel.next_request() is not None
        with pytest.raises(WireCorrupt, match=f"request {again} does not follow request 1"):
            channel.next_request()


def test_a_goodbye_ends_the_target_loop_and_fails_a_waiting_client() -> None:
    target, _ = channel_reading(HELLO, Frame(FrameKind.BYE))
    target.answer_greeting()
    assert target.next_request() is None
    client, _ = channel_reading(HELLO, Frame(FrameKind.BYE))
    client.greet()
    with pytest.raises(WireClosed, match="ended with request 1 unanswered"):
        client.call("list")


def test_a_peer_error_keeps_its_class_and_shows_only_printable_text() -> None:
    hostile = Frame(
        FrameKind.ERROR,
        1,
        {"name": "org.blockguard1.Error.Nope", "message": "\x1b[2J" + "x" * 5000},
    )
    error = peer_error(hostile, "target t1")
    assert type(error) is BlockguardError
    assert str(error).startswith("target t1: ?[2Jxxx")
    assert len(str(error)) < 1100
    with pytest.raises(WireCorrupt, match="without a name"):
        peer_error(Frame(FrameKind.ERROR, 1, {"name": 3}), "target t1")


# --- through a pipe to another process ------------------------------------------------------


class Peer:
    """wire_peer.py in a child process, its stdin and stdout two OS pipes of ours."""

    def __init__(self, *versions: int) -> None:
        to_child, self._to_child = os.pipe()
        self._from_child, from_child = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER), *map(str, versions)],
            stdin=to_child,
            stdout=from_child,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        os.close(to_child)
        os.close(from_child)
        self.reader = open(self._from_child, "rb")  # noqa: SIM115 - closed in close()
        self.writer = open(self._to_child, "wb")  # noqa: SIM115 - closed in close()
        self.channel = Channel(self.reader, self.writer, peer="target t1")

    def close(self) -> tuple[int, str]:
        self.writer.close()
        self.reader.close()
        try:
            _, err = self.proc.communicate(timeout=scaled(60))
        finally:
            self.proc.kill()
        return self.proc.returncode, err.decode()


def test_a_conversation_through_pipes_with_a_child_process() -> None:
    peer = Peer()
    try:
        channel = peer.channel
        assert channel.greet() == max(PROTOCOL_VERSIONS)
        # Small requests with large answers in flight at once (packs fetched for a
        # restore), collected newest first: earlier answers wait, paired, for their call.
        sizes = [0, 1, 65536, 3 << 20]
        ids = [channel.request("read", {"size": n, "byte": i}) for i, n in enumerate(sizes)]
        for i in reversed(range(len(sizes))):
            assert channel.response(ids[i]).payload == bytes([i]) * sizes[i]
        big = os.urandom(3 << 20)
        assert channel.call("reverse", {}, big).payload == big[::-1]
        echoed = channel.call("echo", {"generation": "g7", "pack": 3}, b"abc")
        assert (dict(echoed.meta), echoed.payload) == (
            {"echo": {"generation": "g7", "pack": 3}},
            b"abc",
        )
        with pytest.raises(PoolSpaceLow, match="target t1: pool remote has 0 bytes free, 4 bytes"):
            channel.call("fill", {}, b"data")
        channel.bye()
        assert channel.receive().kind is FrameKind.BYE
    finally:
        code, err = peer.close()
    assert (code, err) == (0, "")


def test_a_target_dying_mid_answer_is_a_truncated_frame_not_half_an_answer() -> None:
    peer = Peer()
    try:
        peer.channel.greet()
        with pytest.raises(WireTruncated, match="connection to target t1 ended in the middle"):
            peer.channel.call("die")
    finally:
        code, _ = peer.close()
    assert code == 9


def test_a_version_mismatch_with_a_child_process_names_both_versions() -> None:
    peer = Peer(7)
    ours = versions_text(PROTOCOL_VERSIONS)
    try:
        wanted = f"speaks blockguard protocol version 7, this side speaks {ours}"
        with pytest.raises(WireVersionMismatch, match=wanted):
            peer.channel.greet()
    finally:
        code, err = peer.close()
    assert code == 3
    assert f"client speaks blockguard protocol version {ours}, this side speaks 7" in err
