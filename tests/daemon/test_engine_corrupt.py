"""Damaged generations and failed backups, with the real engine on loop devices.

A truncated manifest and a flipped byte in a parent's data make exactly that generation
and the ones that depend on it ``corrupt`` in every listing (the volume's Generations
property, ListGenerations, the CLI); using them answers CorruptMetadata or
ChecksumMismatch, the others still restore bit-exact, and the next backup is a full. A
backup whose commit fails leaves no generation behind and its job failed with a named
error. Backups of an idle volume do not push real generations out of retention.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from blockguard.cli.client import JOB, VOLUME, Client, RemoteError, plain, variant
from tests.support.bus import REPO
from tests.support.daemon import Daemon, EngineHarness, run_job
from tests.support.devices import MiB, sha256_of, write_random

SIZE = 32 * MiB
POOL_SIZE = 400 * MiB
CORRUPT = "org.blockguard1.Error.CorruptMetadata"
MISMATCH = "org.blockguard1.Error.ChecksumMismatch"
VOLUME_PATH = "/org/blockguard1/volume/db"
CLI = [sys.executable, "-m", "blockguard.cli.main"]


def gen_dir(daemon: Daemon, generation: str) -> Path:
    pool_id = generation.split("@", 1)[1]
    return daemon.state_dir / "pools" / "p1" / "area-0" / "volumes" / "db" / pool_id


def pool_entries(daemon: Daemon) -> list[str]:
    area = daemon.state_dir / "pools" / "p1" / "area-0" / "volumes" / "db"
    return sorted(p.name for p in area.iterdir()) if area.exists() else []


def setup_volume(client: Client, pool_disk: str, volume: str, keep: int = 20) -> None:
    client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
    client.call("Protect", "sstssa{sv}", volume, "db", 0, "", "", {})
    # An RPO and no RTO: the planner takes the cheapest method (incrementals).
    client.call(
        "SetObjectives", "sa{sv}", "db", {"rpo": variant("1h"), "generations": variant(keep)}
    )


def back_up(client: Client, expected: str | None = None) -> dict[str, object]:
    props = run_job(client, client.call("BackupNow", "s", "db"))
    assert props["State"] == "done", props["Error"]
    result = props["Result"]
    if expected is not None:
        assert result["method"] == expected, result["reasons"]
    return result  # type: ignore[no-any-return]


def take_backups(client: Client, volume: str, count: int) -> dict[str, str]:
    """A full then incrementals, each after 1 MiB written; generation -> sha256."""
    points: dict[str, str] = {}
    write_random(volume, 0, SIZE, seed=1)
    for n in range(count):
        if n:
            write_random(volume, n * MiB, MiB, seed=100 + n)
        result = back_up(client, "full" if n == 0 else "incremental")
        points[str(result["generation"])] = sha256_of(volume)
    return points


def states(client: Client) -> dict[str, dict[str, str]]:
    """Generation -> state in each D-Bus listing (GetGeneration is not on the bus; the
    service answers it from the same volume info as the Generations property)."""
    listed = {g[0]: g[5] for g in plain(client.call("ListGenerations", "s", "db"))}
    prop = {g[0]: g[5] for g in plain(client.properties(VOLUME_PATH, VOLUME)["Generations"])}
    return {"ListGenerations": listed, "Generations": prop}


def cli_states(daemon: Daemon) -> dict[str, str]:
    out = subprocess.run(
        [*CLI, "--bus", daemon.address, "--json", "generations", "db"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr
    return {g["id"]: g["state"] for g in json.loads(out.stdout)["generations"]}


def refused(call: Callable[[], object], name: str) -> str:
    with pytest.raises(RemoteError) as info:
        call()
    assert info.value.name == name, info.value
    return str(info.value)


def restore(client: Client, generation: str, target: str) -> dict[str, object]:
    job = client.call("Restore", "ssssb", "db", generation, "copy", target, False)
    return run_job(client, job)


def test_truncated_manifest_marks_it_and_its_dependents(
    engine: EngineHarness, loopdev: Callable[..., str]
) -> None:
    pool_disk = loopdev(POOL_SIZE, "pool.img")
    volume = loopdev(SIZE, "db.img")
    targets = [loopdev(SIZE, f"new{i}.img") for i in range(3)]
    daemon = engine.start()
    with Client(daemon.address) as client:
        setup_volume(client, pool_disk, volume)
        points = take_backups(client, volume, 8)
        gens = list(points)
        # The pool areas are mounted while the daemon runs (it unmounts them at exit).
        manifest = gen_dir(daemon, gens[4]) / "manifest.json"
        manifest.write_bytes(manifest.read_bytes()[:100])
        entries = pool_entries(daemon)
    daemon.stop()

    daemon = engine.start()
    with Client(daemon.address) as client:
        want = {g: "corrupt" if i >= 4 else "ok" for i, g in enumerate(gens)}
        for listing, got in states(client).items():
            assert got == want, listing
        assert cli_states(daemon) == want
        # Tracking goes on: the tracker's last backup is the newest generation, corrupt or not.
        assert client.properties(VOLUME_PATH, VOLUME)["TrackerState"] == "exact"
        listed = {g[0]: g for g in plain(client.call("ListGenerations", "s", "db"))}
        assert listed[gens[4]][1] == "unknown"  # its manifest says nothing more
        assert listed[gens[5]][1] == "incremental"

        message = refused(lambda: client.call("Verify", "s", gens[4]), CORRUPT)
        assert gens[4] in message and "manifest" in message
        untouched = sha256_of(targets[0])
        refused(lambda: restore(client, gens[4], targets[0]), CORRUPT)
        refused(lambda: restore(client, gens[7], targets[0]), CORRUPT)
        # "" is the newest, which is corrupt: refused, not quietly an older one.
        refused(lambda: restore(client, "", targets[0]), CORRUPT)
        assert sha256_of(targets[0]) == untouched
        message = refused(lambda: client.call("Verify", "s", gens[6]), CORRUPT)
        assert gens[4].split("@", 1)[1] in message  # names the broken parent
        assert not [p for p in client.objects(JOB).values() if p["Kind"] != "backup"]

        for gen, target in ((gens[3], targets[0]), (gens[0], targets[1])):
            props = restore(client, gen, target)
            assert props["State"] == "done", props["Error"]
            assert sha256_of(target, SIZE) == points[gen]
        verify = run_job(client, client.call("Verify", "s", gens[3]))
        assert verify["State"] == "done", verify["Error"]
        assert verify["Result"]["chain"] == gens[:4]

        plan = plain(client.call("Plan", "s", "db"))
        assert plan["method"] == "full"
        assert any("corrupt" in r for r in plan["reasons"]), plan["reasons"]
        write_random(volume, 20 * MiB, MiB, seed=7)
        result = back_up(client, "full")
        assert any("corrupt" in r for r in result["reasons"]), result["reasons"]  # type: ignore[union-attr]
        new = str(result["generation"])
        props = restore(client, new, targets[2])
        assert props["State"] == "done", props["Error"]
        assert sha256_of(targets[2], SIZE) == sha256_of(volume)
        assert states(client)["ListGenerations"] == {**want, new: "ok"}
        assert plain(client.call("Plan", "s", "db"))["method"] == "incremental"
    # Nothing was removed from the pool: damage is reported, never cleaned up.
    assert set(entries) <= set(pool_entries(daemon))
    assert "Traceback" not in daemon.log()


def test_corrupt_parent_chunk_fails_the_dependent_verify(
    engine: EngineHarness, loopdev: Callable[..., str]
) -> None:
    pool_disk = loopdev(POOL_SIZE, "pool.img")
    volume = loopdev(SIZE, "db.img")
    targets = [loopdev(SIZE, f"new{i}.img") for i in range(2)]
    daemon = engine.start()
    with Client(daemon.address) as client:
        setup_volume(client, pool_disk, volume)
        points = take_backups(client, volume, 4)
        gens = list(points)
        # Flip one byte of the first incremental's only chunk.
        chunks = gen_dir(daemon, gens[1]) / "chunks"
        flip(chunks, 4096)

        props = run_job(client, client.call("Verify", "s", gens[2]))
        assert props["State"] == "failed"
        name, message = props["Error"]  # type: ignore[misc]
        assert name == MISMATCH and gens[1] in message and "chunk" in message
        want = {g: "ok" if i == 0 else "corrupt" for i, g in enumerate(gens)}
        assert states(client)["ListGenerations"] == want
    daemon.stop()

    # What a verify found is recorded on the pool: a new daemon knows it too.
    daemon = engine.start()
    with Client(daemon.address) as client:
        for listing, got in states(client).items():
            assert got == want, listing
        assert cli_states(daemon) == want
        untouched = sha256_of(targets[0])
        refused(lambda: restore(client, gens[1], targets[0]), MISMATCH)
        message = refused(lambda: restore(client, gens[3], targets[0]), CORRUPT)
        assert gens[1].split("@", 1)[1] in message
        assert sha256_of(targets[0]) == untouched

        props = restore(client, gens[0], targets[0])
        assert props["State"] == "done", props["Error"]
        assert sha256_of(targets[0], SIZE) == points[gens[0]]

        result = back_up(client, "full")
        assert any("corrupt" in r for r in result["reasons"]), result["reasons"]  # type: ignore[union-attr]
        props = restore(client, str(result["generation"]), targets[1])
        assert props["State"] == "done", props["Error"]
        assert sha256_of(targets[1], SIZE) == sha256_of(volume)
        assert plain(client.call("Plan", "s", "db"))["method"] == "incremental"

        # Repaired (the byte flipped back), a verify of the chain reads it whole again.
        flip(chunks, 4096)
        props = run_job(client, client.call("Verify", "s", gens[3]))
        assert props["State"] == "done", props["Error"]
        assert set(states(client)["ListGenerations"].values()) == {"ok"}
    assert "Traceback" not in daemon.log()


def flip(path: Path, offset: int) -> None:
    """Invert one byte of a pool file, durably."""
    fd = os.open(path, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([byte[0] ^ 0xFF]), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("point", ["before-manifest", "after-manifest", "before-tracker-commit"])
def test_failed_commit_leaves_no_generation(
    engine: EngineHarness, loopdev: Callable[..., str], point: str
) -> None:
    pool_disk = loopdev(POOL_SIZE, "pool.img")
    volume = loopdev(SIZE, "db.img")
    target = loopdev(SIZE, "new.img")
    daemon = engine.start(BLOCKGUARD_TEST_FAIL_AT=f"{point}@2")
    with Client(daemon.address) as client:
        setup_volume(client, pool_disk, volume)
        write_random(volume, 0, SIZE, seed=1)
        first = str(back_up(client, "full")["generation"])
        before = pool_entries(daemon)
        listed_before = plain(client.call("ListGenerations", "s", "db"))

        write_random(volume, 4 * MiB, 2 * MiB, seed=2)
        props = run_job(client, client.call("BackupNow", "s", "db"))
        assert props["State"] == "failed"
        name, message = props["Error"]  # type: ignore[misc]
        assert name == "org.blockguard1.Error.Environment"
        assert f"fault injected at {point}" in message
        assert pool_entries(daemon) == before
        assert plain(client.call("ListGenerations", "s", "db")) == listed_before
        failed = [p for p in client.objects(JOB).values() if p["State"] == "failed"]
        assert len(failed) == 1

        # The failure changed nothing: the next backup builds on the first one again.
        second = back_up(client, "incremental")
        assert plain(client.call("ListGenerations", "s", "db"))[-1][2] == first
        props = restore(client, str(second["generation"]), target)
        assert props["State"] == "done", props["Error"]
        assert sha256_of(target, SIZE) == sha256_of(volume)
    assert "Traceback" not in daemon.log()


def test_idle_backups_do_not_push_generations_out(
    engine: EngineHarness, loopdev: Callable[..., str]
) -> None:
    pool_disk = loopdev(POOL_SIZE, "pool.img")
    volume = loopdev(SIZE, "db.img")
    target = loopdev(SIZE, "new.img")
    daemon = engine.start()
    with Client(daemon.address) as client:
        setup_volume(client, pool_disk, volume, keep=2)
        points = take_backups(client, volume, 2)
        empty = [str(back_up(client, "incremental")["generation"]) for _ in range(4)]
        gens = plain(client.call("ListGenerations", "s", "db"))
        # The two real generations stay, and only the newest of the empty ones.
        assert [g[0] for g in gens] == [*points, empty[-1]]
        assert gens[-1][2] == list(points)[1] and gens[-1][4] == 0
        props = restore(client, empty[-1], target)
        assert props["State"] == "done", props["Error"]
        assert sha256_of(target, SIZE) == list(points.values())[1]
    assert "Traceback" not in daemon.log()
