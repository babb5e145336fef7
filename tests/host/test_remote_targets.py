"""Registering a backup target through blockguardctl, the real daemon on a private bus and
the network lab's sshd (issue 11): without a confirmed fingerprint the offered one is shown
and nothing is recorded; a wrong one is HostKeyMismatch and nothing is recorded; a key the
target does not know yet shows the authorized_keys line; once authorised the target is
recorded with its measured link (``target show``); ``key export`` text imported on a new
host (a second state directory) is the same key, and a mistyped copy is refused whole."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blockguard.errors import ExitCode
from blockguard.storage.remote.packstore import PackStore
from tests.support.bus import REPO, NotifyListener
from tests.support.daemon import Daemon, EngineHarness
from tests.support.netlab import TARGET_ADDR, NetLab, require_netlab
from tests.timeouts import scaled

pytestmark = pytest.mark.root

CLIENT = "prot1"


@pytest.fixture(autouse=True)
def _can_run() -> None:
    require_netlab()


def ctl(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "blockguard.cli.main", "--bus", daemon.address, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=scaled(120), env=env)


def in_prot_env(lab: NetLab) -> dict[str, str]:
    """The daemon's ssh and ssh-keyscan run in the protected namespace (the runner's
    program overrides; ``ip netns exec`` execs, so the child's PID is ssh's)."""
    env = {}
    for program in ("ssh", "ssh-keyscan"):
        wrapper = lab.run_dir / f"prot-{program}"
        real = shutil.which(program)
        assert real is not None
        wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {lab.names.prot} {real} "$@"\n')
        wrapper.chmod(0o755)
        env["BLOCKGUARD_BIN_" + program.upper().replace("-", "_")] = str(wrapper)
    return env


def host_fingerprint(lab: NetLab) -> str:
    listed = subprocess.run(
        ["ssh-keygen", "-lf", str(lab.run_dir / "host_ed25519_key.pub")],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return listed.stdout.split()[1]


def other_fingerprint(tmp_path: Path) -> str:
    key = tmp_path / "impostor"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    listed = subprocess.run(
        ["ssh-keygen", "-lf", f"{key}.pub"], check=True, capture_output=True, text=True
    )
    return listed.stdout.split()[1]


def authorize(lab: NetLab, daemon: Daemon, area: Path) -> None:
    """What the target's administrator does with the line ``target client-key`` shows,
    with the forced command of this checkout's serve (DIR = the area)."""
    shown = ctl(daemon, "--json", "target", "client-key", "--client", CLIENT)
    assert shown.returncode == 0, shown.stderr
    line = json.loads(shown.stdout)["authorized_keys_line"]
    argv = [sys.executable, "-m", "blockguard.engine.servecmd", "--client", CLIENT]
    # A short probe: the area's speeds are measured at the first ``areas`` (then kept).
    serve = shlex.join([*argv, "--root", str(area), "--probe-seconds", "0.05"])
    command = f"cd {shlex.quote(str(REPO))} && PYTHONPATH=. exec {serve}"
    options, _, public = line.partition('" ')
    assert options.startswith('restrict,command="python3 -m blockguard.engine.servecmd')
    with lab.authorized_keys.open("a") as keys:
        keys.write(f'restrict,command="{command}" {public}\n')


def nothing_recorded(daemon: Daemon) -> None:
    listed = ctl(daemon, "--json", "target", "list")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["targets"] == []
    known_hosts = daemon.state_dir / "known_hosts"
    assert not known_hosts.exists() or TARGET_ADDR not in known_hosts.read_text()


def test_target_registration_and_key_export_through_blockguardctl(
    net_lab: NetLab,
    engine: EngineHarness,
    tmp_path: Path,
    notify_socket: NotifyListener,
) -> None:
    env = in_prot_env(net_lab)
    daemon = engine.start(**env)
    url = f"ssh://root@{TARGET_ADDR}:{net_lab.port}"
    fingerprint = host_fingerprint(net_lab)
    area = net_lab.run_dir / "area"
    PackStore.create(area, CLIENT).close()
    add = ("target", "add", "offsite", url, "--pool", "main", "--client", CLIENT)

    # No fingerprint: the offered one is shown with how to confirm it.
    out = ctl(daemon, *add)
    assert out.returncode == ExitCode.USAGE, out.stderr
    assert f"--host-key {fingerprint}" in out.stderr and "ssh-keygen -lf" in out.stderr
    nothing_recorded(daemon)

    # A wrong fingerprint: HostKeyMismatch naming both.
    wrong = other_fingerprint(tmp_path)
    out = ctl(daemon, *add, "--host-key", wrong)
    assert out.returncode == ExitCode.PERMISSION, out.stderr
    assert "does not match" in out.stderr and wrong in out.stderr and fingerprint in out.stderr
    nothing_recorded(daemon)

    # The right one, but the target does not know this host's key yet: the line to add.
    out = ctl(daemon, *add, "--host-key", fingerprint)
    assert out.returncode == ExitCode.PERMISSION, out.stderr
    assert "authorized_keys" in out.stderr
    assert f"servecmd --client {CLIENT} --root DIR" in out.stderr
    nothing_recorded(daemon)

    authorize(net_lab, daemon, area)
    out = ctl(daemon, *add, "--host-key", fingerprint)
    assert out.returncode == 0, out.stderr + daemon.log()
    assert "target offsite registered" in out.stdout and "link down" in out.stdout
    shown = json.loads(ctl(daemon, "--json", "target", "show", "offsite").stdout)["target"]
    print({k: shown[k] for k in ("link_down", "link_up", "link_round_trip")})
    assert (shown["url"], shown["pool"], shown["client_id"], shown["host_key"]) == (
        url,
        "main",
        CLIENT,
        fingerprint,
    )
    assert shown["link_down"] > 0 and shown["link_up"] > 0 and shown["link_round_trip"] > 0
    assert shown["space_total"] > 0
    # The target's area, probed there, as seen from here: never faster than the link.
    [area_row] = shown["areas"]
    assert area_row["name"] == "area" and area_row["total"] > 0
    assert 0 < area_row["read"] <= shown["link_down"] and 0 < area_row["write"] <= shown["link_up"]
    shown_text = ctl(daemon, "target", "show", "offsite").stdout
    assert "area area" in shown_text and "the slower of the area and the link" in shown_text
    assert f"[{TARGET_ADDR}]:{net_lab.port} " in (daemon.state_dir / "known_hosts").read_text()
    listed = json.loads(ctl(daemon, "--json", "target", "list").stdout)["targets"]
    assert [t["id"] for t in listed] == ["offsite"]

    # key export: the text to a file of its own (0600), the warning on stderr.
    exported = tmp_path / "key.txt"
    out = ctl(daemon, "key", "export", "--output", str(exported))
    assert out.returncode == 0, out.stderr
    assert "unreadable" in out.stderr
    assert oct(exported.stat().st_mode & 0o777) == "0o600"
    key_text = exported.read_text().strip()
    assert ctl(daemon, "key", "export", "--output", str(exported)).returncode == ExitCode.USAGE
    # Root only and in the audit trail; the key itself never in the log.
    assert "audit: ExportKey by uid 0" in daemon.log()
    assert key_text not in daemon.log()

    out = ctl(daemon, "target", "remove", "offsite")
    assert out.returncode == 0, out.stderr
    nothing_recorded(daemon)
    daemon.stop()

    # A new host: another state directory, only the exported key and the address.
    new_host = EngineHarness(engine.bus, tmp_path / "newhost", notify_socket)
    (tmp_path / "newhost").mkdir()
    try:
        second = new_host.start(**env)
        typo = tmp_path / "typo.txt"
        typo.write_text(key_text[:-1] + ("q" if key_text[-1] != "q" else "p") + "\n")
        out = ctl(second, *add, "--host-key", fingerprint, "--key", str(typo))
        assert out.returncode == ExitCode.USAGE and "checksum" in out.stderr, out.stderr
        assert not (second.state_dir / "keys" / "remote.key").exists()
        nothing_recorded(second)

        authorize(net_lab, second, area)
        out = ctl(second, *add, "--host-key", fingerprint, "--key", str(exported))
        assert out.returncode == 0, out.stderr + second.log()
        again = ctl(second, "key", "export")
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip() == key_text
        # The imported text was an argument of AddTarget: withheld from the audit trail.
        assert "audit: AddTarget by uid 0" in second.log()
        assert key_text not in second.log()
    finally:
        new_host.cleanup()
