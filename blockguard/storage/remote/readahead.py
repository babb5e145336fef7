"""A byte stream read ahead by a thread: the target's serve receives the next pack while
it stores (writes and fsyncs) the one before.

The serve answers one request at a time, and a put returns only once its pack is durable.
While a pack is fsynced nothing read the link: the pipe from sshd, sshd's window and the
socket's buffer filled, and the line stood still for as long as the disk took beyond
what they hold (~0.3 s at 20 MiB/s; a shared disk takes longer now and then). Reading
ahead into a bounded buffer keeps the line busy through that. Nothing changes in what
is stored or answered, or when: a put is still answered after its pack is durable.
"""

from __future__ import annotations

import collections
import threading
from typing import Protocol

#: Bytes one read of the source asks for.
READ_BYTES = 1 << 20
#: Bytes held ahead by default: two 8 MiB packs (storage/remote/remotegen.py).
DEFAULT_LIMIT = 16 << 20


class _Source(Protocol):
    def read1(self, size: int, /) -> bytes: ...


class ReadAhead:
    """``read`` as of ``source``, with up to ``limit`` bytes read ahead by a thread.

    The end of ``source`` and an ``OSError`` of it reach the caller after every byte read
    before them, as they would without the thread. The thread is a daemon: a caller that
    stops reading leaves it blocked on the source until the process ends.

    :param source: a buffered binary stream (``read1`` returns what is there, up to a size).
    :param limit: bytes held ahead at most (a read may take it past by one ``READ_BYTES``).
    """

    def __init__(self, source: _Source, *, limit: int = DEFAULT_LIMIT, name: str = "") -> None:
        if limit < 1:
            raise ValueError(f"a read-ahead of {limit} bytes")
        self._source = source
        self._limit = limit
        self._chunks: collections.deque[bytes] = collections.deque()
        self._held = 0
        self._offset = 0
        self._ended = False
        self._error: OSError | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._fill, name=name or "read-ahead", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        while True:
            with self._cond:
                while self._held >= self._limit:
                    self._cond.wait()
            try:
                data = self._source.read1(READ_BYTES)
            except OSError as exc:
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            with self._cond:
                if not data:
                    self._ended = True
                else:
                    self._chunks.append(data)
                    self._held += len(data)
                self._cond.notify_all()
            if not data:
                return

    def read(self, size: int, /) -> bytes:
        """Up to ``size`` bytes (at least one), or ``b""`` at the end of the source.

        :raises OSError: the source's, once the bytes read before it are taken.
        """
        with self._cond:
            while not self._chunks and not self._ended and self._error is None:
                self._cond.wait()
            if not self._chunks:
                if self._error is not None:
                    raise self._error
                return b""
            # The head chunk is taken from an offset, not sliced: a reader asking for a
            # few bytes at a time would copy the rest of the chunk on every read.
            parts: list[bytes] = []
            wanted = size
            while wanted > 0 and self._chunks:
                head = self._chunks[0]
                rest = len(head) - self._offset
                if rest <= wanted:
                    parts.append(head[self._offset :] if self._offset else head)
                    self._chunks.popleft()
                    self._offset = 0
                    wanted -= rest
                else:
                    parts.append(head[self._offset : self._offset + wanted])
                    self._offset += wanted
                    wanted = 0
            got = parts[0] if len(parts) == 1 else b"".join(parts)
            self._held -= len(got)
            self._cond.notify_all()
            return got
