"""An import protects a volume again only on its own device, not on whatever took its number.

The real daemon over D-Bus on loop devices (dir pool, scan tracking): the catalog is lost,
the volume's loop device is detached and an unrelated file of the same size is attached
under the same loop number. The import must leave the volume detached and say which device
it refused; the original file attached again, under another number, is found and protected.
"""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pytest

from blockguard.cli.client import VOLUME, Client, plain, variant
from tests.daemon.test_engine_import import POOL_SIZE, VOLUME_SIZE, backup, ctl, generations
from tests.support.daemon import EngineHarness, run_job
from tests.support.devices import MiB, sha256_of, write_random


def lose_catalog(state_dir: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{state_dir}/catalog.db{suffix}").unlink(missing_ok=True)


def losetup(*args: str) -> str:
    done = subprocess.run(
        ["losetup", *args], check=True, capture_output=True, text=True, timeout=30
    )
    return done.stdout.strip()


def test_import_refuses_another_file_on_the_same_loop_number_and_finds_the_moved_one(
    engine: EngineHarness, loopdev: object, tmp_path: Path
) -> None:
    pool_disk = loopdev(POOL_SIZE, "pool.img")  # type: ignore[operator]
    db = loopdev(VOLUME_SIZE, "db.img")  # type: ignore[operator]
    daemon = engine.start()
    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
        client.call("Protect", "sstssa{sv}", db, "db", 0, "", "", {})
        write_random(db, 0, VOLUME_SIZE, seed=11)
        backup(client, "db")
        before = generations(client, "db")
    assert daemon.stop() == 0
    lose_catalog(daemon.state_dir)

    # db's loop device goes; another file of the same size takes its number.
    losetup("-d", db)
    loopdev.devices.remove(db)  # type: ignore[attr-defined]
    impostor = tmp_path / "impostor.img"
    with open(impostor, "wb") as f:
        f.truncate(VOLUME_SIZE)
    write_random(str(impostor), 0, 4 * MiB, seed=12)
    try:
        losetup(db, str(impostor))
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"{db} was taken by someone else meanwhile: {exc.stderr}")
    loopdev.devices.append(db)  # type: ignore[attr-defined]
    impostor_bytes = sha256_of(db)

    daemon = engine.start(BLOCKGUARD_ALLOW_EMPTY_CATALOG="1")
    with Client(daemon.address) as client:
        assert client.call("ImportPool", "as", [pool_disk]) == "p1"
        props = client.properties("/org/blockguard1/volume/db", VOLUME)
        assert props["TrackerState"] == "detached" and props["Device"] == "", props
        reasons = " ".join(plain(props["NextMethodReasons"]))
        assert db in reasons and str(impostor) in reasons, reasons
        assert "blockguardctl protect DEVICE db" in reasons, reasons
        assert generations(client, "db") == before
    assert daemon.stop() == 0
    assert sha256_of(db) == impostor_bytes
    assert f"volume db stays detached: {db}, backed by {impostor}" in daemon.log()

    # The original file comes back, under another loop number this time.
    lose_catalog(daemon.state_dir)
    again = losetup("--find", "--show", str(tmp_path / "db.img"))
    loopdev.devices.append(again)  # type: ignore[attr-defined]
    assert again != db
    daemon = engine.start(BLOCKGUARD_ALLOW_EMPTY_CATALOG="1")
    with Client(daemon.address) as client:
        assert client.call("ImportPool", "as", [pool_disk]) == "p1"
        props = client.properties("/org/blockguard1/volume/db", VOLUME)
        assert props["TrackerState"] != "detached" and props["Device"] == again, props
        assert generations(client, "db") == before
        write_random(again, 0, MiB, seed=13)
        _gen, method = backup(client, "db")
        assert method == "full"
    assert daemon.stop() == 0
    assert sha256_of(db) == impostor_bytes
    assert "Traceback" not in daemon.log()


def forget_keys(state_dir: Path) -> None:
    """Make the catalog look as an older daemon left it: no device keys of volumes."""
    conn = sqlite3.connect(f"{state_dir}/catalog.db")
    try:
        with conn:
            conn.execute("UPDATE volumes SET serial = NULL")
    finally:
        conn.close()


def rewrite_record(daemon_address: str, generations_kept: int) -> None:
    """SetObjectives writes the volume's record on the pool from the catalog."""
    with Client(daemon_address) as client:
        client.call("SetObjectives", "sa{sv}", "db", {"generations": variant(generations_kept)})


def test_a_record_without_key_leaves_a_loop_volume_detached_until_a_backup_records_it(
    engine: EngineHarness, loopdev: object
) -> None:
    pool_disk = loopdev(POOL_SIZE, "pool.img")  # type: ignore[operator]
    db = loopdev(VOLUME_SIZE, "db.img")  # type: ignore[operator]
    daemon = engine.start()
    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
        client.call("Protect", "sstssa{sv}", db, "db", 0, "", "", {})
        write_random(db, 0, VOLUME_SIZE, seed=21)
    assert daemon.stop() == 0

    # A volume protected by an older daemon: a backup records its device's key.
    forget_keys(daemon.state_dir)
    daemon = engine.start()
    rewrite_record(daemon.address, 8)
    with Client(daemon.address) as client:
        backup(client, "db")
    assert daemon.stop() == 0
    assert "volume db: its device is recorded as loop:" in daemon.log()
    lose_catalog(daemon.state_dir)
    daemon = engine.start(BLOCKGUARD_ALLOW_EMPTY_CATALOG="1")
    with Client(daemon.address) as client:
        assert client.call("ImportPool", "as", [pool_disk]) == "p1"
        props = client.properties("/org/blockguard1/volume/db", VOLUME)
        assert props["TrackerState"] != "detached" and props["Device"] == db, props
        before = generations(client, "db")
    assert daemon.stop() == 0

    # An older record and no backup since: the loop device, though it is the right one,
    # cannot be told from another under its number; the volume waits for the admin.
    forget_keys(daemon.state_dir)
    daemon = engine.start()
    rewrite_record(daemon.address, 7)
    assert daemon.stop() == 0
    lose_catalog(daemon.state_dir)
    daemon = engine.start(BLOCKGUARD_ALLOW_EMPTY_CATALOG="1")
    with Client(daemon.address) as client:
        assert client.call("ImportPool", "as", [pool_disk]) == "p1"
        props = client.properties("/org/blockguard1/volume/db", VOLUME)
        assert props["TrackerState"] == "detached" and props["Device"] == "", props
        reasons = " ".join(plain(props["NextMethodReasons"]))
        assert "keeps no identity" in reasons and db in reasons, reasons
        assert "blockguardctl protect DEVICE db" in reasons, reasons
        assert generations(client, "db") == before
        # What the reason says to do re-attaches it.
        protected = ctl(daemon, "protect", db, "db")
        assert protected.returncode == 0, protected.stderr
        props = client.properties("/org/blockguard1/volume/db", VOLUME)
        assert props["TrackerState"] != "detached" and props["Device"] == db, props
        _gen, method = backup(client, "db")
        assert method == "full"
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log()


def test_a_backup_refuses_another_file_under_the_volume_s_loop_number(
    engine: EngineHarness, loopdev: object, tmp_path: Path
) -> None:
    pool_disk = loopdev(POOL_SIZE, "pool.img")  # type: ignore[operator]
    db = loopdev(VOLUME_SIZE, "db.img")  # type: ignore[operator]
    daemon = engine.start()
    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
        client.call("Protect", "sstssa{sv}", db, "db", 0, "", "", {})
        write_random(db, 0, VOLUME_SIZE, seed=31)
        backup(client, "db")
        before = generations(client, "db")
    assert daemon.stop() == 0

    # As after a reboot where loop devices were set up in another order.
    losetup("-d", db)
    loopdev.devices.remove(db)  # type: ignore[attr-defined]
    impostor = tmp_path / "impostor.img"
    with open(impostor, "wb") as f:
        f.truncate(VOLUME_SIZE)
    try:
        losetup(db, str(impostor))
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"{db} was taken by someone else meanwhile: {exc.stderr}")
    loopdev.devices.append(db)  # type: ignore[attr-defined]
    write_random(db, 0, 4 * MiB, seed=32)

    daemon = engine.start()
    with Client(daemon.address) as client:
        props = run_job(client, client.call("BackupNow", "s", "db"))
        assert props["State"] == "failed", props
        error = str(props["Error"])
        assert f"{db} is not the device it was protected on" in error, error
        assert str(impostor) in error, error
        assert generations(client, "db") == before
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log()
