"""One generation on a backup target: its packs, their writer and their reader
(the data side of :class:`~blockguard.storage.pool.remotepool.RemotePool`).

A generation's stored chunks (every chunk of a full, the changed ones of a delta, in chunk
order: a chunk's *slot* is its place among them, as in a local pool) are cut into packs of
:attr:`PackLayout.pack_chunks` slots (8 MiB of plaintext), numbered from 0; after them
come the packs of its checksum array (one xxh3_64 per slot, 1 Mi of them a pack). Each
is sealed (``seal.py``) under the generation's pack key, with an AAD naming the volume
id, the generation id, the pack's number, its first chunk (for a checksum pack: its
first slot), how many it holds and its length. The manifest says how the packs were cut
(``storage``), so a later blockguard with other sizes still reads it; it is sealed as a
blob and sent with the commit.
"""

from __future__ import annotations

import array
import collections
import contextlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from blockguard.errors import CorruptMetadata, DataError, InvalidInput, WireError
from blockguard.storage.manifest import (
    Manifest,
    check_component,
    checksum_bytes,
    checksum_digest,
    checksums_from_bytes,
)
from blockguard.storage.pool.base import GenerationReader, GenerationWriter
from blockguard.storage.remote.packvalues import GenerationState, pack_digest
from blockguard.storage.remote.seal import PackAAD, open_pack, pack_nonce, seal_pack
from blockguard.storage.remote.session import PutWindow, RemoteSession

MiB = 1 << 20
#: Plaintext a pack gathers (a chunk larger than this travels alone).
PACK_BYTES = 8 * MiB
#: Checksums a checksum pack holds (8 MiB of them).
CHECKSUMS_PER_PACK = PACK_BYTES // 8
STORAGE_FORMAT = "remote-packs-v1"
#: A synthesized full's layout: as v1, plus ``origins`` (pack -> the generation that
#: sealed it). A blockguard that knows only v1 refuses it by name instead of failing to
#: open the packs it took from earlier generations.
SYNTHESIZED_FORMAT = "remote-packs-v2"
#: Opened packs a reader keeps: the copy engine's readers ask for neighbouring windows
#: out of order, and a sequential read then still fetches each pack once.
PACK_CACHE = 4

#: Runs ``fn`` on the pool's session (connecting if needed, serialized between threads).
SessionCall = Callable[[Callable[[RemoteSession], Any]], Any]


def generation_key(volume_id: str, generation_id: str) -> str:
    """A generation's name on the target: unique among this client's volumes, and
    naming no volume (the id is an HMAC of the name)."""
    return f"{volume_id}@{generation_id}"


def is_cut(exc: BaseException) -> bool:
    """True when ``exc`` is the link ending (a resume can follow), not a refusal."""
    return isinstance(exc, WireError) or isinstance(exc.__cause__, WireError)


@dataclass(frozen=True)
class PackLayout:
    """How one generation's slots and checksums are cut into packs."""

    manifest: Manifest
    volume_id: str
    pack_chunks: int
    checksums_per_pack: int
    #: A synthesized full's data packs taken from earlier fulls: pack -> the generation
    #: that sealed it (its AAD and key name that generation; its number and chunks are
    #: the same, since only a full of the same chunks and pack size is a source).
    origins: Mapping[int, str] = field(default_factory=dict)

    @classmethod
    def new_storage(
        cls,
        chunk_size: int,
        slots: int,
        origins: Mapping[int, str] | None = None,
        pack_chunks: int | None = None,
    ) -> dict[str, Any]:
        """The manifest's ``storage`` for a new generation of ``slots`` stored chunks
        (``origins``: a synthesized full's packs taken from earlier generations)."""
        per = pack_chunks or max(1, PACK_BYTES // chunk_size)
        storage: dict[str, Any] = {
            "format": STORAGE_FORMAT,
            "pack_chunks": per,
            "checksums_per_pack": CHECKSUMS_PER_PACK,
            "data_packs": -(-slots // per),
            "checksum_packs": -(-slots // CHECKSUMS_PER_PACK),
        }
        if origins:
            storage["format"] = SYNTHESIZED_FORMAT
            storage["origins"] = {str(p): gid for p, gid in sorted(origins.items())}
        return storage

    @staticmethod
    def new_pack_chunks(chunk_size: int) -> int:
        """Chunks a data pack of a new generation holds."""
        return max(1, PACK_BYTES // chunk_size)

    @classmethod
    def of(cls, manifest: Manifest, volume_id: str) -> PackLayout:
        """:raises CorruptMetadata: the manifest does not describe remote packs."""
        storage = manifest.storage
        try:
            if storage["format"] not in (STORAGE_FORMAT, SYNTHESIZED_FORMAT):
                raise ValueError(f"storage format {storage['format']!r}")
            layout = cls(
                manifest,
                volume_id,
                int(storage["pack_chunks"]),
                int(storage["checksums_per_pack"]),
                _origins(storage, manifest),
            )
            if layout.pack_chunks < 1 or layout.checksums_per_pack < 1:
                raise ValueError("a pack of no chunks")
            counts = (storage["data_packs"], storage["checksum_packs"])
            if (layout.data_packs, layout.checksum_packs) != counts:
                raise ValueError("its pack counts do not fit its chunks")
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptMetadata(
                what=f"generation {manifest.generation_id}", detail=f"its pack layout: {exc}"
            ) from None
        return layout

    @property
    def slots(self) -> int:
        """Stored chunks (not ``len(stored_chunks())``: that builds a bitmap of a full)."""
        m = self.manifest
        return m.chunks if m.is_full else len(m.changed)

    @property
    def data_packs(self) -> int:
        return -(-self.slots // self.pack_chunks)

    @property
    def checksum_packs(self) -> int:
        return -(-self.slots // self.checksums_per_pack)

    def chunk_of(self, slot: int) -> int:
        m = self.manifest
        return slot if m.is_full else m.changed[slot]

    def data_aad(self, pack: int) -> PackAAD:
        """The AAD of data pack ``pack``: where it belongs and how long it is."""
        m = self.manifest
        first = pack * self.pack_chunks
        count = min(self.pack_chunks, self.slots - first)
        if not 0 <= pack < self.data_packs:
            raise InvalidInput(detail=f"generation {m.generation_id} has no data pack {pack}")
        last = self.chunk_of(first + count - 1)
        length = count * m.chunk_size - (m.chunk_size - m.chunk_bytes(last))
        sealer = self.origins.get(pack, m.generation_id)
        return PackAAD(self.volume_id, sealer, pack, self.chunk_of(first), count, length)

    def checksum_aad(self, index: int) -> PackAAD:
        """The AAD of the ``index``-th checksum pack (numbered after the data packs)."""
        first = index * self.checksums_per_pack
        count = min(self.checksums_per_pack, self.slots - first)
        return PackAAD(
            self.volume_id,
            self.manifest.generation_id,
            self.data_packs + index,
            first,
            count,
            8 * count,
        )


class RemoteGenerationWriter(GenerationWriter):
    """Gathers chunks into packs, seals each and puts it with a window in flight; the
    commit sends the checksum packs, the index and the sealed manifest.

    A resumed generation (``stored``: what the target holds of it) skips every pack the
    target holds with the size it seals to here: packs are sealed with a synthetic nonce
    (:func:`~.seal.pack_nonce`), so the same data is the same bytes and the index names
    them without fetching them; if the data differed, the target refuses the commit.

    :param call: runs a function on the pool's session.
    :param seal_manifest: seals the committed manifest (the blob key is the pool's).
    :param finished: told when the writer ends: ``True`` committed (with the committed
        manifest) or removed (with None), ``False`` cut (the generation stays open on the
        target for a resume).
    """

    def __init__(
        self,
        draft: Manifest,
        *,
        volume_id: str,
        pack_key: bytes,
        call: SessionCall,
        seal_manifest: Callable[[Manifest], bytes],
        stored: GenerationState,
        finished: Callable[[bool, Manifest | None], None],
    ) -> None:
        super().__init__(draft, None)
        self.key = generation_key(volume_id, draft.generation_id)
        self.layout = PackLayout(
            draft, volume_id, draft.storage["pack_chunks"], draft.storage["checksums_per_pack"]
        )
        self._pack_key = pack_key
        self._call = call
        self._seal_manifest = seal_manifest
        self._on_target = dict(stored.packs)
        self._finished = finished
        self._index: dict[int, dict[str, Any]] = {}
        self._puts: PutWindow | None = None
        self._buffer = bytearray()
        self._pack = 0
        self._next_slot = 0
        self._bytes = 0
        self._cut = False
        #: Puts sent (not the packs the target held already): for a resume, the rest.
        self.puts = 0
        #: Packs of a resumed generation not sent again (the target held them).
        self.skipped = 0
        #: Sealed bytes of the puts sent: what crossed the link (after compression).
        self.sent_bytes = 0

    def write_chunks(self, first: int, view: memoryview, digests: Sequence[int]) -> None:
        slot = first if self.draft.is_full else self.draft.changed.rank(first) - 1
        if slot != self._next_slot:
            raise InvalidInput(
                detail=f"generation {self.generation_id}: chunk {first} is at slot {slot}, "
                f"slot {self._next_slot} was expected next"
            )
        cs, per = self.draft.chunk_size, self.layout.pack_chunks
        off, count = 0, len(digests)
        while count:
            in_pack = self._next_slot % per
            take = min(count, per - in_pack)
            n = min(take * cs, len(view) - off)
            self._buffer += view[off : off + n]
            off, count = off + n, count - take
            self._next_slot += take
            if self._next_slot % per == 0 or self._next_slot == self.layout.slots:
                # Sealed from the buffer itself: a pack's plaintext is not copied again.
                with memoryview(self._buffer) as plain:
                    self._send(self.layout.data_aad(self._pack), plain)
                self._buffer.clear()
                self._pack += 1
        self._bytes += len(view)

    def _send(self, aad: PackAAD, plain: bytes | memoryview) -> None:
        sealed = seal_pack(self._pack_key, aad, plain, nonce=pack_nonce(self._pack_key, aad, plain))
        self._index[aad.pack] = {
            "pack": aad.pack,
            "size": len(sealed),
            "xxh3_128": pack_digest(sealed),
        }
        if self._on_target.get(aad.pack) == len(sealed):
            self.skipped += 1
            return

        def put(session: RemoteSession) -> None:
            window = self._window(session)
            if not window.send(aad.pack, sealed):
                window.finish()  # raises the target's refusal (a full disk) now

        self._remote(put)
        self.puts += 1
        self.sent_bytes += len(sealed)

    def _window(self, session: RemoteSession) -> PutWindow:
        if self._puts is None or self._puts.session is not session:
            self._puts = session.put_window(self.key)
        return self._puts

    def _remote(self, fn: Callable[[RemoteSession], Any]) -> Any:
        try:
            return self._call(fn)
        except BaseException as exc:
            self._cut = self._cut or is_cut(exc)
            raise

    def commit(self, checksums: array.array[int]) -> Manifest:
        if self._next_slot != self.layout.slots:
            raise InvalidInput(
                detail=f"generation {self.generation_id}: {self._next_slot} of "
                f"{self.layout.slots} chunks written at commit"
            )
        raw = checksum_bytes(checksums)
        per = self.layout.checksums_per_pack * 8
        with memoryview(raw) as whole:
            for index in range(self.layout.checksum_packs):
                self._send(self.layout.checksum_aad(index), whole[index * per : (index + 1) * per])
        manifest = self.draft.with_(
            bytes_stored=self._bytes,
            checksum_count=len(checksums),
            checksum_digest=checksum_digest(raw),
        )
        sealed = self._seal_manifest(manifest)
        index = {"packs": [self._index[n] for n in sorted(self._index)]}

        def finish(session: RemoteSession) -> None:
            if self._puts is not None and self._puts.session is session:
                self._puts.finish()
            session.commit(self.key, index, sealed)

        try:
            self._remote(finish)
        except DataError as exc:
            if not self.skipped:
                raise
            # Packs the target held were taken for this copy's by their size, and one is
            # not: the cut transfer read another copy of the volume. Nothing is committed;
            # the generation is removed (abort), and the next writer sends everything.
            raise DataError(
                detail=f"generation {self.generation_id} was resumed on packs the target "
                f"held of another copy of volume {self.draft.volume.name} ({exc}); nothing "
                "is committed, the next backup sends it whole"
            ) from exc
        self.committed = manifest
        self._finished(True, manifest)
        return manifest

    def abort(self) -> None:
        if self.committed is not None:
            return
        if self._cut:
            self._finished(False, None)  # what the target stored stays for a resume
            return
        self._finished(True, None)
        # Best effort: an open generation left on the target is harmless (resumable,
        # never listed) and the error that aborted the writer is the one to report.
        with contextlib.suppress(Exception):
            self._call(lambda s: s.remove(self.key))


class RemoteGenerationReader(GenerationReader):
    """Reads a committed generation from the target: packs fetched, opened (a changed,
    moved or replaced pack is :class:`~blockguard.errors.TamperedPack`) and kept in a
    small cache, since the copy engine's threads read neighbouring windows."""

    def __init__(
        self,
        manifest: Manifest,
        layout: PackLayout,
        pack_keys: Callable[[str], bytes],
        call: SessionCall,
    ):
        """:param pack_keys: the pack key of a generation id (a synthesized full's packs
        taken from earlier fulls are sealed with theirs)."""
        super().__init__(manifest)
        self.layout = layout
        self.key = generation_key(layout.volume_id, manifest.generation_id)
        self._pack_keys = pack_keys
        self._call = call
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        #: Packs fetched from the target (a sequential read fetches each once).
        self.gets = 0

    def read_chunks(self, first: int, view: memoryview) -> None:
        m, per, cs = self.manifest, self.layout.pack_chunks, self.manifest.chunk_size
        slot = m.checksum_slot(first)
        pos = 0
        while pos < len(view):
            plain = self._data_pack(slot // per)
            start = (slot % per) * cs
            n = min(len(view) - pos, len(plain) - start)
            if n <= 0:
                raise CorruptMetadata(
                    what=f"generation {m.generation_id}", detail=f"its packs end at slot {slot}"
                )
            view[pos : pos + n] = plain[start : start + n]
            pos += n
            slot += -(-n // cs)

    def _data_pack(self, number: int) -> bytes:
        with self._lock:
            plain = self._cache.get(number)
            if plain is None:
                plain = self._fetch(self.layout.data_aad(number))
                self._cache[number] = plain
                while len(self._cache) > PACK_CACHE:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(number)
            return plain

    def _fetch(self, aad: PackAAD) -> bytes:
        try:
            sealed = self._call(lambda s: s.get(self.key, aad.pack))
        except DataError as exc:
            # The target's own check of a stored pack (bit rot, a changed byte) names
            # only its opaque key: name the generation, as TamperedPack does, so that
            # the caller can mark it damaged.
            exc.fields.setdefault("generation", self.manifest.generation_id)
            raise
        self.gets += 1
        return open_pack(self._pack_keys(aad.generation_id), aad, sealed)

    def _load_checksums(self) -> array.array[int]:
        raw = b"".join(
            self._fetch(self.layout.checksum_aad(i)) for i in range(self.layout.checksum_packs)
        )
        return checksums_from_bytes(raw, self.manifest, f"checksums of {self.key}")

    def close(self) -> None:
        with self._lock:
            self._cache.clear()


def _origins(storage: Mapping[str, Any], manifest: Manifest) -> dict[int, str]:
    """A layout's ``origins`` (v2 only), checked: data packs of a full, plain ids.

    :raises ValueError: they do not fit.
    """
    if storage["format"] == STORAGE_FORMAT:
        if "origins" in storage:
            raise ValueError("origins in a layout of format v1")
        return {}
    if not manifest.is_full:
        raise ValueError("origins in a generation that is no full")
    raw = storage["origins"]
    if not isinstance(raw, dict):
        raise ValueError("origins is no object")
    per = int(storage["pack_chunks"])
    packs = -(-manifest.chunks // per) if per > 0 else 0
    origins: dict[int, str] = {}
    for key, gid in raw.items():
        pack = int(key)
        if not 0 <= pack < packs or not isinstance(gid, str):
            raise ValueError(f"origin {key!r}: {gid!r:.80}")
        try:
            check_component(gid, "generation id")
        except InvalidInput as exc:
            raise ValueError(str(exc)) from None
        origins[pack] = gid
    return origins
