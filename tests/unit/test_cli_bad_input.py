"""Bad input to blockguardctl is a named error that names it, never "internal error" (70).

The bus address is the user's input (``--bus``, BLOCKGUARD_BUS, DBUS_SYSTEM_BUS_ADDRESS,
DBUS_SESSION_BUS_ADDRESS): one that does not parse is a usage error naming the value and
what a valid one looks like; one at which no bus answers (no socket, refused, something
that is not a bus) is "cannot reach the daemon at ADDRESS". A value that is not UTF-8 can
never reach the daemon (D-Bus strings are UTF-8) and is refused before connecting.
Each case ended in exit 70 before. The same refusals against the real daemon, with
"nothing changed" checked, are in ``tests/daemon/test_hostile_input.py``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blockguard.cli import bus
from blockguard.cli.main import main
from blockguard.errors import ExitCode

EXAMPLE = "unix:path=/run/dbus/system_bus_socket"
LONG_PATH = "unix:path=/" + "a" * 200

#: (address given with --bus, what the refusal says the problem is)
BAD_ADDRESSES = [
    ("bogus", "did not contain a transport"),
    ("", "no addresses"),
    (";;", "no addresses"),
    ("é", "did not contain a transport"),
    ("unix:", "unknown address transport: unix"),
    ("unix:path", "did not contain a value"),
    ("unix:path=/a b", "invalid characters"),
    ("unix:path=%00", "NUL byte"),
    ("tcp:host=localhost,port=abc", "invalid port"),
    ("tcp:host=127.0.0.1,port=99999", "invalid port"),
    ("foo:bar=1", "unknown address transport: foo"),
    (LONG_PATH, "longer than 107 bytes"),
]


@pytest.fixture(autouse=True)
def _no_bus_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BLOCKGUARD_BUS", "DBUS_SYSTEM_BUS_ADDRESS", "DBUS_SESSION_BUS_ADDRESS"):
        monkeypatch.delenv(name, raising=False)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit code and output (stderr, then stdout) of ``blockguardctl ARGV`` (in this
    process)."""
    try:
        code = main(argv)
    except SystemExit as exc:  # status --check exits with its own code
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.err + captured.out


@pytest.mark.parametrize(
    ("address", "problem"), BAD_ADDRESSES, ids=[a[:30] for a, _ in BAD_ADDRESSES]
)
@pytest.mark.parametrize("command", [["status"], ["volume", "list"], ["plan", "db"]], ids=" ".join)
def test_a_bad_bus_address_is_a_usage_error_naming_it(
    address: str, problem: str, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run(["--bus", address, *command], capsys)
    assert code == ExitCode.USAGE, err
    assert f"bus address {address!r} (from --bus) is not a D-Bus address" in err
    assert problem in err and EXAMPLE in err
    assert "internal error" not in err


@pytest.mark.parametrize(
    ("environment", "argv", "source"),
    [
        ({"DBUS_SYSTEM_BUS_ADDRESS": "bogus"}, [], "from DBUS_SYSTEM_BUS_ADDRESS"),
        ({"DBUS_SYSTEM_BUS_ADDRESS": "bogus"}, ["--bus", "system"], "from DBUS_SYSTEM_BUS_ADDRESS"),
        ({"BLOCKGUARD_BUS": "bogus"}, [], "from --bus or BLOCKGUARD_BUS"),
        (
            {"DBUS_SESSION_BUS_ADDRESS": "bogus"},
            ["--bus", "session"],
            "from DBUS_SESSION_BUS_ADDRESS",
        ),
    ],
    ids=["system-env", "system-named", "blockguard-bus", "session-env"],
)
def test_a_bad_address_from_the_environment_names_its_variable(
    environment: dict[str, str],
    argv: list[str],
    source: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    code, err = run([*argv, "status"], capsys)
    assert code == ExitCode.USAGE, err
    assert f"bus address 'bogus' ({source}) is not a D-Bus address" in err
    assert EXAMPLE in err


# --- addresses that parse, where no bus answers ----------------------------------------


@contextlib.contextmanager
def fake_server(path: Path, answer: Callable[[socket.socket], None]) -> Iterator[str]:
    """A unix socket at ``path`` that is not a bus: each connection gets ``answer``."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    server.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                with contextlib.suppress(OSError):
                    conn.recv(4096)
                    answer(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"unix:path={path}"
    finally:
        done.set()
        thread.join(10)
        server.close()


def _says(line: bytes) -> Callable[[socket.socket], None]:
    def answer(conn: socket.socket) -> None:
        conn.sendall(line)
        conn.recv(4096)

    return answer


def _silent(conn: socket.socket) -> None:
    conn.recv(4096)  # until the client gives up and closes


NOT_A_BUS: dict[str, Callable[[socket.socket], None]] = {
    "closes": lambda conn: None,
    "http": _says(b"HTTP/1.1 400 Bad Request\r\n"),
    "binary": _says(b"\xff\xfe\x00\r\n"),
    "rejects": _says(b"REJECTED\r\n"),
    "silent": _silent,
}


@pytest.mark.parametrize("behaviour", sorted(NOT_A_BUS))
def test_a_socket_that_is_not_a_bus_cannot_reach_the_daemon(
    behaviour: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(bus, "CONNECT_TIMEOUT", 0.5)  # for the one that never answers
    with fake_server(tmp_path / "not-a-bus", NOT_A_BUS[behaviour]) as address:
        code, err = run(["--bus", address, "status"], capsys)
    assert code == ExitCode.ENVIRONMENT, err
    assert f"cannot reach the daemon at {address} (from --bus)" in err
    assert "does not answer as a D-Bus bus" in err


def _refusing_unix(tmp_path: Path) -> str:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "bound"))  # bound, never listening: connect is refused
    sock.close()
    return f"unix:path={tmp_path}/bound"


def _refusing_tcp(tmp_path: Path) -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"tcp:host=127.0.0.1,port={port}"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda tmp: f"unix:path={tmp}/none", "No such file or directory"),
        (lambda tmp: f"unix:path={tmp}", "Connection refused"),  # a directory
        (_refusing_unix, "Connection refused"),
        (_refusing_tcp, "Connection refused"),
        (lambda tmp: "tcp:host=blockguard-test.invalid,port=5", ""),
    ],
    ids=["no-socket", "directory", "unix-refused", "tcp-refused", "unknown-host"],
)
def test_an_unreachable_bus_names_the_address(
    make: Callable[[Path], str], reason: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = make(tmp_path)
    code, err = run(["--bus", address, "status"], capsys)
    assert code == ExitCode.ENVIRONMENT, err
    assert f"cannot reach the daemon at {address} (from --bus): {reason}" in err


def test_status_check_says_unknown_naming_the_address(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # For monitoring the contract is exit 3 (unknown) whatever kept the daemon from answering.
    code, said = run(["--bus", "bogus", "status", "--check"], capsys)
    assert code == 3, said
    assert "UNKNOWN" in said and "bus address 'bogus' (from --bus)" in said


# --- values that are not UTF-8 -------------------------------------------------------

BAD_BYTES = os.fsdecode(b"bad\xff")
SHOWN = "bad\\xff"

NOT_UTF8 = [
    (["volume", "show", BAD_BYTES], "name"),
    (["backup", BAD_BYTES], "volume"),
    (["plan", BAD_BYTES], "volume"),
    (["generations", BAD_BYTES], "volume"),
    (["verify", BAD_BYTES], "generation"),
    (["unprotect", BAD_BYTES], "name"),
    (["protect", f"/dev/{BAD_BYTES}", "x"], "device"),
    (["protect", "/dev/x", BAD_BYTES], "name"),
    (["protect", "/dev/x", "x", "--pool", BAD_BYTES], "pool"),
    (["protect", "/dev/x", "x", "--backend", BAD_BYTES], "backend"),
    (["objectives", BAD_BYTES, "--rto", "5m"], "target"),
    (["restore", f"db@{BAD_BYTES}"], "volume"),
    (["restore", "db", "--generation", BAD_BYTES], "generation"),
    (["restore", "db", "--target", f"/dev/{BAD_BYTES}"], "target"),
    (["restore", "--release", BAD_BYTES], "release"),
    (["pool", "create", BAD_BYTES, "/dev/x"], "name"),
    (["pool", "create", "p", "/dev/x", f"/dev/{BAD_BYTES}"], "devices"),
    (["pool", "extend", "p", BAD_BYTES], "devices"),
    (["pool", "remove", BAD_BYTES], "name"),
    (["pool", "import", BAD_BYTES], "devices"),
    (["pool", "drill", BAD_BYTES], "name"),
    (["volume", "drill", BAD_BYTES], "name"),
]


@pytest.mark.parametrize(
    ("argv", "what"), NOT_UTF8, ids=[" ".join(a[:2]) + f" {w}" for a, w in NOT_UTF8]
)
def test_a_value_that_is_not_utf8_is_refused_before_connecting(
    argv: list[str], what: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No bus at this address: a refusal that named it would mean the CLI tried to call.
    code, err = run(["--bus", f"unix:path={tmp_path}/no-bus", *argv], capsys)
    assert code == ExitCode.USAGE, err
    assert f"{what} '" in err and SHOWN in err and "is not UTF-8 text" in err
    assert "cannot reach" not in err
