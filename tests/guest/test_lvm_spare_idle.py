"""The lvm pool's spare delta area through the daemon, in the real kernel: made only once
the pool has been idle (no job of it) for ``idle_quiet``, never in a job's time; the next
delta that fits is written to it with no LV made in its backup, and restores bit-exact;
a daemon killed with a spare and a claimed one reopens with both sorted out.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockguard.cli.client import Client, plain, variant
from blockguard.storage.blockdev import BlockDevice
from blockguard.storage.pool.lvmspare import AREA_PREFIX
from tests.guest import test_lvmpool as lp
from tests.guest.daemon_fixture import (
    EngineHarness,
    dm_names,
    engine_on_private_bus,
    remove_dm,
    resume_suspended,
    sh,
)
from tests.guest.test_engine_guest import wait_jobs
from tests.timeouts import scaled

pytestmark = pytest.mark.guest
pool_disks = lp.pool_disks

MiB = 1 << 20
CHUNK = 64 << 10
SIZE = 16 * MiB
VG = "bgidlevol"
POOL_VG = "bg_p1"


def pool_lvs() -> set[str]:
    return lp.lv_names(POOL_VG)


def areas() -> set[str]:
    return {n for n in pool_lvs() if n.startswith(AREA_PREFIX)}


def scatter(dev: str, chunks: int, seed: int) -> None:
    rng = random.Random(seed)
    with BlockDevice(dev, write=True) as d:
        for c in rng.sample(range(SIZE // CHUNK), chunks):
            os.pwrite(d.fd, rng.randbytes(CHUNK), c * CHUNK)
        os.fsync(d.fd)


def sha_of(dev: str) -> str:
    with BlockDevice(dev) as d:
        return hashlib.sha256(os.pread(d.fd, SIZE, 0)).hexdigest()


def backup(client: Client, vol: str = "vol") -> dict:
    props = wait_jobs(client, {vol: client.call("BackupNow", "s", vol)}, timeout=300)[vol]
    assert props["State"] == "done", props["Error"]
    return plain(props["Result"])


def wait_for(what, timeout: float = 120):
    deadline = time.monotonic() + scaled(timeout)
    while not (found := what()):
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.2)
    return found


@pytest.fixture
def world(pool_disks: list[str], loopdev, tmp_path: Path) -> Iterator[tuple[list[str], str]]:
    pv = loopdev(80 * MiB, "vg.img")
    target = loopdev(SIZE, "target.img")
    sh("lvm", "pvcreate", "-qq", pv)
    sh("lvm", "vgcreate", "-qq", VG, pv)
    try:
        sh("lvm", "lvcreate", "-qq", "-y", "--type", "thin-pool", "-L", "40M", "-c", "64k",
           "-n", "tp", VG)  # fmt: skip
        sh("lvm", "lvcreate", "-qq", "-y", "-V", f"{SIZE >> 20}M", "-T", f"{VG}/tp", "-n", "vol")
        yield pool_disks, target
    finally:
        resume_suspended()
        remove_dm([n for n in dm_names() if n.startswith(("blockguard-", f"{POOL_VG}-s"))])
        for vg in (VG, POOL_VG):
            lp.forget_vg(vg)
        sh("lvm", "pvremove", "-ff", "-y", pv, check=False)


@pytest.fixture
def harness(world, tmp_path: Path) -> Iterator[EngineHarness]:
    with engine_on_private_bus(tmp_path) as h:
        yield h


def test_spare_made_when_idle_taken_by_the_next_delta_and_sorted_out_after_a_kill(
    world: tuple[list[str], str], harness: EngineHarness
) -> None:
    disks, target = world
    dev = f"/dev/{VG}/vol"
    scatter(dev, SIZE // CHUNK // 2, 1)
    # A long quiet period first: back-to-back jobs never see a spare being made.
    daemon = harness.start(BLOCKGUARD_IDLE_QUIET="3600")
    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "lvm", disks, False)
        client.call("Protect", "sstssa{sv}", dev, "vol", CHUNK, "", "", {})
        client.call("SetObjectives", "sa{sv}", "vol", {"generations": variant(10)})
        assert backup(client)["method"] == "full"
        for seed in (2, 3):
            scatter(dev, 4, seed)
            assert backup(client)["method"] == "incremental"
            assert areas() == set(), "a spare made without a quiet period"
    daemon.stop()

    # A short one: the spare comes once the pool is idle; the next delta takes it.
    daemon = harness.start(BLOCKGUARD_IDLE_QUIET="1")
    with Client(daemon.address) as client:
        scatter(dev, 4, 4)
        assert backup(client)["method"] == "incremental"
        spare = wait_for(areas)
        assert len(spare) == 1
        before = pool_lvs()
        scatter(dev, 4, 5)
        inc = backup(client)
        assert inc["method"] == "incremental"
        # No LV made by the backup: its data is in the spare (a new one may follow).
        made = pool_lvs() - before
        assert not {n for n in made if not n.startswith(AREA_PREFIX)}, made
        want = sha_of(dev)
        job = client.call("Restore", "ssssb", "vol", inc["generation"], "copy", target, False)
        props = wait_jobs(client, {"vol": job}, timeout=300)["vol"]
        assert props["State"] == "done", props["Error"]
        assert sha_of(target) == want

        # A second spare after the pool was idle again; then the daemon is killed.
        second = wait_for(lambda: areas() - spare)
        assert len(second) == 1
        kept = areas()
    daemon.kill()

    # Reopened: the generation's area and the spare both stay (nothing else is made or
    # lost); the spare is taken by the next delta that fits, the chain restores.
    daemon = harness.start(BLOCKGUARD_IDLE_QUIET="3600")
    with Client(daemon.address) as client:
        assert areas() == kept
        scatter(dev, 4, 6)
        before = pool_lvs()
        last = backup(client)
        assert last["method"] == "incremental"
        assert pool_lvs() == before, "the spare found at open was not taken"
        want = sha_of(dev)
        job = client.call("Restore", "ssssb", "vol", last["generation"], "copy", target, False)
        props = wait_jobs(client, {"vol": job}, timeout=300)["vol"]
        assert props["State"] == "done", props["Error"]
        assert sha_of(target) == want
    daemon.stop()
