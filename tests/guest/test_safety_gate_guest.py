"""The safety gate in the real kernel: LVM and device-mapper stacks, kernel-parsed partitions.

Topologies (all small loop devices): an LV of a VG whose PV is a protected disk; a PV
under a protected LV; a linear dm device on a protected disk (nodes made by libdevmapper,
``DM_DISABLE_UDEV=1``: there is no udev); a whole disk whose partition (parsed by the
guest kernel, ``losetup -P``) is protected; a disk holding another host's lvm pool (its VG
``bg_<name>`` and tag). Each is tried with every device-writing operation (restore
target, CreatePool, ExtendPool; with and without force) and with Protect, through the real
daemon on a private bus; every call must fail with the named error, and every involved
device and the catalog must be unchanged.
"""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blockguard.cli.client import Client, RemoteError, variant
from tests.daemon.test_engine_refusals import catalog_dump, frozen
from tests.guest.daemon_fixture import engine_on_private_bus, sh
from tests.support.daemon import run_job
from tests.support.devices import sha256_of, write_random

pytestmark = pytest.mark.guest

MiB = 1 << 20
E = "org.blockguard1.Error."
VG_UNDER = "bgsgpv"  # its PV is a protected disk
VG_OVER = "bgsgprot"  # its LV is a protected volume
VG_AWAY = "bg_away"  # another host's lvm pool
LINEAR = "bgsg_linear"
NO_UDEV = {**os.environ, "DM_DISABLE_UDEV": "1"}


class Stack:
    """Loop devices, VGs and dm devices a test made; taken apart in reverse, by name."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.undo: list[tuple[list[str], dict[str, str] | None]] = []
        self.count = 0

    def loop(self, size: int, partition: bool = False) -> str:
        self.count += 1
        path = self.directory / f"disk{self.count}.img"
        with open(path, "wb") as f:
            f.truncate(size)
            if partition:
                entry = struct.pack("<B3sB3sII", 0, bytes(3), 0x83, bytes(3), 2048, 16 * 2048)
                f.seek(446)
                f.write(entry + bytes(48) + b"\x55\xaa")
        argv = ["losetup", "--find", "--show", *(["-P"] if partition else []), str(path)]
        dev = sh(*argv).strip()
        self.undo.append((["losetup", "-d", dev], None))
        return dev

    def vg(self, name: str, pv: str, *tags: str) -> None:
        sh("lvm", "pvcreate", "-qq", "-y", pv)
        self.undo.append((["lvm", "pvremove", "-ff", "-y", pv], None))
        sh("lvm", "vgcreate", "-qq", "-y", *[a for t in tags for a in ("--addtag", t)], name, pv)
        self.undo.append((["lvm", "vgremove", "-ff", "-y", name], None))

    def linear(self, name: str, on: str, sectors: int) -> str:
        subprocess.run(
            ["dmsetup", "create", name, "--table", f"0 {sectors} linear {on} 0"],
            check=True, capture_output=True, env=NO_UDEV, timeout=120,
        )  # fmt: skip
        self.undo.append((["dmsetup", "remove", "--retry", name], NO_UDEV))
        return f"/dev/mapper/{name}"

    def cleanup(self) -> None:
        for argv, env in reversed(self.undo):
            subprocess.run(argv, capture_output=True, env=env, timeout=300)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    made = Stack(tmp_path)
    try:
        yield made
    finally:
        made.cleanup()


def test_dm_lvm_and_partition_topologies_are_refused(stack: Stack, tmp_path: Path) -> None:
    pool_disk = stack.loop(400 * MiB)
    db = stack.loop(16 * MiB)
    pv_protected = stack.loop(40 * MiB)
    stack.vg(VG_UNDER, pv_protected)
    sh("lvm", "lvcreate", "-qq", "-y", "-L", "16M", "-n", "lv", VG_UNDER)
    pv_under = stack.loop(40 * MiB)
    stack.vg(VG_OVER, pv_under)
    sh("lvm", "lvcreate", "-qq", "-y", "-L", "16M", "-n", "prot", VG_OVER)
    linear_base = stack.loop(16 * MiB)
    linear = stack.linear(LINEAR, linear_base, 16 * MiB // 512)
    parted = stack.loop(32 * MiB, partition=True)
    assert Path(f"{parted}p1").exists(), "the guest kernel did not parse the partition table"
    away = stack.loop(40 * MiB)
    stack.vg(VG_AWAY, away, "blockguard_pool")

    with engine_on_private_bus(tmp_path) as engine:
        daemon = engine.start()
        with Client(daemon.address) as client:
            client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
            protected = [
                (db, "db"),
                (pv_protected, "pvdisk"),
                (f"/dev/{VG_OVER}/prot", "lvvol"),
                (linear_base, "linbase"),
                (f"{parted}p1", "part"),
            ]
            for dev, name in protected:
                client.call("Protect", "sstssa{sv}", dev, name, 0, "scan", "", {})
            client.call("SetObjectives", "sa{sv}", "db", {"rto": variant("5m")})
            write_random(db, 0, 16 * MiB, seed=5)
            run_job(client, client.call("BackupNow", "s", "db"), timeout=600)

            topologies = [
                ("an LV of a VG whose PV is protected", f"/dev/{VG_UNDER}/lv", "ProtectedDevice"),
                ("a PV under a protected LV", pv_under, "ProtectedDevice"),
                ("a linear dm device on a protected disk", linear, "ProtectedDevice"),
                ("a disk whose partition is protected", parted, "ProtectedDevice"),
                ("a disk of another host's lvm pool", away, "PoolLabel"),
            ]

            def restore(target: str, force: bool) -> Callable[[], object]:
                return lambda: client.call("Restore", "ssssb", "db", "", "copy", target, force)

            def create(target: str, force: bool) -> Callable[[], object]:
                return lambda: client.call("CreatePool", "ssasb", "p2", "dir", [target], force)

            def extend(target: str, force: bool) -> Callable[[], object]:
                return lambda: client.call("ExtendPool", "sasb", "p1", [target], force)

            calls: list[tuple[str, str, Callable[[], object]]] = []
            for what, target, error in topologies:
                for force in (False, True):
                    for op, make in (("restore", restore), ("create", create), ("extend", extend)):
                        calls.append((f"{op} force={force}: {what}", error, make(target, force)))
                calls.append(
                    (
                        f"protect: {what}",
                        error,
                        lambda t=target: client.call(
                            "Protect", "sstssa{sv}", t, "again", 0, "scan", "", {}
                        ),
                    )
                )

            involved = [
                pool_disk, db, pv_protected, f"/dev/{VG_UNDER}/lv", pv_under,
                f"/dev/{VG_OVER}/prot", linear_base, linear, parted, f"{parted}p1", away,
            ]  # fmt: skip
            pool_mnt = daemon.state_dir / "pools" / "p1" / "area-0"
            with frozen(pool_mnt):
                before = catalog_dump(daemon.state_dir / "catalog.db")
                hashes = {dev: sha256_of(dev) for dev in involved}
                for what, name, call in calls:
                    with pytest.raises(RemoteError) as info:
                        call()
                    assert info.value.name == E + name, f"{what}: {info.value}"
                assert catalog_dump(daemon.state_dir / "catalog.db") == before
                assert {dev: sha256_of(dev) for dev in involved} == hashes
            assert "Traceback" not in daemon.log()
