"""May this disk become pool space? The refusals every backend applies before writing.

A disk is refused, with every reason named and nothing changed, when it is mounted, an
active swap device, held by another device, a protected volume, too small, or has a
mounted or held partition. Disks that merely *hold data* (a partition table, a file
system or an LVM label that nothing uses) are refused too unless ``force`` is given.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from blockguard.errors import DeviceInUse, DeviceTooSmall, NotABlockDevice
from blockguard.storage.blockdev import BlockDevice, device_rdev, in_use_reasons, partitions
from blockguard.storage.runner import Runner

#: Reasons from :func:`in_use_reasons` that mean "it holds data" rather than "it is used".
_DATA_ONLY = ("it has partitions", "it is an LVM physical volume")


@dataclass(frozen=True)
class DiskCheck:
    """The outcome of :func:`check_disk`: what would stop or warn about registration."""

    path: str
    rdev: int
    size: int
    blocking: list[str]
    has_data: list[str]


def check_disk(path: str, *, protected: Sequence[str], min_size: int, runner: Runner) -> DiskCheck:
    """Collect every reason not to take ``path`` (reads only)."""
    rdev = device_rdev(path)
    blocking: list[str] = []
    has_data: list[str] = []
    for other in protected:
        try:
            if device_rdev(other) == rdev:
                blocking.append(f"it is the protected volume {other}")
        except NotABlockDevice:
            continue
    for reason in in_use_reasons(path):
        (has_data if reason.startswith(_DATA_ONLY) else blocking).append(reason)
    for part in partitions(rdev):
        for reason in in_use_reasons(f"/dev/{part}"):
            if not reason.startswith(_DATA_ONLY):
                blocking.append(f"its partition {part}: {reason}")
    signature = _signature(path, runner)
    if signature and not any(r.startswith(_DATA_ONLY) for r in has_data):
        has_data.append(f"it contains {signature}")
    with BlockDevice(path) as dev:
        size = dev.size
    return DiskCheck(path, rdev, size, blocking, has_data)


def refuse_unless_free(
    path: str, *, protected: Sequence[str], min_size: int, force: bool, runner: Runner
) -> DiskCheck:
    """Raise unless ``path`` may be overwritten as pool space.

    :raises DeviceInUse: naming every reason (``force`` lifts only the "has data" ones).
    :raises DeviceTooSmall: smaller than ``min_size``.
    """
    check = check_disk(path, protected=protected, min_size=min_size, runner=runner)
    if check.blocking:
        raise DeviceInUse(path=path, reason="; ".join(check.blocking + check.has_data))
    if check.size < min_size:
        raise DeviceTooSmall(path=path, size=check.size, needed=min_size)
    if check.has_data and not force:
        raise DeviceInUse(
            path=path, reason="; ".join(check.has_data) + " (force would overwrite it)"
        )
    return check


def _signature(path: str, runner: Runner) -> str:
    """What ``blkid`` finds on the disk itself (low-level probe; no udev needed)."""
    result = runner.run(["blkid", "-p", "-o", "export", path], timeout=30, check=False)
    if result.returncode != 0:
        return ""
    fields = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    if "TYPE" in fields:
        return f"a {fields['TYPE']} signature"
    if "PTTYPE" in fields:
        return f"a {fields['PTTYPE']} partition table"
    return ""


def devno(rdev: int) -> str:
    return f"{os.major(rdev)}:{os.minor(rdev)}"
