"""blockguardd on a private bus: name, objects, named errors, jobs, signals, shutdown."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from blockguard.cli.client import JOB, POOL, VOLUME, Client, RemoteError
from blockguard.errors import ExitCode
from tests.timeouts import scaled

from .conftest import Daemon, PrivateBus

E = "org.blockguard1.Error."


def _no_traceback(message: str) -> None:
    assert "Traceback" not in message
    assert 'File "' not in message


def _expect(name: str, fn: Callable[[], Any]) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        fn()
    assert info.value.name == name, info.value
    _no_traceback(info.value.message)
    return info.value


def _setup_volume(client: Client, images: Callable[..., str], name: str = "db") -> str:
    client.call("CreatePool", "ssasb", "p1", "", [images("pool1.img")], False)
    return client.call("Protect", "sstssa{sv}", images(f"{name}.img"), name, 0, "", "", {})


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
    daemon: Daemon, client: Client, images: Callable[..., str]
) -> None:
    path = _setup_volume(client, images, "my-vol")
    assert path == "/org/blockguard1/volume/my_2dvol"
    volumes = client.objects(VOLUME)
    assert list(volumes) == [path]
    assert volumes[path]["Name"] == "my-vol"
    assert volumes[path]["TrackerState"] == "exact"
    assert volumes[path]["NextMethod"] == "full"
    pools = client.objects(POOL)
    assert pools["/org/blockguard1/pool/p1"]["Devices"][0][1]["size"] == 64 * 1024 * 1024
    assert client.call("ListVolumes") == [path]
    client.call("Unprotect", "sb", "my-vol", False)
    assert client.objects(VOLUME) == {}


def test_named_errors_never_tracebacks(
    daemon: Daemon, client: Client, images: Callable[..., str]
) -> None:
    _setup_volume(client, images)
    pool_disk = images("pool1.img")
    _expect(
        E + "NotFound",
        lambda: client.properties("/org/blockguard1/volume/nothere", VOLUME),
    )
    _expect(
        E + "NotFound",
        lambda: client.properties("/org/blockguard1/job/999", JOB),
    )
    _expect(E + "NotFound", lambda: client.call("BackupNow", "s", "nothere"))
    _expect(E + "NotFound", lambda: client.call("Plan", "s", "nothere"))
    _expect(E + "NotFound", lambda: client.call("Verify", "s", "db@42"))
    _expect(
        E + "InvalidObjectives",
        lambda: client.call("SetObjectives", "sa{sv}", "db", {"rpo": Variant("s", "-5m")}),
    )
    _expect(
        E + "InvalidObjectives",
        lambda: client.call("SetObjectives", "sa{sv}", "db", {"bogus": Variant("t", 1)}),
    )
    _expect(
        E + "InvalidObjectives",
        lambda: client.call("SetObjectives", "sa{sv}", "db", {"rto": Variant("t", 0)}),
    )
    _expect(
        E + "NotABlockDevice",
        lambda: client.call("Protect", "sstssa{sv}", "/nonexistent/disk", "x", 0, "", "", {}),
    )
    _expect(
        E + "NotABlockDevice",
        lambda: client.call("Protect", "sstssa{sv}", "/dev/null", "x", 0, "", "", {}),
    )
    _expect(
        E + "PoolDisk",
        lambda: client.call("Protect", "sstssa{sv}", pool_disk, "x", 0, "", "", {}),
    )
    _expect(
        E + "AlreadyExists",
        lambda: client.call("CreatePool", "ssasb", "p1", "", [images("other.img")], False),
    )
    _expect(
        E + "InvalidChunkSize",
        lambda: client.call("Protect", "sstssa{sv}", images("c.img"), "c", 12345, "", "", {}),
    )
    _expect(
        E + "InvalidInput",
        lambda: client.call("Restore", "ssssb", "db", "", "sideways", "", False),
    )
    _expect(E + "InvalidInput", lambda: client.call("CreatePool", "ssasb", "../x", "", [], False))
    _expect(E + "Busy", lambda: client.call("RemovePool", "sbb", "p1", False, False))
    # Nothing of that changed anything.
    assert list(client.objects(VOLUME)) == ["/org/blockguard1/volume/db"]
    assert client.objects(VOLUME)["/org/blockguard1/volume/db"]["Objectives"] == {}
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
    daemon: Daemon, client: Client, images: Callable[..., str]
) -> None:
    _setup_volume(client, images)

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
    assert finished.body[:3] == ["db", "db@1", "full"]
    # The volume object follows: a generation appeared, the next backup is not a full.
    volume = client.properties("/org/blockguard1/volume/db", VOLUME)
    assert [g[0] for g in volume["Generations"]] == ["db@1"]
    assert volume["NextMethod"] == "incremental"


def test_failed_job_reports_named_error(
    daemon: Daemon, client: Client, images: Callable[..., str]
) -> None:
    _setup_volume(client, images, "failing-disk")
    path = client.call("BackupNow", "s", "failing-disk")
    job = client.wait_job(path, timeout=scaled(60))
    assert job["State"] == "failed"
    assert job["Error"][0] == E + "DataError"
    assert "simulated read error" in job["Error"][1]
    _no_traceback(job["Error"][1])


def test_restore_and_verify_jobs(
    daemon: Daemon, client: Client, images: Callable[..., str]
) -> None:
    _setup_volume(client, images)
    client.wait_job(client.call("BackupNow", "s", "db"), timeout=scaled(60))
    target = images("target.img")
    job = client.wait_job(
        client.call("Restore", "ssssb", "db", "", "copy", target, False), timeout=scaled(60)
    )
    assert job["State"] == "done" and job["Result"]["target"] == target
    job = client.wait_job(client.call("Verify", "s", "db@1"), timeout=scaled(60))
    assert job["State"] == "done" and job["Result"]["ok"] is True
    assert len(client.call("ListJobs")) == 3


def test_second_daemon_refuses_to_start(
    daemon: Daemon, bus: PrivateBus, tmp_path: Any, notify_socket: Any
) -> None:
    from .conftest import start_daemon

    other = tmp_path / "other"
    other.mkdir()
    second = start_daemon(bus, other, notify_socket, wait_ready=False)
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
