"""One generation in an S3 pool: its writer (hash each chunk, store the new ones in
packs, the manifest last) and its reader (each chunk by id from its pack). The chunk
ids, packs and their index are :mod:`.s3chunks`; the pool is
:class:`~blockguard.storage.pool.s3pool.S3Pool`."""

from __future__ import annotations

import array
import base64
import threading
from collections.abc import Callable, Sequence

from blockguard.errors import CorruptMetadata, InvalidInput, TamperedPack
from blockguard.storage.manifest import (
    Manifest,
    checksum_bytes,
    checksum_digest,
    checksums_from_bytes,
)
from blockguard.storage.pool.base import GenerationReader, GenerationWriter
from blockguard.storage.remote.objstore import ObjectStore
from blockguard.storage.remote.s3chunks import (
    PACK_BYTES,
    ChunkIndex,
    ChunkPlace,
    chunk_id,
    pack_key,
    slots_of,
)
from blockguard.storage.remote.s3fetch import PackFetcher
from blockguard.storage.remote.s3lease import WriterLease
from blockguard.storage.remote.s3upload import PackUploads
from blockguard.storage.remote.seal import open_pack


class S3GenerationWriter(GenerationWriter):
    """Hashes each chunk, gathers the ones the store lacks into packs and stores them
    (pack, then its index; a few packs at once, :mod:`.s3upload`); the commit waits for
    every pack and stores the manifest last.

    An abort deletes nothing: a pack this writer stored may already be referenced by
    another writer of the key (it deduplicated against the index), so only the garbage
    collection, which knows every manifest, removes unreferenced packs.

    :param commit_manifest: stores the sealed manifest (the commit point); returns
        the bytes it stored.
    :param lease: the writer's lease in the bucket (taken by the pool before it read the
        index): checked right before the manifest is stored, released after it or at an
        abort.
    """

    #: A transfer's result reads these of any remote writer: an S3 writer never resumes
    #: packs of a cut run (a re-run finds them in the index: reused) nor clones a full.
    skipped = 0
    cloned_from: str | None = None

    def __init__(
        self,
        draft: Manifest,
        *,
        store: ObjectStore,
        index: ChunkIndex,
        chunk_id_key: bytes,
        pack_key_bytes: bytes,
        blob_key: bytes,
        commit_manifest: Callable[[Manifest], int],
        lease: WriterLease | None = None,
    ) -> None:
        super().__init__(draft, None)
        self.lease = lease
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
        self._uploads = PackUploads(store, index, pack_key_bytes, blob_key)
        #: Chunks this writer found in the store already (deduplicated).
        self.reused = 0
        #: Packs this writer stored and their sealed bytes (known once it committed or
        #: aborted: the packs go up in the background).
        self.packs = 0
        self.sent_bytes = 0
        #: The sealed manifest's bytes (stored at the commit).
        self.manifest_bytes = 0

    @property
    def puts(self) -> int:
        """Packs stored (as a remote writer counts them)."""
        return self.packs

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
            if cid in self._pending_ids or self._uploads.holds(cid) or self._index.reusable(cid):
                self.reused += 1
                continue
            self._pending.append((cid, len(self._buffer), n))
            self._pending_ids.add(cid)
            self._buffer += data
            if len(self._buffer) >= PACK_BYTES:
                self._flush()
        self._bytes += off

    def _flush(self) -> None:
        # The pack goes up in the background (s3upload.py) while the next one fills.
        if not self._pending:
            return
        plain, entries = memoryview(self._buffer), self._pending  # handed over, not copied
        self._buffer = bytearray()
        self._pending = []
        self._pending_ids = set()
        self._uploads.submit(plain, entries)

    def commit(self, checksums: array.array[int]) -> Manifest:
        if len(self._ids) != self._slots:
            raise InvalidInput(
                detail=f"generation {self.generation_id}: {len(self._ids)} of {self._slots} "
                "chunks written at commit"
            )
        self._flush()
        try:
            self._uploads.finish()
        finally:
            self.packs, self.sent_bytes = self._uploads.packs, self._uploads.sent_bytes
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
        if self.lease is not None:
            # A lease that lapsed no longer held back the collection: a chunk this
            # writer reused may be gone, so nothing is committed (LeaseLost).
            self.lease.check()
        self.manifest_bytes = self._commit_manifest(manifest)
        self.committed = manifest
        if self.lease is not None:
            # Only now: a sweep that finds no lease finds this manifest.
            self.lease.release()
        return manifest

    def abort(self) -> None:
        # Nothing to remove (see the class docstring): unreferenced packs are garbage.
        self._uploads.close()
        if self.lease is not None:
            self.lease.release()
        self.packs, self.sent_bytes = self._uploads.packs, self._uploads.sent_bytes
        self._buffer = bytearray()
        self._pending = []


class S3GenerationReader(GenerationReader):
    """Reads a committed generation: each chunk by its id from its pack (fetched whole,
    opened: a changed or replaced pack is :class:`~blockguard.errors.TamperedPack`
    naming this generation); the packs are fetched a few at once, ahead of the reads, in
    the order of the generation's slots (:mod:`.s3fetch`)."""

    def __init__(
        self, manifest: Manifest, store: ObjectStore, index: ChunkIndex, pack_key_bytes: bytes
    ) -> None:
        super().__init__(manifest)
        self._ids, self._sum_bytes = slots_of(manifest)
        self._store = store
        self._index = index
        self._pack_key = pack_key_bytes
        self._lock = threading.Lock()
        if any(cid not in index for cid in set(self._ids)):
            # Stored by another host (or by this one) since the index was read.
            index.refresh()
        self._packs = PackFetcher(self._fetch, _pack_order(index, self._ids))
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
            plain = self._packs.get(place.pack_id)
            n = min(len(view) - pos, place.length)
            with memoryview(plain) as whole:  # one copy of the chunk, not two
                view[pos : pos + n] = whole[place.offset : place.offset + n]
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

    def _fetch(self, pack_id: str) -> bytes:
        """GET and open one pack (in a fetch thread)."""
        sealed = self._store.get(pack_key(pack_id))
        try:
            plain = open_pack(self._pack_key, self._index.pack_aad(pack_id), sealed)
        except TamperedPack as exc:
            raise TamperedPack(
                pack=pack_id, generation=self.manifest.generation_id, reason=exc.fields["reason"]
            ) from exc
        with self._lock:
            self.gets += 1
        return plain

    def _load_checksums(self) -> array.array[int]:
        return checksums_from_bytes(
            self._sum_bytes, self.manifest, f"checksums of generation {self.manifest.generation_id}"
        )

    def close(self) -> None:
        self._packs.close()


def _pack_order(index: ChunkIndex, ids: Sequence[bytes]) -> list[str]:
    """The packs holding ``ids``, each once, in the order of its first chunk."""
    order: dict[str, None] = {}
    for cid in ids:
        place = index.get(cid)
        if place is not None:
            order.setdefault(place.pack_id)
    return list(order)
