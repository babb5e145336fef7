"""May this disk become pool space? The refusals every backend applies before writing.

The decision is the safety gate's (:mod:`blockguard.storage.safety`): a disk is refused,
with the reason named and nothing changed, when it or a device sharing its blocks is a
protected volume, a pool disk or holds a blockguard pool label (never lifted by
``force``), when it is mounted, swap or held, or when it is too small. Disks that merely
*hold data* (a partition table, a file system or an LVM label that nothing uses) are
refused too unless ``force`` is given.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from blockguard.errors import DeviceTooSmall
from blockguard.storage.blockdev import BlockDevice
from blockguard.storage.runner import Runner
from blockguard.storage.safety import SafetyGate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiskCheck:
    """The outcome of :func:`check_disk`: what would stop or warn about registration."""

    path: str
    rdev: int
    size: int
    has_data: list[str]


def legacy_gate(protected: Sequence[str] | Mapping[str, str], runner: Runner) -> SafetyGate:
    """A gate for callers that only know protected device paths (named by their path)."""
    if isinstance(protected, Mapping):
        return SafetyGate(protected, {}, runner)
    return SafetyGate({path: path for path in protected}, {}, runner)


@dataclass(frozen=True)
class DiskAdmission:
    """What a disk is admitted as pool space under, from pool creation down to the check.

    :param gate: the daemon's safety gate; without one, a gate knowing only ``protected``.
    :param protected: paths of protected volumes (for callers without a gate).
    :param force: overwrite a disk that merely holds data (lifts no other refusal).
    """

    gate: SafetyGate | None = None
    protected: Sequence[str] = ()
    force: bool = False

    def check(
        self, path: str, *, pool_disks: Mapping[str, str], min_size: int, runner: Runner
    ) -> DiskCheck:
        """Raise unless ``path`` may be overwritten as pool space (see :func:`check_disk`).

        :param pool_disks: the pool's other disks, by path, with the pool they are in.
        """
        base = self.gate if self.gate is not None else legacy_gate(self.protected, runner)
        return check_disk(
            path, gate=base.adding(pool_disks=pool_disks), min_size=min_size, force=self.force
        )


def check_disk(
    path: str, *, gate: SafetyGate, min_size: int, force: bool, purpose: str = "a pool disk"
) -> DiskCheck:
    """Raise unless ``path`` may be overwritten as pool space; reads only.

    :raises ProtectedDevice: it shares blocks with a protected volume.
    :raises PoolDiskRefused: it shares blocks with a pool disk.
    :raises ForeignPool: it (or a device sharing its blocks) holds a blockguard pool.
    :raises DeviceInUse: in use; or holds data (without ``force``).
    :raises DeviceTooSmall: smaller than ``min_size``.
    """
    family, refusals = gate.assess(path, purpose=purpose)
    for refusal in refusals:
        if not refusal.foreign_data:
            raise refusal.error
    with BlockDevice(path) as dev:
        size = dev.size
    if size < min_size:
        raise DeviceTooSmall(path=path, size=size, needed=min_size)
    data = [r for r in refusals if r.foreign_data]
    if data and not force:
        raise data[0].error
    has_data = [str(r.error.fields.get("reason", r.error)) for r in data]
    return DiskCheck(path, family.device.rdev, size, has_data)


def refuse_unless_free(
    path: str,
    *,
    protected: Sequence[str] | Mapping[str, str] = (),
    min_size: int,
    force: bool,
    runner: Runner,
    gate: SafetyGate | None = None,
    purpose: str = "a pool disk",
) -> DiskCheck:
    """Raise unless ``path`` may be overwritten as pool space (see :func:`check_disk`).

    :param gate: the daemon's gate; without one, a gate of ``protected`` paths is used.
    """
    return check_disk(
        path,
        gate=gate if gate is not None else legacy_gate(protected, runner),
        min_size=min_size,
        force=force,
        purpose=purpose,
    )


def devno(rdev: int) -> str:
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def wipe_if_forced(path: str, has_data: Sequence[str], runner: Runner) -> None:
    """Erase the signatures and partitions of a disk registered with ``force`` that
    holds data (``has_data``: what :func:`check_disk` found; nothing to do when empty)."""
    if has_data:
        log.warning("overwriting %s (forced): %s", path, "; ".join(has_data))
        runner.run(["wipefs", "-a", "-q", path], timeout=60)
        runner.run(["partx", "-d", path], timeout=60, check=False)
