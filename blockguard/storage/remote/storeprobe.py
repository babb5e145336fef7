"""Measure an object store the way a backup uses it (issue 12): PUT and GET throughput of
pack-sized objects with as many in flight as the generation writer and reader keep
(:data:`~blockguard.storage.remote.s3upload.UPLOAD_THREADS` and
:data:`~blockguard.storage.remote.s3fetch.FETCH_THREADS`), and the latency of a small
GET (a manifest, an index object), one at a time.

The rates are what transfers see: a single stream to SeaweedFS's volume servers is
slower than a few, so a probe one object at a time gave the restore-time model figures
below what the four-at-once writer and reader reach (docs/design/s3.md).

The objects are random (zstd cannot shrink them: the figure is the store's, not the
compressor's), written under ``probe/NONCE/`` of the target's prefix and deleted after,
also when the probe fails half way. The first failure of the store is raised as the
named error :class:`~blockguard.storage.remote.objstore.ObjectStore` makes of it (a
refused key, a missing bucket, no connection), so the probe is also the check that the
target can be written at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from blockguard.core.units import KiB, MiB
from blockguard.errors import BlockguardError
from blockguard.storage.remote.objstore import ObjectStore
from blockguard.storage.remote.s3chunks import PACK_BYTES
from blockguard.storage.remote.s3fetch import FETCH_THREADS
from blockguard.storage.remote.s3upload import UPLOAD_THREADS

log = logging.getLogger(__name__)

PROBE_PREFIX = "probe/"
#: What a probe moves each way by default: two rounds of the writer's packs in flight
#: (one round would time only the slowest of them).
PROBE_BYTES = 2 * UPLOAD_THREADS * PACK_BYTES
SMALL_OBJECT = 4 * KiB
SMALL_GETS = 7


@dataclass(frozen=True)
class StoreSpeed:
    """A store's figures as this host sees them.

    :param put_rate: bytes per second of pack-sized PUTs, ``put_concurrency`` at once.
    :param get_rate: bytes per second of pack-sized GETs, ``get_concurrency`` at once.
    :param latency: seconds of a small GET (the median, one at a time).
    """

    put_rate: float
    get_rate: float
    latency: float
    object_bytes: int
    objects: int
    put_concurrency: int = 1
    get_concurrency: int = 1

    def describe(self) -> str:
        return (
            f"PUT {self.put_rate / MiB:.1f} MiB/s ({self.put_concurrency} at once), "
            f"GET {self.get_rate / MiB:.1f} MiB/s ({self.get_concurrency} at once), "
            f"{self.objects} objects of {self.object_bytes // MiB} MiB; small GET "
            f"{self.latency * 1000:.1f} ms"
        )


def measure_store(
    store: ObjectStore,
    total: int = PROBE_BYTES,
    object_bytes: int = PACK_BYTES,
    *,
    put_concurrency: int = UPLOAD_THREADS,
    get_concurrency: int = FETCH_THREADS,
) -> StoreSpeed:
    """PUT then GET ``total`` bytes in objects of ``object_bytes``, that many requests
    in flight each way, and time small GETs.

    :raises NotAuthorized: the store refused the key.
    :raises NotFound: the bucket does not exist.
    :raises TargetUnreachable: the endpoint does not answer.
    :raises StoreFailed: the store answered with a fault.
    """
    if put_concurrency < 1 or get_concurrency < 1:
        raise ValueError(f"concurrency {put_concurrency}/{get_concurrency}")
    count = max(1, total // object_bytes)
    where = f"{PROBE_PREFIX}{os.urandom(8).hex()}/"
    keys = [f"{where}{n}" for n in range(count)]
    small = f"{where}small"
    try:
        payload = os.urandom(object_bytes)
        put_seconds = _timed(put_concurrency, lambda key: store.put(key, payload), keys)
        get_seconds = _timed(get_concurrency, store.get, keys)
        store.put(small, payload[:SMALL_OBJECT])
        times = []
        for _ in range(SMALL_GETS):
            begun = time.monotonic()
            store.get(small)
            times.append(time.monotonic() - begun)
    finally:
        for key in [*keys, small]:
            # A probe object left behind is a few MiB of garbage, not a failure of the
            # probe: the first error (the one that matters) is already on its way. Keys
            # never written are deleted too: S3 says nothing of a missing one.
            with contextlib.suppress(BlockguardError):
                store.delete(key)
    moved = count * object_bytes
    found = StoreSpeed(
        put_rate=moved / max(put_seconds, 1e-6),
        get_rate=moved / max(get_seconds, 1e-6),
        latency=statistics.median(times),
        object_bytes=object_bytes,
        objects=count,
        put_concurrency=min(put_concurrency, count),
        get_concurrency=min(get_concurrency, count),
    )
    log.info("store %s: %s", store.target, found.describe())
    return found


def _timed(threads: int, request: Callable[[str], object], keys: Sequence[str]) -> float:
    """Seconds to run ``request`` on every key, ``threads`` at once; the first failure
    is raised (the other requests already started finish first)."""
    started = time.monotonic()
    executor = ThreadPoolExecutor(min(threads, len(keys)), thread_name_prefix="blockguard-probe")
    try:
        for future in [executor.submit(request, key) for key in keys]:
            future.result()
    finally:
        # After a failure the requests not started are dropped (an endpoint that does
        # not answer would make each wait for its timeout).
        executor.shutdown(wait=True, cancel_futures=True)
    return time.monotonic() - started
