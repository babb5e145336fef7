"""OpenSSH as the data transfer line to a backup target: its address, the ssh command
line, the protected host's client key, the target's pinned host key, and what ssh's
failures mean.

ssh runs with no configuration file of the host's or a user's (``-F none``): what reaches
the target is only what this module says, the same on every host. Authentication is the
client key alone (no agent, no password prompt: ``BatchMode``), and the target's host key
must be the one pinned in blockguard's own known_hosts file (``StrictHostKeyChecking``,
no global file, no learning of new keys). A key is pinned only for the fingerprint an
administrator confirmed (:func:`pin_host_key`).

ssh reports its own failures with exit code 255 and a line of text; :func:`ssh_failure`
maps them to named errors once, here: a changed or unknown host key is
:class:`~blockguard.errors.HostKeyMismatch`, a refused key
:class:`~blockguard.errors.NotAuthorized`, a host that does not answer
:class:`~blockguard.errors.TargetUnreachable`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from blockguard.errors import (
    AlreadyExists,
    BlockguardError,
    HostKeyMismatch,
    InvalidInput,
    NotAuthorized,
    TargetUnreachable,
    stderr_tail,
)
from blockguard.storage.manifest import write_atomic
from blockguard.storage.runner import Runner, default_runner

DEFAULT_PORT = 22
#: What the client asks the target to run. The target's authorized_keys forces the serve
#: command for the key whatever is asked; this only names the intent in sshd's log.
SERVE_COMMAND = ("blockguardctl", "serve")
#: Host key types asked of ssh-keyscan, in ssh's order of preference.
HOST_KEY_TYPES = "ed25519,ecdsa,rsa"
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9._-]{0,31}")
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
#: OpenSSH's default ciphers, the AES-GCM ones first: packs are sealed already, so ssh's
#: encryption is only the line's, and with AES instructions GCM costs a fraction of
#: chacha20-poly1305's CPU (the default first choice), which a loaded host spends on the
#: copy instead. The same set as the default, so any target the default reaches agrees.
CIPHERS = (
    "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,"
    "aes128-ctr,aes192-ctr,aes256-ctr"
)
#: The DSCP class of the session: best effort. OpenSSH before 10 marks a session
#: without a tty CS1, which routers that honour RFC 8622 treat as lower effort (a
#: backup would run below the line's rate whenever anything else uses the line).
IPQOS = "cs0"
_IPV6 = re.compile(r"[0-9A-Fa-f:.]+")
_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


@dataclass(frozen=True)
class TargetAddress:
    """Where a target's sshd answers: ``ssh://user@host[:port]``."""

    user: str
    host: str
    port: int = DEFAULT_PORT

    @property
    def url(self) -> str:
        return f"ssh://{self.user}@{self._bracketed}{'' if self.port == 22 else f':{self.port}'}"

    @property
    def hostport(self) -> str:
        """``host:port`` for messages."""
        return f"{self._bracketed}:{self.port}"

    @property
    def known_hosts_name(self) -> str:
        """How known_hosts names this host: ``host``, or ``[host]:port`` off port 22."""
        return self.host if self.port == DEFAULT_PORT else f"[{self.host}]:{self.port}"

    @property
    def _bracketed(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host


def parse_target_url(url: str) -> TargetAddress:
    """Parse ``ssh://user@host[:port]`` (host: a name, IPv4 or ``[IPv6]``).

    :raises InvalidInput: anything else (naming the URL and what is wrong with it): another
        scheme, no user, a password, a path, a query, a port out of range, a host that is
        not a host name (one starting with ``-`` would be an ssh option).
    """

    def bad(why: str) -> InvalidInput:
        return InvalidInput(
            detail=f"target URL {url!r:.200} {why}; expected ssh://user@host[:port]"
        )

    if not isinstance(url, str) or not url.isascii() or any(c.isspace() for c in url):
        raise bad("is not a plain URL")
    try:
        parts = urlsplit(url)
    except ValueError:
        # urlsplit checks a bracketed host itself.
        raise bad("is not a valid URL") from None
    if parts.scheme != "ssh":
        raise bad("is not an ssh:// URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment or url.endswith(("?", "#")):
        raise bad("has a path, query or fragment")
    if parts.password is not None:
        raise bad("carries a password (the target is reached with a key)")
    user = parts.username
    if not user or not _USER.fullmatch(user):
        raise bad("needs a user name (letters, digits, . _ -)")
    try:
        port = parts.port
    except ValueError:
        raise bad("has a port that is not 1-65535") from None
    if port == 0 or parts.netloc.endswith(":"):
        raise bad("has a port that is not 1-65535")
    netloc = parts.netloc.rsplit("@", 1)[1]
    host = parts.hostname or ""
    if netloc.startswith("["):
        if not _IPV6.fullmatch(host) or ":" not in host:
            raise bad("has a bracketed host that is not an IPv6 address")
    elif not _HOSTNAME.fullmatch(host):
        raise bad("has no valid host name")
    return TargetAddress(user, host.lower(), DEFAULT_PORT if port is None else port)


@dataclass(frozen=True)
class SshOptions:
    """Timeouts of the ssh child, in seconds: the connection, and the keepalive that
    ends a session whose link died silently (``interval * count``)."""

    connect_timeout: int = 30
    alive_interval: int = 15
    alive_count: int = 4


def ssh_argv(
    address: TargetAddress,
    *,
    key: Path,
    known_hosts: Path,
    options: SshOptions = SshOptions(),
    command: tuple[str, ...] = SERVE_COMMAND,
) -> list[str]:
    """The command line of ``ssh -T`` to ``address`` with the client ``key``, trusting
    only the host key pinned for it in ``known_hosts``."""
    return [
        "ssh",
        "-F", "none",
        "-T",
        "-e", "none",
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "UpdateHostKeys=no",
        "-o", "CheckHostIP=no",
        "-o", "IdentitiesOnly=yes",
        "-o", "IdentityAgent=none",
        "-o", "PasswordAuthentication=no",
        "-o", "KbdInteractiveAuthentication=no",
        # Packs are compressed before sealing; ssh's zlib would spend CPU for nothing.
        "-o", "Compression=no",
        "-o", f"Ciphers={CIPHERS}",
        "-o", f"IPQoS={IPQOS}",
        "-o", f"ConnectTimeout={options.connect_timeout}",
        "-o", f"ServerAliveInterval={options.alive_interval}",
        "-o", f"ServerAliveCountMax={options.alive_count}",
        "-i", str(key),
        "-p", str(address.port),
        "-l", address.user,
        "--", address.host,
        *command,
    ]  # fmt: skip


# --- the protected host's client key ----------------------------------------------------


def create_client_key(
    path: Path, *, comment: str, runner: Runner | None = None, timeout: float = 60
) -> str:
    """Make the protected host's ssh key pair at ``path`` (ed25519, no passphrase: the
    daemon uses it unattended; the private half 0600 in a 0700 directory).

    :returns: the public key line, for the target's authorized_keys.
    :raises AlreadyExists: a key (either half) is there already: never overwritten, since
        targets authorised it.
    """
    public = path.with_name(path.name + ".pub")
    for existing in (path, public):
        if existing.exists() or existing.is_symlink():
            raise AlreadyExists(what="ssh key", name=str(existing))
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    (runner or default_runner()).run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        timeout=timeout,
    )
    os.chmod(path, 0o600)
    return public.read_text().strip()


# --- the target's host key ----------------------------------------------------------------


@dataclass(frozen=True)
class HostKey:
    """A host key as ssh-keyscan reports it: its type and its base64 blob."""

    key_type: str
    blob: str

    @property
    def fingerprint(self) -> str:
        """``SHA256:...`` as ``ssh-keygen -lf`` and ssh's prompts print it."""
        return key_fingerprint(self.blob)


def key_fingerprint(blob: str) -> str:
    """The SHA256 fingerprint of a key's base64 blob."""
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(detail=f"host key {blob[:40]!r} is not base64") from None
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


def scan_host_keys(
    address: TargetAddress, *, target: str, runner: Runner | None = None, timeout: int = 30
) -> list[HostKey]:
    """The host keys the target's sshd offers (ssh-keyscan; nothing is trusted yet).

    :raises TargetUnreachable: it offered none (not reachable, or no sshd there).
    """
    done = (runner or default_runner()).run(
        ["ssh-keyscan", "-T", str(timeout), "-t", HOST_KEY_TYPES, "-p", str(address.port),
         "--", address.host],
        timeout=timeout * 2 + 10,
        check=False,
    )  # fmt: skip
    keys = []
    for line in done.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and not line.startswith("#"):
            keys.append(HostKey(fields[1], fields[2]))
    if not keys:
        reason = stderr_tail(done.stderr) or "no host key was offered"
        raise TargetUnreachable(target=target, address=address.hostport, reason=reason)
    return keys


def pin_host_key(
    address: TargetAddress,
    fingerprint: str,
    known_hosts: Path,
    *,
    target: str,
    runner: Runner | None = None,
    timeout: int = 30,
) -> HostKey:
    """Trust the target's host key with the ``SHA256:...`` fingerprint an administrator
    confirmed (read on the target with ``ssh-keygen -lf``), in ``known_hosts``. Keys
    pinned for that address before are replaced; other hosts' lines stay.

    :raises InvalidInput: ``fingerprint`` is not a SHA256 fingerprint.
    :raises HostKeyMismatch: the target offers no key with that fingerprint (nothing is
        written).
    :raises TargetUnreachable: see :func:`scan_host_keys`.
    """
    if not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint):
        raise InvalidInput(
            detail=f"host key fingerprint {fingerprint!r:.80} is not SHA256:<43 base64 characters>"
        )
    offered = scan_host_keys(address, target=target, runner=runner, timeout=timeout)
    matching = [key for key in offered if key.fingerprint == fingerprint]
    if not matching:
        shown = ", ".join(f"{k.key_type} {k.fingerprint}" for k in offered)
        raise HostKeyMismatch(
            target=target,
            known_hosts=known_hosts,
            detail=f"{address.hostport} offers {shown}, not the confirmed {fingerprint}",
        )
    key = matching[0]
    name = address.known_hosts_name
    rewrite_known_hosts(known_hosts, name, f"{name} {key.key_type} {key.blob}")
    return key


def rewrite_known_hosts(known_hosts: Path, name: str, line: str | None) -> None:
    """Replace the lines pinned for ``name`` in ``known_hosts`` by ``line`` (None: drop
    them); other hosts' lines stay. Atomic and 0600; the caller serializes writers."""
    kept = []
    if known_hosts.exists():
        kept = [
            old
            for old in known_hosts.read_text().splitlines()
            if old.split(maxsplit=1)[:1] != [name]
        ]
    elif line is None:
        return
    lines = [*kept, line] if line is not None else kept
    known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(known_hosts, "".join(f"{x}\n" for x in lines).encode())
    os.chmod(known_hosts, 0o600)


# --- what ssh's failures mean ---------------------------------------------------------------

_HOST_KEY_TEXTS = (
    "host key verification failed",
    "remote host identification has changed",
    "host key is known for",
)
_UNREACHABLE_TEXTS = (
    "connection refused",
    "connection timed out",
    "operation timed out",
    "no route to host",
    "network is unreachable",
    "could not resolve hostname",
    "connection reset",
    "connection closed by",
    "kex_exchange_identification",
)
#: ssh's own failures; any other code is the remote command's.
SSH_FAILED = 255


def ssh_failure(
    returncode: int | None, stderr: str, *, target: str, address: TargetAddress, known_hosts: Path
) -> BlockguardError | None:
    """The named error for an ssh that exited ``returncode`` with ``stderr``, or None when
    it is none of these: the remote command's exit, a signal, or an exit 255 this does
    not recognise (a remote command killed by a signal ends ssh with 255 too): a caller
    keeps its own error for those (the session: ``WireClosed`` with ssh's stderr)."""
    if returncode != SSH_FAILED:
        return None
    text = stderr.lower()
    tail = stderr_tail(stderr) or "(no error output)"
    if any(t in text for t in _HOST_KEY_TEXTS):
        return HostKeyMismatch(target=target, known_hosts=known_hosts, detail=tail)
    if "permission denied" in text:
        return NotAuthorized(
            detail=f"target {target} ({address.user}@{address.hostport}) refused this host's "
            f"key: {tail}"
        )
    if any(t in text for t in _UNREACHABLE_TEXTS):
        return TargetUnreachable(target=target, address=address.hostport, reason=tail)
    return None
