"""LVM queries and commands, confined to the devices blockguard was given.

Every command gets ``--config`` with a devices filter when the caller names the physical
volumes (as blivet does), so blockguard can never touch a disk it was not given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from blockguard.errors import NotFound
from blockguard.storage.runner import Runner, default_runner

TIMEOUT = 300


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

    def lvm(self, command: str, *args: str) -> str:
        return self.run.run(["lvm", command, *self.config_args(), *args], timeout=TIMEOUT).stdout

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
