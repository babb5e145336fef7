"""The one safety gate in front of every operation that writes a device.

(One thing at ~460 lines: the gate and the device family it judges; neither is used alone.)

A device is never judged alone: writing it also writes whatever shares its blocks. Its
*family* (:func:`device_family`), read from sysfs, is

- the device itself;
- upwards (what is built on it, transitively): its partitions, its holders (dm, md),
  loop devices whose backing file lives on it (the file system's ``st_dev``) or whose
  backing file is its device node;
- downwards (what it is built on, transitively): the whole disk it is a partition of, its
  slaves, and a loop device's backing: the block device of the file system its backing
  file lives on, or the block device node it was attached to directly.

Siblings (the other partitions of the same disk, other LVs of the same VG) share no
blocks with the device and are not family.

:class:`SafetyGate` decides from the family, reading only; the callers do the writing.
It refuses, naming the volume or pool and its device, when a family member is a protected
volume (:class:`~blockguard.errors.ProtectedDevice`), a pool disk
(:class:`~blockguard.errors.PoolDiskRefused`) or holds a blockguard pool label the
catalog does not know (:class:`~blockguard.errors.ForeignPool`); when the device or
something built on it is mounted, active swap, held or backs a loop device
(:class:`~blockguard.errors.DeviceInUse`); and, unless ``force``, when it holds foreign
data (a file system, a partition table, an LVM label). ``force`` lifts only the last.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from blockguard.core import vocab
from blockguard.errors import (
    DeviceInUse,
    ForeignPool,
    NotABlockDevice,
    PoolDiskRefused,
    ProtectedDevice,
)
from blockguard.storage.blockdev import device_rdev, has_lvm_label, mounted_devnos, swap_devices
from blockguard.storage.pool.label import PoolLabel, pool_label, probe_signature
from blockguard.storage.runner import Runner

SYS_DEV_BLOCK = Path("/sys/dev/block")
SYS_BLOCK = Path("/sys/block")

UP = "up"
DOWN = "down"
SELF = "self"


@dataclass(frozen=True)
class Member:
    """One device of a family.

    :param rdev: its device number.
    :param name: its kernel name (``loop3p1``, ``dm-0``).
    :param path: a device node of it (``/dev/...``), or "" when none exists.
    :param direction: ``self``, ``up`` (built on the device) or ``down`` (under it).
    :param relation: how the device relates to it, for messages ("is a partition of").
    """

    rdev: int
    name: str
    path: str
    direction: str
    relation: str

    @property
    def label(self) -> str:
        return self.path or self.name


@dataclass
class Family:
    """The family of one device, the device first."""

    members: list[Member] = field(default_factory=list)

    def __iter__(self) -> Iterator[Member]:
        return iter(self.members)

    def rdevs(self) -> set[int]:
        return {m.rdev for m in self.members}

    @property
    def device(self) -> Member:
        return self.members[0]


# --- reading sysfs --------------------------------------------------------------------


def _devno_of(directory: Path) -> int | None:
    try:
        major, minor = (directory / "dev").read_text().strip().split(":")
    except (OSError, ValueError):
        return None
    return os.makedev(int(major), int(minor))


def _sysdir(rdev: int) -> Path | None:
    d = SYS_DEV_BLOCK / vocab.devno(rdev)
    return d.resolve() if d.exists() else None


def _node(rdev: int, directory: Path) -> str:
    """A ``/dev`` node of the device (verified by st_rdev), or ""."""
    candidates = []
    dm_name = directory / "dm" / "name"
    if dm_name.exists():
        candidates.append(f"/dev/mapper/{dm_name.read_text().strip()}")
    try:
        for line in (directory / "uevent").read_text().splitlines():
            if line.startswith("DEVNAME="):
                candidates.append("/dev/" + line.split("=", 1)[1])
    except OSError:
        pass
    candidates.append(f"/dev/{directory.name}")
    for path in candidates:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev:
            return path
    return ""


def _linked(directory: Path, sub: str) -> list[Path]:
    d = directory / sub
    if not d.is_dir():
        return []
    return sorted(p.resolve() for p in d.iterdir())


def loop_backings() -> dict[int, tuple[int, str]]:
    """Every attached loop device: ``rdev -> (device its backing lies on, backing path)``.

    A backing file that is a block device node gives that device; a regular file gives
    the device of the file system it lives on. Backings on no block device (tmpfs,
    overlay, btrfs's anonymous devices) are left out: they share no disk with anything.
    """
    found: dict[int, tuple[int, str]] = {}
    if not SYS_BLOCK.is_dir():
        return found
    for entry in SYS_BLOCK.iterdir():
        backing_file = entry / "loop" / "backing_file"
        if not entry.name.startswith("loop") or not backing_file.exists():
            continue
        rdev = _devno_of(entry)
        try:
            backing = backing_file.read_text().strip()
            st = os.stat(backing.removesuffix(" (deleted)"))
        except OSError:
            continue
        under = st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev
        if rdev is not None and os.major(under) != 0:
            found[rdev] = (under, backing)
    return found


def device_family(rdev: int) -> Family:
    """The device, everything built on it and everything it is built on (see module doc)."""
    loops = loop_backings()
    family = Family()
    seen: set[int] = set()

    def add(number: int, direction: str, relation: str) -> Path | None:
        if number in seen:
            return None
        directory = _sysdir(number)
        seen.add(number)
        name = directory.name if directory else vocab.devno(number)
        node = _node(number, directory) if directory else ""
        family.members.append(Member(number, name, node, direction, relation))
        return directory

    start = add(rdev, SELF, "is")
    # Upwards: what is built on the device.
    todo: list[tuple[int, Path | None, int]] = [(rdev, start, 0)]
    while todo:
        number, directory, depth = todo.pop()
        indirect = "carries (through other devices)"
        above: list[tuple[int, str]] = []
        if directory is not None:
            for part in sorted(p for p in directory.iterdir() if (p / "partition").exists()):
                if (n := _devno_of(part)) is not None:
                    above.append((n, indirect if depth else "has the partition"))
            for holder in _linked(directory, "holders"):
                if (n := _devno_of(holder)) is not None:
                    above.append((n, indirect if depth else "is under"))
        for loop, (under, _) in loops.items():
            if under == number:
                above.append((loop, indirect if depth else "backs the loop device"))
        for n, relation in above:
            if n not in seen:
                todo.append((n, add(n, UP, relation), depth + 1))
    # Downwards: what the device is built on.
    todo = [(rdev, start, 0)]
    while todo:
        number, directory, depth = todo.pop()
        indirect = "is built (through other devices) on"
        below: list[tuple[int, str]] = []
        if directory is not None:
            if (directory / "partition").exists() and (n := _devno_of(directory.parent)):
                below.append((n, indirect if depth else "is a partition of"))
            for slave in _linked(directory, "slaves"):
                if (n := _devno_of(slave)) is not None:
                    below.append((n, indirect if depth else "is stacked on"))
        if number in loops:
            below.append((loops[number][0], indirect if depth else "is a loop device backed by"))
        for n, relation in below:
            if n not in seen:
                todo.append((n, add(n, DOWN, relation), depth + 1))
    return family


# --- the gate --------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """One reason not to write a device; ``error`` is raised for the first."""

    error: DeviceInUse
    foreign_data: bool = False


class SafetyGate:
    """Decides whether a device may be written (see the module docstring).

    :param protected: protected volume name -> its device path (every volume of the
        catalog, whatever its state).
    :param pool_disks: pool disk path -> pool name (every disk of every pool).
    :param runner: runs ``blkid`` and ``lvm pvs`` (reads only).
    :param scratch: scratch device path -> the pool that made it for a restore drill
        (see :meth:`check_scratch`); only these may be written on a pool's disks.
    """

    def __init__(
        self,
        protected: Mapping[str, str],
        pool_disks: Mapping[str, str],
        runner: Runner,
        scratch: Mapping[str, str] | None = None,
    ) -> None:
        self.protected = dict(protected)
        self.pool_disks = dict(pool_disks)
        self.runner = runner
        self.scratch = dict(scratch or {})

    def adding(
        self,
        *,
        protected: Mapping[str, str] | None = None,
        pool_disks: Mapping[str, str] | None = None,
        scratch: Mapping[str, str] | None = None,
    ) -> SafetyGate:
        """A gate that also knows ``protected``, ``pool_disks`` and ``scratch`` (this one
        is unchanged)."""
        return SafetyGate(
            {**self.protected, **(protected or {})},
            {**self.pool_disks, **(pool_disks or {})},
            self.runner,
            {**self.scratch, **(scratch or {})},
        )

    # --- deciding -------------------------------------------------------------------

    def claims(
        self,
        path: str,
        *,
        purpose: str,
        own_volume: str | None = None,
        probed: dict[str, dict[str, str]] | None = None,
    ) -> tuple[Family, list[Refusal]]:
        """The family of ``path`` and the protected volumes, pool disks and pool labels
        in it (never lifted by force).

        :param probed: ``blkid`` fields by path, filled as members are probed: one
            assessment probes a device once.
        """
        family = device_family(device_rdev(path))
        if own_volume is not None:
            # A volume's own device: what it is built on was judged when it was protected,
            # and its tracker may since have stacked it on pool space (dm-era's metadata
            # LV lives in the pool): only what is built on it can be someone else's.
            family = Family([m for m in family if m.direction != DOWN])
        refusals: list[Refusal] = []
        by_rdev = {m.rdev: m for m in family}
        for volume, device in sorted(self.protected.items()):
            rdev = _rdev_or_none(device)
            if rdev is None or rdev not in by_rdev:
                continue
            member = by_rdev[rdev]
            if volume == own_volume and member.direction == SELF:
                continue
            refusals.append(
                Refusal(
                    ProtectedDevice(
                        path=path,
                        purpose=purpose,
                        relation=member.relation,
                        device=device,
                        volume=volume,
                    )
                )
            )
        for disk, pool in sorted(self.pool_disks.items()):
            rdev = _rdev_or_none(disk)
            if rdev is None or rdev not in by_rdev:
                continue
            member = by_rdev[rdev]
            refusals.append(
                Refusal(
                    PoolDiskRefused(
                        path=path, purpose=purpose, relation=member.relation, device=disk, pool=pool
                    )
                )
            )
        known = {r for d in self.pool_disks if (r := _rdev_or_none(d)) is not None}
        for member in family:
            if not member.path or member.rdev in known:
                continue
            label = self._label(member, probed if probed is not None else {})
            if label is not None:
                refusals.append(
                    Refusal(
                        ForeignPool(
                            path=path,
                            purpose=purpose,
                            relation=member.relation,
                            device=member.path,
                            pool=f"{label.pool} ({label.backend}, {label.evidence})",
                        )
                    )
                )
        return family, refusals

    def assess(
        self, path: str, *, purpose: str, own_volume: str | None = None
    ) -> tuple[Family, list[Refusal]]:
        """Every reason not to write ``path``, the claims first (reads only)."""
        probed: dict[str, dict[str, str]] = {}
        family, refusals = self.claims(path, purpose=purpose, own_volume=own_volume, probed=probed)
        in_use = self._in_use(family)
        if in_use:
            refusals.append(Refusal(DeviceInUse(path=path, reason="; ".join(in_use))))
        data = self._foreign_data(family, probed)
        if data:
            refusals.append(
                Refusal(
                    DeviceInUse(path=path, reason="; ".join(data) + " (force would overwrite it)"),
                    foreign_data=True,
                )
            )
        return family, refusals

    def check_writable(
        self, path: str, *, purpose: str, force: bool, own_volume: str | None = None
    ) -> Family:
        """Raise unless ``path`` may be overwritten for ``purpose``.

        :param force: lifts only the "holds foreign data" refusal.
        :param own_volume: the volume whose own device this is (an in-place restore):
            that volume's device is allowed, and what it is built on is not looked at.
        :returns: the family, for the caller's log.
        :raises NotABlockDevice: ``path`` is not a block device.
        :raises ProtectedDevice: a family member is a protected volume.
        :raises PoolDiskRefused: a family member is a pool disk.
        :raises ForeignPool: a family member holds a blockguard pool label.
        :raises DeviceInUse: mounted, swap, held; or holds data (without ``force``).
        """
        family, refusals = self.assess(path, purpose=purpose, own_volume=own_volume)
        for refusal in refusals:
            if refusal.foreign_data and force:
                continue
            raise refusal.error
        return family

    def check_scratch(self, path: str, *, pool: str, purpose: str) -> Family:
        """Raise unless ``path`` may be overwritten as scratch space of ``pool``.

        A drill's scratch device (a loop device over a file of a dir pool, an LV of an lvm
        pool) lies on ``pool``'s own disks by construction. Only a device the gate was told
        is ``pool``'s scratch (``scratch``, by device number, not by name) has that claim
        lifted, and only when it is built on the pool disk (never the disk itself); every
        other refusal stands (a protected volume, another pool, a mount, a holder). Its
        content is the drill's own, so data found on it is no refusal.

        :raises NotABlockDevice: ``path`` is not a block device.
        :raises PoolDiskRefused: ``path`` is not a registered scratch device of ``pool``
            (then it is judged as any other device), or it is the pool disk itself.
        :raises DeviceInUse: any refusal of :meth:`check_writable` but ``pool``'s disks.
        """
        rdev = device_rdev(path)
        registered = {
            r
            for device, owner in self.scratch.items()
            if owner == pool and (r := _rdev_or_none(device)) is not None
        }
        family, refusals = self.assess(path, purpose=purpose)
        for refusal in refusals:
            error = refusal.error
            if rdev in registered:
                if refusal.foreign_data:
                    continue
                if (
                    isinstance(error, PoolDiskRefused)
                    and error.fields.get("pool") == pool
                    and _rdev_or_none(str(error.fields.get("device", ""))) != rdev
                ):
                    continue
            raise error
        return family

    def check_unclaimed(self, path: str, *, purpose: str, own_volume: str | None = None) -> Family:
        """Raise if a family member of ``path`` is protected, a pool disk or holds a pool
        label (for operations that do not overwrite the device, such as protect).

        :raises ProtectedDevice: see :meth:`check_writable`.
        :raises PoolDiskRefused: see :meth:`check_writable`.
        :raises ForeignPool: see :meth:`check_writable`.
        """
        family, refusals = self.claims(path, purpose=purpose, own_volume=own_volume)
        if refusals:
            raise refusals[0].error
        return family

    def foreign_data(self, path: str) -> list[str]:
        """What data ``path`` (and what is built on it) holds; [] when blank."""
        return self._foreign_data(device_family(device_rdev(path)), {})

    # --- the facts ------------------------------------------------------------------

    def _probe(self, path: str, probed: dict[str, dict[str, str]]) -> dict[str, str]:
        if path not in probed:
            probed[path] = probe_signature(path, self.runner)
        return probed[path]

    def _label(self, member: Member, probed: dict[str, dict[str, str]]) -> PoolLabel | None:
        return pool_label(member.path, self.runner, self._probe(member.path, probed))

    def _in_use(self, family: Family) -> list[str]:
        mounts = mounted_devnos()
        swaps = swap_devices()
        reasons = []
        for member in family:
            if member.direction == DOWN:
                # What a device is built on is in use by it; that is no reason.
                continue
            if member.direction == SELF:
                who = "it"
            elif member.relation == "has the partition":
                who = f"its partition {member.name}"
            else:
                who = f"{member.label} (built on it)"
            devno = vocab.devno(member.rdev)
            if devno in mounts:
                reasons.append(f"{who} is mounted on {mounts[devno]}")
            if member.rdev in swaps:
                reasons.append(f"{who} is an active swap device")
        for member in family:
            if member.relation == "is under":
                reasons.append(f"it is held by {member.name}")
            elif member.direction == UP and member.relation != "has the partition":
                reasons.append(f"it {member.relation} {member.label}")
        return reasons

    def _foreign_data(self, family: Family, probed: dict[str, dict[str, str]]) -> list[str]:
        device = family.device
        found = []
        parts = [m.name for m in family if m.relation == "has the partition"]
        if parts:
            found.append(f"it has partitions ({', '.join(parts)})")
        if device.path and has_lvm_label(device.path):
            found.append("it is an LVM physical volume")
        if device.path and not found:
            # What blkid sees matters only when nothing above already said it holds data.
            fields = self._probe(device.path, probed)
            if "TYPE" in fields:
                found.append(f"it contains a {fields['TYPE']} signature")
            elif "PTTYPE" in fields:
                found.append(f"it contains a {fields['PTTYPE']} partition table")
        return found


def _rdev_or_none(path: str) -> int | None:
    try:
        return device_rdev(path)
    except NotABlockDevice:
        return None
