"""The network lab of the remote-target tests (tests/support/netlab.py): ssh from the
protected namespace reaches the target namespace and carries bytes exactly, forced commands
and ``restrict`` hold, a wrong host key is refused, and nothing is left behind, also when
the body or the setup fails.

No speed is asserted: bench/bench_link.py prints what the shaped link carries.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.netlab import (
    TARGET_ADDR,
    LabNames,
    NetLab,
    NetLabError,
    lab_names,
    netlab,
    require_netlab,
)
from tests.timeouts import scaled

pytestmark = pytest.mark.root

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _can_run() -> None:
    require_netlab()


def _netns_inode(ns: str) -> int:
    return os.stat(f"/run/netns/{ns}").st_ino


def _processes_in_netns(inode: int) -> list[int]:
    """Live processes whose network namespace is ``inode``."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if os.stat(entry / "ns" / "net").st_ino == inode:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _assert_gone(names: LabNames, inodes: list[int], sshd_pid: int | None) -> None:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for ns in (names.prot, names.target):
        assert ns not in listed.split(), f"{ns} is still listed: {listed}"
        assert not Path(f"/run/netns/{ns}").exists()
    # Unlisted is not enough: a process left inside would keep a namespace (and its veth).
    for inode in inodes:
        assert _processes_in_netns(inode) == [], f"processes left in netns {inode}"
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    for dev in (names.veth_prot, names.veth_target):
        assert f" {dev}@" not in links and f" {dev}:" not in links
    if sshd_pid is not None:
        assert not _is_running(sshd_pid), f"sshd {sshd_pid} is still running"
    assert not names.run_dir.exists()


def test_command_runs_in_the_target_namespace_and_bytes_come_back_exact() -> None:
    data = os.urandom(8 * MiB)
    with netlab(rate=32 * MiB) as lab:
        where = lab.ssh(["sh", "-c", 'readlink /proc/self/ns/net; echo "$SSH_CONNECTION"'])
        assert where.returncode == 0, where.stderr
        netns, connection = where.stdout.decode().splitlines()
        assert netns == f"net:[{_netns_inode(lab.names.target)}]"
        client, _, server, port = connection.split()
        assert (client, server, port) == ("192.0.2.1", TARGET_ADDR, str(lab.port))

        echoed = lab.ssh(["cat"], input=data)
        assert echoed.returncode == 0, echoed.stderr
        assert hashlib.sha256(echoed.stdout).hexdigest() == hashlib.sha256(data).hexdigest()
        # The link is shaped both ways, as asked.
        names = lab.names
        for ns, dev in ((names.prot, names.veth_prot), (names.target, names.veth_target)):
            qdisc = subprocess.run(
                ["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", dev],
                capture_output=True,
                text=True,
            ).stdout
            assert "tbf" in qdisc and "rate 268435Kbit" in qdisc, qdisc


def test_an_argument_arrives_as_given(net_lab: NetLab) -> None:
    odd = "a b; $(touch x) 'q' \"d\""
    done = net_lab.ssh(["printf", "%s", odd])
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == odd


def test_forced_command_runs_whatever_the_client_asks() -> None:
    with netlab(command='printf "forced:%s" "$SSH_ORIGINAL_COMMAND"', restrict=True) as lab:
        done = lab.ssh(["cat", "/etc/hostname"])
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"forced:cat /etc/hostname"

        # restrict: the server refuses a forwarding the unrestricted key is allowed.
        forward = ["-o", "ExitOnForwardFailure=yes", "-R", "40000:127.0.0.1:9"]
        refused = lab.ssh(["true"], options=forward)
        assert refused.returncode == 255
        assert b"forwarding failed" in refused.stderr
        free = lab.add_client("free")
        allowed = lab.ssh(["true"], key=free, options=forward)
        assert allowed.returncode == 0, allowed.stderr


def test_a_second_client_key_has_its_own_forced_command(net_lab: NetLab) -> None:
    other = net_lab.add_client("other", command="echo other", restrict=True)
    assert net_lab.ssh(["echo", "mine"]).stdout == b"mine\n"
    assert net_lab.ssh(["echo", "mine"], key=other).stdout == b"other\n"


def test_a_wrong_host_key_is_refused(net_lab: NetLab, tmp_path: Path) -> None:
    impostor = tmp_path / "impostor"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(impostor)], check=True)
    kind, blob = Path(f"{impostor}.pub").read_text().split()[:2]
    net_lab.known_hosts.write_text(f"[{TARGET_ADDR}]:{net_lab.port} {kind} {blob}\n")
    done = net_lab.ssh(["echo", "reached"])
    assert done.returncode == 255
    assert b"Host key verification failed" in done.stderr
    assert b"reached" not in done.stdout


def test_nothing_is_left_after_the_context() -> None:
    with netlab(rate=8 * MiB) as lab:
        names = lab.names
        inodes = [_netns_inode(names.prot), _netns_inode(names.target)]
        sshd_pid = lab.sshd_pid
        assert _is_running(sshd_pid)
        assert lab.ssh(["true"]).returncode == 0
    _assert_gone(names, inodes, sshd_pid)


def test_a_failure_in_the_body_still_cleans_up() -> None:
    with pytest.raises(RuntimeError, match="the body failed"), netlab() as lab:
        names = lab.names
        inodes = [_netns_inode(names.prot), _netns_inode(names.target)]
        sshd_pid = lab.sshd_pid
        # A session still open in the target namespace when the body fails.
        session = subprocess.Popen(
            lab.in_prot([*lab.ssh_argv(), "--", "sleep 600"]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        session_pid = session.pid
        # Wait until the session has its own sshd process in the target namespace.
        deadline = time.monotonic() + scaled(30)
        while len(_processes_in_netns(inodes[1])) < 2:
            assert time.monotonic() < deadline, "the ssh session never opened"
            assert session.poll() is None, "the ssh session ended"
            time.sleep(0.05)
        raise RuntimeError("the body failed")
    session.wait(timeout=60)
    _assert_gone(names, inodes, sshd_pid)
    assert not _is_running(session_pid)


def test_a_setup_failing_half_way_removes_what_it_made() -> None:
    names = lab_names("halfway")
    with (
        pytest.raises(NetLabError, match="sshd configuration"),
        netlab(names=names, sshd_options={"NoSuchOption": "yes"}),
    ):
        pytest.fail("the lab started with a bad sshd option")
    _assert_gone(names, [], None)
