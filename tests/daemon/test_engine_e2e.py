"""The real daemon end to end, over D-Bus only: pool, protect, automatic backups, restore.

Loop devices, a dir pool on XFS, scan tracking, a private bus and blockguardd with the real
engine. Every device is assumed to run at 8 MiB/s (``ENGINE_ENV``: no probe), so an RTO of
2 s means "at most 16 MiB to copy back" in swap-in mode, where the full costs nothing. The
writes then move the planner through incremental, differential and full, and the test checks
each choice against the numbers in the plan's reasons, not just the method's name.
"""

from __future__ import annotations

import re
import subprocess

from blockguard.cli.client import JOB, VOLUME, Client, plain, variant
from blockguard.core.units import parse_duration, parse_size
from tests.support.daemon import EngineHarness, run_job
from tests.support.devices import MiB, sha256_of, write_random

VOLUME_SIZE = 64 * MiB
POOL_SIZE = 400 * MiB
RTO = 2.0
EST = re.compile(r"(incremental chain (\d+) generations.*?|differential|full) ([0-9.]+ \w?i?B).*?"
                 r"restores ([0-9.]+ \w?i?B), est (\S+) (<=|>) RTO")  # fmt: skip


def considered(reasons: list[str]) -> list[tuple[str, int, float, str]]:
    """(what, bytes restored, estimated seconds, "<=" or ">") for each method in the reasons."""
    found = []
    for reason in reasons:
        for part in reason.split(";"):
            m = EST.search(part)
            if m:
                what = m.group(1).split()[0]
                seconds = parse_duration(m.group(5)).total_seconds()
                found.append((what, parse_size(m.group(4)), seconds, m.group(6)))
    return found


def back_up(client: Client, expected: str) -> dict[str, object]:
    """Plan, back up, and check the method is the one the plan's numbers demand."""
    plan = plain(client.call("Plan", "s", "db"))
    assert plan["method"] == expected, plan["reasons"]
    steps = considered(plan["reasons"])
    assert steps, plan["reasons"]
    # The planner tries the cheapest method first and takes the first that fits the RTO:
    # every method before the chosen one was over it, the chosen one is within it.
    *rejected, chosen = steps
    assert chosen[0] == expected and chosen[3] == "<=" and chosen[2] <= RTO, steps
    order = ["incremental", "differential", "full"]
    assert [s[0] for s in steps] == order[
        order.index(expected) - len(rejected) : order.index(expected) + 1
    ]
    for _what, _nbytes, seconds, cmp in rejected:
        assert cmp == ">" and seconds > RTO, steps
    # The estimate is the model's: bytes to copy back at 8 MiB/s (swap-in: the full is free).
    assert abs(chosen[2] - chosen[1] / (8 * MiB)) < 0.06, chosen
    job = client.call("BackupNow", "s", "db")
    props = run_job(client, job)
    assert props["State"] == "done", props["Error"]
    assert props["Result"]["method"] == expected
    return props["Result"]


def test_backups_follow_the_rto_and_restore_bit_exact(
    engine: EngineHarness, loopdev: object
) -> None:
    pool_disk = loopdev(POOL_SIZE, "pool.img")  # type: ignore[operator]
    volume = loopdev(VOLUME_SIZE, "db.img")  # type: ignore[operator]
    targets = [loopdev(VOLUME_SIZE, f"new{i}.img") for i in range(2)]  # type: ignore[operator]
    daemon = engine.start()
    swapped: list[str] = []
    with Client(daemon.address) as client:
        try:
            client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
            path = client.call("Protect", "sstssa{sv}", volume, "db", 0, "", "", {})
            props = client.properties(path, VOLUME)
            assert props["Backend"] == "scan" and props["TrackerState"] == "initialising"
            client.call(
                "SetObjectives",
                "sa{sv}",
                "db",
                # The RTO refers to a swap-in (where the full costs nothing).
                {
                    "rto": variant("2s"),
                    "restore_mode": variant("swap-in"),
                    "generations": variant(10),
                },
            )

            points: dict[str, str] = {}  # generation -> sha256 of the volume at its point
            write_random(volume, 0, VOLUME_SIZE, seed=1)
            steps = [
                ("full", None),  # no full yet
                ("incremental", (0, 6)),  # chain 6 MiB: 0.75 s
                ("incremental", (0, 6)),  # chain 12 MiB: 1.5 s
                ("differential", (0, 6)),  # chain 18 MiB > 2 s; differential 6 MiB
                ("full", (20, 20)),  # on the differential 26 MiB; differential 26 MiB
                ("incremental", (40, 4)),
            ]
            for n, (method, write) in enumerate(steps):
                if write is not None:
                    write_random(volume, write[0] * MiB, write[1] * MiB, seed=100 + n)
                result = back_up(client, method)
                points[str(result["generation"])] = sha256_of(volume)

            gens = plain(client.call("ListGenerations", "s", "db"))
            assert [g[1] for g in gens] == [m for m, _ in steps]
            assert [g[0] for g in gens] == list(points)
            assert gens[3][2] == gens[0][0]  # the differential's parent is its full

            # Newest to a new device, and an older incremental chain to another.
            for gen, target in ((gens[-1][0], targets[0]), (gens[2][0], targets[1])):
                job = client.call("Restore", "ssssb", "db", gen, "copy", target, False)
                props = run_job(client, job)
                assert props["State"] == "done", props["Error"]
                assert props["Result"]["target"] == target
                assert sha256_of(target, VOLUME_SIZE) == points[gen]

            # Swap-in of the differential: a clone of its full with the delta applied.
            job = client.call("Restore", "ssssb", "db", gens[3][0], "swap-in", "", False)
            props = run_job(client, job)
            assert props["State"] == "done", props["Error"]
            swapped.append(str(props["Result"]["target"]))
            assert sha256_of(swapped[0], VOLUME_SIZE) == points[gens[3][0]]

            verify = run_job(client, client.call("Verify", "s", gens[1][0]))
            assert verify["State"] == "done" and verify["Result"]["ok"] is True

            # Restores are measured and learnt from: the jobs carry both figures.
            restore_jobs = [p for p in client.objects(JOB).values() if p["Kind"] == "restore"]
            assert len(restore_jobs) == 3
            assert all(p["Result"]["predicted_seconds"] > 0 for p in restore_jobs)
            status = plain(client.call("GetStatus"))
            assert status["summary"].startswith("1 volumes, 1 pools")
        finally:
            for device in swapped:
                subprocess.run(["losetup", "-d", device], capture_output=True, timeout=30)
    assert "Traceback" not in daemon.log()
