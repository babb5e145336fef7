"""Swap-ins a restore left for the admin: listed, and released when no longer used.

A swap-in restore hands over a new device made from a generation (a loop device over a
clone of the full on a dir pool, a thin snapshot on an lvm pool); the daemon does not
know when service moved off it again, so it stays until the admin releases it. Release
refuses a device that is still mounted or held open exclusively.
"""

from __future__ import annotations

import logging
from typing import Any

from blockguard.engine.pools import PoolRegistry
from blockguard.errors import Busy, DeviceInUse, NotFound
from blockguard.storage.blockdev import BlockDevice

log = logging.getLogger(__name__)


def list_swap_ins(pools: PoolRegistry) -> list[dict[str, Any]]:
    """Every swap-in of every pool: ``{"pool", "name", "device"}`` (device ``""`` when it
    is not attached)."""
    found = []
    for pool in pools.names():
        for name, device in pools.backend(pool).swap_in_devices():
            found.append({"pool": pool, "name": name, "device": device})
    return found


def release_swap_in(pools: PoolRegistry, which: str) -> dict[str, Any]:
    """Detach and delete the swap-in named ``which`` (its name or its device).

    :raises NotFound: no swap-in has that name or device.
    :raises Busy: its device is mounted or open exclusively.
    """
    for swap in list_swap_ins(pools):
        devices = [d.strip() for d in swap["device"].split(",") if d.strip()]
        if which != swap["name"] and which not in devices:
            continue
        for device in devices:
            try:
                with BlockDevice(device, exclusive=True):
                    pass
            except DeviceInUse:
                raise Busy(
                    what=f"swap-in {device}", reason="it is mounted or open; stop using it first"
                ) from None
        pools.backend(swap["pool"]).release_swap_in(swap["name"])
        log.info("released swap-in %s (%s) of pool %s", swap["name"], swap["device"], swap["pool"])
        return swap
    raise NotFound(what="swap-in", name=which)
