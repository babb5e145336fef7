"""scripts/install into a staging root (--root): everything lands where systemd, D-Bus, udev,
man and the shells look; a second run changes nothing; the installed programs run.

Offline from the wheelhouse scripts/bootstrap fills (.cache/wheels); the real install on a
clean system, followed by the units under a real systemd, is tests/guest/test_units_systemd.py.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WHEELS = REPO / ".cache" / "wheels"
VENV = "usr/local/lib/blockguard"


def install(root: Path) -> str:
    if not any(WHEELS.glob("*.whl")):
        pytest.fail(f"no wheelhouse in {WHEELS}: run scripts/bootstrap")
    result = subprocess.run(
        [str(REPO / "scripts" / "install"), "--root", str(root), "--wheelhouse", str(WHEELS)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def digest(root: Path) -> dict[str, str]:
    """Every installed file outside the venv (which is reinstalled on purpose)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if rel.startswith(VENV) or path.is_dir():
            continue
        data = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


def test_install_layout_idempotence_and_programs(tmp_path: Path) -> None:
    root = tmp_path / "root"
    install(root)
    local = root / "usr" / "local"
    expected = [
        "usr/local/lib/systemd/system/blockguard.service",
        "usr/local/lib/systemd/system/blockguard-early.service",
        "etc/dbus-1/system.d/org.blockguard1.conf",
        "usr/local/share/dbus-1/system-services/org.blockguard1.service",
        "usr/local/lib/udev/rules.d/90-blockguard.rules",
        "usr/local/lib/sysusers.d/blockguard.conf",
        "usr/local/lib/tmpfiles.d/blockguard.conf",
        "usr/local/share/man/man8/blockguardctl.8",
        "usr/local/share/man/man8/blockguardd.8",
        "usr/local/share/bash-completion/completions/blockguardctl",
        "usr/local/share/zsh/site-functions/_blockguardctl",
        "usr/local/share/doc/blockguard/LICENSE",
        "etc/blockguard/blockguard.toml",
    ]
    for rel in expected:
        assert (root / rel).is_file(), rel
    assert os.readlink(local / "sbin" / "blockguardd") == f"/{VENV}/bin/blockguardd"
    assert os.readlink(local / "bin" / "blockguardctl") == f"/{VENV}/bin/blockguardctl"

    # The units start what was installed; the policy's group is the one sysusers makes.
    unit = (local / "lib/systemd/system/blockguard.service").read_text()
    assert re.search(rf"^ExecStart=/{VENV}/bin/blockguardd ", unit, re.M)
    policy = (root / "etc/dbus-1/system.d/org.blockguard1.conf").read_text()
    group = re.search(r'<policy group="([^"]+)">', policy).group(1)
    assert f"g {group} -" in (local / "lib/sysusers.d/blockguard.conf").read_text()
    activation = (local / "share/dbus-1/system-services/org.blockguard1.service").read_text()
    assert (
        "Name=org.blockguard1" in activation and "SystemdService=blockguard.service" in activation
    )

    # Man pages and completion come from the parsers: they know today's options.
    assert "--version" in (local / "share/man/man8/blockguardd.8").read_text()
    assert "--config" in (local / "share/man/man8/blockguardd.8").read_text()
    bash = (local / "share/bash-completion/completions/blockguardctl").read_text()
    assert "pool" in bash and "--json" in bash
    assert (
        "#compdef blockguardctl" in (local / "share/zsh/site-functions/_blockguardctl").read_text()
    )

    # The programs run from the venv (its python: under --root the scripts' #! names /usr/local).
    python = str(root / VENV / "bin" / "python")
    for module, prog in (
        ("blockguard.cli.main", "blockguardctl"),
        ("blockguard.daemon.main", "blockguardd"),
    ):
        out = subprocess.run(
            [python, "-m", module, "--version"], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0 and out.stdout.strip() == f"{prog} 0.1.0", out
    assert (root / VENV / "bin" / "blockguardd").read_text().startswith(f"#!/{VENV}/bin/python")

    # An admin's configuration survives; a second run changes nothing else.
    config = root / "etc/blockguard/blockguard.toml"
    config.write_text("probe_seconds = 0\n")
    before = digest(root)
    install(root)
    assert digest(root) == before
    assert config.read_text() == "probe_seconds = 0\n"
