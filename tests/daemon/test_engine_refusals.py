"""Malformed and forbidden calls to the real daemon: each is a named error, nothing changes.

The state is checked, not assumed: every table of the catalog is dumped and every loop
device hashed before and after the calls. The mounted file systems (the pool's XFS and a
mounted ext4 used as a "busy" target) are frozen meanwhile, so their own housekeeping
(XFS covers its log when idle) cannot change a hash, and a refused call that wrote to
them would hang rather than pass.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blockguard.cli.client import Client, RemoteError, variant
from tests.support.bus import NOBODY
from tests.support.daemon import EngineHarness, run_job
from tests.support.devices import MiB, sha256_of, write_random

E = "org.blockguard1.Error."


def catalog_dump(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in tables}
    finally:
        conn.close()


@contextlib.contextmanager
def frozen(*mount_points: Path) -> Iterator[None]:
    done = []
    try:
        for point in mount_points:
            subprocess.run(["fsfreeze", "-f", str(point)], check=True, timeout=30)
            done.append(point)
        yield
    finally:
        for point in done:
            subprocess.run(["fsfreeze", "-u", str(point)], timeout=30)


def gdbus_as_nobody(address: str, method: str, *args: str) -> str:
    """Call a Manager method as uid 65534; returns gdbus's error output."""
    result = subprocess.run(
        [
            *NOBODY,
            "gdbus",
            "call",
            "--address",
            address,
            "--dest",
            "org.blockguard1",
            "--object-path",
            "/org/blockguard1",
            "--method",
            f"org.blockguard1.Manager.{method}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0, result.stdout
    return result.stderr


@pytest.fixture
def mounted_disk(loopdev: Callable[..., str], tmp_path: Path) -> Iterator[tuple[str, Path]]:
    dev = loopdev(64 * MiB, "busy.img")
    subprocess.run(
        ["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev],
        check=True,
        timeout=60,
    )
    mnt = tmp_path / "busy"
    mnt.mkdir()
    subprocess.run(["mount", dev, str(mnt)], check=True, timeout=60)
    try:
        yield dev, mnt
    finally:
        subprocess.run(["umount", str(mnt)], timeout=60)


def test_refused_calls_change_nothing(
    engine: EngineHarness,
    loopdev: Callable[..., str],
    mounted_disk: tuple[str, Path],
    tmp_path: Path,
) -> None:
    busy, busy_mnt = mounted_disk
    pool_disk = loopdev(400 * MiB, "pool.img")
    volume = loopdev(32 * MiB, "db.img")
    free = loopdev(400 * MiB, "free.img")
    small = loopdev(16 * MiB, "small.img")
    plain_file = tmp_path / "file.img"
    plain_file.write_bytes(bytes(1 * MiB))
    daemon = engine.start()
    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
        client.call("Protect", "sstssa{sv}", volume, "db", 0, "", "", {})
        client.call("SetObjectives", "sa{sv}", "db", {"rto": variant("5m")})
        write_random(volume, 0, 32 * MiB, seed=7)
        gen = run_job(client, client.call("BackupNow", "s", "db"))["Result"]["generation"]
        other_gen = str(gen).replace("db@", "nothere@")

        def objectives(**values: object) -> Callable[[], object]:
            given = {k: variant(v) for k, v in values.items()}
            return lambda: client.call("SetObjectives", "sa{sv}", "db", given)

        def pool(name: str, devices: list[str], backend: str = "") -> Callable[[], object]:
            return lambda: client.call("CreatePool", "ssasb", name, backend, devices, False)

        def protect(device: str, name: str, chunk: int = 0, backend: str = "") -> Callable:
            return lambda: client.call(
                "Protect", "sstssa{sv}", device, name, chunk, backend, "", {}
            )

        def restore(generation: str, mode: str, target: str, volume: str = "db") -> Callable:
            return lambda: client.call("Restore", "ssssb", volume, generation, mode, target, False)

        calls: list[tuple[str, str, Callable[[], object]]] = [
            ("pool on a missing path", "NotABlockDevice", pool("p2", ["/dev/nonexistent"])),
            ("pool on a regular file", "NotABlockDevice", pool("p2", [str(plain_file)])),
            ("pool on a directory", "NotABlockDevice", pool("p2", [str(tmp_path)])),
            ("pool on a character device", "NotABlockDevice", pool("p2", ["/dev/null"])),
            ("pool on a relative path", "NotABlockDevice", pool("p2", ["loop0"])),
            ("pool on a mounted disk", "DeviceInUse", pool("p2", [busy])),
            ("the protected volume as a pool disk", "ProtectedDevice", pool("p2", [volume])),
            ("a disk of another pool", "PoolDisk", pool("p2", [pool_disk])),
            ("duplicate pool", "AlreadyExists", pool("p1", [free])),
            ("pool name with a slash", "InvalidInput", pool("../x", [free])),
            ("unknown pool backend", "InvalidInput", pool("p2", [free], "zfs")),
            ("pool without disks", "InvalidInput", pool("p2", [])),
            ("the same disk twice", "InvalidInput", pool("p2", [free, free])),
            ("pool disk too small", "DeviceTooSmall", pool("p2", [small])),
            (
                "extend an unknown pool",
                "NotFound",
                lambda: client.call("ExtendPool", "sasb", "nope", [free], False),
            ),
            (
                "extend with the protected volume",
                "ProtectedDevice",
                lambda: client.call("ExtendPool", "sasb", "p1", [volume], False),
            ),
            (
                "remove an unknown pool",
                "NotFound",
                lambda: client.call("RemovePool", "sbb", "nope", False, False),
            ),
            (
                "remove a pool in use",
                "Busy",
                lambda: client.call("RemovePool", "sbb", "p1", False, False),
            ),
            ("protect a missing path", "NotABlockDevice", protect("/dev/nonexistent", "x")),
            ("protect a regular file", "NotABlockDevice", protect(str(plain_file), "x")),
            ("protect a pool disk", "PoolDisk", protect(pool_disk, "x")),
            ("protect the volume twice", "AlreadyExists", protect(volume, "x")),
            ("duplicate volume name", "AlreadyExists", protect(free, "db")),
            ("chunk size not a power of two", "InvalidChunkSize", protect(free, "x", 12345)),
            ("chunk size too large", "InvalidChunkSize", protect(free, "x", 1 << 30)),
            ("chunk size too small", "InvalidChunkSize", protect(free, "x", 512)),
            ("volume name with a slash", "InvalidInput", protect(free, "a/b")),
            ("unknown tracking backend", "InvalidInput", protect(free, "x", 0, "magic")),
            ("era without device-mapper", "Environment", protect(free, "x", 0, "era")),
            ("zero RTO", "InvalidObjectives", objectives(rto="0s")),
            ("negative RTO", "InvalidObjectives", objectives(rto="-5m")),
            ("huge RTO", "InvalidObjectives", objectives(rto="400d")),
            ("zero RTO as a number", "InvalidObjectives", objectives(rto=0.0)),
            ("zero RPO interval", "InvalidObjectives", objectives(rpo="every 0m")),
            ("RPO hour that does not exist", "InvalidObjectives", objectives(rpo="25:00")),
            ("zero generations", "InvalidObjectives", objectives(rto="5m", generations=0)),
            ("negative generations", "InvalidObjectives", objectives(rto="5m", generations=-3)),
            ("unknown objective", "InvalidObjectives", objectives(rto="5m", colour="blue")),
            ("no objective at all", "InvalidObjectives", objectives()),
            ("unknown restore mode", "InvalidObjectives", objectives(rto="5m", restore_mode="x")),
            (
                "objectives of an unknown volume",
                "NotFound",
                lambda: client.call("SetObjectives", "sa{sv}", "nope", {"rto": variant("5m")}),
            ),
            (
                "back up an unknown volume",
                "NotFound",
                lambda: client.call("BackupNow", "s", "nope"),
            ),
            (
                "unknown generation",
                "NotFound",
                restore("db@20200101T000000.000000Z-0", "copy", free),
            ),
            ("malformed generation id", "InvalidInput", restore("nonsense", "copy", free)),
            ("generation of another volume", "InvalidInput", restore(other_gen, "copy", free)),
            ("restore onto a mounted device", "DeviceInUse", restore("", "copy", busy)),
            ("restore onto a pool disk", "PoolDisk", restore("", "copy", pool_disk)),
            ("restore onto a too small device", "DeviceTooSmall", restore("", "copy", small)),
            (
                "restore onto a regular file",
                "NotABlockDevice",
                restore("", "copy", str(plain_file)),
            ),
            ("restore in place without force", "InvalidInput", restore("", "copy", "")),
            ("bad restore mode", "InvalidInput", restore("", "teleport", free)),
            ("swap-in with a target", "InvalidInput", restore("", "swap-in", free)),
            ("restore an unknown volume", "NotFound", restore("", "copy", free, "nope")),
            (
                "verify an unknown generation",
                "NotFound",
                lambda: client.call("Verify", "s", "db@20200101T000000.000000Z-0"),
            ),
            ("verify a malformed id", "InvalidInput", lambda: client.call("Verify", "s", "db")),
            (
                "unprotect an unknown volume",
                "NotFound",
                lambda: client.call("Unprotect", "sb", "nope", False),
            ),
        ]
        nobody: list[tuple[str, list[str]]] = [
            ("CreatePool", ["p2", "dir", f"['{free}']", "false"]),
            ("ExtendPool", ["p1", f"['{free}']", "false"]),
            ("RemovePool", ["p1", "true", "false"]),
            ("Protect", [free, "x", "0", "", "", "@a{sv} {}"]),
            ("Unprotect", ["db", "false"]),
            ("SetObjectives", ["db", "{'rto': <'1m'>}"]),
            ("BackupNow", ["db"]),
            ("Restore", ["db", "", "copy", free, "false"]),
            ("Verify", [str(gen)]),
        ]
        assert len(calls) + len(nobody) >= 30

        devices = [pool_disk, volume, free, small, busy]
        pool_mnt = daemon.state_dir / "pools" / "p1" / "area-0"
        with frozen(pool_mnt, busy_mnt):
            before = catalog_dump(daemon.state_dir / "catalog.db")
            hashes = {dev: sha256_of(dev) for dev in devices}
            jobs = client.call("ListJobs")
            for what, name, call in calls:
                with pytest.raises(RemoteError) as info:
                    call()
                assert info.value.name == E + name, f"{what}: {info.value}"
                assert "Traceback" not in info.value.message, what
            for method, args in nobody:
                stderr = gdbus_as_nobody(daemon.address, method, *args)
                assert f"{E}NotAuthorized" in stderr, f"{method} as nobody: {stderr}"
            assert catalog_dump(daemon.state_dir / "catalog.db") == before
            assert {dev: sha256_of(dev) for dev in devices} == hashes
            assert client.call("ListJobs") == jobs
        assert "Traceback" not in daemon.log()
