"""A private dbus-daemon (system-type) and the receiving end of NOTIFY_SOCKET.

Every process started here is killed by its PID when its context ends, also on failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.timeouts import scaled

REPO = Path(__file__).resolve().parents[2]
POLICY_FILE = REPO / "data" / "org.blockguard1.conf"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

_HEADER = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
"""

#: Everyone may do everything: the daemon's own authorisation is all that is left.
PERMISSIVE = (
    _HEADER
    + """  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="signal"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
  </policy>
</busconfig>
"""
)

#: Like Debian's system.conf (deny by default), plus the project's policy file.
SYSTEM_LIKE = (
    _HEADER
    + """  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"""
)


@dataclass
class PrivateBus:
    address: str
    pid: int
    directory: Path


def need(program: str) -> None:
    """Skip the test when ``program`` is not installed."""
    if shutil.which(program) is None:
        pytest.skip(f"{program} is not installed")


def kill_pid(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM ``pid``, then SIGKILL if it is still there after ``timeout`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def start_bus(directory: Path, template: str) -> Iterator[PrivateBus]:
    """A dbus-daemon listening in ``directory`` (which every user must be able to traverse
    when tests connect as ``nobody``), configured by ``template``."""
    need("dbus-daemon")
    sock = directory / "bus"
    config = directory / "bus.conf"
    config.write_text(template.format(socket=sock, policy=POLICY_FILE))
    out = subprocess.run(
        [
            "dbus-daemon",
            f"--config-file={config}",
            "--fork",
            "--print-address=1",
            "--print-pid=1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    address, pid = out[0], int(out[1])
    try:
        yield PrivateBus(address, pid, directory)
    finally:
        # dbus-daemon --fork is not our child: it cannot be reaped, only killed.
        kill_pid(pid)


class NotifyListener:
    """The receiving end of NOTIFY_SOCKET: collects the datagrams blockguardd sends."""

    def __init__(self, address: str, bind_to: str | bytes) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)
        self.messages: list[dict[str, str]] = []

    def receive(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append(fields)
        return fields

    def wait_for(self, key: str, value: str | None = None, timeout: float = 15.0) -> dict[str, str]:
        """Wait for a message setting ``key`` (to ``value``); earlier ones are kept too.

        ``timeout`` is a base: it is scaled to the harness (:mod:`tests.timeouts`).
        """
        timeout = scaled(timeout)
        for message in self.messages:
            if key in message and (value is None or message[key] == value):
                return message
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.receive(max(deadline - time.monotonic(), 0.01))
            if message and key in message and (value is None or message[key] == value):
                return message
        raise AssertionError(f"no {key}={value or '*'} within {timeout}s: {self.messages}")

    def close(self) -> None:
        self.sock.close()
