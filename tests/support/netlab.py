"""Two hosts on one machine for the remote-target tests (issue 11): a "protected host" and a
"backup storage host", each a network namespace, joined by a veth pair that a ``tbf`` qdisc
can shape like a WAN line, with an sshd of its own in the target namespace.

Only addresses of the documentation range 192.0.2.0/24 are used, and only inside the two
namespaces made here: nothing is sent to or from any other network. Names are made from
the PID of the test process (``bg-<pid>-<tag>-prot``, ``bg-<pid>-<tag>-tgt``) so that
parallel runs never meet, and everything is removed by those names when the context ends,
also when the body raises or setup fails half way: sshd by the PID in its PidFile, any
process still inside a namespace (an sshd session, an ssh client) by ``ip netns pids``,
the namespaces by ``ip netns del`` (the veth pair lives only inside them and goes with
them), the run directory.

The sshd is the one ``scripts/bootstrap`` unpacks into ``.cache/sshd`` (no system service).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.bus import REPO, kill_pid
from tests.timeouts import scaled

#: Where ``scripts/bootstrap`` unpacks Debian's openssh-server.
SSHD = REPO / ".cache" / "sshd" / "root" / "usr" / "sbin" / "sshd"
#: sshd's privilege-separation directory; it refuses to start without it.
PRIVSEP_DIR = Path("/run/sshd")
PROT_ADDR = "192.0.2.1"
TARGET_ADDR = "192.0.2.2"
PREFIX_LEN = 24
#: Any port: nothing else listens inside the target namespace.
SSH_PORT = 2222
#: tbf: the bucket holds 20 ms of traffic at the rate, at least 64 KiB (a GSO packet on a
#: veth can be that big; a smaller bucket makes tbf split or drop it), and a packet waits
#: at most 50 ms in the queue (a WAN-like buffer; TCP adapts to it instead of bursting).
TBF_BURST_SECONDS = 0.02
TBF_MIN_BURST = 64 * 1024
TBF_LATENCY = "50ms"

_serial = itertools.count(1)


class NetLabError(RuntimeError):
    """The lab could not be set up (the message says which step and why)."""


@dataclass(frozen=True)
class LabNames:
    """Everything a lab creates, by name, so that it (and a test) can find it afterwards."""

    prot: str
    target: str
    veth_prot: str
    veth_target: str
    run_dir: Path


def lab_names(tag: str | None = None, base: Path | None = None) -> LabNames:
    """The names of a lab of this process; ``tag`` tells apart labs of one process."""
    pid = os.getpid()
    tag = tag or str(next(_serial))
    stem = f"bg-{pid}-{tag}"
    root = base or Path(tempfile.gettempdir())
    # The veth ends are created inside their namespaces, never in the host's, so they
    # cannot meet another interface; the names only have to fit IFNAMSIZ.
    return LabNames(f"{stem}-prot", f"{stem}-tgt", f"v{pid}p", f"v{pid}t", root / stem)


@dataclass(frozen=True)
class ClientKey:
    """A key pair of the protected host and the options its authorized_keys line carries."""

    name: str
    private: Path
    public_line: str
    options: str


@dataclass
class NetLab:
    """A running lab; see :func:`netlab`."""

    names: LabNames
    port: int
    rate: int | None
    sshd_pid: int
    known_hosts: Path
    authorized_keys: Path
    user: str = "root"
    keys: dict[str, ClientKey] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.names.run_dir

    @property
    def key(self) -> ClientKey:
        """The client key made at setup (named ``client``)."""
        return self.keys["client"]

    def in_prot(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run in the protected host's namespace."""
        return ["ip", "netns", "exec", self.names.prot, *argv]

    def in_target(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run in the backup storage host's namespace."""
        return ["ip", "netns", "exec", self.names.target, *argv]

    def ssh_argv(self, key: ClientKey | None = None, *options: str) -> list[str]:
        """The ssh command line (up to the destination) that reaches the target's sshd
        from the protected namespace: no user or system configuration, no agent, only
        ``key``, and only the target's host key as recorded in :attr:`known_hosts`."""
        key = key or self.key
        return [
            "ssh",
            "-F",
            "none",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "UpdateHostKeys=no",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "IdentityAgent=none",
            "-o",
            f"ConnectTimeout={int(scaled(30))}",
            "-i",
            str(key.private),
            "-p",
            str(self.port),
            "-l",
            self.user,
            "-T",
            *options,
            TARGET_ADDR,
        ]

    def ssh(
        self,
        command: Sequence[str],
        *,
        key: ClientKey | None = None,
        options: Sequence[str] = (),
        input: bytes | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``command`` on the target over ssh from the protected namespace.

        The remote side hands the command to the user's shell as one string, so each
        argument is quoted: ``command`` arrives as the argv given. ``timeout`` is a base,
        scaled (:mod:`tests.timeouts`).
        """
        argv = self.in_prot([*self.ssh_argv(key, *options), "--", shlex.join(command)])
        return subprocess.run(argv, input=input, capture_output=True, timeout=scaled(timeout))

    def run_in_prot(
        self, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` in the protected namespace; ``timeout`` is a scaled base."""
        return subprocess.run(
            self.in_prot(argv), input=input, capture_output=True, timeout=scaled(timeout)
        )

    def add_client(
        self, name: str, *, command: str | None = None, restrict: bool = False
    ) -> ClientKey:
        """A new client key pair, authorised on the target with a forced ``command``
        (run by the user's shell whatever the client asks; the request is in
        ``$SSH_ORIGINAL_COMMAND``) and/or ``restrict`` (no forwarding, pty, agent, X11),
        as the target role's authorized_keys will do. sshd reads authorized_keys at each
        login, so a key added while the lab runs works at once."""
        if name in self.keys:
            raise ValueError(f"client key {name!r} exists already")
        private = self.run_dir / f"client-{name}"
        _run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"netlab-{name}", "-f", private],
            "create a client key",
        )
        opts = []
        if restrict:
            opts.append("restrict")
        if command is not None:
            opts.append('command="' + command.replace("\\", "\\\\").replace('"', '\\"') + '"')
        client = ClientKey(
            name, private, Path(f"{private}.pub").read_text().strip(), ",".join(opts)
        )
        self.keys[name] = client
        self._write_authorized_keys()
        return client

    def _write_authorized_keys(self) -> None:
        lines = [f"{k.options} {k.public_line}".strip() for k in self.keys.values()]
        tmp = self.authorized_keys.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(self.authorized_keys)


def _run(argv: Sequence[str | Path], what: str, timeout: float = 60) -> str:
    """Run a setup command; a failure is a :class:`NetLabError` naming ``what``."""
    argv = [str(a) for a in argv]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=scaled(timeout))
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetLabError(f"cannot {what}: {shlex.join(argv)}: {exc}") from exc
    if done.returncode != 0:
        raise NetLabError(
            f"cannot {what}: {shlex.join(argv)} exited {done.returncode}: {done.stderr.strip()}"
        )
    return done.stdout


def netlab_unavailable() -> str | None:
    """Why this machine cannot hold a lab at all (a reason to skip), or None."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if not Path("/proc/self/ns/net").exists():
        return "the kernel has no network namespaces"
    for program in ("ip", "tc", "ssh", "ssh-keygen"):
        if shutil.which(program) is None:
            return f"{program} is not installed"
    return None


def bootstrap_missing() -> str | None:
    """What ``scripts/bootstrap`` should have provided and did not (a failure), or None."""
    if not os.access(SSHD, os.X_OK):
        return f"no sshd at {SSHD}: run scripts/bootstrap"
    try:
        pwd.getpwnam("sshd")
    except KeyError:
        return "no system user sshd (sshd's privilege separation): run scripts/bootstrap"
    return None


def require_netlab() -> None:
    """In a test: skip where the kernel (or the user) cannot make network namespaces;
    fail, naming ``scripts/bootstrap``, where only what it provides is missing."""
    reason = netlab_unavailable()
    if reason:
        pytest.skip(reason)
    missing = bootstrap_missing()
    if missing:
        pytest.fail(missing)


def _tbf_argv(ns: str, dev: str, rate: int) -> list[str]:
    burst = max(int(rate * TBF_BURST_SECONDS), TBF_MIN_BURST)
    # tc's "bps" means bytes per second; "bit" leaves no doubt.
    return ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
            "rate", f"{rate * 8}bit", "burst", str(burst), "latency", TBF_LATENCY]  # fmt: skip


def _sshd_config(run_dir: Path, port: int, extra: Mapping[str, str]) -> str:
    settings = {
        "ListenAddress": TARGET_ADDR,
        "Port": str(port),
        "HostKey": str(run_dir / "host_ed25519_key"),
        "PidFile": str(run_dir / "sshd.pid"),
        "AuthorizedKeysFile": str(run_dir / "authorized_keys"),
        # The run directory sits under the world-writable /tmp, which StrictModes refuses.
        "StrictModes": "no",
        "UsePAM": "no",
        "PasswordAuthentication": "no",
        "KbdInteractiveAuthentication": "no",
        "PubkeyAuthentication": "yes",
        "PermitRootLogin": "prohibit-password",
        "AuthenticationMethods": "publickey",
        "PrintMotd": "no",
        "AcceptEnv": "",
        "LogLevel": "VERBOSE",
        **extra,
    }
    return "".join(f"{k} {v}\n" for k, v in settings.items() if v != "")


def _stop_sshd(pid_file: Path, process: subprocess.Popen[bytes]) -> None:
    # sshd -D is our child (ip netns exec execs it): the PID in its PidFile is the child's,
    # reaped by waiting for it (a zombie would look alive to kill_pid).
    pid = process.pid
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text().split()[0])
    if pid != process.pid:
        kill_pid(pid, timeout=scaled(10))
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(scaled(10))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(scaled(10))
    if process.stderr:
        process.stderr.close()


def _kill_inside(ns: str) -> None:
    """SIGKILL what is left inside namespace ``ns`` (sshd sessions, ssh clients): a
    process inside keeps the namespace, and its veth, alive after ``ip netns del``."""
    for _ in range(50):
        done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        pids = [int(p) for p in done.stdout.split()] if done.returncode == 0 else []
        if not pids:
            return
        for pid in pids:
            kill_pid(pid, timeout=0)
        time.sleep(0.05)


def _del_netns(ns: str) -> None:
    _kill_inside(ns)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=scaled(30))


@contextlib.contextmanager
def netlab(
    *,
    rate: int | None = None,
    command: str | None = None,
    restrict: bool = False,
    port: int = SSH_PORT,
    names: LabNames | None = None,
    sshd_options: Mapping[str, str] | None = None,
) -> Iterator[NetLab]:
    """Set up a lab, yield it, remove all of it.

    :param rate: if given, a ``tbf`` qdisc shapes both directions of the link to this many
        bytes/s (bucket and queue bound: :data:`TBF_BURST_SECONDS`, :data:`TBF_LATENCY`).
    :param command: a forced command for the setup's client key (see :meth:`NetLab.add_client`).
    :param restrict: ``restrict`` on the setup's client key.
    :param port: sshd's port inside the target namespace.
    :param names: the names to use (default: :func:`lab_names` with a fresh tag).
    :param sshd_options: more sshd_config settings (they override the lab's).
    :raises NetLabError: a setup step failed (everything made so far is removed).
    """
    reason = netlab_unavailable() or bootstrap_missing()
    if reason:
        raise NetLabError(reason)
    names = names or lab_names()
    with contextlib.ExitStack() as cleanup:
        names.run_dir.mkdir(mode=0o700)
        cleanup.callback(shutil.rmtree, names.run_dir, ignore_errors=True)
        # Callbacks run last-in first-out: sshd and sessions go before their namespace.
        for ns in (names.prot, names.target):
            _run(["ip", "netns", "add", ns], f"create network namespace {ns}")
            cleanup.callback(_del_netns, ns)
        _run(
            ["ip", "link", "add", names.veth_prot, "netns", names.prot, "type", "veth",
             "peer", "name", names.veth_target, "netns", names.target],
            "create the veth pair",
        )  # fmt: skip
        for ns, dev, addr in (
            (names.prot, names.veth_prot, PROT_ADDR),
            (names.target, names.veth_target, TARGET_ADDR),
        ):
            ip = ["ip", "-n", ns]
            _run([*ip, "link", "set", "lo", "up"], f"bring up lo in {ns}")
            _run([*ip, "addr", "add", f"{addr}/{PREFIX_LEN}", "dev", dev], f"address {dev}")
            _run([*ip, "link", "set", dev, "up"], f"bring up {dev}")
            if rate is not None:
                _run(_tbf_argv(ns, dev, rate), f"shape {dev} to {rate} bytes/s")

        run_dir = names.run_dir
        host_key = run_dir / "host_ed25519_key"
        _run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "netlab-host", "-f", host_key],
            "create the target's host key",
        )
        known_hosts = run_dir / "known_hosts"
        host_pub = Path(f"{host_key}.pub").read_text().split()
        known_hosts.write_text(f"[{TARGET_ADDR}]:{port} {host_pub[0]} {host_pub[1]}\n")
        lab = NetLab(
            names=names,
            port=port,
            rate=rate,
            sshd_pid=0,
            known_hosts=known_hosts,
            authorized_keys=run_dir / "authorized_keys",
        )
        lab.add_client("client", command=command, restrict=restrict)

        # Debian's tmpfiles makes it at boot when openssh-server is installed. It is shared
        # by every sshd (labs running in parallel too), so it is left in place.
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        config = run_dir / "sshd_config"
        config.write_text(_sshd_config(run_dir, port, sshd_options or {}))
        log = run_dir / "sshd.log"
        _run([SSHD, "-t", "-f", config], "check the sshd configuration")
        pid_file = run_dir / "sshd.pid"
        # sshd wants its absolute path (it re-executes itself for each connection).
        process = subprocess.Popen(
            lab.in_target([str(SSHD), "-D", "-f", str(config), "-E", str(log)]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        cleanup.callback(_stop_sshd, pid_file, process)
        # sshd writes its PidFile once it listens.
        deadline = time.monotonic() + scaled(30)
        while not pid_file.exists() or not pid_file.read_text().strip():
            if process.poll() is not None or time.monotonic() > deadline:
                stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
                text = log.read_text(errors="replace") if log.exists() else ""
                raise NetLabError(
                    f"sshd did not start in {names.target} (exit {process.poll()}):"
                    f" {stderr.strip()} {text.strip()}"
                )
            time.sleep(0.05)
        lab.sshd_pid = int(pid_file.read_text().split()[0])
        yield lab


@pytest.fixture
def net_lab() -> Iterator[NetLab]:
    """A lab with no rate limit and an unrestricted client key (:func:`netlab`), after
    :func:`require_netlab`."""
    require_netlab()
    with netlab() as running:
        yield running
