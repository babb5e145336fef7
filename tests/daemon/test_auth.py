"""Authorisation: anyone may read, only root (or the admin group) may change anything.

Two layers are tested separately: the bus policy (data/org.blockguard1.conf, on a bus with
system-bus defaults) and the daemon's own check (on a bus that allows everything). The
daemon runs the real engine, with a dir pool and a volume on loop devices.
"""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

from blockguard.cli.client import Client
from blockguard.daemon.bus import ManagerInterface
from tests.support.bus import NOBODY, POLICY_FILE
from tests.support.daemon import Daemon, EngineHarness
from tests.support.devices import LoopFactory, MiB, sha256_of

pytestmark = pytest.mark.skipif(
    shutil.which("busctl") is None or shutil.which("setpriv") is None,
    reason="needs busctl and setpriv",
)


def busctl(address: str, *args: str, user: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*(user or []), "busctl", f"--address={address}", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def _read_only_methods() -> set[str]:
    names = set()
    for attr in dir(ManagerInterface):
        fn = getattr(ManagerInterface, attr)
        if hasattr(fn, "read_only") and attr[0].isupper():
            names.add(attr)
    return {n for n in names if getattr(getattr(ManagerInterface, n), "read_only", False)}


def _root_daemon_with_volume(client: Client, loopdev: LoopFactory) -> None:
    client.call("CreatePool", "ssasb", "p1", "dir", [loopdev(400 * MiB, "pool.img")], False)
    client.call("Protect", "sstssa{sv}", loopdev(16 * MiB, "db.img"), "db", 0, "", "", {})


@pytest.fixture
def policy_daemon(policy_engine: EngineHarness) -> Daemon:
    return policy_engine.start()


def test_policy_denies_nobody_changes_but_allows_reads(
    policy_daemon: Daemon, loopdev: LoopFactory
) -> None:
    address = policy_daemon.address
    with Client(address) as root:
        _root_daemon_with_volume(root, loopdev)
    volume = loopdev.devices[1]
    untouched = sha256_of(volume)
    denied = busctl(
        address,
        "call",
        "org.blockguard1",
        "/org/blockguard1",
        "org.blockguard1.Manager",
        "BackupNow",
        "s",
        "db",
        user=NOBODY,
    )
    assert denied.returncode != 0
    assert "Access denied" in denied.stderr or "AccessDenied" in denied.stderr, denied.stderr
    for member, sig, args in (
        ("Unprotect", "sb", ["db", "false"]),
        ("RemovePool", "sbb", ["p1", "true", "false"]),
        ("CreatePool", "ssasb", ["p2", "", "1", "/dev/null", "false"]),
    ):
        result = busctl(
            address,
            "call",
            "org.blockguard1",
            "/org/blockguard1",
            "org.blockguard1.Manager",
            member,
            sig,
            *args,
            user=NOBODY,
        )
        assert result.returncode != 0 and "ccess denied" in result.stderr, (member, result)
    name = busctl(
        address,
        "get-property",
        "org.blockguard1",
        "/org/blockguard1/volume/db",
        "org.blockguard1.Volume",
        "Name",
        user=NOBODY,
    )
    assert name.returncode == 0, name.stderr
    assert name.stdout.strip() == 's "db"'
    plan = busctl(
        address,
        "call",
        "org.blockguard1",
        "/org/blockguard1",
        "org.blockguard1.Manager",
        "Plan",
        "s",
        "db",
        user=NOBODY,
    )
    assert plan.returncode == 0, plan.stderr
    intro = busctl(address, "introspect", "org.blockguard1", "/org/blockguard1", user=NOBODY)
    assert intro.returncode == 0 and "BackupNow" in intro.stdout
    # Nothing changed: the volume and the pool are still there, no job ran.
    with Client(address) as root:
        assert root.call("ListVolumes") == ["/org/blockguard1/volume/db"]
        assert root.call("ListPools") == ["/org/blockguard1/pool/p1"]
        assert root.call("ListJobs") == []
    assert sha256_of(volume) == untouched


def test_daemon_refuses_nobody_even_if_the_bus_allows(daemon: Daemon, loopdev: LoopFactory) -> None:
    with Client(daemon.address) as root:
        _root_daemon_with_volume(root, loopdev)
    result = busctl(
        daemon.address,
        "call",
        "org.blockguard1",
        "/org/blockguard1",
        "org.blockguard1.Manager",
        "Unprotect",
        "sb",
        "db",
        "false",
        user=NOBODY,
    )
    assert result.returncode != 0
    assert "needs root or membership of group blockguard" in result.stderr, result.stderr
    assert "uid 65534" in result.stderr
    reads = busctl(
        daemon.address,
        "call",
        "org.blockguard1",
        "/org/blockguard1",
        "org.blockguard1.Manager",
        "ListVolumes",
        user=NOBODY,
    )
    assert reads.returncode == 0 and "/org/blockguard1/volume/db" in reads.stdout
    with Client(daemon.address) as root:
        assert root.call("ListVolumes") == ["/org/blockguard1/volume/db"]


def test_admin_group_member_may_change(engine: EngineHarness, loopdev: LoopFactory) -> None:
    # nogroup (65534) stands in for the blockguard group, which the test host lacks.
    daemon = engine.start("--admin-group", "nogroup")
    with Client(daemon.address) as root:
        _root_daemon_with_volume(root, loopdev)
    member = ["setpriv", "--reuid=65534", "--regid=65534", "--groups=65534"]
    result = busctl(
        daemon.address,
        "call",
        "org.blockguard1",
        "/org/blockguard1",
        "org.blockguard1.Manager",
        "Unprotect",
        "sb",
        "db",
        "false",
        user=member,
    )
    assert result.returncode == 0, result.stderr
    with Client(daemon.address) as root:
        assert root.call("ListVolumes") == []
    # The master key is root's alone: the admin group may not carry it away.
    result = busctl(
        daemon.address,
        "call",
        "org.blockguard1",
        "/org/blockguard1",
        "org.blockguard1.Manager",
        "ExportKey",
        user=member,
    )
    assert result.returncode != 0 and "needs root" in result.stderr, result.stderr
    assert "audit: ExportKey by uid 65534" in daemon.log() and "refused" in daemon.log()


def test_policy_read_methods_match_the_code() -> None:
    tree = ET.parse(POLICY_FILE)
    default = tree.find("policy[@context='default']")
    assert default is not None
    allowed = {
        rule.get("send_member")
        for rule in default.findall("allow")
        if rule.get("send_interface") == "org.blockguard1.Manager"
    }
    assert allowed == _read_only_methods()
    assert {"Plan", "ListVolumes", "GetStatus"} <= allowed
    assert "BackupNow" not in allowed
