"""Sharing a thin pool's one metadata snapshot with other tools.

dm-thin holds at most one metadata snapshot per pool, and ``thin_delta -m`` reads it.
Other tools reserve it too (thin_ls, ``thin_dump -m``, wyng, a second backup program);
a reservation while one is held fails with EBUSY, for them as for us. So:

* we hold it as briefly as possible: reserve, the ``thin_delta`` calls, release, in a
  try/finally (:meth:`MetadataSnapshot.held`);
* when another process holds it we wait (backoff with jitter, at most ``wait`` seconds)
  for its release and reserve right after it: a tool that holds it again later finds it
  free by then, because we use the gap after its release, not the end of that gap;
* when a neighbour was seen lately (or we have not looked for ``MEMORY`` seconds) and the
  snapshot is free, we first listen up to ``quiet`` seconds for a hold, so as not to
  reserve just before the neighbour does;
* a poll never sleeps: not for a held snapshot, not for the next hold of a neighbour
  seen lately, and not to listen: it raises :class:`MetadataSnapshotBusy` at once and the
  caller skips that poll. The listening a poll needs first (the first look at a pool, or
  one after ``MEMORY`` quiet seconds) is :func:`listen`, which reserves nothing, so the
  caller runs it before taking its own locks (a poll runs under the volume registry's
  lock: five seconds of listening there stalled every other volume's calls). Busy is
  never "tracking lost": nothing was missed;
* a marker file records the held root we reserved, so that after a crash the snapshot is
  released only if the one held is still ours (:func:`recover`), never another tool's.
"""

from __future__ import annotations

import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from blockguard.errors import BlockguardError, MetadataSnapshotBusy
from blockguard.storage.dm import DeviceMapper
from blockguard.storage.manifest import write_atomic

log = logging.getLogger(__name__)

#: Seconds a neighbour seen holding the snapshot (or a quiet look) is remembered.
MEMORY = 600.0
#: Longest pause between two looks while waiting: the delay before we use a release.
POLL_CAP = 0.5
POLL_FIRST = 0.05
MARKER = "metadata-snap.json"


@dataclass
class Policy:
    """:ivar wait: seconds a backup waits for another process's hold to end.
    :ivar quiet: seconds to listen for a neighbour before reserving a free snapshot."""

    wait: float = 300.0
    quiet: float = 5.0


#: Set once by the application from its settings (see :func:`configure`).
POLICY = Policy()


def configure(wait: float, quiet: float) -> None:
    """Set the waiting bound and the listening time for every thin pool of the process."""
    POLICY.wait, POLICY.quiet = wait, quiet


@dataclass
class _Watch:
    """What this process saw of one pool: when a neighbour last held the snapshot, and
    when we last listened and nobody came."""

    neighbour_seen: float = -math.inf
    quiet_seen: float = -math.inf


_watches: dict[str, _Watch] = {}
_watches_lock = threading.Lock()


def _watch(pool: str) -> _Watch:
    with _watches_lock:
        return _watches.setdefault(pool, _Watch())


def _known_quiet(watch: _Watch, now: float) -> bool:
    """We listened lately and nobody held it since."""
    return watch.quiet_seen > watch.neighbour_seen and now - watch.quiet_seen < MEMORY


def listen(
    dm: DeviceMapper,
    pool: str,
    *,
    policy: Policy | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Before a poll, outside any lock: when ``pool`` is neither known quiet nor was
    seen held lately, watch it for up to ``policy.quiet`` seconds; what was seen (a
    neighbour's hold, or nobody) is remembered for the polls that follow. Reserves nothing.
    """
    watch = _watch(pool)
    quiet = (policy or POLICY).quiet
    start = clock()
    pause = POLL_FIRST
    if _known_quiet(watch, start) or start - watch.neighbour_seen < MEMORY:
        return  # nothing to learn: the poll reserves, or skips, at once
    while True:
        now = clock()
        if dm.held_metadata_root(pool) is not None:
            watch.neighbour_seen = now
            return
        if now - start >= quiet:
            watch.quiet_seen = now
            return
        sleep(min(pause * (0.5 + random.random()), max(start + quiet - now, 0.0)))
        pause = min(pause * 2, POLL_CAP)


class MetadataSnapshot:
    """The metadata snapshot of thin pool ``pool`` (its ``-tpool`` dm name), as we use it.

    :param marker: the file recording a reservation of ours (in the tracker's state).
    :param poll: never wait: for a held snapshot, a neighbour's next hold, or to listen
        (see :func:`listen`).
    """

    def __init__(
        self,
        dm: DeviceMapper,
        pool: str,
        marker: Path,
        *,
        poll: bool = False,
        policy: Policy | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.dm = dm
        self.pool = pool
        self.marker = marker
        self.poll = poll
        self.policy = policy or POLICY
        self.clock = clock
        self.sleep = sleep
        #: seconds spent waiting for the last reservation (for the log and tests)
        self.waited = 0.0

    @contextmanager
    def held(self) -> Iterator[None]:
        """Reserve the snapshot (waiting as the module docstring says), release it after.

        :raises MetadataSnapshotBusy: another process held it for longer than we wait.
        """
        self._reserve()
        try:
            yield
        finally:
            self._release()

    def _reserve(self) -> None:
        watch = _watch(self.pool)
        wait = 0.0 if self.poll else self.policy.wait
        start = self.clock()
        after_hold = False  # saw another process hold it: reserve as soon as it is free
        listen_until: float | None = None
        pause = POLL_FIRST
        while True:
            now = self.clock()
            if self.dm.held_metadata_root(self.pool) is not None:
                watch.neighbour_seen = now
                after_hold, listen_until = True, None
                if now - start >= wait:
                    self.waited = now - start
                    raise MetadataSnapshotBusy(
                        pool=self.pool, waited=f" (waited {self.waited:.1f} s)" if wait else ""
                    )
            else:
                known_quiet = _known_quiet(watch, now)
                if self.poll and not known_quiet:
                    # A poll does not wait for a neighbour's next hold, nor listen (that is
                    # listen(), outside the caller's locks): skipped.
                    lately = now - watch.neighbour_seen < MEMORY
                    raise MetadataSnapshotBusy(
                        pool=self.pool, waited=" lately" if lately else " (not listened to yet)"
                    )
                if listen_until is None and not (after_hold or known_quiet):
                    listen_until = now + self.policy.quiet
                if listen_until is not None and now >= listen_until:
                    watch.quiet_seen = now
                if after_hold or known_quiet or (listen_until is not None and now >= listen_until):
                    try:
                        self.dm.reserve_metadata_snap(self.pool)
                    except MetadataSnapshotBusy:
                        # Taken between our look and our message: it is someone's now.
                        watch.neighbour_seen = now
                        after_hold, listen_until = True, None
                        continue
                    self.waited = self.clock() - start
                    if self.waited > 1:
                        log.info(
                            "waited %.1f s for the metadata snapshot of %s", self.waited, self.pool
                        )
                    self._mark()
                    return
            self.sleep(pause * (0.5 + random.random()))  # jitter: two waiters do not beat in step
            pause = min(pause * 2, POLL_CAP)

    def _mark(self) -> None:
        """Record the held root as ours (a crash before the release is undone by
        :func:`recover` only while that same root is held)."""
        try:
            root = self.dm.held_metadata_root(self.pool)
            doc = {"pool": self.pool, "root": root}
            write_atomic(self.marker, json.dumps(doc).encode())
        except BaseException:
            self.dm.release_metadata_snap(self.pool)
            raise

    def _release(self) -> None:
        try:
            self.dm.release_metadata_snap(self.pool)
        except BlockguardError as exc:
            # Someone released it for us (lvconvert --repair, an admin): nothing is held.
            log.warning("releasing the metadata snapshot of %s: %s", self.pool, exc)
        self.marker.unlink(missing_ok=True)


def recover(dm: DeviceMapper, marker: Path) -> None:
    """After a restart: release a metadata snapshot a previous run of ours left held.

    Only the root recorded in ``marker`` is released, and only while it is the one held:
    another tool's snapshot is left alone.
    """
    try:
        doc = json.loads(marker.read_text())
    except FileNotFoundError:
        return
    except ValueError:
        doc = {}
    pool, root = doc.get("pool"), doc.get("root")
    try:
        held = dm.held_metadata_root(pool) if pool else None
        if held is not None and held == root:
            log.warning("releasing the metadata snapshot of %s a previous run left held", pool)
            dm.release_metadata_snap(pool)  # type: ignore[arg-type]
        elif held is not None:
            log.info("the metadata snapshot of %s is held by another process: left alone", pool)
    except BlockguardError as exc:
        log.warning("checking the metadata snapshot of %s: %s", pool, exc)
        return  # the marker stays for the next start
    marker.unlink(missing_ok=True)
