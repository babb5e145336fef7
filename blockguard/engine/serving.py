"""The target's side of a conversation: one client's requests answered from its pack store.

A protected host's ssh runs the target's serve command; its stdin and stdout are a
:class:`~blockguard.storage.remote.channel.Channel`. After the hello, every request is
answered (RESPONSE) or refused with a named error (ERROR) until the client says BYE or
the link ends. The client id is fixed when the conversation starts (by the forced command
of the client's key, i.e. by sshd's check of that key): no operation takes a client id or
a path, so a client reaches its own :class:`~blockguard.storage.remote.packstore.PackStore`
and nothing else.

Operations (args; payload in -> result; payload out):

============  ======================================  ===========================================
begin         generation, meta={}, needed=0           state of the generation (resume: its packs)
status        generation                              state
put           generation, pack; the pack's bytes      pack, size
commit        generation, index; the sealed manifest  state
list          -                                       generations (manifest_size each); manifests
get           generation, pack                        pack, size; the pack's bytes
remove        generation                              -
mark-damaged  generation, reason, chunk=None          - (``list`` shows it as the problem)
space         -                                       free, total, used
probe         down=0; any bytes (discarded)           received; ``down`` bytes
link          generation, source, packs=[[from, to]]  packs (index entries of the packs made)
areas         - (protocol 2)                          areas: name, total, free, speeds, disk type
============  ======================================  ===========================================

``link`` makes packs of an open generation from packs of a committed one of the same
client and volume (a synthesized full, :meth:`PackStore.link`).

A state is ``{"generation", "committed", "meta", "packs": [[number, size], ...]}``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from blockguard.errors import (
    BlockguardError,
    InternalError,
    InvalidInput,
    NotAuthorized,
    NotFound,
)
from blockguard.storage.remote.areaprobe import AreaReport
from blockguard.storage.remote.channel import (
    AREAS_VERSION,
    LINK_VERSION,
    PROTOCOL_VERSIONS,
    Channel,
)
from blockguard.storage.remote.packstore import PackStore
from blockguard.storage.remote.packvalues import GenerationState
from blockguard.storage.remote.wire import Frame

log = logging.getLogger(__name__)

#: Room left in a frame for the meta of a ``get`` or ``probe`` answer.
_META_ROOM = 64 << 10
_MISSING = object()

Result = tuple[Mapping[str, Any], bytes]
#: The target's areas for this client, with their speeds (measured or cached on call).
AreasSource = Callable[[], list[AreaReport]]


def _args(request: Frame, **spec: tuple[type, Any]) -> dict[str, Any]:
    """The request's args by ``name=(type, default)`` (default :data:`_MISSING`: required).

    :raises InvalidInput: an unknown, missing or mistyped argument, named.
    """
    given = dict(request.args)
    unknown = sorted(set(given) - set(spec))
    if unknown:
        raise InvalidInput(detail=f"{request.op}: unknown arguments {unknown}")
    found = {}
    for name, (kind, default) in spec.items():
        if name not in given:
            if default is _MISSING:
                raise InvalidInput(detail=f"{request.op}: argument {name!r} is missing")
            found[name] = default
            continue
        value = given[name]
        # bool is an int to Python, not to the protocol.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise InvalidInput(detail=f"{request.op}: argument {name!r} must be {kind.__name__}")
        found[name] = value
    return found


def state_meta(state: GenerationState) -> dict[str, Any]:
    """A generation's state as a RESPONSE carries it."""
    return {
        "generation": state.generation,
        "committed": state.committed,
        "meta": state.meta,
        "packs": [[number, size] for number, size in state.packs.items()],
    }


class Serving:
    """Answers the requests of one conversation from ``store`` (see the module table).

    :param channel: the conversation; the hello is :meth:`run`'s first step.
    :param store: the client's store; closed when the conversation ends.
    :param areas: the target's areas (``areas``); ``None``: refused as not served here.
    """

    def __init__(
        self, channel: Channel, store: PackStore, areas: AreasSource | None = None
    ) -> None:
        self.channel = channel
        self.store = store
        self.areas = areas
        self._ops: dict[str, Callable[[Frame], Result]] = {
            "begin": self._begin,
            "status": self._status,
            "put": self._put,
            "commit": self._commit,
            "list": self._list,
            "get": self._get,
            "remove": self._remove,
            "space": self._space,
            "mark-damaged": self._mark_damaged,
            "probe": self._probe,
            "link": self._link,
            "areas": self._areas,
        }

    def run(self) -> None:
        """Hello, then answer every request until the client's BYE.

        :raises WireError: the link broke or the client spoke out of turn (the stream is
            out of step: the conversation ends; what was stored stays for a resume).
        :raises WireVersionMismatch: no protocol version in common (the client was told).
        """
        try:
            self.channel.answer_greeting(PROTOCOL_VERSIONS)
            while (request := self.channel.next_request()) is not None:
                self._answer(request)
            self.channel.bye()
        finally:
            self.store.close()

    def _answer(self, request: Frame) -> None:
        handler = self._ops.get(request.op)
        try:
            if handler is None:
                raise InvalidInput(detail=f"unknown operation {request.op!r:.80}")
            result, payload = handler(request)
        except BlockguardError as exc:
            log.info("client %s: %s refused: %s", self.store.client, request.op, exc)
            self.channel.refuse(request, exc)
        except Exception as exc:
            # Never a traceback to the client; the log has it.
            log.exception("client %s: %s failed", self.store.client, request.op)
            self.channel.refuse(
                request, InternalError(detail=f"{type(exc).__name__} in {request.op}")
            )
        else:
            self.channel.reply(request, result, payload)

    # --- the operations ---------------------------------------------------------------

    def _begin(self, request: Frame) -> Result:
        a = _args(request, generation=(str, _MISSING), meta=(dict, {}), needed=(int, 0))
        return state_meta(self.store.begin(a["generation"], a["meta"], a["needed"])), b""

    def _status(self, request: Frame) -> Result:
        a = _args(request, generation=(str, _MISSING))
        return state_meta(self.store.status(a["generation"])), b""

    def _put(self, request: Frame) -> Result:
        a = _args(request, generation=(str, _MISSING), pack=(int, _MISSING))
        self.store.put(a["generation"], a["pack"], request.payload)
        return {"pack": a["pack"], "size": len(request.payload)}, b""

    def _commit(self, request: Frame) -> Result:
        a = _args(request, generation=(str, _MISSING), index=(dict, _MISSING))
        return state_meta(self.store.commit(a["generation"], a["index"], request.payload)), b""

    def _list(self, request: Frame) -> Result:
        _args(request)
        found = self.store.list()
        entries = []
        for gen in found:
            entry = asdict(gen)
            entry["manifest_size"] = len(entry.pop("manifest"))
            entries.append(entry)
        manifests = b"".join(gen.manifest for gen in found)
        if len(manifests) + _META_ROOM > self.channel.max_body:
            raise InvalidInput(detail="the list of generations no longer fits one frame")
        return {"generations": entries}, manifests

    def _get(self, request: Frame) -> Result:
        a = _args(request, generation=(str, _MISSING), pack=(int, _MISSING))
        data = self.store.get(a["generation"], a["pack"])
        return {"pack": a["pack"], "size": len(data)}, data

    def _remove(self, request: Frame) -> Result:
        a = _args(request, generation=(str, _MISSING))
        self.store.remove(a["generation"])
        return {}, b""

    def _mark_damaged(self, request: Frame) -> Result:
        a = _args(request, generation=(str, _MISSING), reason=(str, _MISSING), chunk=(int, None))
        self.store.mark_damaged(a["generation"], a["reason"], a["chunk"])
        return {}, b""

    def _space(self, request: Frame) -> Result:
        _args(request)
        return asdict(self.store.space()), b""

    def _probe(self, request: Frame) -> Result:
        a = _args(request, down=(int, 0))
        limit = self.channel.max_body - _META_ROOM
        if not 0 <= a["down"] <= limit:
            raise InvalidInput(detail=f"probe: down must be 0-{limit} bytes")
        # Random bytes: a link that compresses must not look faster than it is.
        return {"received": len(request.payload)}, os.urandom(a["down"])

    # --- synthesized fulls (issue 11: unchanged data never crosses the link again) ------

    def _link(self, request: Frame) -> Result:
        if (self.channel.version or 0) < LINK_VERSION:
            raise InvalidInput(detail=f"link needs protocol version {LINK_VERSION}")
        a = _args(
            request, generation=(str, _MISSING), source=(str, _MISSING), packs=(list, _MISSING)
        )
        pairs = []
        for pair in a["packs"]:
            if (
                not isinstance(pair, list)
                or len(pair) != 2
                or not all(type(n) is int and n >= 0 for n in pair)
            ):
                raise InvalidInput(detail=f"link: {pair!r:.80} is not a [from, to] pair of packs")
            pairs.append((pair[0], pair[1]))
        if len({to for _, to in pairs}) != len(pairs):
            raise InvalidInput(detail="link: a pack is made twice")
        return {"packs": self.store.link(a["generation"], a["source"], pairs)}, b""

    def _areas(self, request: Frame) -> Result:
        # A client that agreed on version 1 does not know the answer's shape.
        if (self.channel.version or 0) < AREAS_VERSION:
            raise InvalidInput(detail=f"areas needs protocol version {AREAS_VERSION}")
        _args(request)
        if self.areas is None:
            raise InvalidInput(detail="this target reports no areas")
        return {"areas": [a.as_dict() for a in self.areas()]}, b""


def serve_client(
    channel: Channel, area: Path, client: str, areas: AreasSource | None = None
) -> None:
    """Serve one conversation of ``client`` on ``area``.

    A client without a root on the area is refused at the hello (an ERROR with id 0,
    :class:`~blockguard.errors.NotAuthorized`), so its ssh key may exist but reaches
    nothing until the target's administrator creates its root.

    :raises NotAuthorized: after telling the client so.
    :raises WireError: see :meth:`Serving.run`.
    """
    try:
        store = PackStore.open(area, client)
    except (NotFound, InvalidInput) as exc:
        refusal = NotAuthorized(detail=f"client {client!r:.80} is not served by this target")
        channel.receive()  # the client's hello: it speaks first
        channel.refuse(None, refusal)
        raise refusal from exc
    Serving(channel, store, areas).run()
