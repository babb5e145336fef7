"""LVM queries and commands, confined to the devices blockguard was given.

Every LVM command line of blockguard is built here (a test holds it): every command gets
``--config`` with ``ignore_suspended_devices`` and, when the caller names the physical
volumes, a devices filter (as blivet does), so blockguard can never touch a disk it was
not given, nor block on a device it suspended.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import overload

from blockguard.errors import NotFound
from blockguard.storage.runner import Runner, default_runner

TIMEOUT = 300

# What a command did to a VG's allocation, for :attr:`Lvm.allocation_changed`.
LV_CREATED = "lv-created"  # a new LV: no other LV moved
LV_REMOVED = "lv-removed"
#: A thin LV removed: its blocks go back to the thin pool, the VG's allocation is unchanged.
THIN_REMOVED = "thin-removed"
VG_CHANGED = "vg-changed"  # anything else: PVs, the VG, an LV grown


@dataclass(frozen=True)
class LvInfo:
    vg: str
    name: str
    size: int
    segtype: str
    pool: str
    thin_id: int | None
    data_percent: float | None
    metadata_percent: float | None
    dm_name: str


class Lvm:
    """The ``lvm`` tool, through the runner."""

    def __init__(self, runner: Runner | None = None, devices: Sequence[str] = ()) -> None:
        self.run = runner or default_runner()
        self.devices = list(devices)
        #: Called after every command that may change what a VG allocated (PVs, VG, linear
        #: LVs, the thin pool's size), whether it worked or not, with the command and the VG
        #: or VG/LV it named (the effect: :data:`LV_CREATED`, :data:`LV_REMOVED`,
        #: :data:`VG_CHANGED`): a cache of VG space drops what the command may have changed.
        #: Thin LVs and snapshots allocate from the thin pool, not the VG: no call.
        self.allocation_changed: Callable[[str, str], None] | None = None

    def config_args(self) -> list[str]:
        """``--config`` arguments every lvm call of blockguard carries."""
        # Never look into a suspended device: a status query of a suspended dm-era device
        # blocks in the kernel (seen on 6.1), and the resume that would end the suspension
        # then hangs behind it. blockguard suspends devices for its point-in-time copies.
        settings = "ignore_suspended_devices = 1"
        if self.devices:
            accept = ", ".join(f'"a|^{d}$|"' for d in self.devices)
            settings += f' filter = [ {accept}, "r|.*|" ]'
        return ["--config", f"devices {{ {settings} }}"]

    def _lvm(self, command: str, *args: str) -> str:
        return self.run.run(["lvm", command, *self.config_args(), *args], timeout=TIMEOUT).stdout

    def _allocate(self, effect: str, target: str, command: str, *args: str) -> str:
        """``_lvm`` for a command that changes the VG's allocation (see
        :attr:`allocation_changed`)."""
        try:
            return self._lvm(command, *args)
        finally:
            if self.allocation_changed is not None:
                self.allocation_changed(effect, target)

    # --- reports ------------------------------------------------------------------------

    def _report(
        self, command: str, fields: str, targets: Sequence[str], extra: Sequence[str], check: bool
    ) -> list[list[str]] | None:
        res = self.run.run(
            ["lvm", command, *self.config_args(), *extra, "--noheadings", "--nosuffix",
             "--units", "b", "--separator", "|", "-o", fields, *targets],
            timeout=TIMEOUT, check=check,
        )  # fmt: skip
        if res.returncode != 0:
            return None
        lines = [line for line in res.stdout.splitlines() if line.strip()]
        return [[f.strip() for f in line.split("|")] for line in lines]

    @overload
    def lvs(self, fields: str, *targets: str, all_lvs: bool = False) -> list[list[str]]: ...
    @overload
    def lvs(
        self, fields: str, *targets: str, all_lvs: bool = False, check: bool
    ) -> list[list[str]] | None: ...
    def lvs(
        self, fields: str, *targets: str, all_lvs: bool = False, check: bool = True
    ) -> list[list[str]] | None:
        """Rows of ``lvs -o FIELDS`` (sizes in bytes); None when ``check`` is off and it
        failed. ``all_lvs`` includes hidden LVs (a thin pool's ``_tdata``, ``_tmeta``)."""
        return self._report("lvs", fields, targets, ["-a"] if all_lvs else [], check)

    @overload
    def vgs(self, fields: str, *targets: str) -> list[list[str]]: ...
    @overload
    def vgs(self, fields: str, *targets: str, check: bool) -> list[list[str]] | None: ...
    def vgs(self, fields: str, *targets: str, check: bool = True) -> list[list[str]] | None:
        """Rows of ``vgs -o FIELDS`` (sizes in bytes); None when ``check`` is off and it failed."""
        return self._report("vgs", fields, targets, [], check)

    @overload
    def pvs(self, fields: str, *targets: str) -> list[list[str]]: ...
    @overload
    def pvs(self, fields: str, *targets: str, check: bool) -> list[list[str]] | None: ...
    def pvs(self, fields: str, *targets: str, check: bool = True) -> list[list[str]] | None:
        """Rows of ``pvs -o FIELDS`` (sizes in bytes); None when ``check`` is off and it failed."""
        return self._report("pvs", fields, targets, [], check)

    def vg_exists(self, vg: str) -> bool:
        res = self.run.run(["lvm", "vgs", *self.config_args(), vg], timeout=TIMEOUT, check=False)
        return res.returncode == 0

    # --- physical volumes and volume groups --------------------------------------------

    def create_pvs(self, *devices: str) -> None:
        self._allocate(VG_CHANGED, "", "pvcreate", "-qq", "-y", *devices)

    def create_vg(self, vg: str, devices: Sequence[str], extent: int, tag: str) -> None:
        self._allocate(
            VG_CHANGED,
            vg,
            "vgcreate",
            "-qq",
            "-y",
            "-s",
            f"{extent}b",
            "--addtag",
            tag,
            vg,
            *devices,
        )

    def extend_vg(self, vg: str, device: str) -> None:
        self._allocate(VG_CHANGED, vg, "vgextend", "-qq", vg, device)

    def remove_vg_and_pvs(self, vg: str) -> None:
        """Remove VG and the labels of this object's PVs, forced; failures are ignored
        (it undoes a half-made pool too)."""
        self.run.run(["lvm", "vgremove", *self.config_args(), "-ff", "-y", vg],
                     timeout=TIMEOUT, check=False)  # fmt: skip
        if self.devices:
            self.run.run(["lvm", "pvremove", *self.config_args(), "-ff", "-y", *self.devices],
                         timeout=TIMEOUT, check=False)  # fmt: skip
        if self.allocation_changed is not None:
            self.allocation_changed(VG_CHANGED, vg)

    # --- logical volumes ----------------------------------------------------------------

    def create_linear(
        self,
        vg: str,
        lv: str,
        size: int,
        pvs: Sequence[str] = (),
        *,
        wipe: bool,
        zero: bool | None = None,
    ) -> None:
        """A linear LV of ``size`` bytes on ``pvs`` (anywhere in VG when empty).

        :param wipe: wipe signatures found at its start (``-W``).
        :param zero: zero its first KiB (``-Z``; None: LVM's default).
        """
        flags = ["-Wy" if wipe else "-Wn"]
        if zero is not None:
            flags.append("-Zy" if zero else "-Zn")
        self._allocate(
            LV_CREATED, f"{vg}/{lv}",
            "lvcreate", "-qq", "-y", *flags, "-L", f"{size}b", "-n", lv, vg, *pvs,
        )  # fmt: skip

    def create_thin_pool(
        self, vg: str, lv: str, size: int, metadata_size: int, block: int, pvs: Sequence[str]
    ) -> None:
        self._allocate(
            LV_CREATED, f"{vg}/{lv}",
            "lvcreate", "-qq", "-y", "--type", "thin-pool", "-L", f"{size}b",
            "--poolmetadatasize", f"{metadata_size}b", "-c", f"{block}b", "-n", lv, vg, *pvs,
        )  # fmt: skip

    def error_when_full(self, vg: str, lv: str) -> None:
        """Make thin pool VG/LV fail writes at once when full (instead of queueing them)."""
        self._lvm("lvchange", "-qq", "--errorwhenfull", "y", f"{vg}/{lv}")

    def create_thin(self, vg: str, pool: str, lv: str, size: int) -> None:
        self._lvm("lvcreate", "-qq", "-y", "-V", f"{size}b", "-T", f"{vg}/{pool}", "-n", lv)

    def snapshot(self, vg: str, origin: str, lv: str, *, activate: bool, now: bool = False) -> None:
        """A thin snapshot of VG/ORIGIN; ``activate``: without the activation-skip flag
        (active now and at every activation), else LVM's default for thin snapshots.

        :param now: with the activation-skip flag kept, active all the same from the
            start (``-K``): one command instead of a ``lvcreate`` and a ``lvchange``.
        """
        if activate:
            self._lvm("lvcreate", "-qq", "-y", "-s", "-kn", f"{vg}/{origin}", "-n", lv)
        else:
            skip = ["-K"] if now else []
            self._lvm("lvcreate", "-qq", "-s", *skip, f"{vg}/{origin}", "-n", lv)

    def activate(self, vg: str, lv: str, *, ignore_skip: bool = False) -> None:
        """:param ignore_skip: activate even with the activation-skip flag (``-K``)."""
        self._lvm("lvchange", "-qq", "-ay", *(["-K"] if ignore_skip else []), f"{vg}/{lv}")

    def deactivate(self, vg: str, lv: str) -> None:
        self._lvm("lvchange", "-qq", "-an", f"{vg}/{lv}")

    def remove_lv(self, vg: str, lv: str, *, thin: bool = False) -> None:
        """:param thin: ``lv`` is a thin LV (the VG's allocation does not change)."""
        effect = THIN_REMOVED if thin else LV_REMOVED
        self._allocate(effect, f"{vg}/{lv}", "lvremove", "-qq", "-f", f"{vg}/{lv}")

    def extend(self, vg: str, lv: str, grow: int, pvs: Sequence[str] = ()) -> None:
        self._allocate(
            VG_CHANGED, f"{vg}/{lv}", "lvextend", "-qq", "-L", f"+{grow}b", f"{vg}/{lv}", *pvs
        )

    def extend_pool_metadata(self, vg: str, lv: str, grow: int) -> None:
        self._allocate(
            VG_CHANGED,
            f"{vg}/{lv}",
            "lvextend",
            "-qq",
            "--poolmetadatasize",
            f"+{grow}b",
            f"{vg}/{lv}",
        )

    def lv(self, vg: str, lv: str) -> LvInfo:
        """Facts about VG/LV.

        :raises NotFound: no such LV.
        """
        res = self.run.run(
            ["lvm", "lvs", *self.config_args(), "--noheadings", "--nosuffix", "--units", "b",
             "--separator", "|", "-o",
             "vg_name,lv_name,lv_size,segtype,pool_lv,thin_id,data_percent,metadata_percent,"
             "lv_dm_path", f"{vg}/{lv}"],
            timeout=TIMEOUT, check=False,
        )  # fmt: skip
        if res.returncode != 0 or not res.stdout.strip():
            raise NotFound(what="logical volume", name=f"{vg}/{lv}")
        f = [x.strip() for x in res.stdout.strip().split("|")]
        return LvInfo(
            vg=f[0], name=f[1], size=int(f[2]), segtype=f[3], pool=f[4],
            thin_id=int(f[5]) if f[5] else None,
            data_percent=float(f[6]) if f[6] else None,
            metadata_percent=float(f[7]) if f[7] else None,
            dm_name=f[8].rsplit("/", 1)[-1],
        )  # fmt: skip

    def exists(self, vg: str, lv: str) -> bool:
        try:
            self.lv(vg, lv)
        except NotFound:
            return False
        return True
