"""What sysfs (and, for device-mapper, ``dmsetup table``) says about a block device: the
rest of a performance-table row next to the probe's speeds — identity, capacity,
rotational, transport and layout."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from blockguard.core import vocab
from blockguard.core.perftable import DeviceRole, DeviceSpeed, PerformanceEntry, Transport
from blockguard.errors import CommandFailed, CommandNotFound
from blockguard.storage.blockdev import BlockDevice, device_rdev, sysfs_dir
from blockguard.storage.dm import DeviceMapper
from blockguard.storage.runner import Runner, default_runner


@dataclass(frozen=True)
class DeviceDescription:
    """What sysfs (and dmsetup) say about a device: a performance entry without speeds.

    :param device_id: stable identity (WWN/WWID, serial, dm/md UUID, loop backing file).
    :param kernel_name: e.g. ``loop3``, ``nvme0n1``, ``dm-2``, ``md0``.
    :param devno: ``MAJ:MIN``.
    :param capacity: bytes.
    :param rotational: ``queue/rotational``.
    :param transport: how it is attached (stacked devices: that of all their disks).
    :param layout: ``single``, ``partition``, ``linear``, ``striped 2``, ``raid5 2D+1P``...
    """

    device_id: str
    kernel_name: str
    devno: str
    capacity: int
    rotational: bool
    transport: Transport
    layout: str

    def entry(
        self,
        speed: DeviceSpeed,
        role: DeviceRole = DeviceRole.POOL,
        measured_at: datetime | None = None,
    ) -> PerformanceEntry:
        """This description with measured speeds, as a performance-table row."""
        return PerformanceEntry(
            device_id=self.device_id,
            role=role,
            capacity=self.capacity,
            rotational=self.rotational,
            transport=self.transport,
            layout=self.layout,
            speed=speed,
            measured_at=measured_at or datetime.now(UTC),
        )


def describe_device(
    path: str | os.PathLike[str], *, runner: Runner | None = None
) -> DeviceDescription:
    """Identity, capacity, rotational, transport and layout of a block device.

    :param path: the device.
    :param runner: for ``dmsetup table`` of device-mapper devices.
    :raises NotABlockDevice: if the path is not a block device.
    """
    path = os.fspath(path)
    rdev = device_rdev(path)
    with BlockDevice(path, expect_rdev=rdev) as dev:
        capacity = dev.size
    sysdir = sysfs_dir(rdev)
    disk = sysdir.parent if (sysdir / "partition").exists() else sysdir
    devno = vocab.devno(rdev)
    return DeviceDescription(
        device_id=_identity(sysdir, disk, devno),
        kernel_name=sysdir.name,
        devno=devno,
        capacity=capacity,
        rotational=_read(disk / "queue" / "rotational") == "1",
        transport=_transport(disk),
        layout=_layout(sysdir, disk, rdev, runner or default_runner()),
    )


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _identity(sysdir: Path, disk: Path, devno: str) -> str:
    part = f"-part{_read(sysdir / 'partition')}" if sysdir != disk else ""
    name = disk.name
    if name.startswith("loop"):
        backing = _read(disk / "loop" / "backing_file")
        if backing:
            offset = _read(disk / "loop" / "offset") or "0"
            return f"loop:{backing}@{offset}{part}"
    if name.startswith("dm-"):
        uuid = _read(disk / "dm" / "uuid") or _read(disk / "dm" / "name")
        if uuid:
            return f"dm:{uuid}{part}"
    if name.startswith("md"):
        uuid = _read(disk / "md" / "uuid")
        if uuid:
            return f"md:{uuid}{part}"
    for candidate in ("wwid", "device/wwid", "serial", "device/serial"):
        value = _read(disk / candidate)
        if value:
            return f"{value}{part}"
    # No stable identity known to the kernel: the device number is all there is.
    return f"devno:{devno}"


def _transport(disk: Path, seen: frozenset[str] = frozenset()) -> Transport:
    name = disk.name
    if name.startswith("loop"):
        return Transport.LOOP
    if name.startswith("nvme"):
        return Transport.NVME
    if name.startswith("vd"):
        return Transport.VIRTIO
    slaves = disk / "slaves"
    if name.startswith(("dm-", "md")) and slaves.is_dir():
        # A stacked device is as fast as what it is built on: report that, when uniform.
        below = {
            _transport(s.resolve(), seen | {name})
            for s in slaves.iterdir()
            if s.resolve().name not in seen
        }
        return below.pop() if len(below) == 1 else Transport.OTHER
    device = disk / "device"
    try:
        device_path = str(device.resolve())
        driver = (device / "driver").resolve().name
    except OSError:
        return Transport.OTHER
    if "virtio" in driver or "/virtio" in device_path:
        return Transport.VIRTIO
    if "/nvme" in device_path:
        return Transport.NVME
    if "/ata" in device_path:
        return Transport.SATA
    if driver == "sd" or (device / "scsi_level").exists():
        return Transport.SCSI
    return Transport.OTHER


def _layout(sysdir: Path, disk: Path, rdev: int, runner: Runner) -> str:
    if sysdir != disk:
        return "partition"
    name = disk.name
    if name.startswith("dm-"):
        try:
            table = DeviceMapper(runner).table_of(rdev)
        except (CommandFailed, CommandNotFound):
            return "dm"
        return dm_layout(table)
    if name.startswith("md") and (disk / "md").is_dir():
        disks = _read(disk / "md" / "raid_disks")
        return md_layout(_read(disk / "md" / "level"), int(disks) if disks.isdigit() else 0)
    return "single"


def raid_layout(level: str, disks: int) -> str:
    """A RAID level and member count in the table's words, e.g. ``raid5 2D+1P``.

    :param level: ``raid0``/``raid1``/``raid4``/``raid5``/``raid6``/``raid10`` (dm-raid
        sub-types like ``raid5_ls`` or ``raid6_zr`` are accepted).
    :param disks: number of member devices.
    """
    base = level.split("_", 1)[0]
    parity = {"raid4": 1, "raid5": 1, "raid6": 2}.get(base)
    if parity is not None and disks > parity:
        return f"{base} {disks - parity}D+{parity}P"
    if base == "raid1":
        return f"raid1 {disks} mirrors"
    if base == "raid0":
        return f"raid0 {disks} stripes"
    if base == "raid10":
        return f"raid10 {disks} disks"
    return f"{base} {disks} disks" if disks else base


def md_layout(level: str, raid_disks: int) -> str:
    """Layout of an md array from ``md/level`` and ``md/raid_disks``."""
    if not level:
        return "md"
    if level == "linear":
        return f"linear {raid_disks} disks"
    return raid_layout(level, raid_disks)


def dm_layout(table: str) -> str:
    """Layout of a device-mapper device from its ``dmsetup table`` output.

    One description per distinct segment, joined with ``+`` when segments differ:
    ``linear``, ``striped 2``, ``mirror 2``, ``raid5 2D+1P``, ``thin``...
    """
    described: list[str] = []
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        kind, args = fields[2], fields[3:]
        text = _dm_segment(kind, args)
        if text not in described:
            described.append(text)
    return "+".join(described) if described else "dm"


def _dm_segment(kind: str, args: list[str]) -> str:
    try:
        if kind == "striped":
            return f"striped {int(args[0])}"
        if kind == "mirror":
            # mirror <log type> <#log args> <log args...> <#devs> <dev offset>...
            nlog = int(args[1])
            return f"mirror {int(args[2 + nlog])}"
        if kind == "raid":
            # raid <raid type> <#raid params> <params...> <#raid devs> <meta dev>...
            nparams = int(args[1])
            return raid_layout(args[0], int(args[2 + nparams]))
    except (IndexError, ValueError):
        return kind
    return kind
