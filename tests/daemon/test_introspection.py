"""The D-Bus API is a contract: the exported interfaces must equal the committed XML.

After an intended change of the API, regenerate the committed copies with
``BLOCKGUARD_REGEN_INTROSPECTION=1 .venv/bin/python -m pytest tests/daemon/test_introspection.py``
and review the diff like any other change of a public interface.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from blockguard.cli.client import Client
from tests.support.daemon import Daemon, run_job
from tests.support.devices import LoopFactory, MiB

COMMITTED = Path(__file__).parent / "introspection"
INTERFACES = {
    "org.blockguard1.Manager": "/org/blockguard1",
    "org.blockguard1.Volume": "/org/blockguard1/volume/db",
    "org.blockguard1.Pool": "/org/blockguard1/pool/p1",
    "org.blockguard1.Job": "/org/blockguard1/job/1",
}


def _interface_xml(client: Client, path: str, name: str) -> str:
    xml = client.call("Introspect", path=path, interface="org.freedesktop.DBus.Introspectable")
    root = ET.fromstring(xml)
    element = root.find(f"interface[@name='{name}']")
    assert element is not None, f"{name} not at {path}"
    ET.indent(element)
    return ET.tostring(element, encoding="unicode") + "\n"


def _canonical(xml: str) -> str:
    return ET.canonicalize(xml, strip_text=True)


@pytest.fixture
def exported(daemon: Daemon, loopdev: LoopFactory) -> dict[str, str]:
    """The real daemon with one object of each kind: pool p1, volume db, job 1 (a backup)."""
    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "dir", [loopdev(400 * MiB, "p.img")], False)
        client.call("Protect", "sstssa{sv}", loopdev(16 * MiB, "db.img"), "db", 0, "", "", {})
        job = client.call("BackupNow", "s", "db")
        assert job == INTERFACES["org.blockguard1.Job"]
        assert run_job(client, job)["State"] == "done"
        return {name: _interface_xml(client, path, name) for name, path in INTERFACES.items()}


def test_interfaces_match_committed_xml(exported: dict[str, str]) -> None:
    if os.environ.get("BLOCKGUARD_REGEN_INTROSPECTION") == "1":
        COMMITTED.mkdir(exist_ok=True)
        for name, xml in exported.items():
            (COMMITTED / f"{name}.xml").write_text(xml)
        pytest.skip("regenerated the committed introspection XML")
    for name, xml in exported.items():
        committed = COMMITTED / f"{name}.xml"
        assert committed.exists(), f"missing {committed}: regenerate (see module docstring)"
        assert _canonical(xml) == _canonical(committed.read_text()), (
            f"{name} differs from {committed}; if intended, regenerate (see module docstring)"
        )


def test_committed_xml_covers_the_documented_api() -> None:
    manager = ET.parse(COMMITTED / "org.blockguard1.Manager.xml").getroot()
    methods = {m.get("name") for m in manager.findall("method")}
    signals = {s.get("name") for s in manager.findall("signal")}
    assert {
        "CreatePool",
        "ExtendPool",
        "RemovePool",
        "Protect",
        "Unprotect",
        "SetObjectives",
        "BackupNow",
        "Restore",
        "Verify",
        "Plan",
        "GetHealth",
    } <= methods
    assert signals == {
        "BackupStarted",
        "BackupFinished",
        "BackupFailed",
        "RestoreFinished",
        "PoolSpaceLow",
        "ObjectiveInfeasible",
        "TrackingLost",
        "Alert",
    }
    volume = ET.parse(COMMITTED / "org.blockguard1.Volume.xml").getroot()
    props = {p.get("name"): p.get("type") for p in volume.findall("property")}
    assert props["EstimatedRestoreSeconds"] == "a{sd}"
    assert props["NextBackup"] == "t"
    assert props["Generations"] == "a(sssttsu)"
    job = ET.parse(COMMITTED / "org.blockguard1.Job.xml").getroot()
    job_props = {p.get("name"): p.get("type") for p in job.findall("property")}
    assert job_props["Progress"] == "d" and job_props["Error"] == "(ss)"
