"""Which blockguard pool the given disks hold, found from the disks alone (``pool import``).

Only reads: a ``dir`` area is looked at through a read-only mount with log recovery off
(``ro,norecovery``: XFS then writes nothing, not even its log), an ``lvm`` pool through
``pvs`` confined to the disks given. Nothing here opens the pool for use; the caller does
that with the backend's ``open`` once every disk agreed on one pool.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from blockguard.errors import BlockguardError, NotAPool
from blockguard.storage.blockdev import device_rdev, mounted_devnos
from blockguard.storage.lvm import Lvm
from blockguard.storage.pool.registration import devno
from blockguard.storage.runner import Runner

log = logging.getLogger(__name__)

DIR_FORMAT = "blockguard-dir-pool"
VG_PREFIX = "bg_"


@dataclass(frozen=True)
class FoundPool:
    """A pool found on disks: its name, backend and the disks in their pool order."""

    name: str
    kind: str
    pool_uuid: str
    devices: tuple[str, ...]


def _fs_type(path: str, runner: Runner) -> str:
    result = runner.run(["blkid", "-p", "-o", "export", path], timeout=30, check=False)
    for line in result.stdout.splitlines():
        key, _, value = line.partition("=")
        if key == "TYPE":
            return value
    return ""


def _read_dir_area(path: str, scratch: Path, runner: Runner) -> dict[str, object]:
    """``pool.json`` of the XFS area on ``path`` (its own mount if mounted already)."""
    mounted = mounted_devnos().get(devno(device_rdev(path)))
    if mounted is not None:
        text = (Path(mounted) / "pool.json").read_text()
    else:
        mnt = Path(tempfile.mkdtemp(prefix=".import-", dir=scratch))
        try:
            runner.run(
                ["mount", "-t", "xfs", "-o", "ro,norecovery,nodev,nosuid,noexec", path, str(mnt)],
                timeout=120,
            )
            try:
                text = (mnt / "pool.json").read_text()
            finally:
                runner.run(["umount", str(mnt)], timeout=120)
        finally:
            mnt.rmdir()
    info = json.loads(text)
    if not isinstance(info, dict) or info.get("format") != DIR_FORMAT:
        raise ValueError("its pool.json is not a blockguard dir pool's")
    return info


def _area_index(info: dict[str, object]) -> int:
    area = str(info.get("area", "area-0"))
    try:
        return int(area.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return 0


def identify(
    devices: Sequence[str], scratch: Path, runner: Runner, *, lvm_available: bool
) -> FoundPool:
    """The one pool every disk of ``devices`` belongs to.

    :param scratch: a directory for temporary read-only mounts.
    :raises NotAPool: a disk holds no blockguard pool, or the disks hold different pools.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    kinds = {path: _fs_type(path, runner) for path in devices}
    if all(kind == "LVM2_member" for kind in kinds.values()):
        return _identify_lvm(devices, runner, lvm_available)
    found: list[tuple[int, str, dict[str, object]]] = []
    for path in devices:
        if kinds[path] != "xfs":
            what = kinds[path] or "no file system or volume signature"
            raise NotAPool(path=path, detail=f"it holds {what}")
        try:
            info = _read_dir_area(path, scratch, runner)
        except (OSError, ValueError, BlockguardError) as exc:
            raise NotAPool(path=path, detail=f"no readable pool.json ({exc})") from None
        found.append((_area_index(info), path, info))
    names = {(str(i["pool"]), str(i.get("pool_uuid", ""))) for _, _, i in found}
    if len(names) != 1:
        listed = ", ".join(f"{p}: pool {i['pool']}" for _, p, i in found)
        raise NotAPool(path=" ".join(devices), detail=f"the disks hold different pools ({listed})")
    name, pool_uuid = names.pop()
    found.sort()
    return FoundPool(name, "dir", pool_uuid, tuple(p for _, p, _ in found))


def _identify_lvm(devices: Sequence[str], runner: Runner, lvm_available: bool) -> FoundPool:
    if not lvm_available:
        raise NotAPool(
            path=" ".join(devices),
            detail="it is an LVM physical volume and this host has no device-mapper",
        )
    lvm = Lvm(runner, devices)
    vgs: dict[str, str] = {}
    for row in lvm.pvs("pv_name,vg_name"):
        pv, vg = [*row, "", ""][:2]
        vgs[pv] = vg
    for path in devices:
        vg = vgs.get(path, "")
        if not vg.startswith(VG_PREFIX):
            raise NotAPool(path=path, detail=f"its volume group {vg or '(none)'} is not a pool's")
    names = set(vgs.values())
    if len(names) != 1:
        raise NotAPool(path=" ".join(devices), detail=f"the disks hold several VGs: {names}")
    return FoundPool(names.pop().removeprefix(VG_PREFIX), "lvm", "", tuple(devices))
