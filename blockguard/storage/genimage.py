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

from blockguard.storage.copyengine import DEFAULT_EXTENT_BYTES, copy_chunks
from blockguard.storage.manifest import Manifest
from blockguard.storage.pool.base import PoolBackend
from blockguard.storage.restore import gathered_items, plan_chunks


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
        # The last window read: the kernel reads a file in pieces smaller than a chunk.
        self._cached: tuple[int, bytes] | None = None

    def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` (fewer at the end of the image).

        :raises ChecksumMismatch: a chunk of the range is damaged (names it and its
            generation).
        """
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        cs = self.chunk_size
        first, last = offset // cs, (end + cs - 1) // cs
        with self._lock:
            cached = self._cached
            if cached is not None:
                start, data = cached
                if start <= offset and end <= start + len(data):
                    return data[offset - start : end - start]
            data = self._read_chunks(first, last)
            self._cached = (first * cs, data)
        return data[offset - first * cs : end - first * cs]

    def _read_chunks(self, first: int, last: int) -> bytes:
        cs = self.chunk_size
        window = BitMap(range(first, last))
        buf = bytearray(min(last * cs, self.size) - first * cs)
        extent = max(DEFAULT_EXTENT_BYTES, (last - first) * cs)

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
