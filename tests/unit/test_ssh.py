"""The ssh side of a backup target, without a network: target URLs, the ssh command line,
the client key, host key pinning (ssh-keyscan faked) and what ssh's failures mean (from
the texts OpenSSH 9.2 prints)."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from blockguard.errors import (
    AlreadyExists,
    HostKeyMismatch,
    InvalidInput,
    NotAuthorized,
    TargetUnreachable,
)
from blockguard.storage.remote.ssh import (
    SshOptions,
    TargetAddress,
    create_client_key,
    key_fingerprint,
    parse_target_url,
    pin_host_key,
    ssh_argv,
    ssh_failure,
)
from blockguard.storage.runner import Runner


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ssh://backup@store.example.org", TargetAddress("backup", "store.example.org", 22)),
        ("ssh://root@192.0.2.2:2222", TargetAddress("root", "192.0.2.2", 2222)),
        ("ssh://bg_1@[2001:db8::2]:2200/", TargetAddress("bg_1", "2001:db8::2", 2200)),
        ("ssh://u@Store-1.Example.ORG", TargetAddress("u", "store-1.example.org", 22)),
    ],
)
def test_target_urls_parse(url: str, expected: TargetAddress) -> None:
    assert parse_target_url(url) == expected
    assert parse_target_url(expected.url) == expected


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://u@host", "not an ssh:// URL"),
        ("ssh://host", "needs a user name"),
        ("ssh://-oProxyCommand=x@host", "needs a user name"),
        ("ssh://u@-oProxyCommand=touch", "no valid host name"),
        ("ssh://u:secret@host", "carries a password"),
        ("ssh://u@host:0", "port that is not 1-65535"),
        ("ssh://u@host:65536", "port that is not 1-65535"),
        ("ssh://u@host:", "port that is not 1-65535"),
        ("ssh://u@host:22x", "port that is not 1-65535"),
        ("ssh://u@host/srv/backup", "has a path, query or fragment"),
        ("ssh://u@host?x=1", "has a path, query or fragment"),
        ("ssh://u@ho st", "is not a plain URL"),
        ("ssh://u@[not-v6]:22", "is not a valid URL"),
        ("ssh://u@", "no valid host name"),
        ("u@host", "not an ssh:// URL"),
    ],
)
def test_bad_target_urls_are_named(url: str, why: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_target_url(url)
    assert why in str(info.value) and repr(url) in str(info.value)


def test_known_hosts_names_and_messages() -> None:
    assert TargetAddress("u", "h", 22).known_hosts_name == "h"
    assert TargetAddress("u", "192.0.2.2", 2222).known_hosts_name == "[192.0.2.2]:2222"
    assert TargetAddress("u", "2001:db8::2", 2200).hostport == "[2001:db8::2]:2200"


def test_the_ssh_command_line_trusts_only_the_pinned_key_and_the_client_key() -> None:
    argv = ssh_argv(
        TargetAddress("backup", "192.0.2.2", 2222),
        key=Path("/var/lib/blockguard/keys/ssh_ed25519"),
        known_hosts=Path("/var/lib/blockguard/known_hosts"),
        options=SshOptions(connect_timeout=20, alive_interval=10, alive_count=3),
    )
    assert argv[0] == "ssh" and "-T" in argv
    opts = {argv[i + 1] for i, a in enumerate(argv) if a == "-o"}
    assert {
        "BatchMode=yes",
        "StrictHostKeyChecking=yes",
        "UserKnownHostsFile=/var/lib/blockguard/known_hosts",
        "GlobalKnownHostsFile=/dev/null",
        "IdentitiesOnly=yes",
        "IdentityAgent=none",
        "ConnectTimeout=20",
        "ServerAliveInterval=10",
        "ServerAliveCountMax=3",
        # The line carries sealed (compressed) packs: no ssh compression, a cheap cipher
        # first, and best effort rather than OpenSSH's lower-effort class for bulk.
        "Compression=no",
        "IPQoS=cs0",
    } <= opts
    [ciphers] = [o.split("=", 1)[1] for o in opts if o.startswith("Ciphers=")]
    assert ciphers.split(",")[0] == "aes128-gcm@openssh.com"
    assert argv[argv.index("-F") + 1] == "none"
    assert argv[argv.index("-i") + 1] == "/var/lib/blockguard/keys/ssh_ed25519"
    assert argv[argv.index("-p") + 1] == "2222"
    assert argv[argv.index("-l") + 1] == "backup"
    # The host comes after "--": never read as an option.
    assert argv[argv.index("--") + 1 :] == ["192.0.2.2", "blockguardctl", "serve"]


def test_a_client_key_is_made_once_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "ssh_ed25519"
    line = create_client_key(path, comment="blockguard@prot", runner=Runner())
    assert line.startswith("ssh-ed25519 ") and line.endswith(" blockguard@prot")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    before = path.read_bytes()
    with pytest.raises(AlreadyExists, match="ssh_ed25519"):
        create_client_key(path, comment="again", runner=Runner())
    assert path.read_bytes() == before
    (tmp_path / "lone.pub").write_text("x")
    with pytest.raises(AlreadyExists, match=r"lone\.pub"):
        create_client_key(tmp_path / "lone", comment="x", runner=Runner())
    assert not (tmp_path / "lone").exists()


def host_key(tmp_path: Path, name: str) -> tuple[str, str, str]:
    """A real host key pair: (type, base64 blob, fingerprint as ssh-keygen prints it)."""
    path = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path], check=True)
    key_type, blob = (path.with_suffix(".pub")).read_text().split()[:2]
    listed = subprocess.run(
        ["ssh-keygen", "-lf", f"{path}.pub"], check=True, capture_output=True, text=True
    )
    return key_type, blob, listed.stdout.split()[1]


def keyscan_runner(tmp_path: Path, output: str, stderr: str = "") -> Runner:
    fake = tmp_path / "fake-ssh-keyscan"
    (tmp_path / "keyscan.out").write_text(output)
    (tmp_path / "keyscan.err").write_text(stderr)
    fake.write_text(f"#!/bin/sh\ncat {tmp_path}/keyscan.out\ncat {tmp_path}/keyscan.err >&2\n")
    fake.chmod(0o755)
    return Runner(binaries={"ssh-keyscan": str(fake)})


def test_fingerprints_are_the_ones_ssh_keygen_prints(tmp_path: Path) -> None:
    _, blob, fingerprint = host_key(tmp_path, "k")
    assert key_fingerprint(blob) == fingerprint


def test_a_host_key_is_pinned_only_for_the_confirmed_fingerprint(tmp_path: Path) -> None:
    address = TargetAddress("root", "192.0.2.2", 2222)
    key_type, blob, fingerprint = host_key(tmp_path, "target")
    _, _, other = host_key(tmp_path, "impostor")
    runner = keyscan_runner(tmp_path, f"# banner\n[192.0.2.2]:2222 {key_type} {blob}\n")
    known_hosts = tmp_path / "state" / "known_hosts"

    with pytest.raises(HostKeyMismatch) as info:
        pin_host_key(address, other, known_hosts, target="backup1", runner=runner)
    message = str(info.value)
    assert "backup1" in message and str(known_hosts) in message
    assert fingerprint in message and other in message
    assert not known_hosts.exists()

    known_hosts.parent.mkdir()
    known_hosts.write_text("[192.0.2.2]:2222 ssh-ed25519 OLDKEY\nelsewhere ssh-ed25519 KEEP\n")
    pinned = pin_host_key(address, fingerprint, known_hosts, target="backup1", runner=runner)
    assert pinned.blob == blob
    assert known_hosts.read_text() == (
        f"elsewhere ssh-ed25519 KEEP\n[192.0.2.2]:2222 {key_type} {blob}\n"
    )


def test_a_bad_fingerprint_or_no_offered_key_is_named(tmp_path: Path) -> None:
    address = TargetAddress("root", "192.0.2.2", 2222)
    with pytest.raises(InvalidInput, match="'MD5:aa' is not SHA256"):
        pin_host_key(address, "MD5:aa", tmp_path / "kh", target="b1", runner=Runner())
    runner = keyscan_runner(tmp_path, "", "connect (`192.0.2.2'): Connection refused\n")
    with pytest.raises(TargetUnreachable, match=r"192\.0\.2\.2:2222: .*Connection refused"):
        pin_host_key(address, "SHA256:" + "A" * 43, tmp_path / "kh", target="b1", runner=runner)
    assert not (tmp_path / "kh").exists()


ADDRESS = TargetAddress("root", "192.0.2.2", 2222)
KNOWN = Path("/state/known_hosts")
CHANGED = (
    "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\r\n"
    "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\r\n"
    "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\r\n"
    "IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!\r\n"
    "Host key for [192.0.2.2]:2222 has changed and you have requested strict checking.\r\n"
    "Host key verification failed.\r\n"
)


@pytest.mark.parametrize(
    ("stderr", "error", "named"),
    [
        (CHANGED, HostKeyMismatch, ["backup1", "/state/known_hosts", "verification failed"]),
        (
            "No ED25519 host key is known for [192.0.2.2]:2222 and you have requested strict "
            "checking.\r\nHost key verification failed.\r\n",
            HostKeyMismatch,
            ["backup1", "/state/known_hosts"],
        ),
        (
            "root@192.0.2.2: Permission denied (publickey).\r\n",
            NotAuthorized,
            ["backup1", "root@192.0.2.2:2222", "Permission denied"],
        ),
        (
            "ssh: connect to host 192.0.2.2 port 2222: Connection refused\r\n",
            TargetUnreachable,
            ["backup1", "192.0.2.2:2222", "Connection refused"],
        ),
        (
            "ssh: connect to host 192.0.2.2 port 2222: Connection timed out\r\n",
            TargetUnreachable,
            ["192.0.2.2:2222", "timed out"],
        ),
        (
            "ssh: connect to host 192.0.2.2 port 2222: No route to host\r\n",
            TargetUnreachable,
            ["No route to host"],
        ),
        (
            "ssh: Could not resolve hostname store: Name or service not known\r\n",
            TargetUnreachable,
            ["Could not resolve"],
        ),
    ],
)
def test_ssh_failures_are_named(stderr: str, error: type, named: list[str]) -> None:
    found = ssh_failure(255, stderr, target="backup1", address=ADDRESS, known_hosts=KNOWN)
    assert type(found) is error
    for text in named:
        assert text in str(found)


def test_other_exits_are_left_to_the_caller() -> None:
    for code in (0, 1, 5, -9, None):
        assert ssh_failure(code, "x", target="b", address=ADDRESS, known_hosts=KNOWN) is None
    # ssh's 255 for a remote command killed by a signal, and anything not recognised.
    for stderr in ("", "Connection to 192.0.2.2 closed by remote host.\r\n", "new text"):
        assert ssh_failure(255, stderr, target="b", address=ADDRESS, known_hosts=KNOWN) is None
