"""The daemon's safety gate, built from the catalog in this one place.

Every operation that writes a device (restore target, pool create and extend, the
probe of a new pool disk, a drill's scratch space) and protect ask a gate made here, so
none of them can forget a protected volume or a pool disk: every volume of the catalog, in
whatever state, and every disk of every pool. A detached volume (its generations kept, no
device tracked) is no longer protected: its old device may be restored onto or protected
again. The scratch devices pools made for their restore drills (not in the catalog: they
live for one drill) are known as such, so that only they may be written on a pool's disks.
"""

from __future__ import annotations

from collections.abc import Mapping

from blockguard.core.catalog import Catalog
from blockguard.storage.runner import Runner
from blockguard.storage.safety import SafetyGate


def build_gate(
    catalog: Catalog, runner: Runner, scratch: Mapping[str, str] | None = None
) -> SafetyGate:
    """A gate knowing every protected volume and pool disk of ``catalog``.

    :param scratch: the drill scratch devices that exist now: path -> pool.
    """
    # "detached": the tracker backend of a volume without a device (engine/volumes.py;
    # not imported from there, which imports the pools and so this module).
    protected = {
        v.name: v.device_path
        for v in catalog.list_volumes()
        if v.device_path and v.tracker_backend != "detached"
    }
    pool_disks = {d.device_path: d.pool for d in catalog.list_pool_devices()}
    return SafetyGate(protected, pool_disks, runner, scratch)
