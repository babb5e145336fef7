"""blockguardd on a private bus: name, objects, named errors, jobs, signals, shutdown.

The daemon runs the real engine: a dir pool on a loop device, a volume on another one,
tracked by scanning.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from blockguard.cli.client import JOB, POOL, VOLUME, Client, RemoteError
from blockguard.errors import ExitCode
from tests.support.bus import PrivateBus
from tests.support.daemon import ENGINE_ENV, Daemon, EngineHarness
from tests.support.devices import LoopFactory, MiB, sha256_of, write_random
from tests.timeouts import scaled

E = "org.blockguard1.Error."
POOL_SIZE = 400 * MiB  # a dir pool is XFS, which wants 300 MiB at least
VOLUME_SIZE = 16 * MiB
CHUNK = 64 * 1024  # the default chunk size


def _no_traceback(message: str) -> None:
    assert "Traceback" not in message
    assert 'File "' not in message


def _expect(name: str, fn: Callable[[], Any]) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        fn()
    assert info.value.name == name, info.value
    _no_traceback(info.value.message)
    return info.value


def _setup_volume(
    client: Client, loopdev: LoopFactory, name: str = "db", size: int = VOLUME_SIZE
) -> str:
    """Pool p1 (dir, on ``pool1.img``) and volume ``name`` (on ``NAME.img``, random data);
    returns the volume's D-Bus path."""
    pool_disk = loopdev(POOL_SIZE, "pool1.img")
    client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
    device = loopdev(size, f"{name}.img")
    write_random(device, 0, size, seed=1)
    return client.call("Protect", "sstssa{sv}", device, name, 0, "", "", {})


def _volume(client: Client, path: str = "/org/blockguard1/volume/db") -> dict[str, Any]:
    return client.properties(path, VOLUME)


def test_name_is_owned_and_ready_sent(daemon: Daemon, client: Client) -> None:
    owner = client.call(
        "GetNameOwner",
        "s",
        "org.blockguard1",
        path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus",
        destination="org.freedesktop.DBus",
    )
    assert owner.startswith(":")
    ready = daemon.notify.wait_for("READY", "1")
    assert ready["STATUS"] == "0 volumes, 0 pools, 0 jobs running"
    assert client.properties("/org/blockguard1", "org.blockguard1.Manager")["Version"]


def test_objects_are_exported_and_enumerable(
    daemon: Daemon, client: Client, loopdev: LoopFactory
) -> None:
    path = _setup_volume(client, loopdev, "my-vol")
    assert path == "/org/blockguard1/volume/my_2dvol"
    volumes = client.objects(VOLUME)
    assert list(volumes) == [path]
    assert volumes[path]["Name"] == "my-vol"
    # Scan tracking knows nothing until the first backup has read the whole volume.
    assert volumes[path]["Backend"] == "scan"
    assert volumes[path]["TrackerState"] == "initialising"
    assert volumes[path]["NextMethod"] == "full"
    assert "full needed: no full backup yet" in volumes[path]["NextMethodReasons"]
    assert volumes[path]["Device"] == str(loopdev.devices[1])
    pools = client.objects(POOL)
    pool = pools["/org/blockguard1/pool/p1"]
    assert pool["Backend"] == "dir"
    assert pool["Devices"][0][0] == loopdev.devices[0]
    assert pool["Devices"][0][1]["size"] == POOL_SIZE
    # The capacity is the pool file system's, less than the disk it is made on.
    assert VOLUME_SIZE < pool["Free"] <= pool["Capacity"] < POOL_SIZE
    assert client.call("ListVolumes") == [path]
    client.call("Unprotect", "sb", "my-vol", False)
    assert client.objects(VOLUME) == {}


def test_named_errors_never_tracebacks(
    daemon: Daemon, client: Client, loopdev: LoopFactory
) -> None:
    _setup_volume(client, loopdev)
    pool_disk, volume = loopdev.devices
    spare = loopdev(VOLUME_SIZE, "spare.img")
    hashes = {dev: sha256_of(dev) for dev in (volume, spare)}
    before = (client.objects(POOL), _volume(client))
    _expect(
        E + "NotFound",
        lambda: client.properties("/org/blockguard1/volume/nothere", VOLUME),
    )
    _expect(
        E + "NotFound",
        lambda: client.properties("/org/blockguard1/job/999", JOB),
    )
    assert (
        "nothere"
        in _expect(E + "NotFound", lambda: client.call("BackupNow", "s", "nothere")).message
    )
    _expect(E + "NotFound", lambda: client.call("Plan", "s", "nothere"))
    assert "db@42" in _expect(E + "NotFound", lambda: client.call("Verify", "s", "db@42")).message
    assert (
        "-5m"
        in _expect(
            E + "InvalidObjectives",
            lambda: client.call("SetObjectives", "sa{sv}", "db", {"rpo": Variant("s", "-5m")}),
        ).message
    )
    assert (
        "bogus"
        in _expect(
            E + "InvalidObjectives",
            lambda: client.call("SetObjectives", "sa{sv}", "db", {"bogus": Variant("t", 1)}),
        ).message
    )
    _expect(
        E + "InvalidObjectives",
        lambda: client.call("SetObjectives", "sa{sv}", "db", {"rto": Variant("t", 0)}),
    )
    assert (
        "/nonexistent/disk"
        in _expect(
            E + "NotABlockDevice",
            lambda: client.call("Protect", "sstssa{sv}", "/nonexistent/disk", "x", 0, "", "", {}),
        ).message
    )
    assert (
        "character device"
        in _expect(
            E + "NotABlockDevice",
            lambda: client.call("Protect", "sstssa{sv}", "/dev/null", "x", 0, "", "", {}),
        ).message
    )
    refused = _expect(
        E + "PoolDisk",
        lambda: client.call("Protect", "sstssa{sv}", pool_disk, "x", 0, "", "", {}),
    )
    assert pool_disk in refused.message and "pool p1" in refused.message
    _expect(
        E + "AlreadyExists",
        lambda: client.call("CreatePool", "ssasb", "p1", "dir", [spare], False),
    )
    assert (
        "12345"
        in _expect(
            E + "InvalidChunkSize",
            lambda: client.call("Protect", "sstssa{sv}", spare, "c", 12345, "", "", {}),
        ).message
    )
    assert (
        "sideways"
        in _expect(
            E + "InvalidInput",
            lambda: client.call("Restore", "ssssb", "db", "", "sideways", "", False),
        ).message
    )
    _expect(E + "InvalidInput", lambda: client.call("CreatePool", "ssasb", "../x", "", [], False))
    assert (
        "volumes db"
        in _expect(E + "Busy", lambda: client.call("RemovePool", "sbb", "p1", False, False)).message
    )
    # Nothing of that changed anything: no volume, pool, objective or job, no byte written.
    assert list(client.objects(VOLUME)) == ["/org/blockguard1/volume/db"]
    assert (client.objects(POOL), _volume(client)) == before
    assert _volume(client)["Objectives"] == {}
    assert client.call("ListJobs") == []
    assert {dev: sha256_of(dev) for dev in hashes} == hashes
    assert "Traceback" not in daemon.log()


def test_wrong_signature_is_a_bus_error_not_a_crash(daemon: Daemon, client: Client) -> None:
    with pytest.raises(RemoteError) as info:
        client.call("BackupNow", "u", 7)
    assert info.value.name.startswith("org.freedesktop.DBus.Error.")
    assert client.call("GetStatus")["summary"].value.startswith("0 volumes")


async def _watch(address: str, action: Callable[[MessageBus], Any], until: Callable[[list], bool]):
    """Subscribe to every signal of blockguardd, run ``action``, collect until ``until``."""
    bus = await MessageBus(bus_address=address).connect()
    seen: list[Message] = []
    done = asyncio.Event()

    def on_message(msg: Message) -> bool:
        if msg.message_type == MessageType.SIGNAL and msg.path.startswith("/org/blockguard1"):
            seen.append(msg)
            if until(seen):
                done.set()
        return False

    bus.add_message_handler(on_message)
    await bus.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member="AddMatch",
            signature="s",
            body=["type='signal',sender='org.blockguard1'"],
        )
    )
    await action(bus)
    try:
        await asyncio.wait_for(done.wait(), scaled(60))
    finally:
        bus.disconnect()
    return seen


async def _call(bus: MessageBus, member: str, signature: str, *body: Any) -> Message:
    reply = await bus.call(
        Message(
            destination="org.blockguard1",
            path="/org/blockguard1",
            interface="org.blockguard1.Manager",
            member=member,
            signature=signature,
            body=list(body),
        )
    )
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    return reply


def _job_state(msg: Message) -> str | None:
    if msg.member != "PropertiesChanged" or msg.body[0] != "org.blockguard1.Job":
        return None
    state = msg.body[1].get("State")
    return None if state is None else state.value


def test_job_properties_changed_and_backup_signals(
    engine: EngineHarness, loopdev: LoopFactory
) -> None:
    # Slowed down (the engine's test hook: a pause after each extent written, of up to
    # 8 MiB), so that the job reports progress several times before it is done.
    daemon = engine.start(BLOCKGUARD_TEST_BACKUP_DELAY="0.2")
    size = 64 * MiB
    with Client(daemon.address) as client:
        _setup_volume(client, loopdev, size=size)

        async def backup(bus: MessageBus) -> None:
            await _call(bus, "BackupNow", "s", "db")

        seen = asyncio.run(
            _watch(
                daemon.address,
                backup,
                lambda msgs: (
                    any(m.member == "BackupFinished" for m in msgs)
                    and any(_job_state(m) == "done" for m in msgs)
                ),
            )
        )
        members = [m.member for m in seen]
        assert "BackupStarted" in members
        started = next(m for m in seen if m.member == "BackupStarted")
        assert started.body[0] == "db" and started.body[1].startswith("/org/blockguard1/job/")
        job_changes = [
            m.body[1]
            for m in seen
            if m.member == "PropertiesChanged" and m.body[0] == "org.blockguard1.Job"
        ]
        progresses = [c["Progress"].value for c in job_changes if "Progress" in c]
        assert len(progresses) >= 3, job_changes
        assert progresses == sorted(progresses) and progresses[-1] == 1.0
        assert any(c.get("State", Variant("s", "")).value == "done" for c in job_changes)
        finished = next(m for m in seen if m.member == "BackupFinished")
        volume, generation, method, nbytes = finished.body
        # The first backup is a full: every byte of the volume was copied.
        assert (volume, method, nbytes) == ("db", "full", size)
        assert generation.startswith("db@")
        # The volume object follows: a generation appeared, the next backup is not a full.
        props = _volume(client)
        assert [g[0] for g in props["Generations"]] == [generation]
        assert props["TrackerState"] == "exact"
        assert props["NextMethod"] == "incremental"
    assert "Traceback" not in daemon.log()


def test_failed_job_reports_named_error(
    daemon: Daemon, client: Client, loopdev: LoopFactory
) -> None:
    _setup_volume(client, loopdev)
    # The pool's file system fills up behind the daemon's back (room for less than a full).
    area = daemon.state_dir / "pools" / "p1" / "area-0"
    fs = os.statvfs(area)
    filler = area / "filler"
    subprocess.run(
        ["fallocate", "-l", str(fs.f_bavail * fs.f_frsize - MiB), str(filler)],
        check=True,
        timeout=60,
    )
    entries = sorted(p.name for p in area.iterdir())
    job = client.wait_job(client.call("BackupNow", "s", "db"), timeout=scaled(60))
    assert job["State"] == "failed"
    name, message = job["Error"]
    assert name == E + "PoolSpaceLow"
    assert "pool p1" in message and f"{VOLUME_SIZE} bytes needed" in message
    _no_traceback(message)
    # Nothing was kept of it: no generation, nothing new in the pool.
    assert _volume(client)["Generations"] == []
    assert sorted(p.name for p in area.iterdir()) == entries
    # With room again, the same backup succeeds.
    filler.unlink()
    job = client.wait_job(client.call("BackupNow", "s", "db"), timeout=scaled(60))
    assert job["State"] == "done", job["Error"]
    assert job["Result"]["method"] == "full"


def test_restore_and_verify_jobs(daemon: Daemon, client: Client, loopdev: LoopFactory) -> None:
    _setup_volume(client, loopdev)
    volume = loopdev.devices[1]
    backup = client.wait_job(client.call("BackupNow", "s", "db"), timeout=scaled(60))
    assert backup["State"] == "done", backup["Error"]
    generation = backup["Result"]["generation"]
    target = loopdev(VOLUME_SIZE, "target.img")
    job = client.wait_job(
        client.call("Restore", "ssssb", "db", "", "copy", target, False), timeout=scaled(60)
    )
    assert job["State"] == "done", job["Error"]
    assert job["Result"]["target"] == target and job["Result"]["generation"] == generation
    assert sha256_of(target) == sha256_of(volume)
    job = client.wait_job(client.call("Verify", "s", generation), timeout=scaled(60))
    assert job["State"] == "done", job["Error"]
    # Every chunk of the full was read back and checked.
    assert job["Result"]["ok"] is True
    assert job["Result"]["chunks"] == VOLUME_SIZE // CHUNK
    assert job["Result"]["bytes"] == VOLUME_SIZE
    assert len(client.call("ListJobs")) == 3

    # A verify reads the stored data: one flipped byte of the full image fails the next one.
    pool_id = generation.split("@", 1)[1]
    image = daemon.state_dir / "pools" / "p1" / "area-0" / "volumes" / "db" / pool_id / "image"
    fd = os.open(image, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, 4096)
        os.pwrite(fd, bytes([byte[0] ^ 0xFF]), 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
    job = client.wait_job(client.call("Verify", "s", generation), timeout=scaled(60))
    assert job["State"] == "failed"
    assert job["Error"][0] == E + "ChecksumMismatch" and generation in job["Error"][1]


def test_second_daemon_refuses_to_start(
    daemon: Daemon, bus: PrivateBus, tmp_path: Any, notify_socket: Any
) -> None:
    from tests.support.daemon import start_daemon

    other = tmp_path / "other"
    other.mkdir()
    second = start_daemon(bus, other, notify_socket, wait_ready=False, env=dict(ENGINE_ENV))
    try:
        assert second.process.wait(scaled(60)) == ExitCode.ENVIRONMENT
    finally:
        second.stop()
    assert "is another blockguardd running?" in second.log()


def test_sigterm_shuts_down_cleanly(daemon: Daemon) -> None:
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(scaled(60)) == 0
    daemon.notify.wait_for("STOPPING", "1")
    assert "Traceback" not in daemon.log()


def test_reestablish_tracking_only_exits(tmp_path: Any) -> None:
    import os
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "blockguard.daemon.main",
            "--reestablish-tracking-only",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "NOTIFY_SOCKET": ""},
    )
    assert result.returncode == 0, result.stderr
    assert "tracking re-established for 0 volumes" in result.stderr
