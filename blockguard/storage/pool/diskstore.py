"""The generation store on disks of this host: what the ``dir`` and ``lvm`` pools share.

Both keep their generation directories on a file system they mount under
``MOUNT_ROOT/POOL`` from the pool's own disks, so both are reopened the same way (mount,
check that what is mounted describes this pool, remove the garbage of interrupted writes,
and close again if any of it fails) and admit a disk the same way (the safety gate, with
the pool's other disks as pool disks). A backend says how it mounts and checks
(:meth:`DiskStore._attach`), what it keeps of its own (:meth:`DiskStore._setup`) and
how it takes a disk in.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Self

from blockguard.storage.manifest import check_name
from blockguard.storage.pool.registration import DiskAdmission, DiskCheck
from blockguard.storage.pool.store import GenerationStore
from blockguard.storage.pool.values import AlertCallback
from blockguard.storage.runner import Runner, default_runner


class DiskStore(GenerationStore):
    """A generation store on this host's disks, mounted under ``mount_root``."""

    #: A smaller disk is refused.
    min_device_size: ClassVar[int]

    def __init__(
        self,
        name: str,
        devices: Sequence[str],
        mount_root: str | os.PathLike[str],
        runner: Runner,
        alert: AlertCallback | None,
    ) -> None:
        self.check_pool_name(name)
        super().__init__(name, alert)
        self.mount_root = Path(mount_root)
        self.runner = runner
        self.pool_uuid = ""
        self._setup(devices)

    @classmethod
    def check_pool_name(cls, name: str) -> None:
        """:raises InvalidInput: ``name`` cannot name a pool of this backend."""
        check_name(name, "pool name")

    @abstractmethod
    def _setup(self, devices: Sequence[str]) -> None:
        """The backend's own state of a pool on ``devices``, before anything is mounted."""

    @classmethod
    def open(
        cls,
        name: str,
        devices: Sequence[str],
        mount_root: str | os.PathLike[str],
        *,
        runner: Runner | None = None,
        alert: AlertCallback | None = None,
        collect: bool = True,
    ) -> Self:
        """Open an existing pool: mount it from ``devices`` (unless mounted), check that
        it is this pool, and remove garbage.

        :param collect: remove the garbage of interrupted writes (``pool import`` does
            not: it changes nothing on the pool).
        :raises CorruptMetadata: a device does not carry this pool.
        :raises NotFound: (lvm) no VG of this pool on ``devices``.
        """
        pool = cls(name, devices, mount_root, runner or default_runner(), alert)
        try:
            pool._attach(devices)
            if collect:
                pool.collect_garbage()
        except BaseException:
            pool.close()
            raise
        return pool

    @abstractmethod
    def _attach(self, devices: Sequence[str]) -> None:
        """Mount the pool's file systems on ``devices`` and check they describe this pool.

        :raises CorruptMetadata: one describes another pool.
        """

    @abstractmethod
    def collect_garbage(self) -> list[str]:
        """Remove what interrupted writes and removals left; returns what was removed."""

    def _admit(self, path: str, admission: DiskAdmission, pool_disks: Sequence[str]) -> DiskCheck:
        """Raise unless ``path`` may become a disk of this pool (``pool_disks``: its
        disks, refused as this pool's when given again, under any name)."""
        return admission.check(
            path,
            pool_disks={d: self.name for d in pool_disks},
            min_size=self.min_device_size,
            runner=self.runner,
        )
