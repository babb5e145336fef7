"""Self-describing pools: a lost catalog, a new host, and nothing dropped on unprotect.

The real daemon over D-Bus on loop devices (dir pool, scan tracking). Every generation is
restored (copy, onto a scratch loop device) and compared with the volume's bytes saved at
backup time; refusals are checked to change nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blockguard.cli.client import VOLUME, Client, RemoteError, plain, variant
from tests.support.bus import REPO
from tests.support.daemon import ENGINE, ENGINE_ENV, Daemon, EngineHarness, run_job, start_daemon
from tests.support.devices import MiB, sha256_of, write_random

VOLUME_SIZE = 32 * MiB
POOL_SIZE = 400 * MiB
CATALOG_LOST_EXIT = 7


def ctl(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    """blockguardctl against ``daemon``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "blockguard.cli.main", "--bus", daemon.address, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)


def error_name(exc: BaseException) -> str:
    assert isinstance(exc, RemoteError), exc
    return exc.name


def backup(client: Client, volume: str) -> tuple[str, str]:
    props = run_job(client, client.call("BackupNow", "s", volume))
    assert props["State"] == "done", props["Error"]
    return str(props["Result"]["generation"]), str(props["Result"]["method"])


def populate(client: Client, devices: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Back up ``db`` as full, incremental, incremental, differential and ``web`` twice;
    returns generation -> (method, sha256 of the volume at its point)."""
    points: dict[str, tuple[str, str]] = {}
    for name, device in devices.items():
        client.call("Protect", "sstssa{sv}", device, name, 0, "", "", {})
        # At 8 MiB/s an RTO of 2 s allows 16 MiB to copy back: the chain grows with
        # incrementals until a differential is needed (see test_engine_e2e).
        client.call(
            "SetObjectives",
            "sa{sv}",
            name,
            {"rto": variant("2s"), "restore_mode": variant("swap-in"), "generations": variant(9)},
        )
        write_random(device, 0, VOLUME_SIZE, seed=hash(name) & 0xFFFF)
    for n, (name, offset) in enumerate(
        [("db", None), ("db", 0), ("db", 0), ("db", 0), ("web", None), ("web", 8)]
    ):
        if offset is not None:
            write_random(devices[name], offset * MiB, 6 * MiB, seed=100 + n)
        gen, method = backup(client, name)
        points[gen] = (method, sha256_of(devices[name]))
    methods = [m for m, _ in points.values()]
    assert {"full", "incremental", "differential"} <= set(methods), methods
    return points


def restore_all(client: Client, points: dict[str, tuple[str, str]], scratch: str) -> None:
    """Copy-restore every generation onto ``scratch`` and compare its bytes."""
    for gen, (_method, digest) in points.items():
        volume = gen.split("@")[0]
        job = client.call("Restore", "ssssb", volume, gen, "copy", scratch, False)
        props = run_job(client, job)
        assert props["State"] == "done", (gen, props["Error"])
        assert sha256_of(scratch, VOLUME_SIZE) == digest, gen


def generations(client: Client, volume: str) -> list[tuple[str, str, int]]:
    """(id, method, number): an import keeps the running numbers (db@7) too."""
    return [(g[0], g[1], g[6]) for g in plain(client.call("ListGenerations", "s", volume))]


def catalog_view(client: Client) -> tuple[object, ...]:
    vols = sorted(client.objects(VOLUME).items())
    pools = plain(client.call("ListPools"))
    return (
        [(p, v["TrackerState"], v["Device"]) for p, v in vols],
        sorted(pools),
        {v["Name"]: generations(client, v["Name"]) for _, v in vols},
    )


def start_refused(engine: EngineHarness, **env: str) -> tuple[int, str]:
    daemon = start_daemon(
        engine.bus,
        engine.tmp_path,
        engine.notify,
        "--service",
        ENGINE,
        env={**ENGINE_ENV, **env},
        wait_ready=False,
    )
    engine.daemons.append(daemon)
    code = daemon.process.wait(60)
    return code, daemon.log()


def test_lost_catalog_is_refused_then_imported_bit_exact(
    engine: EngineHarness, loopdev: object
) -> None:
    pool_disk = loopdev(POOL_SIZE, "pool.img")  # type: ignore[operator]
    devices = {n: loopdev(VOLUME_SIZE, f"{n}.img") for n in ("db", "web")}  # type: ignore[operator]
    scratch = loopdev(VOLUME_SIZE, "scratch.img")  # type: ignore[operator]
    blank = loopdev(POOL_SIZE, "blank.img")  # type: ignore[operator]
    daemon = engine.start()
    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
        points = populate(client, devices)
        before = {v: generations(client, v) for v in devices}
    assert daemon.stop() == 0

    # The catalog is lost; the rest of the state directory shows earlier use.
    state = daemon.state_dir
    for suffix in ("", "-wal", "-shm"):
        Path(f"{state}/catalog.db{suffix}").unlink(missing_ok=True)
    code, log = start_refused(engine)
    assert code == CATALOG_LOST_EXIT, log
    assert "CatalogLost" in log or "catalog" in log
    assert f"blockguardctl pool import {pool_disk}" in log, log

    daemon = engine.start(BLOCKGUARD_ALLOW_EMPTY_CATALOG="1")
    with Client(daemon.address) as client:
        assert plain(client.call("ListPools")) == []
        # Refusals first: a disk that is no pool, and each changes nothing.
        blank_hash = sha256_of(blank)
        with pytest.raises(RemoteError) as refused:
            client.call("ImportPool", "as", [blank])
        assert error_name(refused.value) == "org.blockguard1.Error.NotAPool"
        assert sha256_of(blank) == blank_hash
        assert plain(client.call("ListPools")) == []

        assert client.call("ImportPool", "as", [pool_disk]) == "p1"
        after = {v: generations(client, v) for v in devices}
        assert after == before
        for name, device in devices.items():
            props = client.properties(f"/org/blockguard1/volume/{name}", VOLUME)
            assert props["Device"] == device and props["TrackerState"] != "detached", props
            assert plain(props["Objectives"])["rto"] == "2s", props["Objectives"]
            # A fresh tracker: the next backup is a full.
            assert plain(client.call("Plan", "s", name))["method"] == "full"
        restore_all(client, points, scratch)

        view = catalog_view(client)
        with pytest.raises(RemoteError) as again:
            client.call("ImportPool", "as", [pool_disk])
        assert error_name(again.value) == "org.blockguard1.Error.DeviceInUse"
        assert catalog_view(client) == view

        write_random(devices["db"], 0, MiB, seed=7)
        _gen, method = backup(client, "db")
        assert method == "full"
    assert daemon.stop() == 0
    # The catalog is whole again: the daemon starts without the override.
    daemon = engine.start()
    with Client(daemon.address) as client:
        numbers = [n for _, _, n in generations(client, "db")]
        assert numbers == list(range(1, len(before["db"]) + 2))
    assert "Traceback" not in daemon.log()


def test_new_host_imports_and_detaches_a_missing_volume(
    engine: EngineHarness, loopdev: object, tmp_path: Path
) -> None:
    pool_disk = loopdev(POOL_SIZE, "pool.img")  # type: ignore[operator]
    devices = {n: loopdev(VOLUME_SIZE, f"{n}.img") for n in ("db", "web")}  # type: ignore[operator]
    scratch = loopdev(VOLUME_SIZE, "scratch.img")  # type: ignore[operator]
    other = loopdev(POOL_SIZE, "other.img")  # type: ignore[operator]
    daemon = engine.start()
    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
        points = populate(client, devices)
        before = {v: generations(client, v) for v in devices}
    assert daemon.stop() == 0

    # web's disk does not come along to the new host.
    subprocess.run(["losetup", "-d", devices["web"]], check=True, timeout=30)
    loopdev.devices.remove(devices["web"])  # type: ignore[attr-defined]

    host2 = tmp_path / "host2"
    host2.mkdir()
    new_host = EngineHarness(engine.bus, host2, engine.notify)
    daemon = new_host.start(BLOCKGUARD_MOUNT_ROOT=str(tmp_path / "mnt2"))
    engine.daemons.append(daemon)
    with Client(daemon.address) as client:
        assert plain(client.call("ListPools")) == []  # a fresh state directory starts
        # The new host has a pool p1 of its own: the import is refused, nothing changes.
        client.call("CreatePool", "ssasb", "p1", "dir", [other], False)
        view, disk = catalog_view(client), sha256_of(pool_disk)
        with pytest.raises(RemoteError) as clash:
            client.call("ImportPool", "as", [pool_disk])
        assert error_name(clash.value) == "org.blockguard1.Error.AlreadyExists"
        assert "pool p1" in clash.value.message
        assert catalog_view(client) == view and sha256_of(pool_disk) == disk
        client.call("RemovePool", "sbb", "p1", False, False)
        imported = ctl(daemon, "--json", "pool", "import", pool_disk)
        assert imported.returncode == 0, imported.stderr
        assert json.loads(imported.stdout)["name"] == "p1"
        assert {v: generations(client, v) for v in devices} == before
        web = client.properties("/org/blockguard1/volume/web", VOLUME)
        assert web["TrackerState"] == "detached" and web["Device"] == "", web
        db = client.properties("/org/blockguard1/volume/db", VOLUME)
        assert db["TrackerState"] != "detached" and db["Device"] == devices["db"], db
        assert "detached: web" in plain(client.call("GetStatus"))["summary"]
        restore_all(client, points, scratch)
        with pytest.raises(RemoteError) as refused:
            client.call("BackupNow", "s", "web")
        assert error_name(refused.value) == "org.blockguard1.Error.VolumeDetached"
        # A detached volume has no device to restore in place.
        with pytest.raises(RemoteError) as in_place:
            client.call("Restore", "ssssb", "web", "", "copy", "", True)
        assert error_name(in_place.value) == "org.blockguard1.Error.VolumeDetached"
    assert "Traceback" not in daemon.log()
    assert (tmp_path / "mnt2" / "p1").is_dir()


def test_unprotect_and_remove_pool_keep_generations_unless_told(
    engine: EngineHarness, loopdev: object
) -> None:
    pool_disk = loopdev(POOL_SIZE, "pool.img")  # type: ignore[operator]
    devices = {n: loopdev(VOLUME_SIZE, f"{n}.img") for n in ("db", "web")}  # type: ignore[operator]
    scratch = loopdev(VOLUME_SIZE, "scratch.img")  # type: ignore[operator]
    daemon = engine.start()
    area = daemon.state_dir / "pools" / "p1" / "area-0"
    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
        points = populate(client, devices)
        db_gens = generations(client, "db")
        assert (area / "records" / "db.json").is_file()

        # Unprotect keeps the generations: db is detached, listed and restorable.
        client.call("Unprotect", "sb", "db", False)
        props = client.properties("/org/blockguard1/volume/db", VOLUME)
        assert props["TrackerState"] == "detached"
        assert generations(client, "db") == db_gens
        restore_all(client, {g: p for g, p in points.items() if g.startswith("db")}, scratch)
        with pytest.raises(RemoteError) as refused:
            client.call("BackupNow", "s", "db")
        assert error_name(refused.value) == "org.blockguard1.Error.VolumeDetached"

        # RemovePool refuses while generations are held, even with force; nothing changes.
        view = catalog_view(client)
        held = len(db_gens) + len(generations(client, "web"))
        with pytest.raises(RemoteError) as busy:
            client.call("RemovePool", "sbb", "p1", True, False)
        assert error_name(busy.value) == "org.blockguard1.Error.Busy"
        assert f"{held} generations" in str(busy.value)
        assert catalog_view(client) == view

        # With delete_generations, web's generations leave the pool and the catalog.
        done = ctl(daemon, "unprotect", "web", "--delete-generations")
        assert done.returncode == 0, done.stderr
        assert "web" not in {v["Name"] for v in client.objects(VOLUME).values()}
        assert not list((area / "volumes" / "web").glob("*/manifest.json"))
        assert not (area / "records" / "web.json").exists()

        # Protect under the detached name re-attaches: generations kept, tracking again.
        client.call("Protect", "sstssa{sv}", devices["db"], "db", 0, "", "", {})
        props = client.properties("/org/blockguard1/volume/db", VOLUME)
        assert props["TrackerState"] != "detached" and props["Device"] == devices["db"]
        assert generations(client, "db") == db_gens
        newest, method = backup(client, "db")
        assert method == "full"

        # Retention still applies to a detached volume (when its objectives change).
        client.call("Unprotect", "sb", "db", False)
        client.call(
            "SetObjectives", "sa{sv}", "db", {"rto": variant("2s"), "generations": variant(1)}
        )
        # The one kept keeps its number: numbers never move down when older ones go.
        assert generations(client, "db") == [(newest, "full", len(db_gens) + 1)]
        assert len(list((area / "volumes" / "db").glob("*/manifest.json"))) == 1

        client.call("RemovePool", "sbb", "p1", True, True)
        assert plain(client.call("ListPools")) == []
        assert not client.objects(VOLUME)
    assert "Traceback" not in daemon.log()
    # The pool's disk no longer holds any generation.
    mnt = daemon.state_dir.parent / "check"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "ro,norecovery", pool_disk, str(mnt)], check=True, timeout=60)
    try:
        assert not list((mnt / "volumes").glob("*/*/manifest.json"))
        assert not list((mnt / "records").glob("*.json"))
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=60)
    os.rmdir(mnt)
