"""The frames of the remote protocol: checksummed and length-prefixed, over a byte stream.

A protected host and its backup target talk over one byte stream each way: the stdin and
stdout of ``ssh -T``, which runs ``blockguard serve`` on the target (see
docs/design/remote.md). Every message is one frame (integers big-endian)::

    magic     2  b"BG"
    kind      1  a FrameKind
    flags     1  0 (no flag is defined; a set one is refused)
    id        4  request id: a REQUEST's own, echoed by its RESPONSE or ERROR; 0 otherwise
    length    4  body length, at most the receiving channel's ``max_body``
    body_sum  8  xxh3_64 of the body
    head_sum  4  the low 32 bits of xxh3_64 of the 20 bytes before it
    body         u32 meta length, meta (a JSON object, UTF-8), payload (raw bytes)

The header has its own checksum so that a corrupt length is caught before a byte of the
body is read, and a length beyond ``max_body`` is refused before anything is allocated for
it: a hostile peer cannot make us allocate gigabytes. SSH authenticates and encrypts the
channel; the checksums catch what it cannot see: bytes on it that are not a frame of ours
(a login banner, a stray print on the target) and our own bugs. The header layout and the
HELLO exchange never change, so any two blockguard versions can at least tell each other
which protocol versions they speak.

This lives in storage, not core: it does blocking I/O on the pipes of a child process and
maps an ``OSError`` of the link to a named error once, here. The conversation (the hello,
requests paired with their answers) is :mod:`.channel`.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import xxhash

from blockguard.errors import WireClosed, WireCorrupt, WireFrameTooLarge, WireTruncated

MAGIC = b"BG"
_HEAD = struct.Struct(">2sBBIIQ")
_HEAD_SUM = struct.Struct(">I")
_META_LEN = struct.Struct(">I")
HEADER_SIZE = _HEAD.size + _HEAD_SUM.size
#: The largest body a stream takes unless told otherwise: one sealed pack of the largest
#: chunk size (16 MiB) with room for its compression and sealing overhead.
MAX_BODY = 32 << 20
MAX_REQUEST_ID = 0xFFFFFFFF


class FrameKind(enum.IntEnum):
    """What a frame is. REQUEST/RESPONSE/ERROR carry a request id; the others 0."""

    HELLO = 1
    REQUEST = 2
    RESPONSE = 3
    #: The answer to a request that failed; with id 0, the peer refuses the connection.
    ERROR = 4
    #: The sender ends the conversation in order (a clean end, not a cut link).
    BYE = 5


_KINDS = frozenset(FrameKind)


@dataclass(frozen=True)
class Frame:
    """One frame. ``meta`` must be JSON-encodable; ``payload`` is carried as it is."""

    kind: FrameKind
    request_id: int = 0
    meta: Mapping[str, Any] = field(default_factory=dict)
    payload: bytes = b""

    @property
    def op(self) -> str:
        """A REQUEST's operation."""
        return str(self.meta.get("op", ""))

    @property
    def args(self) -> Mapping[str, Any]:
        """A REQUEST's arguments."""
        args = self.meta.get("args", {})
        return args if isinstance(args, Mapping) else {}


class ByteReader(Protocol):
    """A blocking byte stream: ``read`` returns at least one byte, or ``b""`` at its end."""

    def read(self, size: int, /) -> bytes: ...


class ByteWriter(Protocol):
    """A blocking byte stream that is written to."""

    def write(self, data: memoryview, /) -> int | None: ...
    def flush(self) -> None: ...


def _head_sum(head: bytes) -> int:
    return xxhash.xxh3_64_intdigest(head) & 0xFFFFFFFF


def frame_parts(frame: Frame) -> tuple[bytes, bytes, bytes | memoryview]:
    """The header, meta part and payload of ``frame`` as sent (joined: the whole frame).
    The payload is the frame's own bytes (a view when they are not ``bytes``), not a copy:
    a put's pack is large."""
    kind = FrameKind(frame.kind)
    if not 0 <= frame.request_id <= MAX_REQUEST_ID:
        raise ValueError(f"request id {frame.request_id} does not fit the frame header")
    meta = json.dumps(dict(frame.meta), separators=(",", ":"), allow_nan=False).encode()
    meta_part = _META_LEN.pack(len(meta)) + meta
    body_sum = xxhash.xxh3_64()
    body_sum.update(meta_part)
    body_sum.update(frame.payload)
    length = len(meta_part) + len(frame.payload)
    if length > MAX_REQUEST_ID:
        raise ValueError(f"a frame body of {length} bytes does not fit the frame header")
    head = _HEAD.pack(MAGIC, kind, 0, frame.request_id, length, body_sum.intdigest())
    payload = frame.payload if type(frame.payload) is bytes else memoryview(frame.payload)
    return head + _HEAD_SUM.pack(_head_sum(head)), meta_part, payload


def encode_frame(frame: Frame) -> bytes:
    """``frame`` as bytes on the wire."""
    return b"".join(frame_parts(frame))


class FrameStream:
    """Whole frames over a pair of blocking byte streams.

    After any :class:`~blockguard.errors.WireError` the stream is out of step (or gone):
    close it; a new connection resumes what was cut.

    :param reader: what the peer writes (ssh's stdout; on the target, stdin).
    :param writer: what the peer reads.
    :param peer: how errors name the other side, e.g. ``"target backup1"``.
    :param max_body: the largest frame body taken; a larger one is refused unread.
    """

    def __init__(
        self,
        reader: ByteReader,
        writer: ByteWriter,
        *,
        peer: str = "peer",
        max_body: int = MAX_BODY,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.peer = peer
        self.max_body = max_body

    def send(self, frame: Frame) -> None:
        """Write one frame whole and flush it.

        :raises WireFrameTooLarge: its body exceeds ``max_body`` (the peer's limit too).
        :raises WireClosed: the stream is gone (ssh ended, the link was cut).
        """
        parts = frame_parts(frame)
        length = len(parts[1]) + len(parts[2])
        if length > self.max_body:
            raise WireFrameTooLarge(peer=self.peer, length=length, limit=self.max_body)
        try:
            for part in parts:
                view = memoryview(part)
                while view:
                    written = self._writer.write(view)
                    if written is None:
                        raise ValueError("the channel's writer must be a blocking stream")
                    view = view[written:]
            self._writer.flush()
        except OSError as exc:
            raise WireClosed(peer=self.peer, where=f"while sending ({_reason(exc)})") from exc

    def receive(self) -> Frame:
        """Read one whole frame; never a part of one.

        :raises WireClosed: the stream ended between frames.
        :raises WireTruncated: the stream ended inside a frame.
        :raises WireFrameTooLarge: the header announces more than ``max_body`` (unread).
        :raises WireCorrupt: a checksum does not match or the frame is malformed.
        """
        head = self._read_exact(HEADER_SIZE, "header", started=False)
        magic, kind, flags, request_id, length, body_sum = _HEAD.unpack_from(head)
        if magic != MAGIC:
            raise WireCorrupt(peer=self.peer, detail=f"it starts with {head[:16]!r}, not {MAGIC!r}")
        if _HEAD_SUM.unpack_from(head, _HEAD.size)[0] != _head_sum(head[: _HEAD.size]):
            raise WireCorrupt(peer=self.peer, detail="the header checksum does not match")
        if flags:
            raise WireCorrupt(peer=self.peer, detail=f"unknown flags {flags:#04x}")
        if kind not in _KINDS:
            raise WireCorrupt(peer=self.peer, detail=f"unknown frame kind {kind}")
        if length > self.max_body:
            raise WireFrameTooLarge(peer=self.peer, length=length, limit=self.max_body)
        if length < _META_LEN.size:
            raise WireCorrupt(peer=self.peer, detail=f"a body of {length} bytes has no meta")
        body = self._read_exact(length, "body", started=True)
        if xxhash.xxh3_64_intdigest(body) != body_sum:
            raise WireCorrupt(peer=self.peer, detail="the body checksum does not match")
        meta, payload = self._split(body)
        return Frame(FrameKind(kind), request_id, meta, payload)

    def _split(self, body: bytes) -> tuple[dict[str, Any], bytes]:
        (size,) = _META_LEN.unpack_from(body)
        end = _META_LEN.size + size
        if end > len(body):
            raise WireCorrupt(peer=self.peer, detail=f"its meta of {size} bytes overruns the body")
        try:
            meta = json.loads(body[_META_LEN.size : end])
        except (ValueError, RecursionError) as exc:
            # A hostile peer's text: name the problem, not the text.
            raise WireCorrupt(peer=self.peer, detail=f"its meta is not JSON ({exc})") from None
        if not isinstance(meta, dict):
            raise WireCorrupt(peer=self.peer, detail="its meta is not a JSON object")
        return meta, body[end:]

    def _read_exact(self, wanted: int, part: str, *, started: bool) -> bytes:
        got = bytearray()
        while len(got) < wanted:
            try:
                more = self._reader.read(wanted - len(got))
            except OSError as exc:
                raise WireClosed(peer=self.peer, where=f"while reading ({_reason(exc)})") from exc
            if not more:
                if not got and not started:
                    raise WireClosed(peer=self.peer, where="between frames")
                raise WireTruncated(peer=self.peer, got=len(got), wanted=wanted, part=part)
            got += more
        return bytes(got)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__
