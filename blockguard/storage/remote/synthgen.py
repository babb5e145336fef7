"""A full synthesized on the target: the packs no change touched are made there from
the previous full's (the ``link`` operation: hard links), only the others cross the link
(issue 11, docs/design/remote.md "Synthesized full").

The unit of reuse is a data pack (8 MiB of chunks): a pack of the new full holds the same
chunks as the previous full's pack of the same number, so a pack none of whose chunks
changed is that pack, sealed when it was first sent. Its AAD and key name the generation
that sealed it (the manifest's ``origins``), so it opens with no re-sealing. A pack with a
changed chunk is sealed anew under the new full's id, from every chunk it holds: the
caller writes them (:meth:`SynthesizedFullWriter.clone_reads` asks for them), and one it
did not write, which did not change, is read from the previous full on the target.
"""

from __future__ import annotations

import array
import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from pyroaring import BitMap

from blockguard.errors import InvalidInput
from blockguard.storage.copyengine import extents
from blockguard.storage.manifest import Manifest
from blockguard.storage.pool.base import GenerationReader
from blockguard.storage.remote.packvalues import GenerationState
from blockguard.storage.remote.remotegen import (
    PackLayout,
    RemoteGenerationWriter,
    SessionCall,
)


def pack_origins(previous: Manifest, volume_id: str, changed: BitMap) -> dict[int, str]:
    """The data packs a full synthesized from ``previous`` takes from it unchanged, each
    with the generation that sealed it (the previous full's own origin for a pack it
    took itself: the pack is the same file)."""
    layout = PackLayout.of(previous, volume_id)
    per = layout.pack_chunks
    touched = {chunk // per for chunk in changed}
    return {
        pack: layout.origins.get(pack, previous.generation_id)
        for pack in range(layout.data_packs)
        if pack not in touched
    }


def can_synthesize_from(previous: Manifest, volume_id: str, chunk_size: int, size: int) -> bool:
    """True when a new full of ``chunk_size`` and volume ``size`` lines up with the packs
    of ``previous`` (a full of the same chunks cut into packs of the same size)."""
    return (
        previous.is_full
        and previous.chunk_size == chunk_size
        and previous.volume.size == size
        and PackLayout.of(previous, volume_id).pack_chunks == PackLayout.new_pack_chunks(chunk_size)
    )


class SynthesizedFullWriter(RemoteGenerationWriter):
    """Writes the packs of a synthesized full that some change touched; the others were
    linked on the target before the first chunk (``linked``: their index entries).

    Chunks come in increasing order, only of packs not linked: the changed ones at
    least, best every chunk of :meth:`clone_reads`.

    :param previous: the full it is synthesized from (``cloned_from``).
    :param changed: the chunks changed since ``previous`` (each must be written).
    :param linked: pack -> index entry of each pack the target linked.
    :param open_previous: opens ``previous`` for a chunk the caller did not write.
    """

    def __init__(
        self,
        draft: Manifest,
        *,
        previous: Manifest,
        changed: BitMap,
        linked: Mapping[int, Mapping[str, Any]],
        open_previous: Callable[[], GenerationReader],
        volume_id: str,
        pack_key: bytes,
        call: SessionCall,
        seal_manifest: Callable[[Manifest], bytes],
        stored: GenerationState,
        finished: Callable[[bool, Manifest | None], None],
    ) -> None:
        super().__init__(
            draft,
            volume_id=volume_id,
            pack_key=pack_key,
            call=call,
            seal_manifest=seal_manifest,
            stored=stored,
            finished=finished,
        )
        self.cloned_from = previous
        self.layout = PackLayout.of(draft, volume_id)
        if set(linked) != set(self.layout.origins):
            raise InvalidInput(
                detail=f"generation {draft.generation_id}: the target linked packs "
                f"{sorted(linked)}, not the {len(self.layout.origins)} asked for"
            )
        for number, entry in linked.items():
            self._index[number] = dict(entry)
        self._changed = changed
        self._open_previous = open_previous
        self._previous: GenerationReader | None = None
        self._current: int | None = None
        self._have = BitMap()
        self._after = 0  # the next chunk may not come before this one
        self._sent: set[int] = set()

    def clone_reads(self, changed: BitMap) -> BitMap:
        """Every chunk of the packs not linked: the pack is sealed whole, and reading an
        unchanged chunk here is cheaper than fetching it over the link."""
        wanted = BitMap()
        for first, end in self._pack_ranges():
            wanted.add_range(first, end)
        return wanted

    def _pack_ranges(self) -> Iterator[tuple[int, int]]:
        per, chunks = self.layout.pack_chunks, self.draft.chunks
        for pack in range(self.layout.data_packs):
            if pack not in self.layout.origins:
                yield pack * per, min((pack + 1) * per, chunks)

    def write_chunks(self, first: int, view: memoryview, digests: Sequence[int]) -> None:
        if first < self._after:
            raise InvalidInput(
                detail=f"generation {self.generation_id}: chunk {first} came after chunk "
                f"{self._after - 1}"
            )
        cs, per = self.draft.chunk_size, self.layout.pack_chunks
        chunk, off, count = first, 0, len(digests)
        while count:
            pack = chunk // per
            if pack in self.layout.origins:
                raise InvalidInput(
                    detail=f"generation {self.generation_id}: chunk {chunk} is in pack {pack}, "
                    f"which is taken unchanged from generation {self.layout.origins[pack]}"
                )
            if pack != self._current:
                self._flush()
                self._current = pack
                self._buffer = bytearray(self.layout.data_aad(pack).plaintext_length)
                self._have = BitMap()
            take = min(count, (pack + 1) * per - chunk)
            n = min(take * cs, len(view) - off)
            start = (chunk - pack * per) * cs
            self._buffer[start : start + n] = view[off : off + n]
            self._have.add_range(chunk, chunk + take)
            chunk, off, count = chunk + take, off + n, count - take
        self._after = chunk
        self._bytes += len(view)

    def _flush(self) -> None:
        """Seal and send the pack being filled, its unwritten chunks from the previous full."""
        pack = self._current
        if pack is None:
            return
        per, cs = self.layout.pack_chunks, self.draft.chunk_size
        first = pack * per
        end = min(first + per, self.draft.chunks)
        missing = BitMap(range(first, end)) - self._have
        if lost := missing & self._changed:
            raise InvalidInput(
                detail=f"generation {self.generation_id}: changed chunk {lost.min()} was "
                "not written"
            )
        with memoryview(self._buffer) as view:
            for run_first, count in extents(missing, self.draft.chunks, per):
                stop = min((run_first + count - first) * cs, len(view))
                self._previous_reader().read_chunks(
                    run_first, view[(run_first - first) * cs : stop]
                )
            self._send(self.layout.data_aad(pack), view)  # sealed from the buffer, no copy
        self._buffer = bytearray()
        self._sent.add(pack)
        self._current = None

    def _previous_reader(self) -> GenerationReader:
        if self._previous is None:
            self._previous = self._open_previous()
        return self._previous

    def commit(self, checksums: array.array[int]) -> Manifest:
        try:
            self._flush()
            unsent = [
                pack
                for pack in range(self.layout.data_packs)
                if pack not in self.layout.origins and pack not in self._sent
            ]
            if unsent:
                # Only packs with a changed chunk are not linked: those chunks are missing.
                raise InvalidInput(
                    detail=f"generation {self.generation_id}: the changed chunks of pack "
                    f"{unsent[0]} were not written"
                )
            self._next_slot = self.layout.slots
            return super().commit(checksums)
        finally:
            self._close_previous()

    def abort(self) -> None:
        self._close_previous()
        super().abort()

    def _close_previous(self) -> None:
        if self._previous is not None:
            with contextlib.suppress(Exception):
                self._previous.close()
            self._previous = None
