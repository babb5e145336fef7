"""Writer leases in an object store, and the store's own clock (docs/design/s3.md,
"Garbage collection with several writers": writer leases).

A writer (one generation's backup into an :class:`~blockguard.storage.pool.s3pool.S3Pool`)
holds ``leases/HOST_ID/LEASE_ID`` from before it reads the chunk index until after its
manifest is stored. The object is a sealed blob (``BlobAAD("lease", HOST_ID, LEASE_ID)``
under the key's blob key: the store can neither forge one nor move one to another name)
of ``{"client", "started", "timeout"}``; ``started`` is the store's time when the lease
was taken, and the object's Last-Modified (the store's clock again) is its last renewal.
A thread renews it every ``timeout / 5`` seconds; the garbage collection
(:mod:`.s3gc`) deletes nothing a mark named while a live lease (renewed within its
timeout) is older than the mark.

Times are the store's, never a host's: the time of a throw-away ``clock/`` object the
caller has just written (:func:`store_time`), and the Last-Modified of the objects
listed. A host whose clock is wrong therefore neither expires another host's lease nor
keeps its own alive. The store's clock has whole seconds in a HEAD's Last-Modified, so
comparisons leave :data:`CLOCK_SLACK` on the safe side.

A writer that could not renew for longer than its timeout (the store unreachable, the
process paused) may have had the chunks it reused collected meanwhile: it finds out
at its next renewal (the gap between two of the store's Last-Modified times) and its
commit fails with :class:`~blockguard.errors.LeaseLost` before the manifest is stored.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass

from blockguard.errors import BlockguardError, DataError, LeaseLost, NotFound
from blockguard.storage.remote.objstore import ObjectStore
from blockguard.storage.remote.seal import BlobAAD, open_blob, seal_blob

log = logging.getLogger(__name__)

LEASE_PREFIX = "leases/"
CLOCK_PREFIX = "clock/"
#: Seconds a lease lives without a renewal (BLOCKGUARD_S3_LEASE_TIMEOUT).
DEFAULT_LEASE_TIMEOUT = 600.0
#: Renewals per timeout: one or two failed PUTs in a row do not expire a lease.
RENEWALS_PER_TIMEOUT = 5
#: Seconds of doubt in a comparison of two store times (a HEAD's Last-Modified has whole
#: seconds; two gateways of one store may differ a little).
CLOCK_SLACK = 2.0


def store_time(store: ObjectStore, host_id: str) -> float:
    """The store's clock now (seconds since the epoch): the Last-Modified of a small
    object written for it (then deleted). A store that gives none: this host's clock,
    logged."""
    key = f"{CLOCK_PREFIX}{host_id}/{os.urandom(8).hex()}"
    store.put(key, b"")
    try:
        modified = store.head(key).modified
    finally:
        store.delete(key)
    if modified is None:
        log.warning(
            "target %s: the store gives no Last-Modified: its clock is this host's", store.target
        )
        return time.time()
    return modified.timestamp()


@dataclass(frozen=True)
class LeaseInfo:
    """A lease as the collection sees it.

    :param name: ``HOST_ID/LEASE_ID``.
    :param client: the writer's client id (for the report), "" when it does not open.
    :param started: the store's time when it was taken (None: it does not open).
    :param timeout: seconds it lives without a renewal (its writer's setting).
    :param renewed: its object's Last-Modified (the store's clock).
    """

    name: str
    client: str
    started: float | None
    timeout: float
    renewed: float

    def live(self, now: float) -> bool:
        """Renewed within its timeout at store time ``now``."""
        return now - self.renewed <= self.timeout + CLOCK_SLACK


def read_leases(store: ObjectStore, blob_key: bytes, timeout: float) -> list[LeaseInfo]:
    """Every lease of the bucket. One that does not open (damaged, or sealed with another
    key) counts as started at the beginning of time and lives ``timeout`` (the sweeper's)
    after its Last-Modified: while it is renewed, nothing marked is deleted; once it is
    not, it is ignored like any expired lease."""
    found: list[LeaseInfo] = []
    for info in store.list(LEASE_PREFIX):
        name = info.key[len(LEASE_PREFIX) :]
        renewed = info.modified.timestamp() if info.modified is not None else time.time()
        host, _, lease_id = name.partition("/")
        try:
            plain = open_blob(blob_key, BlobAAD("lease", host, lease_id), store.get(info.key))
            body = json.loads(plain)
            found.append(
                LeaseInfo(
                    name,
                    str(body["client"]),
                    float(body["started"]),
                    float(body["timeout"]),
                    renewed,
                )
            )
        except NotFound:
            continue  # released since the listing: its writer committed or gave up
        except (DataError, KeyError, TypeError, ValueError) as exc:
            log.error("target %s: lease %s: %s", store.target, name, exc)
            found.append(LeaseInfo(name, "", None, timeout, renewed))
    return found


class WriterLease:
    """One writer's lease: taken by :meth:`acquire`, renewed by a thread, checked by
    :meth:`check` before the commit, released by :meth:`release`.

    :param store: the bucket.
    :param blob_key: seals the lease.
    :param host_id: the writer's host id (``MasterKey.host_id``): its folder of leases.
    :param client: the writer's client id (named in the collection's report).
    :param timeout: seconds it lives without a renewal.
    """

    def __init__(
        self,
        store: ObjectStore,
        blob_key: bytes,
        host_id: str,
        client: str,
        timeout: float = DEFAULT_LEASE_TIMEOUT,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"lease timeout {timeout}")
        self._store = store
        self._blob_key = blob_key
        self._host = host_id
        self._id = os.urandom(16).hex()
        self._client = client
        self.timeout = timeout
        self.period = timeout / RENEWALS_PER_TIMEOUT
        self.name = f"{self._host}/{self._id}"
        self._key = LEASE_PREFIX + self.name
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._body = b""
        #: The store's time of the lease's start and its last renewal.
        self.started = 0.0
        self.renewed = 0.0
        #: Renewals stored (the first PUT included).
        self.renewals = 0
        #: The longest gap between two renewals once it exceeded the timeout.
        self._lost: float | None = None

    def acquire(self) -> None:
        """Take the lease (before the writer reads the chunk index) and start renewing.

        :raises WireError: the store cannot be reached (nothing is taken).
        """
        self.started = store_time(self._store, self._host)
        self.renewed = self.started
        raw = json.dumps({"client": self._client, "started": self.started, "timeout": self.timeout})
        self._body = seal_blob(self._blob_key, BlobAAD("lease", self._host, self._id), raw.encode())
        self._renew()
        self._thread = threading.Thread(target=self._run, name="blockguard-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        with self._lock:
            self._store.put(self._key, self._body)
            modified = self._store.head(self._key).modified
            now = modified.timestamp() if modified is not None else time.time()
            gap = now - self.renewed
            if gap > self.timeout and self._lost is None:
                log.error(
                    "target %s: lease %s was not renewed for %.0fs (timeout %.0fs)",
                    self._store.target,
                    self.name,
                    gap,
                    self.timeout,
                )
                self._lost = gap
            self.renewed = max(self.renewed, now)
            self.renewals += 1

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self._renew()
            except BlockguardError as exc:
                # Tried again at the next period; the gap decides whether it was lost.
                log.warning(
                    "target %s: lease %s not renewed: %s", self._store.target, self.name, exc
                )

    def check(self) -> None:
        """Renew now and make sure the lease never lapsed (called right before the
        manifest is stored: a writer whose lease lapsed commits nothing).

        :raises LeaseLost: it went longer than its timeout without a renewal.
        :raises WireError: the store cannot be reached.
        """
        self._renew()
        if self._lost is not None:
            raise LeaseLost(
                target=self._store.target, lease=self.name, gap=self._lost, timeout=self.timeout
            )

    def release(self) -> None:
        """Stop renewing and delete the lease (after the manifest is stored, or on an
        abort; once). A failed delete is logged: the lease then expires by itself."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            self._store.delete(self._key)
        except BlockguardError as exc:
            log.warning("target %s: lease %s not released: %s", self._store.target, self.name, exc)
