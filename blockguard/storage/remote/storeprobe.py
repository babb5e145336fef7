"""Measure an object store the way a backup uses it (issue 12): PUT and GET throughput of
pack-sized objects, one at a time as the generation writer and reader do, and the
latency of a small GET (a manifest, an index object).

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
from dataclasses import dataclass

from blockguard.core.units import KiB, MiB
from blockguard.errors import BlockguardError
from blockguard.storage.remote.objstore import ObjectStore
from blockguard.storage.remote.s3chunks import PACK_BYTES

log = logging.getLogger(__name__)

PROBE_PREFIX = "probe/"
#: What a probe moves each way by default (four packs).
PROBE_BYTES = 4 * PACK_BYTES
SMALL_OBJECT = 4 * KiB
SMALL_GETS = 7


@dataclass(frozen=True)
class StoreSpeed:
    """A store's figures as this host sees them.

    :param put_rate: bytes per second of pack-sized PUTs, one at a time.
    :param get_rate: bytes per second of pack-sized GETs, one at a time.
    :param latency: seconds of a small GET (the median).
    """

    put_rate: float
    get_rate: float
    latency: float
    object_bytes: int
    objects: int

    def describe(self) -> str:
        return (
            f"PUT {self.put_rate / MiB:.1f} MiB/s, GET {self.get_rate / MiB:.1f} MiB/s "
            f"({self.objects} objects of {self.object_bytes // MiB} MiB), small GET "
            f"{self.latency * 1000:.1f} ms"
        )


def measure_store(
    store: ObjectStore, total: int = PROBE_BYTES, object_bytes: int = PACK_BYTES
) -> StoreSpeed:
    """PUT then GET ``total`` bytes in objects of ``object_bytes``, and time small GETs.

    :raises NotAuthorized: the store refused the key.
    :raises NotFound: the bucket does not exist.
    :raises TargetUnreachable: the endpoint does not answer.
    :raises StoreFailed: the store answered with a fault.
    """
    count = max(1, total // object_bytes)
    where = f"{PROBE_PREFIX}{os.urandom(8).hex()}/"
    written: list[str] = []
    try:
        payload = os.urandom(object_bytes)
        started = time.monotonic()
        for n in range(count):
            key = f"{where}{n}"
            written.append(key)
            store.put(key, payload)
        put_seconds = time.monotonic() - started
        started = time.monotonic()
        for key in written:
            store.get(key)
        get_seconds = time.monotonic() - started
        small = f"{where}small"
        written.append(small)
        store.put(small, payload[:SMALL_OBJECT])
        times = []
        for _ in range(SMALL_GETS):
            begun = time.monotonic()
            store.get(small)
            times.append(time.monotonic() - begun)
    finally:
        for key in written:
            # A probe object left behind is a few MiB of garbage, not a failure of the
            # probe: the first error (the one that matters) is already on its way.
            with contextlib.suppress(BlockguardError):
                store.delete(key)
    moved = count * object_bytes
    found = StoreSpeed(
        put_rate=moved / max(put_seconds, 1e-6),
        get_rate=moved / max(get_seconds, 1e-6),
        latency=statistics.median(times),
        object_bytes=object_bytes,
        objects=count,
    )
    log.info("store %s: %s", store.target, found.describe())
    return found
