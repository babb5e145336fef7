"""Deduplicated chunk packs in an object store (the data side of
:class:`~blockguard.storage.pool.s3pool.S3Pool`; layout in docs/design/s3.md).

The chunk ids, the packs and their index (the writer and reader of one generation are
:mod:`.s3gen`).

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

import base64
import hashlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from blockguard.errors import CorruptMetadata, DataError, NotFound
from blockguard.storage.manifest import (
    Manifest,
)
from blockguard.storage.remote.objstore import ObjectStore
from blockguard.storage.remote.seal import (
    BlobAAD,
    PackAAD,
    open_blob,
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
DATA_PREFIX = "data/"
INDEX_PREFIX = "index/"
#: Garbage-collection marks (``s3gc.py``): packs to delete after a grace period, which
#: writers no longer deduplicate against.
GC_PREFIX = "gc/"


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
        self._marked: set[str] = set()
        self._entries: dict[str, list[bytes]] = {}

    def refresh(self) -> None:
        """List ``index/`` and read the index objects not seen yet (one caller at a
        time: two readers opening at once read each object once)."""
        with self._refreshing:
            self._refresh()

    def _refresh(self) -> None:
        # Marks first: a chunk stored again because its pack is marked takes the place
        # of the marked one, whatever order the index objects come in.
        marked = read_marks(self._store, self._blob_key)
        listed = self._store.list(INDEX_PREFIX)
        names = {info.key[len(INDEX_PREFIX) :] for info in listed}
        with self._lock:
            self._marked = {p for mark in marked for p in mark.packs}
            # A pack whose index is gone was deleted by a collection: forget it (a
            # cached place in it would make a writer reference a missing chunk).
            gone = [p for p in self._packs if p not in names]
            for pack_id in gone:
                del self._packs[pack_id]
                self._seen.discard(pack_id)
            if gone:
                dropped = set(gone)
                self._places = {
                    c: pl for c, pl in self._places.items() if pl.pack_id not in dropped
                }
        for info in listed:
            pack_id = info.key[len(INDEX_PREFIX) :]
            with self._lock:
                if pack_id in self._seen:
                    continue
            try:
                entries, length = self._read(pack_id)
            except NotFound:
                # Deleted since the listing by another host's collection (with its pack):
                # its chunks are absent, as if it had not been listed.
                log.info("target %s: index of pack %s: collected", self._store.target, pack_id)
                continue
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
                known = self._places.get(cid)
                if known is None or (known.pack_id in self._marked and pack_id not in self._marked):
                    self._places[cid] = ChunkPlace(pack_id, off, n)
            self._entries[pack_id] = [cid for cid, _, _ in entries]

    def reusable(self, cid: bytes) -> bool:
        """True when a writer may reference ``cid`` without storing it: it is in a pack
        no collection has marked (kopia's rule: never reference what is being deleted)."""
        with self._lock:
            place = self._places.get(cid)
            return place is not None and place.pack_id not in self._marked

    def packs(self) -> dict[str, list[bytes]]:
        """Every indexed pack and the chunk ids it holds."""
        with self._lock:
            return {p: list(ids) for p, ids in self._entries.items() if p in self._packs}

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


@dataclass(frozen=True)
class GcMark:
    """A collection's mark: packs no manifest referenced at ``marked`` (seconds since the
    epoch, the sweeper's clock, for the log), deleted by a sweep at least a grace period
    after ``store_marked`` (the store's clock, taken once the mark was stored: a writer
    whose lease started later read the index with the mark in it). A mark without
    ``store_marked`` (its sweeper is between its two writes, or stopped there) is never
    carried out; ``written`` is its object's Last-Modified (the store's clock)."""

    name: str
    marked: float
    packs: tuple[str, ...]
    store_marked: float | None = None
    written: float | None = None


def read_marks(store: ObjectStore, blob_key: bytes) -> list[GcMark]:
    """Every mark under ``gc/``; one that does not open is logged and left out (its packs
    are then neither deleted nor avoided: a later sweep marks them again)."""
    marks = []
    for info in store.list(GC_PREFIX):
        name = info.key[len(GC_PREFIX) :]
        try:
            plain = open_blob(blob_key, BlobAAD("gc", DOMAIN, name), store.get(info.key))
            body = json.loads(plain)
            at = body.get("store_marked")
            marks.append(
                GcMark(
                    name,
                    float(body["marked"]),
                    tuple(str(p) for p in body["packs"]),
                    None if at is None else float(at),
                    None if info.modified is None else info.modified.timestamp(),
                )
            )
        except NotFound:
            # Deleted since the listing by another host's sweep: that sweep dealt with it.
            continue
        except (DataError, KeyError, TypeError, ValueError) as exc:
            log.error("target %s: gc mark %s: %s", store.target, name, exc)
    return marks


def write_mark(store: ObjectStore, blob_key: bytes, mark: GcMark) -> None:
    body: dict[str, object] = {"marked": mark.marked, "packs": list(mark.packs)}
    if mark.store_marked is not None:
        body["store_marked"] = mark.store_marked
    raw = json.dumps(body).encode()
    store.put(GC_PREFIX + mark.name, seal_blob(blob_key, BlobAAD("gc", DOMAIN, mark.name), raw))
