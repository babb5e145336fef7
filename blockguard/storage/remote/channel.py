"""The conversation over the frames of :mod:`.wire`: the hello, then requests paired
with their answers.

The hello comes first: the client offers the protocol versions it speaks, the target
answers with its own, and both use the highest they share. When they share none, the
target still answers before it gives up, so both sides' errors name both versions.

Then the client sends requests, each with the next id (1, 2, ...), and may keep up to
``max_outstanding`` of them in flight (packs in flight fill a long link); the target
answers each with a RESPONSE or an ERROR carrying the same id, in any order. An answer to
a request that is not outstanding (never sent, or answered already: a replayed frame) is
refused, and so is a request whose id does not follow the last one. ERROR frames carry a
named error across (its D-Bus name and message): a full disk on the target is a
:class:`~blockguard.errors.PoolSpaceLow` on the protected host too. An ERROR with id 0
refuses the whole connection (an unknown client, say).

A channel has one owner thread (a job's worker; no asyncio). With one thread, requests in
flight must be small one way: large requests with small answers (packs stored) or small
requests with large answers (packs fetched). Large both ways would fill both pipes and
leave each side blocked writing to the other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any

from blockguard.errors import (
    BlockguardError,
    WireClosed,
    WireCorrupt,
    WireVersionMismatch,
    all_error_classes,
)
from blockguard.storage.remote.wire import (
    MAX_BODY,
    MAX_REQUEST_ID,
    ByteReader,
    ByteWriter,
    Frame,
    FrameKind,
    FrameStream,
)

#: The protocol versions this blockguard speaks; two sides use the highest they share.
#: 2 adds ``areas`` and ``link``: a client that agreed on 1 does not ask them (the target
#: predates them).
PROTOCOL_VERSIONS: tuple[int, ...] = (1, 2)
#: The first version with the ``areas`` operation.
AREAS_VERSION = 2
#: The first version with the ``link`` operation (synthesized fulls).
LINK_VERSION = 2
#: Requests a client may have outstanding: bounds the answers held back for pairing.
MAX_OUTSTANDING = 8
#: How much of a peer's error message is shown: it is text from another host.
MAX_MESSAGE = 1000


def versions_text(versions: Iterable[int]) -> str:
    """e.g. ``"1"`` or ``"1, 2"`` (for the mismatch message)."""
    return ", ".join(str(v) for v in sorted(set(versions))) or "none"


_BY_DBUS_NAME = {cls.dbus_name: cls for cls in all_error_classes()}


def error_meta(error: BlockguardError) -> dict[str, Any]:
    """The meta of an ERROR frame reporting ``error`` to the peer."""
    return {"name": error.dbus_name, "message": error.message}


def peer_error(frame: Frame, peer: str) -> BlockguardError:
    """The named error an ERROR frame reports, its message prefixed with the peer.

    The class is found by its D-Bus name, so a full disk on the target is a
    :class:`~blockguard.errors.PoolSpaceLow` here too; a name this side does not know
    (a newer peer) becomes the base class.
    """
    name, message = frame.meta.get("name"), frame.meta.get("message")
    if not isinstance(name, str) or not isinstance(message, str):
        raise WireCorrupt(peer=peer, detail="an error frame without a name and a message")
    shown = "".join(c if c.isprintable() else "?" for c in message[:MAX_MESSAGE])
    cls = _BY_DBUS_NAME.get(name, BlockguardError)
    # The classes' own __init__ take different fields; the peer sent the finished
    # message, so the instance gets a plain template (as PoolSpaceLow shadows its own).
    error = cls.__new__(cls)
    error.template = "{detail}"
    BlockguardError.__init__(error, detail=f"{peer}: {shown}")
    return error


class Channel(FrameStream):
    """A :class:`~.wire.FrameStream` with the hello and the request/answer pairing.

    :param max_outstanding: requests a client may have in flight at once.
    """

    def __init__(
        self,
        reader: ByteReader,
        writer: ByteWriter,
        *,
        peer: str = "peer",
        max_body: int = MAX_BODY,
        max_outstanding: int = MAX_OUTSTANDING,
    ) -> None:
        super().__init__(reader, writer, peer=peer, max_body=max_body)
        self.max_outstanding = max_outstanding
        #: The agreed protocol version (None before the hello).
        self.version: int | None = None
        self._last_sent = 0
        self._last_received = 0
        self._outstanding: set[int] = set()
        self._answered: dict[int, Frame] = {}

    # --- the hello ------------------------------------------------------------------

    def greet(self, versions: Iterable[int] = PROTOCOL_VERSIONS) -> int:
        """The client's hello: offer ``versions``, agree with the target's answer.

        :returns: the agreed version (the highest both speak).
        :raises WireVersionMismatch: none in common (naming both sides' versions).
        """
        ours = sorted(set(versions))
        self.send(Frame(FrameKind.HELLO, 0, {"protocol": ours}))
        return self._agree(ours, self._expect_hello())

    def answer_greeting(self, versions: Iterable[int] = PROTOCOL_VERSIONS) -> int:
        """The target's hello: read the client's offer, answer with ``versions``.

        The answer is sent even when nothing matches, so that the client's error names
        both sides' versions as well.

        :raises WireVersionMismatch: none in common.
        """
        ours = sorted(set(versions))
        theirs = self._expect_hello()
        self.send(Frame(FrameKind.HELLO, 0, {"protocol": ours}))
        return self._agree(ours, theirs)

    def _expect_hello(self) -> list[int]:
        frame = self.receive()
        if frame.kind is FrameKind.ERROR and frame.request_id == 0:
            raise peer_error(frame, self.peer)
        if frame.kind is not FrameKind.HELLO:
            raise WireCorrupt(peer=self.peer, detail=f"a {frame.kind.name} frame before hello")
        offered = frame.meta.get("protocol")
        if (
            not isinstance(offered, list)
            or not offered
            or not all(type(v) is int and v > 0 for v in offered)
        ):
            raise WireCorrupt(peer=self.peer, detail=f"its hello offers no version: {offered!r}")
        return offered

    def _agree(self, ours: list[int], theirs: list[int]) -> int:
        common = set(ours) & set(theirs)
        if not common:
            raise WireVersionMismatch(
                peer=self.peer, theirs=versions_text(theirs), ours=versions_text(ours)
            )
        self.version = max(common)
        return self.version

    # --- the client's side ------------------------------------------------------------

    def request(self, op: str, args: Mapping[str, Any] | None = None, payload: bytes = b"") -> int:
        """Send a request; collect its answer with :meth:`response`. Returns its id."""
        if self.version is None:
            raise ValueError("a request before the hello")
        if len(self._outstanding) >= self.max_outstanding:
            raise ValueError(f"more than {self.max_outstanding} requests outstanding")
        if self._last_sent >= MAX_REQUEST_ID:
            raise ValueError("request ids are used up: open a new channel")
        request_id = self._last_sent + 1
        self.send(
            Frame(FrameKind.REQUEST, request_id, {"op": op, "args": dict(args or {})}, payload)
        )
        self._last_sent = request_id
        self._outstanding.add(request_id)
        return request_id

    def response(self, request_id: int) -> Frame:
        """The answer to request ``request_id``; answers to others read on the way are
        kept for their own call.

        :raises BlockguardError: the peer's error for this request (see :func:`peer_error`).
        :raises WireCorrupt: an answer to a request that is not outstanding (never sent,
            or answered already: a replayed frame).
        """
        if request_id not in self._outstanding and request_id not in self._answered:
            raise ValueError(f"request {request_id} is not outstanding")
        while request_id not in self._answered:
            frame = self.receive()
            if frame.kind is FrameKind.BYE:
                raise WireClosed(peer=self.peer, where=f"with request {request_id} unanswered")
            if frame.kind is FrameKind.ERROR and frame.request_id == 0:
                raise peer_error(frame, self.peer)
            if frame.kind not in (FrameKind.RESPONSE, FrameKind.ERROR):
                raise WireCorrupt(
                    peer=self.peer, detail=f"a {frame.kind.name} frame, not an answer"
                )
            if frame.request_id not in self._outstanding:
                raise WireCorrupt(
                    peer=self.peer,
                    detail=f"an answer to request {frame.request_id}, which is not outstanding",
                )
            self._outstanding.discard(frame.request_id)
            self._answered[frame.request_id] = frame
        frame = self._answered.pop(request_id)
        if frame.kind is FrameKind.ERROR:
            raise peer_error(frame, self.peer)
        return frame

    def call(self, op: str, args: Mapping[str, Any] | None = None, payload: bytes = b"") -> Frame:
        """:meth:`request` and wait for its :meth:`response`."""
        return self.response(self.request(op, args, payload))

    # --- the target's side ------------------------------------------------------------

    def next_request(self) -> Frame | None:
        """The next request, or None when the client said goodbye.

        :raises WireCorrupt: not a request, or its id does not follow the last one (a
            replayed or reordered request).
        """
        frame = self.receive()
        if frame.kind is FrameKind.BYE:
            return None
        if frame.kind is not FrameKind.REQUEST:
            raise WireCorrupt(peer=self.peer, detail=f"a {frame.kind.name} frame, not a request")
        if frame.request_id <= self._last_received:
            raise WireCorrupt(
                peer=self.peer,
                detail=f"request {frame.request_id} does not follow request {self._last_received}",
            )
        if not isinstance(frame.meta.get("op"), str) or not isinstance(
            frame.meta.get("args", {}), dict
        ):
            raise WireCorrupt(peer=self.peer, detail="a request without an op and its args")
        self._last_received = frame.request_id
        return frame

    def reply(
        self, request: Frame, result: Mapping[str, Any] | None = None, payload: bytes = b""
    ) -> None:
        """Answer ``request``."""
        self.send(Frame(FrameKind.RESPONSE, request.request_id, dict(result or {}), payload))

    def refuse(self, request: Frame | None, error: BlockguardError) -> None:
        """Answer ``request`` with ``error`` (None: refuse the whole connection)."""
        request_id = 0 if request is None else request.request_id
        self.send(Frame(FrameKind.ERROR, request_id, error_meta(error)))

    # --- either side --------------------------------------------------------------------

    def bye(self) -> None:
        """End the conversation in order (a peer that is gone already is no error here)."""
        with contextlib.suppress(WireClosed):
            self.send(Frame(FrameKind.BYE))
