"""The systemd units pass ``systemd-analyze verify``; the udev rules are well-formed.

``systemd-analyze verify`` insists that ExecStart's binary exists. The units name the
path scripts/install installs (/usr/local/lib/blockguard/bin/blockguardd); the test verifies
copies whose ExecStart points at this checkout's venv script instead, so nothing has to be
installed to run it. tests/guest/test_units_systemd.py runs them under a real systemd.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = sorted((REPO / "systemd").glob("*.service"))
INSTALLED = "/usr/local/lib/blockguard/bin/blockguardd"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    binary = Path(sys.executable).parent / "blockguardd"
    if not binary.exists():
        pytest.skip(f"{binary} is not installed (pip install -e .)")
    assert [u.name for u in UNITS] == ["blockguard-early.service", "blockguard.service"]
    copies = []
    for unit in UNITS:
        text = unit.read_text().replace(INSTALLED, str(binary))
        copy = tmp_path / unit.name
        copy.write_text(text)
        copies.append(str(copy))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *copies],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_main_unit_is_notify_with_watchdog_and_bus_name() -> None:
    text = (REPO / "systemd" / "blockguard.service").read_text()
    for line in (
        "Type=notify",
        "BusName=org.blockguard1",
        "WatchdogSec=30",
        "Restart=on-failure",
        "ProtectSystem=strict",
        "DeviceAllow=block-* rwm",
        "DeviceAllow=/dev/mapper/control rwm",
        "RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6",
        f"ExecStart={INSTALLED} --bus system --state-dir /var/lib/blockguard",
    ):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    # LVM's locks and metadata backups stay writable under ProtectSystem=strict.
    writable = re.search(r"^ReadWritePaths=(.*)$", text, re.M)
    assert writable is not None
    assert "/var/lib/blockguard" in writable.group(1).split()
    for path in ("/run/lock/lvm", "/etc/lvm/backup", "/etc/lvm/archive"):
        assert f"-{path}" in writable.group(1).split(), path


def test_main_unit_lets_the_daemon_open_dev_fuse_for_browse_mounts() -> None:
    text = (REPO / "systemd" / "blockguard.service").read_text()
    assert re.search(r"^DevicePolicy=closed$", text, re.M)
    assert re.search(r"^DeviceAllow=/dev/fuse rw$", text, re.M)


@pytest.mark.parametrize("unit", [u.name for u in UNITS])
def test_units_do_not_cut_off_device_events_or_wait_for_udev_settle(unit: str) -> None:
    text = (REPO / "systemd" / unit).read_text()
    directives = [line for line in text.splitlines() if not line.startswith("#")]
    assert not any(line.startswith("PrivateNetwork=") for line in directives)
    assert not any("systemd-udev-settle" in line for line in directives)
    assert any(
        line == f"ExecStart={INSTALLED}" or line.startswith(f"ExecStart={INSTALLED} ")
        for line in directives
    )


def test_ip_only_where_a_backup_target_is_reached() -> None:
    """The main unit spawns ssh to targets (issue 11): IP sockets allowed, no IPAddressDeny
    (an admin's drop-in narrows it, docs/install.md). The early unit never reaches a
    target: no IP at all."""
    main = (REPO / "systemd" / "blockguard.service").read_text()
    assert not re.search(r"^IPAddress(Deny|Allow)=", main, re.M)
    early = (REPO / "systemd" / "blockguard-early.service").read_text()
    assert re.search(r"^RestrictAddressFamilies=AF_UNIX AF_NETLINK$", early, re.M)
    assert re.search(r"^IPAddressDeny=any$", early, re.M)


def test_early_unit_runs_before_filesystems() -> None:
    text = (REPO / "systemd" / "blockguard-early.service").read_text()
    assert re.search(r"^DefaultDependencies=no$", text, re.M)
    assert re.search(r"^Before=.*local-fs-pre\.target", text, re.M)
    assert "--reestablish-tracking-only" in text


def test_udev_rules_are_well_formed() -> None:
    rules = (REPO / "udev" / "90-blockguard.rules").read_text()
    key = r"[A-Z_]+(\{[A-Za-z_]+\})?"
    assignment = re.compile(rf'^{key}\s*(==|!=|=|\+=|:=)\s*"[^"]*"$')
    labels, gotos = set(), set()
    for line in rules.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for part in (p.strip() for p in line.split(", ")):
            assert assignment.match(part), f"malformed: {part!r} in {line!r}"
            if part.startswith("LABEL="):
                labels.add(part.split('"')[1])
            if part.startswith("GOTO="):
                gotos.add(part.split('"')[1])
    assert gotos <= labels
    assert 'ENV{DM_NAME}=="blockguard-*"' in rules
