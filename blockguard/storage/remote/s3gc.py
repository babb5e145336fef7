"""Garbage collection of an S3 pool's packs, safe with several hosts writing at once
(docs/design/s3.md, "Garbage collection with several writers").

A sweep is two-phase, kopia's way (no lock that writers wait for):

1. it lists every manifest at its start and collects the chunk ids they reference; a
   pack none of whose chunks is referenced, and older than the grace period, is
   *marked* (a sealed ``gc/ROUND`` object naming it and the time);
2. a later sweep, at least ``grace`` after the mark, deletes a marked pack only if it is
   still unreferenced (by the manifests listed at *its* start) and still older than
   the grace period: its index first (writers stop seeing it), then the pack.

Writers never reference a chunk of a marked pack (:meth:`ChunkIndex.reusable`): they
store it again. A writer that referenced it before the mark commits within the grace
period (a backup is shorter than it), so the deleting sweep sees its manifest and
spares the pack. A sweep refuses to delete anything while a manifest does not open:
what it references is unknown.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from blockguard.errors import CorruptMetadata
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

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepResult:
    """What one sweep did: packs it marked, packs it deleted, marked packs it spared
    (referenced again)."""

    marked: tuple[str, ...]
    deleted: tuple[str, ...]
    spared: tuple[str, ...]


def sweep(pool: S3Pool, grace: timedelta, now: float | None = None) -> SweepResult:
    """Delete the packs earlier sweeps marked at least ``grace`` ago that are still
    unreferenced, and mark the unreferenced packs older than ``grace``.

    :raises CorruptMetadata: a manifest does not open (nothing is deleted or marked).
    """
    now = time.time() if now is None else now
    store = pool.store
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

    def old(pack_id: str) -> bool:
        modified = stored.get(pack_id)
        cutoff = datetime.fromtimestamp(now - grace.total_seconds(), tz=UTC)
        return modified is not None and modified <= cutoff

    def unreferenced(pack_id: str) -> bool:
        return not any(cid in referenced for cid in chunks_of.get(pack_id, ()))

    deleted: list[str] = []
    spared: list[str] = []
    pending: set[str] = set()
    for mark in marks:
        if mark.marked > now - grace.total_seconds():
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
    done = set(deleted)
    candidates = tuple(
        sorted(
            p for p in stored if p not in done and p not in pending and unreferenced(p) and old(p)
        )
    )
    if candidates:
        write_mark(
            store, pool.blob_key, GcMark(f"{int(now)}-{os.urandom(4).hex()}", now, candidates)
        )
    log.info(
        "pool %s: gc marked %d, deleted %d, spared %d packs",
        pool.name,
        len(candidates),
        len(deleted),
        len(spared),
    )
    # This pool's own index forgets the deleted packs now (others at their next refresh).
    pool.index.refresh()
    return SweepResult(candidates, tuple(deleted), tuple(spared))
