"""The safety gate on the host: device families on loop devices, and the real daemon's refusals.

Every topology the host kernel can build (partitions added with ``partx``, loop devices on
files, loop devices on loop devices, a foreign pool label, a foreign ext4) is tried with
every operation that writes a device (restore target, CreatePool, ExtendPool; with and
without force) and with Protect. Each refused call must name the expected error, and every
involved device and the catalog must be byte-for-byte unchanged. The mounted file systems
are frozen meanwhile, so that their own housekeeping cannot change a hash and a refused
call that wrote to them would hang instead of passing. dm and LVM stacks are covered by
tests/guest/test_safety_gate_guest.py.
"""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blockguard.cli.client import Client, RemoteError, variant
from blockguard.errors import (
    DeviceInUse,
    PoolDiskRefused,
    ProtectedDevice,
)
from blockguard.storage.blockdev import device_rdev
from blockguard.storage.runner import Runner, default_runner
from blockguard.storage.safety import DOWN, SELF, UP, SafetyGate, device_family
from tests.daemon.test_engine_refusals import catalog_dump, frozen
from tests.support.daemon import EngineHarness, run_job
from tests.support.devices import sha256_of, write_random

MiB = 1 << 20
E = "org.blockguard1.Error."
POOL_SIZE = 400 * MiB


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120).stdout


class Devices:
    """Loop devices, partitions and mounts a test made; undone in reverse, by name."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.undo: list[list[str]] = []
        self.count = 0

    def loop(self, backing: str) -> str:
        dev = run("losetup", "--find", "--show", backing).strip()
        self.undo.append(["losetup", "-d", dev])
        return dev

    def image(self, size: int, partitions: tuple[tuple[int, int], ...] = ()) -> str:
        """A loop device over a new sparse file, with an MBR of ``(start, size)`` entries."""
        self.count += 1
        path = self.directory / f"disk{self.count}.img"
        with open(path, "wb") as f:
            f.truncate(size)
            if partitions:
                entries = b"".join(
                    struct.pack("<B3sB3sII", 0, bytes(3), 0x83, bytes(3), s // 512, n // 512)
                    for s, n in partitions
                )
                f.seek(446)
                f.write(entries.ljust(64, b"\0") + b"\x55\xaa")
        dev = self.loop(str(path))
        if partitions and not Path(f"/sys/class/block/{os.path.basename(dev)}p1").exists():
            # This host's kernel parses no partition table: partx adds them with BLKPG.
            run("partx", "-a", dev)
            self.undo.append(["partx", "-d", dev])
        return dev

    def mount(self, dev: str, point: Path) -> None:
        point.mkdir(parents=True, exist_ok=True)
        run("mount", dev, str(point))
        self.undo.append(["umount", str(point)])

    def cleanup(self) -> None:
        for argv in reversed(self.undo):
            subprocess.run(argv, capture_output=True, timeout=120)
        self.undo.clear()


@pytest.fixture
def devices(tmp_path: Path) -> Iterator[Devices]:
    if os.geteuid() != 0:
        pytest.skip("needs root for loop devices")
    made = Devices(tmp_path)
    try:
        yield made
    finally:
        made.cleanup()


def mkfs_ext4(dev: str) -> None:
    run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)


# --- the family, read from sysfs ---------------------------------------------------------


def family_of(path: str) -> dict[str, str]:
    return {m.path or m.name: m.direction for m in device_family(device_rdev(path))}


def test_family_of_a_disk_its_partitions_and_loops_on_them(devices: Devices) -> None:
    disk = devices.image(64 * MiB, ((1 * MiB, 20 * MiB), (22 * MiB, 30 * MiB)))
    p1, p2 = disk + "p1", disk + "p2"
    over_p2 = devices.loop(p2)
    over_that = devices.loop(over_p2)

    whole = family_of(disk)
    assert whole[disk] == SELF
    assert whole[p1] == whole[p2] == whole[over_p2] == whole[over_that] == UP

    first = family_of(p1)
    assert first[disk] == DOWN
    # A sibling partition shares no blocks: not family.
    assert p2 not in first and over_p2 not in first

    top = family_of(over_that)
    assert top[over_p2] == top[p2] == top[disk] == DOWN
    assert p1 not in top


def test_family_of_a_loop_on_a_file_reaches_the_file_systems_device(
    devices: Devices, tmp_path: Path
) -> None:
    fs_dev = devices.image(64 * MiB)
    mkfs_ext4(fs_dev)
    devices.mount(fs_dev, tmp_path / "mnt")
    backing = tmp_path / "mnt" / "file.img"
    with open(backing, "wb") as f:
        f.truncate(8 * MiB)
    on_file = devices.loop(str(backing))
    assert family_of(on_file)[fs_dev] == DOWN
    assert family_of(fs_dev)[on_file] == UP


def test_gate_refusals_and_force(devices: Devices) -> None:
    protected = devices.image(64 * MiB, ((1 * MiB, 30 * MiB),))
    pool = devices.image(64 * MiB)
    ext4 = devices.image(64 * MiB)
    mkfs_ext4(ext4)
    blank = devices.image(64 * MiB)
    gate = SafetyGate({"vol": protected + "p1"}, {pool: "p1"}, default_runner())

    with pytest.raises(ProtectedDevice, match=f"has the partition {protected}p1, the device of"):
        gate.check_writable(protected, purpose="a test", force=True)
    with pytest.raises(PoolDiskRefused, match=f"is a loop device backed by {pool}, a disk of pool"):
        gate.check_writable(devices.loop(pool), purpose="a test", force=True)
    with pytest.raises(DeviceInUse, match=r"ext4 signature.*force would overwrite it"):
        gate.check_writable(ext4, purpose="a test", force=False)
    gate.check_writable(ext4, purpose="a test", force=True)
    gate.check_writable(blank, purpose="a test", force=False)
    # Its own device, for an in-place restore; never a device built on it.
    gate.check_writable(protected + "p1", purpose="a test", force=True, own_volume="vol")
    with pytest.raises(ProtectedDevice):
        gate.check_writable(protected, purpose="a test", force=True, own_volume="vol")


def test_one_check_probes_each_device_once(devices: Devices) -> None:
    ext4 = devices.image(64 * MiB)
    mkfs_ext4(ext4)
    blank = devices.image(64 * MiB)
    runner = Runner()  # its own flight recorder: only this test's calls
    gate = SafetyGate({}, {}, runner)

    def probes(path: str) -> int:
        return sum(1 for r in runner.history() if r.argv[-1] == path and "blkid" in r.argv[0])

    gate.check_writable(blank, purpose="a test", force=False)
    assert probes(blank) == 1
    # The one probe still tells the pool label check and the foreign data check.
    with pytest.raises(DeviceInUse, match=r"ext4 signature"):
        gate.check_writable(ext4, purpose="a test", force=False)
    assert probes(ext4) == 1


# --- the real daemon: every topology, every operation ----------------------------------------


def test_every_topology_is_refused_by_every_operation(
    engine: EngineHarness, devices: Devices, tmp_path: Path
) -> None:
    pool_disk = devices.image(POOL_SIZE)
    db = devices.image(32 * MiB)
    # A whole disk whose partition is protected, and a protected whole disk's partition.
    with_part = devices.image(64 * MiB, ((1 * MiB, 40 * MiB),))
    whole = devices.image(64 * MiB, ((1 * MiB, 40 * MiB),))
    # A protected volume holding a file system with a loop device on a file in it.
    fs_vol = devices.image(64 * MiB)
    mkfs_ext4(fs_vol)
    fs_mnt = tmp_path / "fsvol"
    devices.mount(fs_vol, fs_mnt)
    # A disk holding another host's dir pool (its XFS label), not in this catalog.
    labelled = devices.image(POOL_SIZE)
    run("mkfs.xfs", "-q", "-m", "reflink=1", "-L", "bgpool.away", labelled)
    # A foreign ext4.
    foreign = devices.image(POOL_SIZE)
    mkfs_ext4(foreign)

    daemon = engine.start()
    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
        for dev, name in [(db, "db"), (with_part + "p1", "part"), (whole, "whole")]:
            client.call("Protect", "sstssa{sv}", dev, name, 0, "", "", {})
        client.call("Protect", "sstssa{sv}", fs_vol, "fsvol", 0, "", "", {})
        client.call("SetObjectives", "sa{sv}", "db", {"rto": variant("5m")})
        write_random(db, 0, 32 * MiB, seed=9)
        run_job(client, client.call("BackupNow", "s", "db"))

        pool_mnt = daemon.state_dir / "pools" / "p1" / "area-0"
        for where, name in [(fs_mnt, "on-fsvol.img"), (pool_mnt, "on-pool.img")]:
            with open(where / name, "wb") as f:
                f.truncate(40 * MiB)
        on_fsvol = devices.loop(str(fs_mnt / "on-fsvol.img"))
        on_pool_area = devices.loop(str(pool_mnt / "on-pool.img"))
        on_db = devices.loop(db)
        on_pool_disk = devices.loop(pool_disk)

        topologies = [
            ("another protected volume", with_part + "p1", "ProtectedDevice"),
            ("whole disk with a protected partition", with_part, "ProtectedDevice"),
            ("partition of a protected whole disk", whole + "p1", "ProtectedDevice"),
            ("loop on a file in a protected volume's fs", on_fsvol, "ProtectedDevice"),
            ("loop on a file in a pool area", on_pool_area, "PoolDisk"),
            ("loop on a protected loop", on_db, "ProtectedDevice"),
            ("loop on a pool disk", on_pool_disk, "PoolDisk"),
            ("a disk with a pool label not in the catalog", labelled, "PoolLabel"),
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
            # The very device of a protected volume is protected already.
            again = "AlreadyExists" if target == with_part + "p1" else error
            calls.append(
                (
                    f"protect: {what}",
                    again,
                    lambda t=target: client.call(
                        "Protect", "sstssa{sv}", t, "again", 0, "", "", {}
                    ),
                )
            )
        for op, make in (("restore", restore), ("create", create), ("extend", extend)):
            calls.append(
                (f"{op}: a foreign ext4 without force", "DeviceInUse", make(foreign, False))
            )

        involved = [
            pool_disk, db, with_part, with_part + "p1", whole, whole + "p1", fs_vol, labelled,
            foreign, on_fsvol, on_pool_area, on_db, on_pool_disk,
        ]  # fmt: skip
        with frozen(pool_mnt, fs_mnt):
            before = catalog_dump(daemon.state_dir / "catalog.db")
            hashes = {dev: sha256_of(dev) for dev in involved}
            jobs = client.call("ListJobs")
            for what, name, call in calls:
                with pytest.raises(RemoteError) as info:
                    call()
                assert info.value.name == E + name, f"{what}: {info.value}"
                assert "Traceback" not in info.value.message, what
            assert catalog_dump(daemon.state_dir / "catalog.db") == before
            assert {dev: sha256_of(dev) for dev in involved} == hashes
            assert client.call("ListJobs") == jobs
        assert "Traceback" not in daemon.log()


def test_refusal_messages_name_the_volume_pool_and_device(
    engine: EngineHarness, devices: Devices
) -> None:
    pool_disk = devices.image(POOL_SIZE)
    disk = devices.image(64 * MiB, ((1 * MiB, 40 * MiB),))
    labelled = devices.image(POOL_SIZE)
    run("mkfs.xfs", "-q", "-m", "reflink=1", "-L", "bgpool.away", labelled)
    daemon = engine.start()
    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
        client.call("Protect", "sstssa{sv}", disk + "p1", "part", 0, "", "", {})
        with pytest.raises(RemoteError) as info:
            client.call("CreatePool", "ssasb", "p2", "dir", [disk], True)
        assert f"has the partition {disk}p1, the device of protected volume part" in str(info.value)
        with pytest.raises(RemoteError) as info:
            client.call("Protect", "sstssa{sv}", devices.loop(pool_disk), "x", 0, "", "", {})
        assert f"{pool_disk}, a disk of pool p1" in str(info.value)
        with pytest.raises(RemoteError) as info:
            client.call("CreatePool", "ssasb", "p2", "dir", [labelled], True)
        assert "blockguard pool away" in str(info.value)
        assert f"blockguardctl pool import {labelled}" in str(info.value)


def test_force_lifts_only_the_foreign_data_refusal(engine: EngineHarness, devices: Devices) -> None:
    pool_disk = devices.image(POOL_SIZE)
    db = devices.image(32 * MiB)
    targets = [devices.image(POOL_SIZE) for _ in range(3)]
    for dev in targets:
        mkfs_ext4(dev)
    restore_target, new_pool, extension = targets
    daemon = engine.start()
    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
        client.call("Protect", "sstssa{sv}", db, "db", 0, "", "", {})
        client.call("SetObjectives", "sa{sv}", "db", {"rto": variant("5m")})
        write_random(db, 0, 32 * MiB, seed=11)
        run_job(client, client.call("BackupNow", "s", "db"))
        job = client.call("Restore", "ssssb", "db", "", "copy", restore_target, True)
        assert run_job(client, job)["State"] == "done"
        assert sha256_of(restore_target, 32 * MiB) == sha256_of(db)
        client.call("CreatePool", "ssasb", "p2", "dir", [new_pool], True)
        client.call("ExtendPool", "sasb", "p1", [extension], True)
        assert len(client.call("ListPools")) == 2
    # The new pool's area carries the pool label.
    label = run("blkid", "-p", "-o", "value", "-s", "LABEL", new_pool).strip()
    assert label == "bgpool.p2"
