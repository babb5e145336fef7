"""Garbage collection of an S3 pool's packs, safe with several hosts writing at once and
for backups of any length (docs/design/s3.md, "Garbage collection with several writers").

A sweep is two-phase, kopia's way (no lock that writers wait for), guarded by writer
leases (:mod:`.s3lease`, PBS's "oldest writer" rule):

1. it lists every manifest at its start and collects the chunk ids they reference; a
   pack none of whose chunks is referenced, and older than the grace period, is
   *marked* (a sealed ``gc/ROUND`` object naming it and the store's time once the mark
   is stored);
2. a later sweep, at least ``grace`` after the mark, and only while no live writer
   lease started before the mark, deletes a marked pack if it is still unreferenced (by
   the manifests listed at *its* start) and still older than the grace period: its
   index first (writers stop seeing it), then the pack.

Writers never reference a chunk of a marked pack (:meth:`ChunkIndex.reusable`): they
store it again. A writer that may have referenced it before the mark (it read the
index before the mark was there) holds a lease that started before the mark, and the
mark waits for that lease to end: by then the writer's manifest is stored and the
deleting sweep sees it. A writer whose lease lapsed (not renewed within its timeout)
no longer holds anything back; it commits nothing (:class:`~blockguard.errors.LeaseLost`).
The leases are read before the manifests: a lease gone at that point belonged to a
writer whose manifest was stored before it released the lease, so the listing that
follows sees it. Times are the store's (:func:`~.s3lease.store_time`, Last-Modified),
never a host's. A sweep refuses to delete anything while a manifest does not open:
what it references is unknown.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from blockguard.errors import CorruptMetadata, NotFound
from blockguard.storage.pool.s3pool import S3Pool
from blockguard.storage.remote.s3chunks import (
    DATA_PREFIX,
    GC_PREFIX,
    GcMark,
    index_key,
    pack_key,
    read_marks,
    slots_of,
    write_mark,
)
from blockguard.storage.remote.s3lease import (
    CLOCK_SLACK,
    DEFAULT_LEASE_TIMEOUT,
    LEASE_PREFIX,
    read_leases,
    store_time,
)

log = logging.getLogger(__name__)

#: Written at the end of every sweep of the bucket (by any host): its Last-Modified, the
#: store's clock, is when the bucket was last swept (:func:`sweep_due`).
SWEPT_KEY = "gc-swept"


def sweep_due(pool: S3Pool, interval: float) -> float:
    """Seconds until the bucket's next scheduled sweep: 0 when one is due (no host swept
    it in the last ``interval`` seconds of the store's clock, or never).

    One sweep per interval for the whole bucket, whichever host runs it: a fleet of N
    hosts does not list the bucket N times per interval.
    """
    if interval <= 0:
        return 0.0
    try:
        last = pool.store.head(SWEPT_KEY).modified
    except NotFound:
        return 0.0
    if last is None:
        return 0.0
    age = store_time(pool.store, pool.host_id) - last.timestamp()
    return max(0.0, interval - age)


@dataclass(frozen=True)
class SweepResult:
    """What one sweep did: packs it marked, packs it deleted, marked packs it spared
    (referenced again); marks it left for later because a live writer lease is older
    than them (``held``); the leases it found expired and removed (``expired``, as
    ``CLIENT HOST_ID/LEASE_ID``); the live leases it saw (``leases``)."""

    marked: tuple[str, ...]
    deleted: tuple[str, ...]
    spared: tuple[str, ...]
    held: tuple[str, ...] = ()
    expired: tuple[str, ...] = ()
    leases: int = 0


def sweep(
    pool: S3Pool,
    grace: timedelta,
    now: float | None = None,
    *,
    lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
) -> SweepResult:
    """Delete the packs earlier sweeps marked at least ``grace`` ago that are still
    unreferenced (unless a live writer lease is older than their mark), and mark the
    unreferenced packs older than ``grace``.

    :param now: the store's time (default: asked of the store, :func:`store_time`).
    :param lease_timeout: how long a lease that does not open lives after its last
        write (a lease that opens says its own timeout).
    :raises CorruptMetadata: a manifest does not open (nothing is deleted or marked).
    """
    store = pool.store
    given = now is not None
    now = store_time(store, pool.host_id) if now is None else now
    # Leases first, then the manifests (module docstring: a released lease's manifest
    # is already in the listing that follows).
    leases = read_leases(store, pool.blob_key, lease_timeout)
    live = [lease for lease in leases if lease.live(now)]
    expired = [lease for lease in leases if not lease.live(now)]
    oldest = min(
        (-math.inf if lease.started is None else lease.started for lease in live), default=None
    )
    marks = read_marks(store, pool.blob_key)
    # Every host's generations: a pack another host's chain references is referenced.
    found = pool.scan(every_host=True)
    if found.damaged:
        raise CorruptMetadata(
            what=f"pool {pool.name}",
            detail=f"{len(found.damaged)} manifest(s) do not open (first: "
            f"{found.damaged[0].generation_id}); what they reference is unknown, so the "
            "collection deletes nothing",
        )
    referenced: set[bytes] = set()
    for manifest in found.manifests:
        referenced.update(slots_of(manifest)[0])
    pool.index.refresh()
    chunks_of = pool.index.packs()
    stored = {info.key.rsplit("/", 1)[-1]: info.modified for info in store.list(DATA_PREFIX)}
    cutoff = datetime.fromtimestamp(now - grace.total_seconds(), tz=UTC)

    def old(pack_id: str) -> bool:
        modified = stored.get(pack_id)
        return modified is not None and modified <= cutoff

    def unreferenced(pack_id: str) -> bool:
        return not any(cid in referenced for cid in chunks_of.get(pack_id, ()))

    deleted: list[str] = []
    spared: list[str] = []
    held: list[str] = []
    pending: set[str] = set()
    for mark in marks:
        at = mark.store_marked
        if at is not None and at > now - grace.total_seconds():
            pending.update(mark.packs)
            continue
        if at is not None and oldest is not None and oldest <= at + CLOCK_SLACK:
            # A writer that may have read the index before this mark is still running.
            held.append(mark.name)
            pending.update(mark.packs)
            continue
        if at is None:
            # Its sweeper is between its two writes of it (its packs stay avoided), or
            # stopped there long ago: then it is dropped and its packs marked again below.
            # Never carried out: when writers began avoiding its packs is unknown.
            if mark.written is not None and now - mark.written > lease_timeout:
                log.warning("pool %s: gc mark %s has no store time: dropped", pool.name, mark.name)
                store.delete(GC_PREFIX + mark.name)
            else:
                pending.update(mark.packs)
            continue
        for pack_id in mark.packs:
            if pack_id not in stored:
                continue
            if unreferenced(pack_id) and old(pack_id):
                store.delete(index_key(pack_id))
                store.delete(pack_key(pack_id))
                deleted.append(pack_id)
            else:
                spared.append(pack_id)
        store.delete(GC_PREFIX + mark.name)
    for lease in expired:
        # Its writer stopped renewing (it crashed, or lost the store for longer than its
        # timeout: then its commit fails by itself, LeaseLost).
        log.warning(
            "pool %s: lease %s of client %s expired (last renewed %.0fs ago): ignored and removed",
            pool.name,
            lease.name,
            lease.client or "?",
            now - lease.renewed,
        )
        store.delete(LEASE_PREFIX + lease.name)
    done = set(deleted)
    candidates = tuple(
        sorted(
            p for p in stored if p not in done and p not in pending and unreferenced(p) and old(p)
        )
    )
    if candidates:
        name = f"{int(time.time())}-{os.urandom(4).hex()}"
        mark = GcMark(name, time.time(), candidates)
        write_mark(store, pool.blob_key, mark)
        # The store's time once the mark is visible: a lease taken after it read the
        # index with the mark in it (and so avoids these packs).
        at = now if given else store_time(store, pool.host_id)
        write_mark(store, pool.blob_key, GcMark(name, mark.marked, candidates, at))
    log.info(
        "pool %s: gc marked %d, deleted %d, spared %d packs; %d mark(s) held by %d live "
        "lease(s); %d lease(s) expired",
        pool.name,
        len(candidates),
        len(deleted),
        len(spared),
        len(held),
        len(live),
        len(expired),
    )
    # This pool's own index forgets the deleted packs now (others at their next refresh).
    pool.index.refresh()
    store.put(SWEPT_KEY, b"")
    return SweepResult(
        candidates,
        tuple(deleted),
        tuple(spared),
        tuple(held),
        tuple(f"{lease.client or '?'} {lease.name}" for lease in expired),
        len(live),
    )
