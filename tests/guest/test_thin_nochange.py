"""A backup of a thin LV that did not change: an empty incremental, no snapshot made.

In the real kernel, over D-Bus: a full; a backup with nothing written (an empty
incremental, and no thin snapshot created or removed: the reference stays); scattered
writes and an incremental that copies exactly them (the kept reference is still exact);
a write left in the device's page cache (buffered, its file still open) before a backup,
which must be in that backup; a daemon restart and one more unchanged backup. Every
generation of the chain, the empty ones included, restores to the bytes the volume had
at its backup.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockguard.cli.client import JOB, Client, variant
from blockguard.storage.blockdev import BlockDevice, aligned_buffer
from tests.guest import test_lvmpool as lp
from tests.guest.daemon_fixture import (
    dm_names,
    engine_on_private_bus,
    remove_dm,
    resume_suspended,
    sh,
)
from tests.timeouts import scaled

pytestmark = pytest.mark.guest
pool_disks = lp.pool_disks

MiB = 1 << 20
CHUNK = 64 << 10
SIZE = 16 * MiB
VG = "bgncvol"
POOL_VG = "bg_p1"


def read_all(path: str, size: int = SIZE) -> bytes:
    buf = aligned_buffer(size)
    with BlockDevice(path, direct=True) as dev:
        dev.pread_into(memoryview(buf), 0)
    return bytes(buf)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def scattered_writes(path: str, rng: random.Random, n: int) -> set[int]:
    """``n`` distinct 64 KiB chunks of random data, flushed; the chunks written."""
    chunks = set(rng.sample(range(SIZE // CHUNK), n))
    buf = aligned_buffer(CHUNK)
    with BlockDevice(path, write=True, direct=True) as dev:
        for c in sorted(chunks):
            buf[:] = rng.randbytes(CHUNK)
            dev.pwrite_all(memoryview(buf), c * CHUNK)
        dev.flush()
    return chunks


def references() -> set[str]:
    out = sh("lvm", "lvs", "--noheadings", "-o", "lv_name", VG)
    return {n.strip() for n in out.split() if n.strip().startswith("bgref-")}


@pytest.fixture
def thin_volume(pool_disks: list[str], loopdev) -> Iterator[tuple[list[str], str]]:
    """A thin LV in a thin pool with 64 KiB blocks, random data; the pool disks; a
    restore target."""
    pv = loopdev(64 * MiB, "vg.img")
    target = loopdev(SIZE, "target.img")
    sh("lvm", "pvcreate", "-qq", pv)
    sh("lvm", "vgcreate", "-qq", VG, pv)
    try:
        sh("lvm", "lvcreate", "-qq", "-y", "--type", "thin-pool", "-L", "48M", "-c", "64k",
           "-n", "tp", VG)  # fmt: skip
        sh("lvm", "lvcreate", "-qq", "-y", "-V", f"{SIZE >> 20}M", "-T", f"{VG}/tp", "-n", "vol")
        yield pool_disks, target
    finally:
        resume_suspended()
        remove_dm([n for n in dm_names() if n.startswith(f"{POOL_VG}-s")])
        for vg in (VG, POOL_VG):
            lp.forget_vg(vg)
        sh("lvm", "pvremove", "-ff", "-y", pv, check=False)


def wait_job(client: Client, job: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + scaled(timeout)
    while True:
        props = client.properties(job, JOB)
        if props["State"] in ("done", "failed"):
            return props
        assert time.monotonic() < deadline, f"job {job} did not finish"
        time.sleep(0.1)


def backup(client: Client) -> dict:
    props = wait_job(client, client.call("BackupNow", "s", "vol"))
    assert props["State"] == "done", props["Error"]
    return props["Result"]


def test_unchanged_thin_backup_is_an_empty_incremental_without_a_snapshot(
    thin_volume: tuple[list[str], str], tmp_path: Path
) -> None:
    disks, target = thin_volume
    vol = f"/dev/{VG}/vol"
    rng = random.Random(1616)
    scattered_writes(vol, rng, SIZE // CHUNK // 2)
    points: list[tuple[str, str]] = []  # (generation, sha256 of the volume at its backup)
    results = Path(__file__).resolve().parents[2] / "results" / "thin-nochange"
    with engine_on_private_bus(tmp_path, results) as engine:
        daemon = engine.start()
        with Client(daemon.address) as client:
            client.call("CreatePool", "ssasb", "p1", "lvm", disks, False)
            client.call("Protect", "sstssa{sv}", vol, "vol", CHUNK, "", "", {})
            client.call("SetObjectives", "sa{sv}", "vol", {"generations": variant(20)})
            first = backup(client)
            assert first["method"] == "full", first["reasons"]
            points.append((first["generation"], sha(read_all(vol))))
            refs = references()
            assert len(refs) == 1, refs

            # Nothing written: an empty incremental, and the reference snapshot stays.
            empty = backup(client)
            assert (empty["method"], empty["bytes"]) == ("incremental", 0), empty
            assert references() == refs
            points.append((empty["generation"], points[-1][1]))

            # Scattered writes: exactly those chunks are copied, against the kept reference.
            written = scattered_writes(vol, rng, 9)
            inc = backup(client)
            assert (inc["method"], inc["bytes"]) == ("incremental", len(written) * CHUNK), inc
            points.append((inc["generation"], sha(read_all(vol))))
            assert references() - refs  # a new reference (the old one goes after the job)

            again = backup(client)
            assert (again["method"], again["bytes"]) == ("incremental", 0), again
            points.append((again["generation"], points[-1][1]))

            # A write still in the device's page cache (buffered, its file open, never
            # synced) is part of the next backup, whatever the write-back did by then.
            fd = os.open(vol, os.O_RDWR)
            try:
                os.pwrite(fd, rng.randbytes(CHUNK), 5 * CHUNK)
                cached = backup(client)
            finally:
                os.close(fd)
            assert (cached["method"], cached["bytes"]) == ("incremental", CHUNK), cached
            points.append((cached["generation"], sha(read_all(vol))))
        daemon.stop()

        # After a restart the daemon knows nothing of the volume's writes: it asks.
        daemon = engine.start()
        with Client(daemon.address) as client:
            after = backup(client)
            assert (after["method"], after["bytes"]) == ("incremental", 0), after
            points.append((after["generation"], points[-1][1]))
            written = scattered_writes(vol, rng, 3)
            last = backup(client)
            assert (last["method"], last["bytes"]) == ("incremental", len(written) * CHUNK)
            points.append((last["generation"], sha(read_all(vol))))
            for generation, want in points:
                job = client.call("Restore", "ssssb", "vol", generation, "copy", target, False)
                restored = wait_job(client, job)
                assert restored["State"] == "done", (generation, restored["Error"])
                assert sha(read_all(target)) == want, generation
        daemon.stop()
    assert "Traceback" not in daemon.log()
