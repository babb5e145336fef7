"""Deduplicated chunk packs in an object store: the chunk ids, the pack index, and one
generation's writer and reader (the data side of
:class:`~blockguard.storage.pool.s3pool.S3Pool`; layout in docs/design/s3.md).

A chunk's id is a keyed BLAKE2b of its plaintext under the key's chunk-id key: the
hosts of one key get the same id for the same data, the store learns nothing of it. New
chunks are gathered into packs of about :data:`PACK_BYTES` of plaintext, each sealed
(``seal.py``: zstd, then ChaCha20-Poly1305) under the key's store pack key with an AAD
naming the pack's random id and length, and stored as ``data/XX/PACKID``; then the
pack's index (which chunk ids it holds, where) is stored as ``index/PACKID``, a sealed
blob. A pack is written once and never replaced; a chunk is referenced only once its
pack and index are stored, and a generation exists only once its manifest is (written
last, by the pool).
"""

from __future__ import annotations

import array
import base64
import collections
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from blockguard.errors import CorruptMetadata, DataError, InvalidInput, TamperedPack
from blockguard.storage.manifest import (
    Manifest,
    checksum_bytes,
    checksum_digest,
    checksums_from_bytes,
)
from blockguard.storage.pool.base import GenerationReader, GenerationWriter
from blockguard.storage.remote.objstore import ObjectStore
from blockguard.storage.remote.seal import (
    BlobAAD,
    PackAAD,
    open_blob,
    open_pack,
    seal_blob,
    seal_pack,
)

log = logging.getLogger(__name__)

MiB = 1 << 20
#: Plaintext a pack gathers before it is sealed and stored (a larger chunk goes alone).
PACK_BYTES = 8 * MiB
#: Bytes of a chunk id (BLAKE2b-256).
CHUNK_ID_BYTES = 32
STORAGE_FORMAT = "s3-chunks-v1"
#: The "volume" of a pack's and an index's AAD: packs belong to the key's domain, not
#: to a volume or a generation (a chunk is shared by all of them).
DOMAIN = "chunks"
#: Opened packs a reader keeps (the copy engine's readers ask for neighbouring windows).
PACK_CACHE = 4
DATA_PREFIX = "data/"
INDEX_PREFIX = "index/"


def chunk_id(key: bytes, data: bytes | memoryview) -> bytes:
    """The id of a chunk of plaintext ``data`` under the chunk-id ``key``."""
    return hashlib.blake2b(
        data, key=key, digest_size=CHUNK_ID_BYTES, person=b"bg chunk id"
    ).digest()


def new_pack_id() -> str:
    """A random pack id (128 bits): a pack is never overwritten, also by a re-run."""
    return os.urandom(16).hex()


def pack_key(pack_id: str) -> str:
    return f"{DATA_PREFIX}{pack_id[:2]}/{pack_id}"


def index_key(pack_id: str) -> str:
    return f"{INDEX_PREFIX}{pack_id}"


@dataclass(frozen=True)
class ChunkPlace:
    """Where a chunk is: its pack, offset and length in the pack's plaintext."""

    pack_id: str
    offset: int
    length: int


class ChunkIndex:
    """Which chunk ids the store holds and where: every ``index/`` object, read once and
    kept (a pool object's cache; :meth:`refresh` reads only index objects it has not
    seen). An index object that does not open is logged and left out: its chunks count
    as absent (uploaded again), never as present."""

    def __init__(self, store: ObjectStore, blob_key: bytes) -> None:
        self._store = store
        self._blob_key = blob_key
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()
        self._places: dict[bytes, ChunkPlace] = {}
        self._packs: dict[str, tuple[int, int]] = {}  # pack id -> (length, chunk count)
        self._seen: set[str] = set()

    def refresh(self) -> None:
        """List ``index/`` and read the index objects not seen yet (one caller at a
        time: two readers opening at once read each object once)."""
        with self._refreshing:
            self._refresh()

    def _refresh(self) -> None:
        listed = self._store.list(INDEX_PREFIX)
        for info in listed:
            pack_id = info.key[len(INDEX_PREFIX) :]
            with self._lock:
                if pack_id in self._seen:
                    continue
            try:
                entries, length = self._read(pack_id)
            except DataError as exc:
                log.error("target %s: index of pack %s: %s", self._store.target, pack_id, exc)
                continue
            self.add(pack_id, length, entries)

    def _read(self, pack_id: str) -> tuple[list[tuple[bytes, int, int]], int]:
        aad = BlobAAD("index", DOMAIN, pack_id)
        plain = open_blob(self._blob_key, aad, self._store.get(index_key(pack_id)))
        try:
            body = json.loads(plain)
            length = int(body["length"])
            entries = [(bytes.fromhex(cid), int(off), int(n)) for cid, off, n in body["chunks"]]
            if body["pack"] != pack_id or any(
                len(cid) != CHUNK_ID_BYTES or off < 0 or n < 0 or off + n > length
                for cid, off, n in entries
            ):
                raise ValueError("its entries do not fit its pack")
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptMetadata(what=f"index of pack {pack_id}", detail=str(exc)) from None
        return entries, length

    def add(self, pack_id: str, length: int, entries: Sequence[tuple[bytes, int, int]]) -> None:
        with self._lock:
            self._seen.add(pack_id)
            self._packs[pack_id] = (length, len(entries))
            for cid, off, n in entries:
                self._places.setdefault(cid, ChunkPlace(pack_id, off, n))

    def get(self, cid: bytes) -> ChunkPlace | None:
        with self._lock:
            return self._places.get(cid)

    def pack_aad(self, pack_id: str) -> PackAAD:
        """What a pack was sealed with: its id, chunk count and plaintext length."""
        with self._lock:
            length, count = self._packs[pack_id]
        return PackAAD(DOMAIN, pack_id, 0, 0, count, length)

    def __contains__(self, cid: object) -> bool:
        with self._lock:
            return cid in self._places

    def __len__(self) -> int:
        with self._lock:
            return len(self._places)


def store_pack(
    store: ObjectStore,
    index: ChunkIndex,
    pack_key_bytes: bytes,
    blob_key: bytes,
    plain: bytes | memoryview,
    entries: Sequence[tuple[bytes, int, int]],
) -> tuple[str, int]:
    """Seal and store one pack, then its index; returns its id and sealed size."""
    pack_id = new_pack_id()
    aad = PackAAD(DOMAIN, pack_id, 0, 0, len(entries), len(plain))
    sealed = seal_pack(pack_key_bytes, aad, plain)
    store.put(pack_key(pack_id), sealed)
    body = {
        "pack": pack_id,
        "length": len(plain),
        "chunks": [[cid.hex(), off, n] for cid, off, n in entries],
    }
    raw = json.dumps(body, separators=(",", ":")).encode()
    store.put(index_key(pack_id), _seal_index(blob_key, pack_id, raw))
    index.add(pack_id, len(plain), entries)
    return pack_id, len(sealed)


def _seal_index(blob_key: bytes, pack_id: str, raw: bytes) -> bytes:
    return seal_blob(blob_key, BlobAAD("index", DOMAIN, pack_id), raw)


def slots_of(manifest: Manifest) -> tuple[list[bytes], bytes]:
    """A manifest's chunk id per slot and its checksum bytes (``storage``).

    :raises CorruptMetadata: its storage does not describe chunk ids of its slots.
    """
    storage = manifest.storage
    slots = manifest.chunks if manifest.is_full else len(manifest.changed)
    try:
        if storage["format"] != STORAGE_FORMAT:
            raise ValueError(f"storage format {storage['format']!r}")
        ids = base64.b64decode(storage["chunk_ids"], validate=True)
        sums = base64.b64decode(storage["checksums"], validate=True)
        if len(ids) != slots * CHUNK_ID_BYTES or len(sums) != slots * 8:
            raise ValueError(f"{len(ids)} bytes of ids and {len(sums)} of checksums")
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptMetadata(
            what=f"generation {manifest.generation_id}", detail=f"its chunk list: {exc}"
        ) from None
    return [ids[i : i + CHUNK_ID_BYTES] for i in range(0, len(ids), CHUNK_ID_BYTES)], sums


class S3GenerationWriter(GenerationWriter):
    """Hashes each chunk, gathers the ones the store lacks into packs and stores them
    (pack, then its index); the commit stores the manifest last.

    An abort deletes nothing: a pack this writer stored may already be referenced by
    another writer of the key (it deduplicated against the index), so only the garbage
    collection, which knows every manifest, removes unreferenced packs.

    :param commit_manifest: stores the sealed manifest (the commit point).
    """

    def __init__(
        self,
        draft: Manifest,
        *,
        store: ObjectStore,
        index: ChunkIndex,
        chunk_id_key: bytes,
        pack_key_bytes: bytes,
        blob_key: bytes,
        commit_manifest: Callable[[Manifest], None],
    ) -> None:
        super().__init__(draft, None)
        self._store = store
        self._index = index
        self._id_key = chunk_id_key
        self._pack_key = pack_key_bytes
        self._blob_key = blob_key
        self._commit_manifest = commit_manifest
        self._slots = draft.chunks if draft.is_full else len(draft.changed)
        self._ids: list[bytes] = []
        self._buffer = bytearray()
        self._pending: list[tuple[bytes, int, int]] = []
        self._pending_ids: set[bytes] = set()
        self._bytes = 0
        #: Chunks this writer found in the store already (deduplicated).
        self.reused = 0
        #: Packs this writer stored and their sealed bytes.
        self.packs = 0
        self.sent_bytes = 0

    def write_chunks(self, first: int, view: memoryview, digests: Sequence[int]) -> None:
        m = self.draft
        slot = first if m.is_full else m.changed.rank(first) - 1
        if slot != len(self._ids):
            raise InvalidInput(
                detail=f"generation {self.generation_id}: chunk {first} is at slot {slot}, "
                f"slot {len(self._ids)} was expected next"
            )
        off = 0
        for i in range(len(digests)):
            chunk = slot + i if m.is_full else m.changed[slot + i]
            n = m.chunk_bytes(chunk)
            data = view[off : off + n]
            if len(data) != n:
                raise InvalidInput(
                    detail=f"generation {self.generation_id}: chunk {chunk} is short"
                )
            off += n
            cid = chunk_id(self._id_key, data)
            self._ids.append(cid)
            if cid in self._pending_ids or cid in self._index:
                self.reused += 1
                continue
            self._pending.append((cid, len(self._buffer), n))
            self._pending_ids.add(cid)
            self._buffer += data
            if len(self._buffer) >= PACK_BYTES:
                self._flush()
        self._bytes += off

    def _flush(self) -> None:
        if not self._pending:
            return
        with memoryview(self._buffer) as plain:
            _, size = store_pack(
                self._store, self._index, self._pack_key, self._blob_key, plain, self._pending
            )
        self.packs += 1
        self.sent_bytes += size
        self._buffer = bytearray()
        self._pending = []
        self._pending_ids = set()

    def commit(self, checksums: array.array[int]) -> Manifest:
        if len(self._ids) != self._slots:
            raise InvalidInput(
                detail=f"generation {self.generation_id}: {len(self._ids)} of {self._slots} "
                "chunks written at commit"
            )
        self._flush()
        raw = checksum_bytes(checksums)
        storage = dict(self.draft.storage)
        storage["chunk_ids"] = base64.b64encode(b"".join(self._ids)).decode()
        storage["checksums"] = base64.b64encode(raw).decode()
        manifest = self.draft.with_(
            storage=storage,
            bytes_stored=self._bytes,
            checksum_count=len(checksums),
            checksum_digest=checksum_digest(raw),
        )
        self._commit_manifest(manifest)
        self.committed = manifest
        return manifest

    def abort(self) -> None:
        # Nothing to remove (see the class docstring): unreferenced packs are garbage.
        self._buffer = bytearray()
        self._pending = []


class S3GenerationReader(GenerationReader):
    """Reads a committed generation: each chunk by its id from its pack (fetched whole,
    opened: a changed or replaced pack is :class:`~blockguard.errors.TamperedPack`
    naming this generation), with a small cache of opened packs."""

    def __init__(
        self, manifest: Manifest, store: ObjectStore, index: ChunkIndex, pack_key_bytes: bytes
    ) -> None:
        super().__init__(manifest)
        self._ids, self._sum_bytes = slots_of(manifest)
        self._store = store
        self._index = index
        self._pack_key = pack_key_bytes
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        if any(cid not in index for cid in set(self._ids)):
            # Stored by another host (or by this one) since the index was read.
            index.refresh()
        #: Packs fetched from the store.
        self.gets = 0

    def read_chunks(self, first: int, view: memoryview) -> None:
        m = self.manifest
        slot = m.checksum_slot(first)
        pos = 0
        while pos < len(view):
            if slot >= len(self._ids):
                raise CorruptMetadata(
                    what=f"generation {m.generation_id}", detail=f"it has no slot {slot}"
                )
            place = self._place(self._ids[slot])
            plain = self._pack(place.pack_id)
            n = min(len(view) - pos, place.length)
            view[pos : pos + n] = plain[place.offset : place.offset + n]
            pos += n
            slot += 1

    def _place(self, cid: bytes) -> ChunkPlace:
        place = self._index.get(cid)
        if place is None:
            raise CorruptMetadata(
                what=f"generation {self.manifest.generation_id}",
                detail=f"its chunk {cid.hex()[:16]}... is in no pack of the store",
            )
        return place

    def _pack(self, pack_id: str) -> bytes:
        with self._lock:
            plain = self._cache.get(pack_id)
            if plain is not None:
                self._cache.move_to_end(pack_id)
                return plain
        sealed = self._store.get(pack_key(pack_id))
        try:
            plain = open_pack(self._pack_key, self._index.pack_aad(pack_id), sealed)
        except TamperedPack as exc:
            raise TamperedPack(
                pack=pack_id, generation=self.manifest.generation_id, reason=exc.fields["reason"]
            ) from exc
        self.gets += 1
        with self._lock:
            self._cache[pack_id] = plain
            while len(self._cache) > PACK_CACHE:
                self._cache.popitem(last=False)
        return plain

    def _load_checksums(self) -> array.array[int]:
        return checksums_from_bytes(
            self._sum_bytes, self.manifest, f"checksums of generation {self.manifest.generation_id}"
        )

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
