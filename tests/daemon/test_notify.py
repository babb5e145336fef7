"""sd_notify: the datagram protocol itself, and what the real daemon sends."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from blockguard.daemon.notify import Notifier
from tests.support.bus import NotifyListener
from tests.support.daemon import Daemon, EngineHarness
from tests.support.devices import LoopFactory, MiB


def test_path_socket_receives_assignments(tmp_path: Path) -> None:
    listener = NotifyListener(str(tmp_path / "n"), str(tmp_path / "n"))
    try:
        notifier = Notifier({"NOTIFY_SOCKET": listener.address})
        assert notifier.ready("line one\nline two")
        message = listener.receive(5)
        assert message == {"READY": "1", "STATUS": "line one line two", "MAINPID": str(os.getpid())}
        notifier.close()
    finally:
        listener.close()


def test_abstract_socket(tmp_path: Path) -> None:
    name = f"blockguard-test-{os.getpid()}"
    listener = NotifyListener(f"@{name}", b"\0" + name.encode())
    try:
        notifier = Notifier({"NOTIFY_SOCKET": f"@{name}"})
        assert notifier.status("3 volumes")
        assert listener.receive(5) == {"STATUS": "3 volumes"}
    finally:
        listener.close()


def test_without_socket_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.ready("x")
    assert notifier.watchdog_interval is None


def test_watchdog_interval_and_pid() -> None:
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000"}).watchdog_interval == 15
    other_pid = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "100", "WATCHDOG_PID": "1"}
    assert Notifier(other_pid).watchdog_interval is None


def test_unreachable_socket_is_not_fatal(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert notifier.notify(READY=1) is False


def test_daemon_sends_ready_status_and_watchdog(
    engine: EngineHarness, loopdev: LoopFactory
) -> None:
    daemon = engine.start(WATCHDOG_USEC="200000")
    ready = daemon.notify.wait_for("READY", "1")
    assert ready["STATUS"].startswith("0 volumes")
    assert int(ready["MAINPID"]) == daemon.process.pid
    pings = 0
    for _ in range(50):
        message = daemon.notify.receive(2)
        if message and message.get("WATCHDOG") == "1":
            pings += 1
            if pings >= 3:
                break
    assert pings >= 3
    from blockguard.cli.client import Client

    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "dir", [loopdev(400 * MiB, "p.img")], False)
    daemon.notify.wait_for("STATUS", "0 volumes, 1 pools, 0 jobs running")
    assert daemon.stop() == 0
    daemon.notify.wait_for("STOPPING", "1")


def test_ready_only_after_the_name_is_held(daemon: Daemon) -> None:
    # READY came (the fixture waited for it): at that moment the name must have an owner.
    from blockguard.cli.client import Client

    with Client(daemon.address) as client:
        assert client.call(
            "NameHasOwner",
            "s",
            "org.blockguard1",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            destination="org.freedesktop.DBus",
        )
    log = daemon.log()
    assert log.index("holding bus name") < log.index("ready:")


def test_socket_type_is_datagram(tmp_path: Path) -> None:
    # A stream socket at NOTIFY_SOCKET must be refused gracefully, not crash the daemon.
    path = tmp_path / "stream"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    try:
        assert Notifier({"NOTIFY_SOCKET": str(path)}).notify(READY=1) is False
    finally:
        server.close()
