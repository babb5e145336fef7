"""The delta area made ahead: a spare linear LV that the next delta of an ``lvm`` pool
is written to, so that its ``lvcreate`` is no part of the backup.

An ``lvcreate`` is a commit of the VG's metadata: 0.6 s of a 3.5 s incremental of 1 %
in the guest under TCG (``bench/bench_backup_fixed.py``). When the pool has been idle a
while after a backup (no job of any of its volumes; :mod:`blockguard.engine.idle`), the
engine asks it to make a spare (:meth:`LvmPool.prepare_ahead`), sized on the volume's
last delta; the next delta that fits it is written to it under the spare's own name
``delta-<hex>`` (an ``lvrename`` would cost as much as the ``lvcreate`` it saves). A
delta that does not fit gets a new ``g<GENERATION_ID>`` LV as before.

Which ``delta-*`` LV is what follows from what is on disk alone, so a crash at any point
is sorted out by the next open (:meth:`LvmPool.collect_garbage`):

- one that a generation's manifest names (``storage.lv``) is that generation's data;
- any other is a spare: made and not claimed yet, or claimed by a write that never
  committed, or left by a removal interrupted after its commit point. Its old bytes do
  not matter: a delta writes every slot it will ever read. The largest closed one is kept
  as the spare; the others are removed. An open one is left alone (a writer in another
  process holds it);
- when a committed generation's manifest cannot be read, nothing tells which ``delta-*``
  LV it names: none is kept as a spare or removed until that generation is dealt with.

The spare is the pool's free space lent to itself: :meth:`LvmPool.capacity` counts it as
free, and it is removed (:meth:`SpareArea.give_way`) before the pool refuses anything
for lack of VG space.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence

from blockguard.errors import BlockguardError
from blockguard.storage.pool.lvmvg import EXTENT, LvFacts, PoolVg, round_up

log = logging.getLogger(__name__)

AREA_PREFIX = "delta-"
#: A spare is made only when the VG keeps this share of its size free besides it.
KEEP_FREE = 20


def is_area(lv: str) -> bool:
    """``lv`` is a delta area's name (a spare, or a generation's that was one)."""
    return lv.startswith(AREA_PREFIX)


def spare_size_for(last_delta: int) -> int:
    """The size of a spare for a volume whose last delta stored ``last_delta`` bytes: a
    quarter above it (deltas vary), in whole extents."""
    return round_up(max(last_delta + last_delta // 4, EXTENT), EXTENT)


def fits(needed: int, size: int) -> bool:
    """Whether a spare of ``size`` bytes takes a delta of ``needed`` bytes: it holds it
    and wastes at most the delta's own size again (plus two extents for small ones) --
    the generation keeps the whole LV as long as it lives."""
    return 0 < needed <= size <= 2 * needed + 2 * EXTENT


class SpareArea:
    """The pool's one spare delta area (none at first; found by the pool's garbage
    collection, made by :meth:`make`, taken by :meth:`claim`).

    No lock is held across an LVM command: while a spare is being made, a claim does not
    wait for it (the delta makes its own LV, as it would with no spare) and a removal for
    space (:meth:`give_way`) waits for that one command, then removes what it made.
    """

    def __init__(self, vg: PoolVg, preferred: Callable[[], str | None]) -> None:
        self.vg = vg
        self._preferred = preferred
        self._lock = threading.Condition()
        self._spare: tuple[str, int] | None = None
        #: a make() is running its lvremove/lvcreate (outside the lock)
        self._making = False

    @property
    def size(self) -> int:
        """The spare's bytes (0: none); counted as the pool's free space."""
        spare = self._spare
        return spare[1] if spare is not None else 0

    @property
    def name(self) -> str | None:
        spare = self._spare
        return spare[0] if spare is not None else None

    def adopt(self, lv: str, size: int) -> None:
        """Know ``lv`` (``size`` bytes) as the spare (the garbage collection found it)."""
        with self._lock:
            self._spare = (lv, size)

    def forget(self) -> None:
        with self._lock:
            self._spare = None

    def sort_out(self, areas: Sequence[LvFacts], named: set[str]) -> list[str]:
        """Of the delta areas ``areas``, those not in ``named`` (by a manifest) and not
        open are spares: keep the largest, remove the others; returns ``VG/LV`` of those
        removed."""
        spares = sorted(
            (lv for lv in areas if lv.name not in named and not lv.is_open),
            key=lambda lv: (-lv.size, lv.name),
        )
        if not spares:
            return []
        self.adopt(spares[0].name, spares[0].size)
        for lv in spares[1:]:
            self.vg.remove_lv(lv.name)
        return [f"{self.vg.name}/{lv.name}" for lv in spares[1:]]

    def claim(self, needed: int) -> str | None:
        """Take the spare for a delta of ``needed`` bytes (whole extents) if it
        :func:`fits`; None: make a new LV (also while a spare is being made: never wait
        for it). The caller records the name in the generation's manifest; uncommitted,
        the LV is a spare again for the next open."""
        with self._lock:
            if self._spare is None or not fits(needed, self._spare[1]):
                return None
            lv, _ = self._spare
            self._spare = None
        log.debug("delta area %s/%s taken for %d bytes", self.vg.name, lv, needed)
        return lv

    def give_way(self) -> int:
        """Remove the spare (the space is wanted), after the one being made if any is
        made; the bytes freed."""
        with self._lock:
            while self._making:
                self._lock.wait()
            if self._spare is None:
                return 0
            lv, size = self._spare
            self._spare = None
            # Held across the lvremove: a make() meanwhile would count the VG's space
            # before the removal, and a claim finds no spare either way.
            try:
                self.vg.remove_lv(lv)
            except BlockguardError:
                log.warning("cannot remove spare delta area %s/%s", self.vg.name, lv)
                return 0
        log.info("spare delta area %s/%s removed: its space is needed", self.vg.name, lv)
        return size

    def make(self, size: int, go_on: Callable[[], bool] = lambda: True) -> str | None:
        """Have a spare that takes a delta of ``size`` bytes: keep the one there when it
        does, else replace it, when the VG keeps 1/:data:`KEEP_FREE` of its size free
        besides (no spare otherwise). ``go_on`` is asked before each LVM command: False
        (a job came) stops there. The spare's name, or None."""
        size = round_up(size, EXTENT)
        with self._lock:
            if self._making:
                return None
            if self._spare is not None and fits(size, self._spare[1]):
                return self._spare[0]
            old, self._spare = self._spare, None
            self._making = True
        lv: str | None = None
        try:
            if old is not None:
                if not go_on():
                    self._put_back(old)
                    return None
                self.vg.remove_lv(old[0])
            total, free = self.vg.vg_space()
            if free - size < max(size, total // KEEP_FREE):
                log.debug("no spare delta area of %d bytes: the VG has %d free", size, free)
                return None
            if not go_on():
                return None
            lv = f"{AREA_PREFIX}{uuid.uuid4().hex[:16]}"
            pvs = self.vg.place(size, self._preferred())
            self.vg.create_linear(lv, size, pvs, wipe=False, zero=False)
            self._put_back((lv, size))
        finally:
            with self._lock:
                self._making = False
                self._lock.notify_all()
        log.debug("spare delta area %s/%s made: %d bytes", self.vg.name, lv, size)
        return lv

    def _put_back(self, spare: tuple[str, int]) -> None:
        with self._lock:
            self._spare = spare
