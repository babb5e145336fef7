"""The RTO promise, end to end in the real kernel over D-Bus: every restore finishes within
the RTO the planner promised when it chose that generation's method.

A thin LV is protected on an lvm pool (the harness's two virtio disks). Nothing is assumed
about speeds: the daemon probes the pool, calibrates its restore-time model with the drills
it runs by itself when the pool is created and the volume protected, and is then given an
RTO of 1.6 x its own upper estimate of a full's restore (copy mode) plus one second — the
objective of the end-to-end run that found restores taking 1.5-6.7 x their promise (issue 14),
plus room for one more generation on a fast machine. Eight rounds
of scattered 64 KiB writes and backups follow, the planner choosing each method; then every
generation is restored to a new LV: its bytes must be the volume's at that backup, and the
restore, as the daemon measured it, must fit the RTO. The planner must have chosen a delta
at least once (a test in which every backup is a full would not test the model of chains).

This is the one place a duration is asserted: it is the product's promise itself, measured
under whatever load the guest has, which the drills measured too.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockguard.cli.client import JOB, Client, plain, variant
from blockguard.storage.blockdev import BlockDevice, aligned_buffer
from tests.guest import test_lvmpool as lp
from tests.guest.daemon_fixture import EngineHarness, engine_on_private_bus, sh
from tests.timeouts import scaled

pytestmark = pytest.mark.guest

pool_disks = lp.pool_disks

MiB = 1 << 20
CHUNK = 64 << 10
SIZE = 64 * MiB
VG = "bgrto"
ROUNDS = 8
#: Each round rewrites 1 % of the volume's chunks, scattered.
CHANGED = SIZE // CHUNK // 100


def sha_of(path: str) -> str:
    buf = aligned_buffer(SIZE)
    with BlockDevice(path, direct=True) as dev:
        dev.pread_into(memoryview(buf), 0)
    return hashlib.sha256(buf).hexdigest()


def scribble(path: str, rng: random.Random) -> None:
    block = aligned_buffer(CHUNK)
    with BlockDevice(path, write=True, direct=True) as dev:
        for chunk in rng.sample(range(SIZE // CHUNK), CHANGED):
            block[:] = rng.randbytes(CHUNK)
            dev.pwrite_all(memoryview(block), chunk * CHUNK)
        dev.flush()


@pytest.fixture
def lvs(loopdev) -> Iterator[dict[str, str]]:
    """A thin LV to protect (its thin pool has room for the backups' snapshots) and a
    thick LV to restore into."""
    pv = loopdev(2 * SIZE + 96 * MiB, "vg.img")
    sh("lvm", "pvcreate", "-qq", pv)
    sh("lvm", "vgcreate", "-qq", VG, pv)
    try:
        sh("lvm", "lvcreate", "-qq", "-y", "--type", "thin-pool", "-L", f"{SIZE // MiB + 16}M",
           "-c", "64k", "-n", "tp", VG)  # fmt: skip
        sh("lvm", "lvcreate", "-qq", "-y", "-V", f"{SIZE // MiB}M", "-T", f"{VG}/tp", "-n", "db")
        sh("lvm", "lvcreate", "-qq", "-y", "-L", f"{SIZE // MiB}M", "-n", "target", VG)
        yield {"volume": f"/dev/{VG}/db", "target": f"/dev/{VG}/target"}
    finally:
        lp.forget_vg(VG)
        sh("lvm", "pvremove", "-ff", "-y", pv, check=False)


@pytest.fixture
def engine(lvs: dict[str, str], tmp_path: Path) -> Iterator[EngineHarness]:
    results = Path(__file__).resolve().parents[2] / "results" / "rto-promise"
    with engine_on_private_bus(tmp_path, results) as harness:
        yield harness


def wait_idle(client: Client, timeout: float) -> None:
    """Wait until no job runs (the drills the daemon starts by itself)."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        states = [client.properties(p, JOB)["State"] for p in client.call("ListJobs")]
        if all(s in ("done", "failed") for s in states):
            return
        assert time.monotonic() < deadline, f"jobs still running: {states}"
        time.sleep(0.2)


def run(client: Client, path: str, timeout: float = 300) -> dict:
    job = client.wait_job(path, interval=0.1, timeout=scaled(timeout))
    assert job["State"] == "done", job["Error"]
    return plain(job["Result"])


def test_every_restore_fits_the_rto_the_planner_promised(
    lvs: dict[str, str], pool_disks: list[str], engine: EngineHarness
) -> None:
    rng = random.Random(14)
    # As shipped: pool disks probed, drills when the pool is made and the volume protected,
    # a copy target not yet known assumed at the shipped default speed (the engine tests'
    # harness assumes 8 MiB/s for every device).
    daemon = engine.start(
        BLOCKGUARD_PROBE_SECONDS="1",
        BLOCKGUARD_DEFAULT_SPEED=str(100_000_000),
        BLOCKGUARD_DRILL_AUTO="1",
        BLOCKGUARD_DRILL_BYTES=str(32 * MiB),
    )
    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "lvm", pool_disks, False)
        client.call("Protect", "sstssa{sv}", lvs["volume"], "db", CHUNK, "", "p1", {})
        wait_idle(client, 900)
        drills = [
            client.properties(p, JOB)
            for p in client.call("ListJobs")
            if client.properties(p, JOB)["Kind"] == "drill"
        ]
        assert drills and all(d["State"] == "done" for d in drills), drills
        for drill in drills:
            for s in plain(drill["Result"])["samples"]:
                print(f"drill {s['mode']:8} {s['shape']:16} on {s['device']}: "
                      f"{s['seconds']:6.2f} s, {s['bytes'] >> 20} MiB, {s['generations']} gens, "
                      f"{s['extents']} extents")  # fmt: skip

        client.call("SetObjectives", "sa{sv}", "db",
                    {"rto": variant("1h"), "restore_mode": variant("copy"),
                     "generations": variant(ROUNDS + 1)})  # fmt: skip
        plan = plain(client.call("Plan", "s", "db"))
        assert plan["calibrated"] is True, plan["calibration"]
        full_upper = plan["upper_restore_seconds"]["full"]
        print(f"plan: {plan['calibration']}; breakdown {plan['restore_breakdown']}; "
              f"terms {plan.get('restore_terms')}")  # fmt: skip
        # 1.6 x as the end-to-end run had it, plus a second: on a fast machine a full of this
        # volume restores in well under a second, and 1.6 x of it leaves no room for the cost
        # of reading one more generation, so every backup would be a full (CI saw that).
        rto = round(1.6 * full_upper + 1.0, 1)
        client.call("SetObjectives", "sa{sv}", "db", {"rto": variant(f"{rto}s")})

        points: list[tuple[str, str, str, float]] = []  # generation, method, sha, upper
        for _ in range(ROUNDS):
            scribble(lvs["volume"], rng)
            digest = sha_of(lvs["volume"])
            plan = plain(client.call("Plan", "s", "db"))
            result = run(client, client.call("BackupNow", "s", "db"))
            assert result["method"] == plan["method"], (plan["reasons"], result["reasons"])
            assert plan["estimated_upper_seconds"] <= rto, plan["reasons"]
            points.append(
                (result["generation"], result["method"], digest, plan["estimated_upper_seconds"])
            )
        methods = [m for _, m, _, _ in points]
        assert set(methods) - {"full"}, f"every backup was a full: {methods}; {plan['reasons']}"

        rows = []
        for generation, method, digest, promised in points:
            result = run(
                client,
                client.call("Restore", "ssssb", "db", generation, "copy", lvs["target"], False),
            )
            assert sha_of(lvs["target"]) == digest, f"restore of {generation} ({method})"
            measured = (result["seconds"], result["predicted_seconds"], result["upper_seconds"])
            rows.append((generation, method, len(result["chain"]), *measured, promised))
        table = "\n".join(
            f"{g[-12:]} {m:12} chain {n}: {s:6.2f} s measured, {p:6.2f} predicted, "
            f"{u:6.2f} upper, {pr:6.2f} promised at backup; RTO {rto} s"
            for g, m, n, s, p, u, pr in rows
        )
        print(table)
        late = [r for r in rows if r[3] > rto]
        assert not late, f"restores over the RTO of {rto} s:\n{table}"
