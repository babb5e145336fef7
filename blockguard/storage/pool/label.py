"""The on-disk pool label: how a disk says "I hold a blockguard pool" without a catalog.

- ``dir`` pools: every area's XFS file system gets the label :func:`dir_label` at mkfs
  (``mkfs.xfs -L``). XFS labels hold at most 12 characters, so the label carries a prefix
  and the start of the pool name; the full name and UUID are in the area's ``pool.json``.
- ``lvm`` pools: the VG is named ``bg_<pool>`` and carries the tag :data:`VG_TAG`.

:func:`pool_label` reads it back (reads only: ``blkid -p`` and, for LVM physical volumes,
``lvm pvs`` confined to that one device).

Limitation: dir pools created before labels existed have a ``pool.json`` in their areas
but no XFS label, and an lvm pool's VG tag is missing on pools made before it, so this
reader does not see them. The safety gate still knows such disks while they are in the
catalog (as pool disks); a disk of an unlabelled pool from another host is only seen as a
foreign XFS file system or LVM physical volume ("holds data", which ``force`` lifts).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from blockguard.storage.lvm import Lvm
from blockguard.storage.runner import Runner

#: Prefix of a dir pool area's XFS label.
DIR_LABEL_PREFIX = "bgpool."
#: XFS file system labels are at most 12 bytes.
XFS_LABEL_MAX = 12
#: Tag of the VG of an lvm pool.
VG_TAG = "blockguard_pool"
#: VG names of lvm pools start with this (see ``lvmpool.vg_name``).
VG_PREFIX = "bg_"


@dataclass(frozen=True)
class PoolLabel:
    """A blockguard pool found on a device.

    :param backend: ``dir`` or ``lvm``.
    :param pool: the pool's name (for dir pools possibly only its first characters).
    :param evidence: what was found, for messages (``xfs label bgpool.p1``, ``VG bg_p1``).
    """

    backend: str
    pool: str
    evidence: str


def dir_label(pool: str) -> str:
    """The XFS label of a dir pool's areas (<= 12 characters)."""
    return (DIR_LABEL_PREFIX + pool)[:XFS_LABEL_MAX]


def probe_signature(path: str, runner: Runner) -> dict[str, str]:
    """What ``blkid -p`` (low-level probe, no udev needed) finds on ``path``; {} if nothing."""
    result = runner.run(["blkid", "-p", "-o", "export", path], timeout=30, check=False)
    if result.returncode != 0:
        return {}
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def pool_label(
    path: str, runner: Runner, signature: Mapping[str, str] | None = None
) -> PoolLabel | None:
    """The blockguard pool ``path`` holds, or None.

    :param signature: ``blkid -p -o export`` fields already read (else they are read).
    """
    fields = probe_signature(path, runner) if signature is None else signature
    kind = fields.get("TYPE", "")
    label = fields.get("LABEL", "")
    if kind == "xfs" and label.startswith(DIR_LABEL_PREFIX):
        return PoolLabel("dir", label.removeprefix(DIR_LABEL_PREFIX), f"xfs label {label}")
    if kind == "LVM2_member":
        return _lvm_label(path, runner)
    return None


def _lvm_label(path: str, runner: Runner) -> PoolLabel | None:
    rows = Lvm(runner, [path]).pvs("vg_name,vg_tags", path, check=False)
    for row in rows or []:
        vg, tags = [*row, "", ""][:2]
        if VG_TAG in tags.split(",") or (vg.startswith(VG_PREFIX) and len(vg) > len(VG_PREFIX)):
            return PoolLabel("lvm", vg.removeprefix(VG_PREFIX), f"VG {vg}")
    return None
