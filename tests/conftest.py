"""Test-wide fixtures: environment isolation, the guest marker, loop devices."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

IN_GUEST = os.environ.get("BLOCKGUARD_GUEST") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Guest tests need device-mapper: on the host they are skipped, never silently passed."""
    if IN_GUEST:
        return
    skip = pytest.mark.skip(reason="needs device-mapper: runs inside the guest (scripts/vm)")
    for item in items:
        if "guest" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the developer's configuration or talks to a real system bus."""
    for name in list(os.environ):
        if name.startswith("BLOCKGUARD_BIN_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("BLOCKGUARD_STATE_DIR", str(tmp_path / "state"))
    # An installed /etc/blockguard/blockguard.toml must not change what a test's daemon does.
    config = tmp_path / "blockguard-test.toml"
    config.write_text("")
    monkeypatch.setenv("BLOCKGUARD_CONFIG", str(config))
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/blockguard-test-bus")


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for loop devices")


class LoopFactory:
    """Creates loop devices over sparse files and always detaches them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.devices: list[str] = []

    def __call__(self, size: int, name: str | None = None, direct_io: bool = False) -> str:
        _need_root()
        backing = self.directory / (name or f"loop{len(self.devices)}.img")
        with open(backing, "wb") as f:
            f.truncate(size)
        argv = ["losetup", "--find", "--show"]
        if direct_io:
            argv.append("--direct-io=on")
        dev = subprocess.run(
            [*argv, str(backing)], check=True, capture_output=True, text=True, timeout=30
        ).stdout.strip()
        self.devices.append(dev)
        return dev

    def cleanup(self) -> None:
        for dev in reversed(self.devices):
            with contextlib.suppress(Exception):
                subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30)
        self.devices.clear()


@pytest.fixture
def loopdev(tmp_path: Path) -> Iterator[LoopFactory]:
    """``loopdev(size)`` returns a new loop device path; all are detached after the test."""
    factory = LoopFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.cleanup()
