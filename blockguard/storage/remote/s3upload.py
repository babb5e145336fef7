"""A generation writer's packs going up to the object store several at once (the writer
is :class:`~blockguard.storage.remote.s3gen.S3GenerationWriter`).

One PUT at a time left the store idle while the writer hashed and packed, and a single
stream to SeaweedFS's volume servers is slower than a few: measured by
``bench/bench_s3_pool.py`` (256 MiB of random data on the host), a full backup ran at 0.37
and 0.60 of the same store's raw PUTs of the same bytes with 4 threads. So each full
pack is sealed and stored (pack, then its index, as :func:`store_pack` does) by one of
:data:`UPLOAD_THREADS` threads while the writer fills the next; the writer waits only
when that many are in flight (memory stays bounded: a pack's plaintext and its sealed
copy each).

Nothing changes in what is stored or when a chunk counts as stored: a chunk enters the
index only once its pack and index object are stored, so another writer never
references a chunk still on its way. Until then this writer finds it among its packs
in flight (:meth:`PackUploads.holds`) and does not store it twice. The first failure is
raised to the writer at its next pack or at the commit, whichever comes first; the
manifest is never written after a failed pack.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait

from blockguard.storage.remote.objstore import ObjectStore
from blockguard.storage.remote.s3chunks import ChunkIndex, store_pack

log = logging.getLogger(__name__)

#: Packs stored at once by one writer (bench/bench_s3_client.py: 4 threads were at or
#: near the best PUT rate of the local SeaweedFS, 8 no better).
UPLOAD_THREADS = 4


class PackUploads:
    """The packs of one writer, sealed and stored by a few threads.

    :param store: where the packs go.
    :param index: the pool's chunk index (a stored pack's chunks are added to it).
    :param pack_key_bytes: seals the packs.
    :param blob_key: seals their index objects.
    :param threads: packs in flight at most.
    """

    def __init__(
        self,
        store: ObjectStore,
        index: ChunkIndex,
        pack_key_bytes: bytes,
        blob_key: bytes,
        *,
        threads: int = UPLOAD_THREADS,
    ) -> None:
        if threads < 1:
            raise ValueError(f"{threads} upload threads")
        self._store = store
        self._index = index
        self._pack_key = pack_key_bytes
        self._blob_key = blob_key
        self._threads = threads
        self._executor: ThreadPoolExecutor | None = None
        self._slots = threading.BoundedSemaphore(threads)
        self._lock = threading.Lock()
        self._futures: list[Future[None]] = []
        self._in_flight: set[bytes] = set()
        self._error: BaseException | None = None
        #: Packs stored and their sealed bytes.
        self.packs = 0
        self.sent_bytes = 0

    def holds(self, cid: bytes) -> bool:
        """True when ``cid`` is in a pack of this writer on its way to the store."""
        with self._lock:
            return cid in self._in_flight

    def submit(self, plain: bytes | memoryview, entries: Sequence[tuple[bytes, int, int]]) -> None:
        """Seal and store ``plain`` (chunks ``entries``) as a pack, in the background;
        waits while :data:`UPLOAD_THREADS` packs are in flight.

        :raises BlockguardError: an earlier pack failed (its error, as the store named it).
        """
        self._raise_failure()
        self._slots.acquire()
        try:
            self._raise_failure()
        except BaseException:
            self._slots.release()
            raise
        with self._lock:
            self._in_flight.update(cid for cid, _, _ in entries)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="blockguard-put")
        try:
            future = self._executor.submit(self._store_one, plain, entries)
        except BaseException:
            self._slots.release()
            raise
        self._futures.append(future)

    def _store_one(
        self, plain: bytes | memoryview, entries: Sequence[tuple[bytes, int, int]]
    ) -> None:
        try:
            if self._error is not None:
                return  # the backup fails anyway: send nothing more
            _, size = store_pack(
                self._store, self._index, self._pack_key, self._blob_key, plain, entries
            )
            with self._lock:
                self.packs += 1
                self.sent_bytes += size
        except BaseException as exc:
            with self._lock:
                if self._error is None:
                    self._error = exc
            raise
        finally:
            with self._lock:
                # Stored: the index has them now. Failed: they are not stored anywhere.
                self._in_flight.difference_update(cid for cid, _, _ in entries)
            self._slots.release()

    def finish(self) -> None:
        """Wait for every pack submitted; the threads end.

        :raises BlockguardError: a pack failed (the first failure).
        """
        try:
            wait(self._futures)
            self._raise_failure()
        finally:
            self.close()

    def close(self) -> None:
        """Stop: packs not started are dropped, the ones being stored are waited for (a
        thread is never left writing after its writer ended)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._futures = []

    def _raise_failure(self) -> None:
        with self._lock:
            error = self._error
        if error is not None:
            raise error
