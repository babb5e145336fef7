"""A small real TCP proxy that cuts chosen HTTP requests in the middle (issue 12's
faults): put in front of the S3 gateway, it passes every byte both ways until it is
told to cut requests whose first line starts with a given prefix (``PUT /BUCKET/PREFIX/
data/`` for the packs of a backup); then, once ``passes`` of them have gone through,
every later one is forwarded for ``after`` bytes and its connection reset (RST to the
client and to the gateway), as a network or a load balancer dropping a connection in
the middle of an upload would. :meth:`CutProxy.heal` lets everything through again.

The client (the daemon, in another process) talks real HTTP over real sockets: nothing
in blockguard is patched. HTTP/1.1 sends one request at a time on a connection (no
pipelining by obstore's client), so a request line at the start of a request is found
by searching the client's bytes for the prefix; a body that holds it by chance (sealed
packs are random) would be cut too, which the tests' counts would show.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass

from tests.support.seaweed import HOST


@dataclass
class _Rule:
    prefix: bytes
    passes: int
    after: int


class CutProxy:
    """A proxy on 127.0.0.1 (a free port) to ``upstream`` (host, port).

    :ivar matched: requests seen that start with the rule's prefix.
    :ivar cut: how many of them were cut.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server((HOST, 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._rule: _Rule | None = None
        self._sockets: set[socket.socket] = set()
        self._closed = False
        self.matched = 0
        self.cut = 0
        self._thread = threading.Thread(target=self._accept, name="cutproxy", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def cut_requests(self, prefix: str, *, passes: int = 0, after: int = 1 << 20) -> None:
        """From now on, requests starting with ``prefix`` after the first ``passes`` are
        reset once ``after`` bytes of them (request line and headers included) went up."""
        with self._lock:
            self._rule = _Rule(prefix.encode(), passes, after)
            self.matched = self.cut = 0

    def heal(self) -> None:
        """Pass everything again."""
        with self._lock:
            self._rule = None

    def close(self) -> None:
        """Stop listening and reset every connection still open."""
        with self._lock:
            self._closed = True
            sockets = list(self._sockets)
        self._listener.close()
        for sock in sockets:
            _reset(sock)
        self._thread.join(10)

    def __enter__(self) -> CutProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._closed:
                    _reset(client)
                    _reset(server)
                    return
                self._sockets.update((client, server))
            threading.Thread(
                target=self._pump_up, args=(client, server), daemon=True, name="cutproxy-up"
            ).start()
            threading.Thread(
                target=self._pump_down, args=(server, client), daemon=True, name="cutproxy-down"
            ).start()

    def _pump_up(self, client: socket.socket, server: socket.socket) -> None:
        """Client to gateway: forward, watching for request lines to cut."""
        tail = b""  # the end of the previous read: a prefix may straddle two reads
        budget: int | None = None  # bytes still to forward before the reset
        try:
            while data := client.recv(256 * 1024):
                if budget is None:
                    budget = self._budget(tail, data)
                    tail = data[-256:]
                if budget is not None:
                    if len(data) >= budget:
                        server.sendall(data[:budget])
                        with self._lock:
                            self.cut += 1
                        break
                    budget -= len(data)
                server.sendall(data)
            else:
                server.shutdown(socket.SHUT_WR)  # the client is done: the gateway answers
                return
        except OSError:
            pass
        self._drop(client, server, reset=True)

    def _budget(self, tail: bytes, data: bytes) -> int | None:
        """Bytes of ``data`` to forward before a cut, or None when no request of it is
        to be cut."""
        with self._lock:
            rule = self._rule
            if rule is None:
                return None
            seen = tail + data
            at = seen.find(rule.prefix, max(0, len(tail) - len(rule.prefix) + 1))
            if at < 0:
                return None
            self.matched += 1
            if self.matched <= rule.passes:
                return None
            return at - len(tail) + rule.after

    def _pump_down(self, server: socket.socket, client: socket.socket) -> None:
        try:
            while data := server.recv(256 * 1024):
                client.sendall(data)
        except OSError:
            self._drop(client, server, reset=True)
        else:
            self._drop(client, server, reset=False)

    def _drop(self, client: socket.socket, server: socket.socket, *, reset: bool) -> None:
        with self._lock:
            self._sockets.difference_update((client, server))
        for sock in (client, server):
            if reset:
                _reset(sock)
            else:
                _close(sock)


def _close(sock: socket.socket) -> None:
    """Close after the gateway closed its side (the client sees an end of stream)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _reset(sock: socket.socket) -> None:
    """Close with an RST (linger 0), waking a thread blocked in recv on it first."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)
    sock.close()
