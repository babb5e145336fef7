"""blockguardctl against the real daemon: --json parses, errors are plain, exit codes map."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

import pytest

from blockguard.cli.client import RemoteError
from blockguard.cli.errors import CliError, explain
from blockguard.cli.main import TREE, build_parser, main
from blockguard.errors import ExitCode, all_error_classes

from .conftest import REPO, Daemon


def ctl(daemon: Daemon, *args: str, bus_env: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "blockguard.cli.main"]
    if bus_env:
        env["DBUS_SYSTEM_BUS_ADDRESS"] = daemon.address
    else:
        argv += ["--bus", daemon.address]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60, env=env)


def test_full_round_in_json(daemon: Daemon, images: Callable[..., str]) -> None:
    pool = json.loads(ctl(daemon, "--json", "pool", "create", "p1", images("p.img")).stdout)
    assert pool == {"schema": 1, "name": "p1", "path": "/org/blockguard1/pool/p1"}
    out = ctl(daemon, "protect", images("db.img"), "db", "--rpo", "15m", "--rto", "5m", "--json")
    assert out.returncode == 0, out.stderr
    # DBUS_SYSTEM_BUS_ADDRESS is honoured when --bus is not given.
    volumes = json.loads(ctl(daemon, "--json", "volume", "list", bus_env=True).stdout)
    assert volumes["schema"] == 1
    assert volumes["volumes"][0]["name"] == "db"
    assert volumes["volumes"][0]["objectives"]["rpo"] == "15m"
    # --json anywhere on the line.
    backup = ctl(daemon, "backup", "--json", "db")
    assert backup.returncode == 0, backup.stderr
    job = json.loads(backup.stdout)["job"]
    assert job["state"] == "done" and job["result"]["method"] == "full"
    assert job["error"] is None and job["bytes_done"] >= 0
    gens = json.loads(ctl(daemon, "generations", "db", "--json").stdout)["generations"]
    assert [g["id"] for g in gens] == ["db@1"]
    assert set(gens[0]) >= {"id", "number", "short_id", "method", "parent", "created", "bytes"}
    plan = json.loads(ctl(daemon, "--json", "plan", "db").stdout)["plan"]
    assert plan["method"] == "incremental" and plan["reasons"]
    verify = json.loads(ctl(daemon, "--json", "verify", "db@1").stdout)["job"]
    assert verify["result"]["ok"] is True
    started = json.loads(ctl(daemon, "--json", "restore", "db", "--no-wait").stdout)
    assert started["job"]["path"] == f"/org/blockguard1/job/{started['job']['id']}"
    jobs = json.loads(ctl(daemon, "jobs", "--json").stdout)["jobs"]
    assert {j["kind"] for j in jobs} == {"backup", "verify", "restore"}
    status = json.loads(ctl(daemon, "--json", "status").stdout)
    assert status["volumes"] == 1 and status["pools"] == 1
    show = json.loads(ctl(daemon, "--json", "volume", "show", "db").stdout)["volume"]
    assert show["generations"][0]["method"] == "full"
    pools = json.loads(ctl(daemon, "--json", "pool", "list").stdout)["pools"]
    assert pools[0]["capacity"] == 64 * 1024 * 1024
    assert all(set(d) >= {"path", "size", "state"} for d in pools[0]["devices"])


def test_human_output(daemon: Daemon, images: Callable[..., str]) -> None:
    ctl(daemon, "pool", "create", "p1", images("p.img"))
    ctl(daemon, "protect", images("db.img"), "db")
    out = ctl(daemon, "plan", "db")
    assert out.returncode == 0
    assert "The next backup of db would be full" in out.stdout
    assert "no generation exists yet" in out.stdout
    assert "db" in ctl(daemon, "volume", "list").stdout


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["volume", "show", "nothere"], ExitCode.NOT_FOUND, "volume nothere does not exist"),
        (["backup", "nothere"], ExitCode.NOT_FOUND, "volume nothere does not exist"),
        (["objectives", "db", "--rpo", "soon"], ExitCode.USAGE, "invalid recovery objectives"),
        (["protect", "/nonexistent", "x"], ExitCode.USAGE, "/nonexistent is not a block device"),
        (["pool", "remove", "p1"], ExitCode.BUSY, "pool p1 is busy"),
        (["verify", "db@7"], ExitCode.NOT_FOUND, "generation db@7 does not exist"),
        (["pool", "frobnicate"], ExitCode.USAGE, "invalid choice"),
    ],
)
def test_errors_are_plain_with_exit_codes(
    daemon: Daemon, images: Callable[..., str], args: list[str], code: ExitCode, words: str
) -> None:
    ctl(daemon, "pool", "create", "p1", images("p.img"))
    ctl(daemon, "protect", images("db.img"), "db")
    out = ctl(daemon, *args)
    assert out.returncode == code, out.stderr
    assert words in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_daemon_not_running(tmp_path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "blockguard.cli.main",
            "--bus",
            f"unix:path={tmp_path}/no-bus",
            "status",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == ExitCode.ENVIRONMENT
    assert "cannot reach the D-Bus bus" in out.stderr


def test_propagate_reraises(daemon: Daemon) -> None:
    with pytest.raises(RemoteError) as info:
        main(["--bus", daemon.address, "--propagate", "backup", "nothere"])
    assert info.value.name == "org.blockguard1.Error.NotFound"
    assert main(["--bus", daemon.address, "backup", "nothere"]) == ExitCode.NOT_FOUND


def test_every_error_class_maps_to_its_exit_code() -> None:
    for cls in all_error_classes():
        message, code = explain(RemoteError(cls.dbus_name, "some words"))
        assert (message, code) == ("some words", cls.exit_code), cls
    denied = RemoteError("org.freedesktop.DBus.Error.AccessDenied", "Rejected send message")
    assert explain(denied)[1] == ExitCode.PERMISSION
    absent = RemoteError("org.freedesktop.DBus.Error.ServiceUnknown", "x")
    assert explain(absent) == (
        "blockguardd is not running (nobody owns org.blockguard1 on this bus)",
        ExitCode.ENVIRONMENT,
    )
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError as exc:
            raise RuntimeError("wrapper") from exc
    except RuntimeError as wrapped:
        assert explain(wrapped)[1] == ExitCode.ENVIRONMENT
    assert explain(CliError("x", ExitCode.USAGE)) == ("x", ExitCode.USAGE)
    assert explain(ValueError("boom"))[1] == ExitCode.INTERNAL


def test_argument_tree_is_data() -> None:
    names = {c.name for c in TREE.sub}
    assert names == {
        "pool",
        "volume",
        "protect",
        "unprotect",
        "objectives",
        "backup",
        "restore",
        "generations",
        "verify",
        "status",
        "plan",
        "jobs",
    }
    args = build_parser().parse_args(["--json", "restore", "db", "--mode", "swap-in"])
    assert args.json and args.mode == "swap-in" and args.generation == "" and not args.no_wait
