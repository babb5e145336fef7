"""A generation's image, read at any offset: what a browse mount serves over FUSE.

The chunks come from the chain exactly as a restore takes them (:func:`plan_chunks`: each
from the newest generation that holds it) and are read and checked by the restore's own
path (:func:`gathered_items` and :func:`copy_chunks`): a chunk whose data does not match
its stored checksum fails the read with :class:`ChecksumMismatch`, naming it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence

from pyroaring import BitMap

from blockguard.errors import ChecksumMismatch
from blockguard.storage.copyengine import copy_chunks
from blockguard.storage.manifest import Manifest
from blockguard.storage.pool.base import PoolBackend
from blockguard.storage.restore import gathered_items, plan_chunks

#: The unit of reading the image: what one copy of chunks reads.
WINDOW_BYTES = 4 << 20


class GenerationImage:
    """The content of one generation of ``volume``, read-only, at byte offsets.

    Holds its chain's readers open until :meth:`close`.

    :raises NotFound: no such generation.
    :raises CorruptMetadata: a link of its chain is missing or damaged.
    """

    def __init__(
        self,
        pool: PoolBackend,
        volume: str,
        generation_id: str,
        chain: Sequence[Manifest] | None = None,
    ) -> None:
        """:param chain: ``pool.chain(volume, generation_id)`` when the caller has it
        already (to hold it before it is opened)."""
        if chain is None:
            chain = pool.chain(volume, generation_id)
        self.chain = tuple(m.generation_id for m in chain)
        self.size = chain[0].volume.size
        self.chunk_size = chain[0].chunk_size
        self._plan = plan_chunks(chain)
        self._stack = contextlib.ExitStack()
        try:
            self._readers = [
                self._stack.enter_context(pool.open_generation(g)) for g, _ in self._plan
            ]
        except BaseException:
            self._stack.close()
            raise
        self._lock = threading.Lock()
        # Reads go through fixed, aligned windows of whole chunks: the kernel reads the
        # file in pieces of 128 KiB to 1 MiB, mostly in order, and each miss starts a copy
        # engine (a thread and its buffers); one window serves many reads in a row.
        self.window = max(self.chunk_size, WINDOW_BYTES // self.chunk_size * self.chunk_size)
        # The last window(s) read: ``(offset, data)``.
        self._cached: tuple[int, bytes] | None = None

    def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` (fewer at the end of the image).

        :raises ChecksumMismatch: a chunk of the range is damaged (names it and its
            generation).
        """
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        cs, window = self.chunk_size, self.window
        with self._lock:
            cached = self._cached
            if cached is not None:
                start, data = cached
                if start <= offset and end <= start + len(data):
                    return data[offset - start : end - start]
            # The window(s) the range falls in: two when it straddles a boundary.
            start = offset // window * window
            stop = min(((end - 1) // window + 1) * window, self.size)
            try:
                data = self._read_chunks(start // cs, (stop + cs - 1) // cs)
            except ChecksumMismatch:
                # A damaged chunk fails only the reads that need it: read just this
                # range's chunks (which raises if it is one of them), uncached.
                start = offset // cs * cs
                data = self._read_chunks(offset // cs, (end + cs - 1) // cs)
                return data[offset - start : end - start]
            self._cached = (start, data)
        return data[offset - start : end - start]

    def _read_chunks(self, first: int, last: int) -> bytes:
        cs = self.chunk_size
        window = BitMap(range(first, last))
        buf = bytearray(min(last * cs, self.size) - first * cs)
        # Sized to the window: a default extent would allocate buffers of 8 MiB for it.
        extent = (last - first) * cs

        def sink(chunk: int, view: memoryview, _digests: object) -> None:
            at = (chunk - first) * cs
            buf[at : at + len(view)] = view

        copy_chunks(
            gathered_items(self._readers, [own & window for _, own in self._plan], extent),
            sink,
            chunk_size=cs,
            volume_size=self.size,
            extent_bytes=extent,
            readers=1,
        )
        return bytes(buf)

    def close(self) -> None:
        """Release the chain's readers."""
        self._stack.close()
