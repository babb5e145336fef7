"""Scratch space on a pool for its restore drill's copy restores.

A drill's copy restores go into a real device on the pool (a loop device over a sparse
file of a dir pool, a thin LV of an lvm pool: :meth:`PoolBackend.drill_scratch`), so that
they measure the copy path's writes and the scratch's write rate instead of assuming a
default target speed. While it exists the pool registry knows it, and so does every gate
built meanwhile: the gate lets only that device, as that pool's scratch, be written on
the pool's disks (:meth:`~blockguard.storage.safety.SafetyGate.check_scratch`). It is
removed after the drill, also on failure; one a crash left is removed when the pool is
opened at daemon start (its garbage collection).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from blockguard.engine.pools import PoolRegistry
from blockguard.errors import BlockguardError, PoolSpaceLow

log = logging.getLogger(__name__)


@contextlib.contextmanager
def scratch_space(
    pools: PoolRegistry, pool: str, size: int, reserve: int = 0
) -> Iterator[str | None]:
    """The device of new scratch space of ``size`` bytes on ``pool``, registered with the
    gate, removed on exit; None (logged) when the pool cannot make one (another drill of
    the pool has it, no room, a pool without block space): the drill's copy restores then
    only rehearse their reads.

    :param reserve: bytes the pool must keep free besides (the next backup's): a drill
        never takes the room a backup needs.
    """
    backend = pools.backend(pool)
    if not pools.claim_scratch(pool):
        log.info("pool %s: its drill scratch space is in use by another drill", pool)
        yield None
        return
    scratch = None
    try:
        try:
            free = backend.capacity().free
            if free < size + reserve:
                raise PoolSpaceLow(pool=pool, free=free, needed=size + reserve)
            scratch = backend.drill_scratch(size)
        except BlockguardError as exc:
            log.warning(
                "pool %s: no scratch space for the restore drill's copy restores (%s); "
                "they time the read side only",
                pool,
                exc,
                extra={"POOL": pool},
            )
        if scratch is None:
            yield None
            return
        log.info("pool %s: drill scratch space %s on %s", pool, scratch.name, scratch.device)
        pools.scratch_made(scratch.device, pool)
        try:
            yield scratch.device
        finally:
            pools.scratch_removing(scratch.device)
            scratch.release()
    finally:
        pools.unclaim_scratch(pool)
