"""blockguardctl against the real daemon (the engine, a dir pool and a volume on loop
devices): --json parses, errors are plain and change nothing, exit codes map."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from blockguard.cli.client import Client, RemoteError
from blockguard.cli.errors import CliError, explain
from blockguard.cli.main import TREE, build_parser, main
from blockguard.errors import ExitCode, all_error_classes
from tests.support.bus import REPO
from tests.support.daemon import Daemon, run_job
from tests.support.devices import LoopFactory, MiB, sha256_of, write_random

POOL_SIZE = 400 * MiB  # a dir pool is XFS, which wants 300 MiB at least
VOLUME_SIZE = 16 * MiB


def ctl(daemon: Daemon, *args: str, bus_env: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "blockguard.cli.main"]
    if bus_env:
        env["DBUS_SYSTEM_BUS_ADDRESS"] = daemon.address
    else:
        argv += ["--bus", daemon.address]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60, env=env)


def _pool_and_volume(daemon: Daemon, loopdev: LoopFactory) -> str:
    """Pool p1 and volume db (random data) through the CLI; the volume's device."""
    assert ctl(daemon, "pool", "create", "p1", loopdev(POOL_SIZE, "p.img")).returncode == 0
    device = loopdev(VOLUME_SIZE, "db.img")
    write_random(device, 0, VOLUME_SIZE, seed=1)
    assert ctl(daemon, "protect", device, "db").returncode == 0
    return device


def test_full_round_in_json(daemon: Daemon, loopdev: LoopFactory) -> None:
    pool_disk = loopdev(POOL_SIZE, "p.img")
    device = loopdev(VOLUME_SIZE, "db.img")
    target = loopdev(VOLUME_SIZE, "target.img")
    write_random(device, 0, VOLUME_SIZE, seed=1)
    pool = json.loads(ctl(daemon, "--json", "pool", "create", "p1", pool_disk).stdout)
    assert pool == {"schema": 1, "name": "p1", "path": "/org/blockguard1/pool/p1"}
    # --json anywhere on the line.
    out = ctl(daemon, "protect", device, "db", "--rpo", "15m", "--rto", "5m", "--json")
    assert out.returncode == 0, out.stderr
    # DBUS_SYSTEM_BUS_ADDRESS is honoured when --bus is not given.
    listing = json.loads(ctl(daemon, "--json", "volume", "list", bus_env=True).stdout)
    assert listing["schema"] == 1
    volumes = listing["volumes"]
    assert volumes[0]["name"] == "db" and volumes[0]["device"] == device
    assert volumes[0]["objectives"] == {"rpo": "15m", "rto": "5m", "restore_mode": "copy"}
    plan = json.loads(ctl(daemon, "--json", "plan", "db").stdout)["plan"]
    assert plan["method"] == "full" and "full needed: no full backup yet" in plan["reasons"]
    backup = ctl(daemon, "backup", "--json", "db")
    assert backup.returncode == 0, backup.stderr
    job = json.loads(backup.stdout)["job"]
    assert job["state"] == "done" and job["result"]["method"] == "full"
    assert job["result"]["bytes"] == VOLUME_SIZE and job["error"] is None
    generation = job["result"]["generation"]
    gens = json.loads(ctl(daemon, "generations", "db", "--json").stdout)["generations"]
    assert [(g["id"], g["number"], g["short_id"]) for g in gens] == [(generation, 1, "db@1")]
    assert gens[0]["parent"] is None
    # Nothing changed since the full, which restores within the RTO: an (empty) incremental.
    plan = json.loads(ctl(daemon, "--json", "plan", "db").stdout)["plan"]
    assert plan["method"] == "incremental" and plan["feasible"] is True
    assert any("RTO" in reason for reason in plan["reasons"]), plan["reasons"]
    verify = json.loads(ctl(daemon, "--json", "verify", "db@latest").stdout)["job"]
    assert verify["result"]["ok"] is True and verify["result"]["bytes"] == VOLUME_SIZE
    assert verify["result"]["generation"] == generation and verify["result"]["number"] == 1
    started = json.loads(
        ctl(daemon, "--json", "restore", "db@1", "--target", target, "--no-wait").stdout
    )["job"]
    assert started["path"] == f"/org/blockguard1/job/{started['id']}"
    with Client(daemon.address) as client:
        restored = run_job(client, started["path"])
    assert restored["State"] == "done", restored["Error"]
    assert sha256_of(target) == sha256_of(device)
    jobs = json.loads(ctl(daemon, "jobs", "--json").stdout)["jobs"]
    assert {j["kind"] for j in jobs} == {"backup", "verify", "restore"}
    status = json.loads(ctl(daemon, "--json", "status").stdout)
    assert status["volumes"] == 1 and status["pools"] == 1
    show = json.loads(ctl(daemon, "--json", "volume", "show", "db").stdout)["volume"]
    assert show["generations"][0]["method"] == "full"
    pools = json.loads(ctl(daemon, "--json", "pool", "list").stdout)["pools"]
    assert pools[0]["backend"] == "dir" and pools[0]["devices"][0]["path"] == pool_disk
    assert pools[0]["devices"][0]["size"] == POOL_SIZE
    assert VOLUME_SIZE < pools[0]["free"] <= pools[0]["capacity"] < POOL_SIZE


def test_human_output(daemon: Daemon, loopdev: LoopFactory) -> None:
    device = _pool_and_volume(daemon, loopdev)
    out = ctl(daemon, "plan", "db")
    assert out.returncode == 0
    assert "The next backup of db would be full" in out.stdout
    assert "no full backup yet" in out.stdout
    listing = ctl(daemon, "volume", "list")
    assert listing.returncode == 0 and "db" in listing.stdout and "p1" in listing.stdout
    shown = ctl(daemon, "volume", "show", "db")
    assert shown.returncode == 0 and device in shown.stdout
    status = ctl(daemon, "status")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0] == "1 volumes, 1 pools, 0 jobs running"
    assert lines[1].split()[:2] == ["volume", "health"] and lines[2].split()[:3] == [
        "db",
        "ok",
        "never",
    ]
    assert any(line.split()[:3] == ["p1", "ok", "ok"] for line in lines)


def test_status_asks_the_daemon_without_heavy_imports(daemon: Daemon, loopdev: LoopFactory) -> None:
    # The whole call, answered by the daemon and printed (issue 16): parsed without
    # argparse, messages of cli.wire on _socket, sizes and ages by core.formats, the
    # tables without rich; nothing of the error tree.
    from tests.unit.test_cli_imports import NOT_FOR_STATUS, imported_in_order, loaded

    _pool_and_volume(daemon, loopdev)
    modules = {name for name, _ in imported_in_order(["--bus", daemon.address, "status"])}
    assert "blockguard.cli.wire" in modules
    heavy = (*NOT_FOR_STATUS, "dbus_fast", "asyncio", "rich", "blockguard.errors")
    assert loaded(modules, heavy) == []


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
    daemon: Daemon, loopdev: LoopFactory, args: list[str], code: ExitCode, words: str
) -> None:
    device = _pool_and_volume(daemon, loopdev)
    before = ctl(daemon, "--json", "volume", "list").stdout, ctl(daemon, "--json", "jobs").stdout
    untouched = sha256_of(device)
    out = ctl(daemon, *args)
    assert out.returncode == code, out.stderr
    assert words in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    # The refusal changed nothing: the same volume, objectives, pool and jobs, no byte written.
    after = ctl(daemon, "--json", "volume", "list").stdout, ctl(daemon, "--json", "jobs").stdout
    assert after == before
    assert json.loads(ctl(daemon, "--json", "pool", "list").stdout)["pools"][0]["name"] == "p1"
    assert sha256_of(device) == untouched


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
    assert f"cannot reach the daemon at unix:path={tmp_path}/no-bus" in out.stderr


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
        "transfer",
        "restore",
        "generations",
        "verify",
        "mount",
        "umount",
        "mounts",
        "filegroup",
        "restore-files",
        "status",
        "plan",
        "jobs",
        "target",
        "key",
    }
    args = build_parser().parse_args(["--json", "restore", "db", "--mode", "swap-in"])
    assert args.json and args.mode == "swap-in" and args.generation == "" and not args.no_wait
