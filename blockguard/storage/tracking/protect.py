"""Deciding whether a device may be protected (reads only; creates nothing)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from blockguard.errors import (
    AlreadyExists,
    DeviceInUse,
    DeviceReadOnly,
    DeviceTooSmall,
    NotABlockDevice,
)
from blockguard.storage.blockdev import BlockDevice, device_rdev, sysfs_dir
from blockguard.storage.tracking.changeset import (
    DEFAULT_CHUNK_SIZE,
    MIN_VOLUME_SIZE,
    validate_chunk_size,
)

# --- what may be protected --------------------------------------------------------------


def check_protectable(
    path: str | os.PathLike[str],
    pool_devices: Iterable[str | os.PathLike[str]],
    protected: Iterable[str | os.PathLike[str]] | Mapping[str, object],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> int:
    """Decide whether ``path`` may be protected; only reads, creates nothing.

    Devices are compared by device number, and through partitions and stacking (a
    partition of a pool disk, or a dm device built on one, is refused too).

    :param pool_devices: the pool's disks.
    :param protected: volumes already protected (paths, or a mapping keyed by path).
    :returns: the volume's size in bytes.
    :raises InvalidChunkSize: bad ``chunk_size``.
    :raises NotABlockDevice: missing, or not a block device.
    :raises AlreadyExists: it (the same device) is already protected.
    :raises DeviceInUse: it is, contains or sits on a pool disk.
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
    mine = _related_devices(rdev)
    for disk in pool_devices:
        disk_rdev = _rdev_or_none(disk)
        if disk_rdev is not None and mine & _related_devices(disk_rdev):
            raise DeviceInUse(path=path, reason=f"it is or shares a disk with pool disk {disk}")
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


def _related_devices(rdev: int) -> set[int]:
    """The device, its whole disk or partitions, and everything it is stacked on."""
    found: set[int] = set()
    todo = [sysfs_dir(rdev)]
    while todo:
        d = todo.pop()
        number = _sysfs_devno(d)
        if number is None or number in found:
            continue
        found.add(number)
        if (d / "partition").exists():
            todo.append(d.parent)
        todo.extend(p for p in d.iterdir() if (p / "partition").exists())
        slaves = d / "slaves"
        if slaves.is_dir():
            todo.extend(p.resolve() for p in slaves.iterdir())
    return found


def _sysfs_devno(d: os.PathLike[str]) -> int | None:
    try:
        with open(os.path.join(d, "dev")) as f:
            major, minor = f.read().strip().split(":")
    except (OSError, ValueError):
        return None
    return os.makedev(int(major), int(minor))
