"""A generation reader's packs fetched from the object store ahead of the reads (the
reader is :class:`~blockguard.storage.remote.s3gen.S3GenerationReader`).

Each of the copy engine's readers used to GET its pack, then open it, slice its chunks
and hash them, one after the other: the store waited while the readers worked, and the
readers waited while the store sent. Measured by ``bench/bench_s3_pool.py`` (256 MiB of
random data on the host), the restore's read side ran at 0.50-0.66 of the same store's
raw GETs of the same bytes with 4 threads. So the packs are fetched and opened by
:data:`FETCH_THREADS` threads of their own, in the order the generation's slots name
them, up to :data:`READ_AHEAD` packs beyond the last one asked for: the copy engine's
readers then mostly find their pack opened. No more GETs are in flight than there are
fetch threads (the raw figure's concurrency), and each pack is fetched once however many
readers ask for it at the same time.

A pack that fails (a named error of the store, :class:`~blockguard.errors.TamperedPack`)
is raised to the reader that asks for it and forgotten, so a later read asks again; a
pack fetched ahead and never asked for is dropped with its error.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

#: Packs fetched at once (the PUT side's UPLOAD_THREADS; bench/bench_s3_client.py: GETs
#: of 8 MiB objects were at their best at 4 threads).
FETCH_THREADS = 4
#: Packs fetched beyond the last one asked for.
READ_AHEAD = 4
#: Opened packs kept (the copy engine's readers ask for neighbouring windows at once, and
#: the packs fetched ahead wait here): at most this many x 8 MiB of plaintext.
PACK_CACHE = 12


class PackFetcher:
    """Opened packs by id, fetched by a few threads ahead of the reads.

    :param fetch: GETs and opens one pack (raises the store's or the seal's named error).
    :param order: pack ids in the order the reads will want them (each once).
    """

    def __init__(self, fetch: Callable[[str], bytes], order: Sequence[str]) -> None:
        self._fetch = fetch
        self._order = list(order)
        self._position = {pack_id: n for n, pack_id in enumerate(self._order)}
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[str, Future[bytes]] = collections.OrderedDict()
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False

    def get(self, pack_id: str) -> bytes:
        """The opened pack ``pack_id``; the next ones in order start on their way."""
        with self._lock:
            future = self._start(pack_id)
            at = self._position.get(pack_id)
            if at is not None:
                for ahead in self._order[at + 1 : at + 1 + READ_AHEAD]:
                    if ahead not in self._cache:
                        self._start(ahead)
            self._trim()
        try:
            return future.result()
        except BaseException:
            with self._lock:
                if self._cache.get(pack_id) is future:
                    del self._cache[pack_id]
            raise

    def _start(self, pack_id: str) -> Future[bytes]:
        """The pack's future, submitted if it is not cached or on its way (lock held)."""
        future = self._cache.get(pack_id)
        if future is None:
            if self._closed:
                raise RuntimeError("pack fetcher used after close")
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    FETCH_THREADS, thread_name_prefix="blockguard-get"
                )
            future = self._executor.submit(self._fetch, pack_id)
            self._cache[pack_id] = future
        return future

    def _trim(self) -> None:
        # The packs furthest behind in the order go first (the reads have passed them);
        # the ones fetched ahead stay, and one still on its way stays until it is done.
        excess = len(self._cache) - PACK_CACHE
        if excess <= 0:
            return
        done = [p for p, f in self._cache.items() if f.done()]
        done.sort(key=lambda p: self._position.get(p, -1))
        for pack_id in done[:excess]:
            del self._cache[pack_id]

    def close(self) -> None:
        """Drop every pack; packs not started are not fetched, and no fetch thread is left
        running."""
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
            self._cache.clear()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
