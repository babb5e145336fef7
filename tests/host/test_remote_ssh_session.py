"""The protected host's session with a target over real ssh in the network lab (issue 11):
the host key pinned for the fingerprint an administrator confirmed, a generation stored
and read back byte-exact through the forced serve command; a wrong pinned host key, a key
the target does not know and a port nobody listens on each end with their named error
and change nothing on the target; the ssh child is reaped on close and on every error;
the link probe over a tbf-shaped line gives positive rates (printed, not judged)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockguard.errors import HostKeyMismatch, NotAuthorized, TargetUnreachable, WireClosed
from blockguard.storage.remote.linkprobe import measure_link
from blockguard.storage.remote.packstore import PackStore, pack_digest
from blockguard.storage.remote.session import RemoteSession
from blockguard.storage.remote.ssh import (
    SshOptions,
    TargetAddress,
    create_client_key,
    parse_target_url,
    pin_host_key,
)
from blockguard.storage.runner import Runner
from tests.support.netlab import TARGET_ADDR, NetLab, netlab, require_netlab
from tests.timeouts import scaled

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


@pytest.fixture(autouse=True)
def _can_run() -> None:
    require_netlab()


def serve_command(client: str, area: Path) -> str:
    """The forced command of a client's key: this checkout's serve for ``client``."""
    argv = [sys.executable, "-m", "blockguard.engine.servecmd", "--client", client]
    serve = shlex.join([*argv, "--root", str(area)])
    return f"cd {shlex.quote(str(REPO))} && PYTHONPATH=. exec {serve}"


def prot_runner(lab: NetLab) -> Runner:
    """A runner whose ssh and ssh-keyscan run in the protected namespace (the runner's
    program overrides; ``ip netns exec`` execs, so the child's PID is ssh's)."""
    binaries = {}
    for program in ("ssh", "ssh-keyscan"):
        wrapper = lab.run_dir / f"prot-{program}"
        real = shutil.which(program)
        assert real is not None
        wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {lab.names.prot} {real} "$@"\n')
        wrapper.chmod(0o755)
        binaries[program] = str(wrapper)
    return Runner(binaries=binaries)


def host_fingerprint(lab: NetLab) -> str:
    """What the target's administrator reads out: ``ssh-keygen -lf`` of its host key."""
    listed = subprocess.run(
        ["ssh-keygen", "-lf", str(lab.run_dir / "host_ed25519_key.pub")],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return listed.stdout.split()[1]


def assert_reaped(lab: NetLab, pid: int) -> None:
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    assert not Path(f"/proc/{pid}").exists()
    left = subprocess.run(["ip", "netns", "pids", lab.names.prot], capture_output=True, text=True)
    assert left.stdout.split() == []


class Client:
    """The protected host's side: its state dir, key, known_hosts and runner."""

    def __init__(self, lab: NetLab, state: Path) -> None:
        self.lab = lab
        self.runner = prot_runner(lab)
        self.key = state / "keys" / "ssh_ed25519"
        self.public = create_client_key(self.key, comment="blockguard@prot", runner=self.runner)
        self.known_hosts = state / "known_hosts"
        self.address = parse_target_url(f"ssh://root@{TARGET_ADDR}:{lab.port}")

    def connect(self, address: TargetAddress | None = None) -> RemoteSession:
        return RemoteSession.connect(
            "backup1",
            address or self.address,
            key=self.key,
            known_hosts=self.known_hosts,
            options=SshOptions(connect_timeout=int(scaled(30))),
            runner=self.runner,
            close_timeout=scaled(30),
        )

    def authorize(self, command: str) -> None:
        """What the target's administrator does with the public key the client shows."""
        line = f'restrict,command="{command}" {self.public}'
        with self.lab.authorized_keys.open("a") as keys:
            keys.write(line + "\n")


@pytest.fixture
def area(net_lab: NetLab) -> Path:
    area = net_lab.run_dir / "area"
    area.mkdir()
    PackStore.create(area, "C1").close()
    return area


@pytest.fixture
def client(net_lab: NetLab, tmp_path: Path) -> Iterator[Client]:
    yield Client(net_lab, tmp_path / "state")


def tree(path: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(path.rglob("*"))
    }


def test_a_generation_round_trips_through_ssh_with_the_pinned_host_key(
    net_lab: NetLab, area: Path, client: Client
) -> None:
    client.authorize(serve_command("C1", area))
    pinned = pin_host_key(
        client.address, host_fingerprint(net_lab), client.known_hosts,
        target="backup1", runner=client.runner,
    )  # fmt: skip
    assert client.known_hosts.read_text() == (
        f"[{TARGET_ADDR}]:{net_lab.port} {pinned.key_type} {pinned.blob}\n"
    )
    packs = {n: os.urandom(MiB + n) for n in range(6)}
    index = {
        "packs": [{"pack": n, "size": len(p), "xxh3_128": pack_digest(p)} for n, p in packs.items()]
    }
    with client.connect() as session:
        session.begin("v1@g1", {"kind": "full"})
        assert session.put_packs("v1@g1", packs.items()) == {n: len(p) for n, p in packs.items()}
        assert session.commit("v1@g1", index, b"sealed manifest").committed
        pid = session.child.pid
    assert session.child.poll() == 0
    assert_reaped(net_lab, pid)

    with client.connect() as session:
        [listed] = session.list()
        assert (listed.generation, listed.manifest) == ("v1@g1", b"sealed manifest")
        assert {n: session.get("v1@g1", n) for n in packs} == packs
    assert session.child.poll() == 0
    assert_reaped(net_lab, session.child.pid)
    record = client.runner.history()[-1]
    assert record.argv[0].endswith("prot-ssh") and record.state == "finished"


def test_a_wrong_host_key_is_refused_and_changes_nothing(
    net_lab: NetLab, area: Path, client: Client, tmp_path: Path
) -> None:
    client.authorize(serve_command("C1", area))
    impostor = tmp_path / "impostor"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", impostor], check=True)
    _, other_fingerprint = subprocess.run(
        ["ssh-keygen", "-lf", f"{impostor}.pub"], check=True, capture_output=True, text=True
    ).stdout.split()[:2]
    with pytest.raises(HostKeyMismatch, match="backup1") as info:
        pin_host_key(
            client.address, other_fingerprint, client.known_hosts,
            target="backup1", runner=client.runner,
        )  # fmt: skip
    assert host_fingerprint(net_lab) in str(info.value)
    assert not client.known_hosts.exists()

    # A known_hosts that pins another key for the target's address.
    key_type, blob = Path(f"{impostor}.pub").read_text().split()[:2]
    client.known_hosts.write_text(f"[{TARGET_ADDR}]:{net_lab.port} {key_type} {blob}\n")
    before = tree(area)
    with pytest.raises(HostKeyMismatch) as info:
        client.connect()
    message = str(info.value)
    assert "backup1" in message and str(client.known_hosts) in message
    assert "verification failed" in message
    assert tree(area) == before
    assert_ssh_failed_and_reaped(client, net_lab)


def assert_ssh_failed_and_reaped(client: Client, lab: NetLab) -> None:
    """The one ssh started failed by itself (exit 255) and is gone."""
    [record] = [r for r in client.runner.history() if r.argv[0].endswith("prot-ssh")]
    assert record.returncode == 255 and record.pid is not None
    assert_reaped(lab, record.pid)


def test_a_key_the_target_does_not_know_is_not_authorized(
    net_lab: NetLab, area: Path, client: Client
) -> None:
    pin_host_key(
        client.address, host_fingerprint(net_lab), client.known_hosts,
        target="backup1", runner=client.runner,
    )  # fmt: skip
    before = tree(area)
    with pytest.raises(NotAuthorized, match=r"target backup1 \(root@192\.0\.2\.2:2222\)"):
        client.connect()
    assert tree(area) == before
    assert_ssh_failed_and_reaped(client, net_lab)


def test_nobody_listening_is_unreachable(net_lab: NetLab, client: Client) -> None:
    address = TargetAddress("root", TARGET_ADDR, net_lab.port + 1)
    with pytest.raises(TargetUnreachable, match=r"backup1 at 192\.0\.2\.2:2223: .*refused"):
        client.connect(address)
    assert_ssh_failed_and_reaped(client, net_lab)


def serve_pids(lab: NetLab) -> list[int]:
    listed = subprocess.run(
        ["ip", "netns", "pids", lab.names.target], capture_output=True, text=True
    )
    found = []
    for pid in map(int, listed.stdout.split()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"blockguard.engine.servecmd" in cmdline:
            found.append(pid)
    return found


def test_a_serve_killed_mid_session_ends_it_named_and_the_next_session_resumes(
    net_lab: NetLab, area: Path, client: Client
) -> None:
    client.authorize(serve_command("C1", area))
    pin_host_key(
        client.address, host_fingerprint(net_lab), client.known_hosts,
        target="backup1", runner=client.runner,
    )  # fmt: skip
    packs = {n: os.urandom(MiB) for n in range(3)}
    session = client.connect()
    session.begin("v1@g1")
    session.put_packs("v1@g1", list(packs.items())[:2])
    [serve] = serve_pids(net_lab)
    os.kill(serve, 9)
    with pytest.raises(WireClosed, match="target backup1") as info:
        session.put("v1@g1", 2, packs[2])
    print(info.value)
    assert session.child.poll() is not None
    assert_reaped(net_lab, session.child.pid)

    with client.connect() as session:
        state = session.begin("v1@g1")  # a resume: what was stored is there
        assert not state.committed and state.packs == {0: MiB, 1: MiB}
        session.put("v1@g1", 2, packs[2])
        index = {
            "packs": [
                {"pack": n, "size": len(p), "xxh3_128": pack_digest(p)} for n, p in packs.items()
            ]
        }
        assert session.commit("v1@g1", index, b"m").committed
        assert [session.get("v1@g1", n) for n in packs] == list(packs.values())


def test_the_link_measured_over_a_shaped_line(tmp_path: Path) -> None:
    rate = 4 * MiB
    with netlab(rate=rate) as lab:
        area = lab.run_dir / "area"
        area.mkdir()
        PackStore.create(area, "C1").close()
        client = Client(lab, tmp_path / "state")
        client.authorize(serve_command("C1", area))
        pin_host_key(
            client.address, host_fingerprint(lab), client.known_hosts,
            target="backup1", runner=client.runner,
        )  # fmt: skip
        with client.connect() as session:
            link = measure_link(session, payload=MiB, rounds=2, pings=3)
        print(f"tbf rate {rate} bytes/s: {link.describe()}")
        assert link.down > 0 and link.up > 0 and link.round_trip > 0
        assert_reaped(lab, session.child.pid)
