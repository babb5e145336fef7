"""Fixtures of the daemon tests: a private dbus-daemon, blockguardd on it, a notify socket.

Every process started here is killed by its PID at teardown, also when a test fails.
The bus sockets live in a world-traversable directory so that tests can connect as
``nobody`` (pytest's own tmp_path is private to root).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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


def _need(program: str) -> None:
    if shutil.which(program) is None:
        pytest.skip(f"{program} is not installed")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A temporary directory that every user may traverse (for the bus socket)."""
    path = Path(tempfile.mkdtemp(prefix="bg-bus-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _kill(pid: int, timeout: float = 5.0) -> None:
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
    _need("dbus-daemon")
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
        _kill(pid)


@pytest.fixture
def bus(shared_dir: Path) -> Iterator[PrivateBus]:
    """A private system-type bus on which everyone may do everything."""
    with start_bus(shared_dir, PERMISSIVE) as private:
        yield private


@pytest.fixture
def policy_bus(shared_dir: Path) -> Iterator[PrivateBus]:
    """A private bus with system-bus defaults and the project's policy file."""
    with start_bus(shared_dir, SYSTEM_LIKE) as private:
        yield private


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


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifyListener]:
    path = tmp_path / "notify"
    listener = NotifyListener(str(path), str(path))
    try:
        yield listener
    finally:
        listener.close()


@dataclass
class Daemon:
    process: subprocess.Popen[str]
    bus: PrivateBus
    state_dir: Path
    notify: NotifyListener
    log_path: Path
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.bus.address

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(scaled(timeout))
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def kill(self) -> None:
        """kill -9 the daemon and every command it was running, as systemd does when the
        main process of a unit dies (KillMode=control-group): an lvm or dmsetup call left
        running would otherwise finish after the next daemon has collected the garbage of
        the killed one (an lvcreate that lands after the new daemon's pool scan)."""
        pgid = self.process.pid  # started with start_new_session: the group is the daemon's
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self.process.wait(scaled(10))
        deadline = time.monotonic() + scaled(10)
        while _group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _group_members(pgid), f"still running after kill -9: {_group_members(pgid)}"


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def start_daemon(
    bus: PrivateBus,
    tmp_path: Path,
    notify: NotifyListener,
    *extra_args: str,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
) -> Daemon:
    state_dir = tmp_path / "state"
    # Each daemon of a test keeps its own log (a restarted one must not overwrite the log of
    # the one that was killed: that is the log a failure needs).
    log_path = tmp_path / "blockguardd.log"
    n = 1
    while log_path.exists():
        n += 1
        log_path = tmp_path / f"blockguardd-{n}.log"
    environ = dict(os.environ)
    environ.update(
        {
            "NOTIFY_SOCKET": notify.address,
            "BLOCKGUARD_MEMORY_JOB_SECONDS": "0.6",
            "PYTHONPATH": str(REPO),
        }
    )
    for key in ("JOURNAL_STREAM", "INVOCATION_ID", "WATCHDOG_USEC", "WATCHDOG_PID"):
        environ.pop(key, None)
    environ.update(env or {})
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "blockguard.daemon.main",
                "--bus",
                bus.address,
                "--state-dir",
                str(state_dir),
                "--udev-source",
                "none",
                "--log-level",
                "debug",
                # The skeleton's tests rely on the in-memory service's toy behaviour (files
                # as devices, sleeping jobs); the engine's tests pass --service themselves.
                *([] if "--service" in extra_args else ["--service", "memory"]),
                *extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environ,
            text=True,
            # Its own process group, which its commands inherit: Daemon.kill takes them all.
            start_new_session=True,
        )
    daemon = Daemon(process, bus, state_dir, notify, log_path)
    if wait_ready:
        try:
            # A loaded machine or a guest under TCG can take a minute to get here.
            notify.wait_for("READY", "1", timeout=60)
        except AssertionError as exc:
            daemon.stop()
            raise AssertionError(f"{exc}\n--- daemon log ---\n{daemon.log()}") from None
    return daemon


@pytest.fixture
def daemon_factory(
    tmp_path: Path, notify_socket: NotifyListener
) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def factory(bus: PrivateBus, *args: str, **kwargs: object) -> Daemon:
        daemon = start_daemon(bus, tmp_path, notify_socket, *args, **kwargs)  # type: ignore[arg-type]
        started.append(daemon)
        return daemon

    try:
        yield factory
    finally:
        for daemon in started:
            daemon.stop()


@pytest.fixture
def daemon(bus: PrivateBus, daemon_factory: Callable[..., Daemon]) -> Daemon:
    """blockguardd (in-memory service) on a permissive private bus, READY."""
    return daemon_factory(bus)


@pytest.fixture
def images(tmp_path: Path) -> Callable[[str, int], str]:
    """``images(name, size)`` makes a sparse file the in-memory service accepts as a device."""

    def make(name: str, size: int = 64 * 1024 * 1024) -> str:
        path = tmp_path / name
        with open(path, "wb") as f:
            f.truncate(size)
        return str(path)

    return make


@pytest.fixture
def client(daemon: Daemon) -> Iterator[object]:
    from blockguard.cli.client import Client

    with Client(daemon.address) as c:
        yield c


# --- the real engine on loop devices ----------------------------------------------------

ENGINE = "blockguard.engine.engine:make_service"
MiB = 1 << 20
#: The daemon's environment for engine tests: no probe (loop devices are too fast for an
#: RTO of seconds to matter), every device at 8 MiB/s, no scheduler unless a test asks,
#: no restore drill unless a test asks (``Drill``), and a small one then.
ENGINE_ENV = {
    "BLOCKGUARD_PROBE_SECONDS": "0",
    "BLOCKGUARD_DEFAULT_SPEED": str(8 * MiB),
    "BLOCKGUARD_SCHEDULER_INTERVAL": "0",
    "BLOCKGUARD_DRILL_AUTO": "0",
    "BLOCKGUARD_DRILL_BYTES": str(4 * MiB),
}


def unmount_under(root: Path) -> None:
    """Unmount everything mounted below ``root`` (deepest first), e.g. after a kill -9."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted(points, key=len, reverse=True):
        if Path(point).is_relative_to(root):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=60)


@dataclass
class EngineHarness:
    """Starts the real daemon (more than once if a test restarts it) and cleans up."""

    bus: PrivateBus
    tmp_path: Path
    notify: NotifyListener
    daemons: list[Daemon] = field(default_factory=list)

    def start(self, **env: str) -> Daemon:
        # A restarted daemon must be waited for, not the READY of the one before it.
        while self.notify.receive(0.01) is not None:
            pass
        self.notify.messages.clear()
        daemon = start_daemon(
            self.bus,
            self.tmp_path,
            self.notify,
            "--service",
            ENGINE,
            env={**ENGINE_ENV, **env},
        )
        self.daemons.append(daemon)
        return daemon

    def cleanup(self) -> None:
        for daemon in self.daemons:
            daemon.stop()
        unmount_under(self.tmp_path)


@pytest.fixture
def engine(
    bus: PrivateBus, tmp_path: Path, notify_socket: NotifyListener, loopdev: object
) -> Iterator[EngineHarness]:
    """``engine.start(**env)`` runs blockguardd with the real engine; torn down before the
    loop devices are detached (pool areas are unmounted, also after a kill -9)."""
    if os.geteuid() != 0:
        pytest.skip("the engine's tests need root (loop devices, mkfs, mount)")
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs is not installed")
    harness = EngineHarness(bus, tmp_path, notify_socket)
    try:
        yield harness
    finally:
        harness.cleanup()


def sha256_of(path: str, size: int | None = None) -> str:
    """sha256 of the first ``size`` bytes of a device (all of it by default)."""
    import hashlib

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
    import random

    data = random.Random(seed).randbytes(nbytes)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def run_job(client: object, path: str, timeout: float = 60) -> dict[str, object]:
    """Wait for a job (by its D-Bus path) and return its final properties."""
    bound = scaled(timeout)
    return client.wait_job(path, interval=0.05, timeout=bound)  # type: ignore[attr-defined]
