"""device-mapper through dmsetup (and the thin/era metadata tools), with device nodes verified.

Every dmsetup, thin_* and era_* command line of blockguard is built here (a test holds it).

Without udev (the guest kernel, early boot, a lagging udev), ``dmsetup create`` may leave
no ``/dev/mapper/NAME``; a later write to that path would fill a regular file. So every
create/resume here ends with :meth:`DeviceMapper.node`, which checks the node is the block
device the kernel reports for NAME, and makes it (``dmsetup mknodes``) if it is missing.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from blockguard.core.vocab import devno
from blockguard.errors import (
    CommandFailed,
    EnvironmentProblem,
    MetadataSnapshotBusy,
    NotABlockDevice,
    NotFound,
)
from blockguard.storage import dmioctl
from blockguard.storage.runner import Runner, default_runner

TIMEOUT = 60

#: Where the kernel shows a loaded device-mapper driver (module or built in).
_DRIVER_LISTS = (Path("/proc/misc"), Path("/proc/devices"))
_DRIVER_MODULE = Path("/sys/module/dm_mod")


def driver_loaded(lists: tuple[Path, ...] = _DRIVER_LISTS, module: Path = _DRIVER_MODULE) -> bool:
    """Whether the running kernel has the device-mapper driver.

    The node ``/dev/mapper/control`` says nothing: it can exist (a container's /dev, a
    left-over devtmpfs entry) on a kernel without the driver, and then every dmsetup or lvm
    call fails ("lvm failed with exit code 3"). The driver registers ``device-mapper`` in
    /proc/misc (the control node) and /proc/devices (the block major); as a module it also
    appears as /sys/module/dm_mod.

    :param lists: the /proc files to look in (tests pass their own).
    :param module: the module's sysfs directory.
    """
    if module.is_dir():
        return True
    for path in lists:
        try:
            text = path.read_text()
        except OSError:
            continue
        if any(line.split()[1:2] == ["device-mapper"] for line in text.splitlines()):
            return True
    return False


@dataclass(frozen=True)
class DmInfo:
    name: str
    major: int
    minor: int
    open_count: int
    suspended: bool

    @property
    def rdev(self) -> int:
        return os.makedev(self.major, self.minor)


class DeviceMapper:
    """dmsetup, one call per operation, all through the runner; a status, a table or a
    message through the dm ioctl where it can be had (:mod:`.dmioctl`).

    :param ioctl: use the ioctl where it can be had (False: dmsetup for everything).
    """

    def __init__(self, runner: Runner | None = None, *, ioctl: bool = True) -> None:
        self.run = runner or default_runner()
        self.ioctl = ioctl

    def _query(self, name: str = "", rdev: int = 0, *, table: bool = False) -> str | None:
        """A status or table through the ioctl; None when dmsetup must answer.

        :raises NotFound: no such dm device.
        :raises CommandFailed: the kernel refused it.
        """
        ctl = dmioctl.control() if self.ioctl else None
        if ctl is None:
            return None
        try:
            with self.run.section():
                return ctl.status(name=name, rdev=rdev, table=table).strip()
        except dmioctl.Unusable as exc:
            dmioctl.give_up(str(exc))
            return None
        except CommandFailed as exc:
            if exc.returncode in (errno.ENXIO, errno.ENODEV, errno.ENOENT):
                raise NotFound(what="device-mapper device", name=name or devno(rdev)) from None
            raise

    def _dmsetup(self, *args: str, check: bool = True, table: str | None = None) -> str:
        # A multi-line table goes on stdin: --table takes one line only.
        if table is None:
            return self.run.run(["dmsetup", *args], timeout=TIMEOUT, check=check).stdout
        return self.run.run(["dmsetup", *args], timeout=TIMEOUT, check=check, input=table).stdout

    def targets(self) -> set[str]:
        """The targets the kernel offers (empty when dmsetup fails)."""
        res = self.run.run(["dmsetup", "targets"], timeout=30, check=False)
        if res.returncode != 0:
            return set()
        return {line.split()[0] for line in res.stdout.splitlines() if line.strip()}

    def names(self) -> list[str]:
        """The names of every dm device (empty when dmsetup fails)."""
        res = self.run.run(["dmsetup", "ls"], timeout=TIMEOUT, check=False)
        if res.returncode != 0 or res.stdout.strip() == "No devices found":
            return []
        return [line.split()[0] for line in res.stdout.splitlines() if line.split()]

    def uuid(self, name: str) -> str:
        """NAME's dm uuid ("" when it has none or does not exist)."""
        res = self.run.run(
            ["dmsetup", "info", "-c", "--noheadings", "-o", "uuid", name],
            timeout=TIMEOUT, check=False,
        )  # fmt: skip
        return res.stdout.strip() if res.returncode == 0 else ""

    def table_of(self, rdev: int) -> str:
        """The table of the dm device with number ``rdev``."""
        found = self._query(rdev=rdev, table=True)
        if found is not None:
            return found
        return self._dmsetup("table", "-j", str(os.major(rdev)), "-m", str(os.minor(rdev)))

    def info(self, name: str) -> DmInfo | None:
        """Kernel facts about NAME, or None when no such dm device exists."""
        res = self.run.run(
            ["dmsetup", "info", "-c", "--noheadings", "--separator", ":",
             "-o", "name,major,minor,open,attr", name],
            timeout=TIMEOUT, check=False,
        )  # fmt: skip
        if res.returncode != 0 or not res.stdout.strip():
            return None
        fields = res.stdout.strip().split(":")
        return DmInfo(fields[0], int(fields[1]), int(fields[2]), int(fields[3]), "s" in fields[4])

    def exists(self, name: str) -> bool:
        return self.info(name) is not None

    def create(self, name: str, table: str, uuid: str | None = None) -> str:
        """Create NAME with TABLE; return its verified node path."""
        multi = "\n" in table
        args = ["create", name, *([] if multi else ["--table", table])]
        if uuid:
            args += ["--uuid", uuid]
        self._dmsetup(*args, table=table + "\n" if multi else None)
        return self.node(name)

    def table(self, name: str) -> str:
        found = self._query(name, table=True)
        if found is not None:
            return found
        if not self.exists(name):
            raise NotFound(what="device-mapper device", name=name)
        return self._dmsetup("table", name).strip()

    def status(self, name: str) -> str:
        found = self._query(name)
        if found is not None:
            return found
        return self._dmsetup("status", name).strip()

    def table_if_exists(self, name: str) -> str | None:
        """NAME's table, or None when there is no such dm device (one dmsetup call, where
        :meth:`table` asks :meth:`exists` first)."""
        try:
            found = self._query(name, table=True)
        except NotFound:
            return None
        if found is not None:
            return found or None
        res = self.run.run(["dmsetup", "table", name], timeout=TIMEOUT, check=False)
        if res.returncode != 0 or not res.stdout.strip():
            return None
        return res.stdout.strip()

    def message(self, name: str, message: str) -> str:
        """``dmsetup message NAME 0 MESSAGE`` (through the ioctl where it can be had:
        then nothing is returned; no message blockguard sends prints anything)."""
        ctl = dmioctl.control() if self.ioctl else None
        if ctl is not None:
            try:
                with self.run.section():
                    ctl.message(name, message)
                return ""
            except dmioctl.Unusable as exc:
                dmioctl.give_up(str(exc))
        return self._dmsetup("message", name, "0", *message.split())

    def held_metadata_root(self, pool: str) -> int | None:
        """The metadata block of thin pool POOL's held metadata snapshot (None: none held).

        The thin-pool status line is ``0 LEN thin-pool TRANSACTION META DATA HELD_ROOT ...``.

        :raises EnvironmentProblem: POOL is not a working thin pool.
        """
        fields = self.status(pool).split()
        if len(fields) < 7 or fields[2] != "thin-pool":
            raise EnvironmentProblem(detail=f"{pool} is not a working thin pool: {fields}")
        return None if fields[6] == "-" else int(fields[6])

    def reserve_metadata_snap(self, pool: str) -> None:
        """Reserve thin pool POOL's one metadata snapshot (what ``thin_delta -m`` reads).

        :raises MetadataSnapshotBusy: another process holds it (the kernel's EBUSY).
        """
        try:
            self.message(pool, "reserve_metadata_snap")
        except CommandFailed as exc:
            if "busy" in exc.stderr.lower():  # "Device or resource busy" (LC_ALL=C)
                raise MetadataSnapshotBusy(pool=pool, waited="") from None
            raise

    def release_metadata_snap(self, pool: str) -> None:
        self.message(pool, "release_metadata_snap")

    def suspend(self, name: str) -> None:
        self._dmsetup("suspend", name)

    def resume(self, name: str) -> None:
        self._dmsetup("resume", name)
        self.node(name)

    def reload(self, name: str, table: str) -> None:
        """Load TABLE as NAME's inactive table (active at the next resume)."""
        if "\n" in table:
            self._dmsetup("reload", name, table=table + "\n")
        else:
            self._dmsetup("reload", name, "--table", table)

    def remove(self, name: str, missing_ok: bool = True) -> None:
        try:
            self._dmsetup("remove", "--retry", name)
        except CommandFailed:
            if missing_ok and not self.exists(name):
                return
            raise

    def node(self, name: str) -> str:
        """``/dev/mapper/NAME``, verified to be NAME's block device; created if missing."""
        path = f"/dev/mapper/{name}"
        if self._node_named(path, name):
            return path
        info = self.info(name)
        if info is None:
            raise NotFound(what="device-mapper device", name=name)
        if not self._node_ok(path, info.rdev):
            self._dmsetup("mknodes", name)
            if not self._node_ok(path, info.rdev):
                raise NotABlockDevice(path, f"no node for dm device {info.major}:{info.minor}")
        return path

    def _node_named(self, path: str, name: str) -> bool:
        """``path`` is a block device the kernel names ``name`` (its sysfs ``dm/name``):
        the answer of ``dmsetup info`` without running it (a thin poll asks each time)."""
        try:
            if not self._node_ok(path, None):
                return False
            return self.name_of(os.stat(path).st_rdev) == name
        except FileNotFoundError:  # a dangling link: dmsetup info and mknodes decide
            return False

    @staticmethod
    def _node_ok(path: str, rdev: int | None) -> bool:
        """``path`` is a block device (number ``rdev`` unless None)."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if stat.S_ISREG(st.st_mode):
            # The trap of the platform notes: a plain file where a node should be.
            raise NotABlockDevice(path, "a regular file stands where the device node should be")
        if stat.S_ISLNK(st.st_mode):
            st = os.stat(path)
        return stat.S_ISBLK(st.st_mode) and rdev in (None, st.st_rdev)

    def name_of(self, rdev: int) -> str | None:
        """The dm name of a device number, or None if it is not a dm device."""
        try:
            with open(f"/sys/dev/block/{devno(rdev)}/dm/name") as f:
                return f.read().strip()
        except OSError:
            return None


def thin_delta(runner: Runner, metadata: str, snap1: int, snap2: int) -> str:
    """``thin_delta``'s XML of what differs between two thin devices, read from the held
    metadata snapshot of the pool whose metadata device is ``metadata``."""
    return runner.run(
        ["thin_delta", "--metadata-snap", "--snap1", str(snap1), "--snap2", str(snap2),
         metadata],
        timeout=600,
    ).stdout  # fmt: skip


def era_invalidate(runner: Runner, metadata: str, since: int) -> str:
    """``era_invalidate``'s XML of the blocks written since era ``since``, read from the
    held metadata snapshot on ``metadata``."""
    return runner.run(
        ["era_invalidate", "--written-since", str(since), "--metadata-snapshot", metadata],
        timeout=300,
    ).stdout  # fmt: skip
