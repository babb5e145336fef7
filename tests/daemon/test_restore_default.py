"""The restore an admin gets without naming a mode is the one the RTO was planned for.

The real daemon (real engine, a dir pool and a volume on loop devices, a private bus):
objectives default to copy, a ``Restore`` with mode ``""`` restores in the objectives'
mode, the plan's estimate is for that mode, and objectives stored by an older blockguard
(an RTO without a mode, which then meant swap-in) keep their meaning.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess

from blockguard.cli.client import VOLUME, Client, plain, variant
from blockguard.cli.main import build_parser
from tests.support.daemon import EngineHarness, run_job
from tests.support.devices import LoopFactory, MiB, sha256_of, write_random

SIZE = 16 * MiB


def test_the_cli_leaves_the_mode_to_the_daemon_unless_given() -> None:
    assert build_parser().parse_args(["restore", "db"]).mode == ""
    assert build_parser().parse_args(["restore", "db", "--mode", "copy"]).mode == "copy"


def _restore(client: Client, target: str) -> dict[str, object]:
    props = run_job(client, client.call("Restore", "ssssb", "db", "", "", target, False))
    assert props["State"] == "done", props["Error"]
    return props["Result"]


def test_a_restore_without_a_mode_follows_the_objectives(
    engine: EngineHarness, loopdev: LoopFactory
) -> None:
    pool_disk = loopdev(400 * MiB, "pool.img")
    volume = loopdev(SIZE, "db.img")
    target = loopdev(SIZE, "new.img")
    daemon = engine.start()
    swapped: list[str] = []
    try:
        with Client(daemon.address) as client:
            client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
            path = client.call(
                "Protect", "sstssa{sv}", volume, "db", 0, "", "", {"rto": variant("1h")}
            )
            # An RTO given without a mode refers to a copy, and says so where it is stored.
            assert plain(client.properties(path, VOLUME)["Objectives"]) == {
                "rto": "1h",
                "restore_mode": "copy",
            }
            write_random(volume, 0, SIZE, seed=7)
            backed_up = sha256_of(volume)
            assert run_job(client, client.call("BackupNow", "s", "db"))["State"] == "done"
            plan = plain(client.call("Plan", "s", "db"))
            assert plan["restore_mode"] == "copy"
            assert client.properties(path, VOLUME)["RestoreEstimate"]["mode"] == "copy"

            copied = _restore(client, target)
            assert copied["mode"] == "new-device" and copied["target"] == target
            assert sha256_of(target, SIZE) == backed_up

            # The admin says the RTO refers to a swap-in: the plan and the default follow.
            client.call("SetObjectives", "sa{sv}", "db", {"restore_mode": variant("swap-in")})
            plan = plain(client.call("Plan", "s", "db"))
            assert plan["restore_mode"] == "swap-in"
            assert client.properties(path, VOLUME)["RestoreEstimate"]["mode"] == "swap-in"
            swap = _restore(client, "")
            assert swap["mode"] == "swap-in"
            swapped.append(str(swap["target"]))
            assert sha256_of(swapped[0], SIZE) == backed_up
            client.call("ReleaseSwapIn", "s", swapped.pop())
        daemon.stop()

        # Objectives as an older blockguard stored them: an RTO without a mode (swap-in then).
        catalog = sqlite3.connect(daemon.state_dir / "catalog.db")
        with catalog:
            catalog.execute(
                "UPDATE volumes SET objectives = ? WHERE name = 'db'", (json.dumps({"rto": "1h"}),)
            )
        catalog.close()
        daemon = engine.start()
        with Client(daemon.address) as client:
            assert plain(client.properties(path, VOLUME)["Objectives"]) == {"rto": "1h"}
            assert plain(client.call("Plan", "s", "db"))["restore_mode"] == "swap-in"
            # Setting another objective writes the meaning out; it does not change it.
            client.call("SetObjectives", "sa{sv}", "db", {"generations": variant(5)})
            assert plain(client.properties(path, VOLUME)["Objectives"]) == {
                "rto": "1h",
                "restore_mode": "swap-in",
                "generations": 5,
            }
            assert plain(client.call("Plan", "s", "db"))["restore_mode"] == "swap-in"
    finally:
        for device in swapped:
            subprocess.run(["losetup", "-d", device], capture_output=True, timeout=30)
    assert "Traceback" not in daemon.log()
