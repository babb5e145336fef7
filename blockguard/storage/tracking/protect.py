"""Deciding whether a device may be protected (reads only; creates nothing)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from blockguard.errors import (
    AlreadyExists,
    DeviceReadOnly,
    DeviceTooSmall,
    NotABlockDevice,
)
from blockguard.storage.blockdev import BlockDevice, device_rdev
from blockguard.storage.runner import default_runner
from blockguard.storage.safety import SafetyGate
from blockguard.storage.tracking.changeset import (
    DEFAULT_CHUNK_SIZE,
    MIN_VOLUME_SIZE,
    validate_chunk_size,
)

# --- what may be protected --------------------------------------------------------------


def check_protectable(
    path: str | os.PathLike[str],
    pool_devices: Iterable[str | os.PathLike[str]] | Mapping[str, str],
    protected: Iterable[str | os.PathLike[str]] | Mapping[str, object],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    gate: SafetyGate | None = None,
) -> int:
    """Decide whether ``path`` may be protected; only reads, creates nothing.

    The safety gate compares the device's whole family (its partitions, the disk it is a
    partition of, what is stacked on it and what it is stacked on, loop backings) with
    every protected volume and pool disk: two volumes may never track the same blocks,
    and a pool's space is never a volume.

    :param pool_devices: the pool disks (paths, or a mapping path -> pool name); ignored
        when ``gate`` is given.
    :param protected: volumes already protected (paths, or a mapping keyed by path).
    :param gate: the daemon's safety gate (knows every volume and pool disk by name).
    :returns: the volume's size in bytes.
    :raises InvalidChunkSize: bad ``chunk_size``.
    :raises NotABlockDevice: missing, or not a block device.
    :raises AlreadyExists: it (the same device) is already protected.
    :raises ProtectedDevice: a device of its family is a protected volume.
    :raises PoolDiskRefused: a device of its family is a pool disk.
    :raises ForeignPool: a device of its family holds a blockguard pool.
    :raises DeviceReadOnly: the kernel says it is read-only.
    :raises DeviceTooSmall: smaller than 1 MiB or than one chunk.
    """
    validate_chunk_size(chunk_size)
    path = os.fspath(path)
    with BlockDevice(path) as dev:
        rdev, size, read_only = dev.rdev, dev.size, dev.read_only
    for other in protected:
        if _rdev_or_none(other) == rdev:
            raise AlreadyExists(what="protected volume", name=f"{path} ({os.fspath(other)})")
    if gate is None:
        disks = (
            dict(pool_devices)
            if isinstance(pool_devices, Mapping)
            else {os.fspath(d): os.fspath(d) for d in pool_devices}
        )
        gate = SafetyGate({os.fspath(p): os.fspath(p) for p in protected}, disks, default_runner())
    gate.check_unclaimed(path, purpose="a protected volume")
    if read_only:
        raise DeviceReadOnly(path=path)
    needed = max(MIN_VOLUME_SIZE, chunk_size)
    if size < needed:
        raise DeviceTooSmall(path=path, size=size, needed=needed)
    return size


def _rdev_or_none(path: str | os.PathLike[str]) -> int | None:
    try:
        return device_rdev(path)
    except NotABlockDevice:
        return None
