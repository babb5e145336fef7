"""Fixtures of the tests that talk to blockguardd: a private dbus-daemon, the daemon (the
real engine) on it, a notify socket. The conftest.py of a suite imports the ones it uses.

Every process started here is killed by its PID at teardown, also when a test fails.
The bus sockets live in a world-traversable directory so that tests can connect as
``nobody`` (pytest's own tmp_path is private to root).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.bus import PERMISSIVE, SYSTEM_LIKE, NotifyListener, PrivateBus, start_bus
from tests.support.daemon import Daemon, EngineHarness
from tests.support.devices import LoopFactory


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A temporary directory that every user may traverse (for the bus socket)."""
    path = Path(tempfile.mkdtemp(prefix="bg-bus-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifyListener]:
    path = tmp_path / "notify"
    listener = NotifyListener(str(path), str(path))
    try:
        yield listener
    finally:
        listener.close()


@contextlib.contextmanager
def _harness(bus: PrivateBus, tmp_path: Path, notify: NotifyListener) -> Iterator[EngineHarness]:
    if os.geteuid() != 0:
        pytest.skip("the engine's tests need root (loop devices, mkfs, mount)")
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs is not installed")
    harness = EngineHarness(bus, tmp_path, notify)
    try:
        yield harness
    finally:
        harness.cleanup()


@pytest.fixture
def engine(
    bus: PrivateBus, tmp_path: Path, notify_socket: NotifyListener, loopdev: LoopFactory
) -> Iterator[EngineHarness]:
    """``engine.start(*args, **env)`` runs blockguardd with the real engine; torn down before
    the loop devices are detached (pool areas are unmounted, also after a kill -9)."""
    with _harness(bus, tmp_path, notify_socket) as harness:
        yield harness


@pytest.fixture
def policy_engine(
    policy_bus: PrivateBus, tmp_path: Path, notify_socket: NotifyListener, loopdev: LoopFactory
) -> Iterator[EngineHarness]:
    """Like :func:`engine`, on a bus with system-bus defaults and the project's policy."""
    with _harness(policy_bus, tmp_path, notify_socket) as harness:
        yield harness


@pytest.fixture
def daemon(engine: EngineHarness) -> Daemon:
    """blockguardd (the real engine, nothing configured yet) on a permissive bus, READY."""
    return engine.start()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[object]:
    from blockguard.cli.client import Client

    with Client(daemon.address) as c:
        yield c
