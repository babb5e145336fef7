"""Loop devices over sparse files, and reading, writing and unmounting what tests made."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import subprocess
from pathlib import Path

import pytest

MiB = 1 << 20


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for loop devices")


class LoopFactory:
    """Creates loop devices over sparse files and always detaches them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.devices: list[str] = []

    def __call__(self, size: int, name: str | None = None, direct_io: bool = False) -> str:
        need_root()
        backing = self.directory / (name or f"loop{len(self.devices)}.img")
        with open(backing, "wb") as f:
            f.truncate(size)
        argv = ["losetup", "--find", "--show"]
        if direct_io:
            argv.append("--direct-io=on")
        dev = subprocess.run(
            [*argv, str(backing)], check=True, capture_output=True, text=True, timeout=30
        ).stdout.strip()
        self.devices.append(dev)
        return dev

    def cleanup(self) -> None:
        for dev in reversed(self.devices):
            with contextlib.suppress(Exception):
                subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30)
        self.devices.clear()


def unmount_under(root: Path) -> None:
    """Unmount everything mounted below ``root`` (deepest first), e.g. after a kill -9."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted(points, key=len, reverse=True):
        if Path(point).is_relative_to(root):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=60)


def sha256_of(path: str, size: int | None = None) -> str:
    """sha256 of the first ``size`` bytes of a device (all of it by default)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        left = size if size is not None else os.lseek(f.fileno(), 0, os.SEEK_END)
        f.seek(0)
        while left:
            block = f.read(min(8 * MiB, left))
            assert block, f"{path} ended early"
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def write_random(path: str, offset: int, nbytes: int, seed: int) -> None:
    """Overwrite ``nbytes`` at ``offset`` with seeded random data, durably."""
    data = random.Random(seed).randbytes(nbytes)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
