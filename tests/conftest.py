"""Test-wide fixtures: environment isolation, the guest marker, loop devices."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.devices import LoopFactory

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
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/blockguard-test-bus")


@pytest.fixture
def loopdev(tmp_path: Path) -> Iterator[LoopFactory]:
    """``loopdev(size)`` returns a new loop device path; all are detached after the test."""
    factory = LoopFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.cleanup()
