"""What tells a protected block device from another one of the same size and number.

A volume's device number is no identity: loop and device-mapper numbers are handed out
again as soon as they are free, and a disk replaced by one of the same model can come
back under the same ``sdX``. What is recorded when a volume is protected (and kept in
its record on the pool, so an import can find the device again) is a :class:`DeviceKey`:

- a loop device: its backing file — path, inode (``LOOP_GET_STATUS64``), birth time
  where the file system keeps one — and offset (``loop:PATH#INODE:BIRTH@OFFSET``). A
  file moved, copied, re-created (even under its old inode number) or deleted no longer
  matches (the safe side: the volume is left for the administrator to re-attach). The
  file system's device number is left out on purpose: it changes between boots when
  the file system lies on an LV activated in another order, or on btrfs, and the path,
  inode and birth time of one file on two file systems do not coincide;
- a device-mapper device: its dm UUID (an LV's is ``LVM-<vg uuid><lv uuid>``, new for a
  re-created LV of the same name); a dm device without UUID has no identity, its name
  can be reused;
- an md array: its array UUID;
- a disk: its WWID, else its serial (not for NVMe, whose serial is the controller's,
  shared by its namespaces);
- a partition: that of its disk and the partition number.

A device of none of these has no key. Only for whole disks of fixed hardware (``sd``,
``vd``, ``nvme``...) is the device number then stable enough to go by
(:attr:`DeviceKey.numbered_by_hardware`).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from blockguard.errors import NotABlockDevice
from blockguard.storage.blockdev import sysfs_dir

#: ``LOOP_GET_STATUS64`` (linux/loop.h), and the head of ``struct loop_info64``:
#: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit (u64 each).
LOOP_GET_STATUS64 = 0x4C05
_LOOP_INFO64_SIZE = 232
_LOOP_INFO64_HEAD = struct.Struct("=5Q")

#: Kernel names of whole disks whose device number comes from where the hardware sits,
#: not from the order devices were set up in.
_FIXED_HARDWARE = ("sd", "vd", "xvd", "hd", "nvme", "mmcblk")

SYS_CLASS_BLOCK = Path("/sys/class/block")


@dataclass(frozen=True)
class DeviceKey:
    """The identity of a block device as far as the kernel can tell it.

    :param stable: the text recorded for the device; None when nothing stable is known.
    :param numbered_by_hardware: a disk whose device number stays with the hardware.
    :param shown: the device in words, for messages (``/dev/loop5, backed by /srv/a.img``).
    """

    stable: str | None
    numbered_by_hardware: bool
    shown: str


def device_key(path: str | os.PathLike[str]) -> DeviceKey:
    """The :class:`DeviceKey` of the block device at ``path``.

    :raises NotABlockDevice: ``path`` is not a block device (or cannot be opened).
    """
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise NotABlockDevice(path, exc.strerror or str(exc)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISBLK(st.st_mode):
            raise NotABlockDevice(path, "it is no device node")
        sysdir = sysfs_dir(st.st_rdev)
        is_partition = (sysdir / "partition").exists()
        disk = sysdir.parent if is_partition else sysdir
        part = f"-part{_read(sysdir / 'partition')}" if is_partition else ""
        if disk.name.startswith("loop"):
            key = _loop_key(fd, disk, is_partition)
            if key is None:
                return DeviceKey(None, False, f"{path} (a loop device without backing file)")
            text, backing = key
            return DeviceKey(text + part, False, f"{path}, backed by {backing}")
        stable = _other_key(disk)
        fixed = disk.name.startswith(_FIXED_HARDWARE)
        return DeviceKey(stable + part if stable else None, fixed, path)
    finally:
        os.close(fd)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _loop_key(fd: int, disk: Path, is_partition: bool) -> tuple[str, str] | None:
    """``(key, backing path)`` of a loop device; None when nothing is attached."""
    backing = _read(disk / "loop" / "backing_file")
    if not backing:
        return None
    if is_partition:
        # The ioctl answers on the loop device itself, not on its partition's node.
        try:
            fd = os.open(f"/dev/{disk.name}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            return _loop_key(fd, disk, False)
        finally:
            os.close(fd)
    try:
        info = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(_LOOP_INFO64_SIZE))
    except OSError:
        return None  # ENXIO: detached in the meantime
    lo_device, lo_inode, _rdevice, lo_offset, _limit = _LOOP_INFO64_HEAD.unpack_from(info)
    # Inode numbers are handed out again (ext4 gives a file deleted and re-created at
    # once its old number): the file's birth time tells the two apart, when the path
    # still names the very file the loop holds and its file system keeps one.
    birth = "-"
    found = _statx(backing)
    if found is not None and found[:2] == (lo_device, lo_inode) and found[2] is not None:
        birth = found[2]
    return f"loop:{backing}#{lo_inode}:{birth}@{lo_offset}", backing


_AT_FDCWD = -100
_STATX_INO = 0x100
_STATX_BTIME = 0x800
_STATX_SIZE = 256
_libc = ctypes.CDLL(None, use_errno=True)


def _statx(path: str) -> tuple[int, int, str | None] | None:
    """``(st_dev, st_ino, birth time or None)`` of ``path``; None when it cannot be told.

    Python's ``os.stat`` has no birth time on Linux; glibc's ``statx`` does.
    """
    statx = getattr(_libc, "statx", None)
    if statx is None:
        return None
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if statx(_AT_FDCWD, os.fsencode(path), 0, _STATX_INO | _STATX_BTIME, buf) != 0:
        return None
    raw = buf.raw
    (mask,) = struct.unpack_from("=I", raw, 0)
    (ino,) = struct.unpack_from("=Q", raw, 32)
    btime_sec, btime_nsec = struct.unpack_from("=qI", raw, 80)
    dev_major, dev_minor = struct.unpack_from("=II", raw, 136)
    if not mask & _STATX_INO:
        return None
    birth = f"{btime_sec}.{btime_nsec:09d}" if mask & _STATX_BTIME else None
    return os.makedev(dev_major, dev_minor), ino, birth


def _other_key(disk: Path) -> str | None:
    name = disk.name
    if name.startswith("dm-"):
        uuid = _read(disk / "dm" / "uuid")
        return f"dm-uuid:{uuid}" if uuid else None
    if name.startswith("md"):
        uuid = _read(disk / "md" / "uuid")
        return f"md-uuid:{uuid}" if uuid else None
    for candidate in ("wwid", "device/wwid"):
        value = _read(disk / candidate)
        if value:
            return f"wwid:{value}"
    if not name.startswith("nvme"):
        for candidate in ("serial", "device/serial"):
            value = _read(disk / candidate)
            if value:
                return f"serial:{value}"
    return None


def find_device(stable: str) -> str | None:
    """The device node whose key is ``stable`` now, wherever it appears (a loop device
    attached again under another number, a disk that came back as another ``sdX``);
    None when there is none.

    Candidates are picked from sysfs; only those are opened to be checked.
    """
    base = SYS_CLASS_BLOCK
    if not base.is_dir():
        return None
    for entry in sorted(base.iterdir()):
        sysdir = entry.resolve()
        is_partition = (sysdir / "partition").exists()
        disk = sysdir.parent if is_partition else sysdir
        part = f"-part{_read(sysdir / 'partition')}" if is_partition else ""
        if disk.name.startswith("loop"):
            backing = _read(disk / "loop" / "backing_file")
            candidate = bool(backing) and stable.startswith(f"loop:{backing}#")
        else:
            key = _other_key(disk)
            candidate = key is not None and key + part == stable
        if not candidate:
            continue
        node = f"/dev/{sysdir.name}"
        try:
            if device_key(node).stable == stable:
                return node
        except NotABlockDevice:
            continue
    return None
