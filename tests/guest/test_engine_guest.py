"""blockguardd end to end in the real kernel, over D-Bus only: an lvm pool, an era-tracked
thick LV and a thin LV, automatic backups with writes going on during each, restores,
an exception store that fills, and a kill -9 in the middle of two backups.

**How the content at each backup point is known** while writes continue. A writer thread
writes 4 KiB blocks (single O_DIRECT bios, one after the other) to a small region of the
volume and logs each write after it returned. A point-in-time copy is taken while the
volume's dm device is suspended (dm-snapshot under dm-era; thin snapshot): a bio is
either completed before the suspend or held until the resume, so the copy is the volume
as it was before the backup started (the test read it while nothing wrote: ``base``)
plus *a prefix* ``log[:k]`` of the writer's writes. The test does not know ``k``; it
restores the generation to a new device and requires: everything outside the writer's
region equals ``base`` byte for byte, and the region equals ``base + log[:k]`` for one
``k`` with ``n0 <= k < n`` — ``n0`` writes had returned before BackupNow was called,
``n`` when the job had finished, so ``k < n`` also proves writes landed on the volume
during the backup, after its point. Random data makes a wrong ``k`` (or a mix of two)
impossible to match by chance. The sha256 of ``base + log[:k]`` is then the generation's
content, checked again by later restores (after the daemon was killed, say).

The pool is on the harness's two virtio disks (wiped before and after) or loop devices;
the volumes are in a VG of their own on a loop device. Every device is assumed to run at
2 MiB/s (no probe), so an RTO of 2 s means at most 4 MiB to apply in swap-in mode.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from blockguard.cli.client import JOB, POOL, VOLUME, Client, plain, variant
from blockguard.storage.blockdev import BlockDevice, aligned_buffer
from tests.guest import test_lvmpool as lp
from tests.guest.daemon_fixture import (
    EngineHarness,
    dm_names,
    engine_on_private_bus,
    pit_layers,
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
VG = "bgevol"
POOL_VG = "bg_p1"
SPEED = str(2 * MiB)
#: The writer's region: inside region A, which every round rewrites.
W_OFF, W_LEN = 0, 512 << 10
A = (0, 5 * MiB // 2)
B = (8 * MiB, 2 * MiB)
C = (2 * MiB, 12 * MiB)
VOLS = ("thick", "thin")


# --- devices ------------------------------------------------------------------------------


def read_all(path: str, size: int = SIZE) -> bytes:
    buf = aligned_buffer(size)
    with BlockDevice(path, direct=True) as dev:
        dev.pread_into(memoryview(buf), 0)
    return bytes(buf)


def write_span(path: str, offset: int, length: int, seed: int) -> None:
    """Seeded random data, in O_DIRECT bios of up to 1 MiB, flushed."""
    rng = random.Random(seed)
    buf = aligned_buffer(min(length, MiB))
    with BlockDevice(path, write=True, direct=True) as dev:
        for at in range(offset, offset + length, MiB):
            n = min(MiB, offset + length - at)
            buf[:n] = rng.randbytes(n)
            dev.pwrite_all(memoryview(buf)[:n], at)
        dev.flush()


def chunks(offset: int, length: int) -> set[int]:
    return set(range(offset // CHUNK, (offset + length - 1) // CHUNK + 1))


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


class Writer(threading.Thread):
    """Writes 4 KiB blocks to [W_OFF, W_OFF + W_LEN) one after the other and logs each
    (offset, data) once its write returned."""

    def __init__(self, path: str, seed: int) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.rng = random.Random(seed)
        self.log: list[tuple[int, bytes]] = []
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        buf = aligned_buffer(4096)
        try:
            with BlockDevice(self.path, write=True, direct=True) as dev:
                while not self.halt.is_set():
                    data = self.rng.randbytes(4096)
                    offset = W_OFF + self.rng.randrange(W_LEN // 4096) * 4096
                    buf[:] = data
                    dev.pwrite_all(memoryview(buf), offset)
                    self.log.append((offset, data))
                    time.sleep(0.02)
                dev.flush()
        except BaseException as exc:  # reported by finish(), in the test thread
            self.error = exc

    def wait_writes(self, n: int, timeout: float = 30) -> int:
        deadline = time.monotonic() + scaled(timeout)
        while len(self.log) < n:
            assert self.error is None and time.monotonic() < deadline, self.error
            time.sleep(0.01)
        return len(self.log)

    def finish(self) -> list[tuple[int, bytes]]:
        self.halt.set()
        self.join(60)
        assert self.error is None, self.error
        return self.log


@dataclass
class Point:
    """One backup taken while the writer ran (see the module docstring)."""

    volume: str
    generation: str
    method: str
    base: bytes
    log: list[tuple[int, bytes]]
    n0: int
    k: int | None = None
    digest: str = ""
    touched_after: set[int] = field(default_factory=set)

    def resolve(self, restored: bytes) -> None:
        """Find ``k`` from the restored bytes; raises if no prefix matches."""
        end = W_OFF + W_LEN
        assert restored[:W_OFF] == self.base[:W_OFF], f"{self.generation}: before the region"
        assert restored[end:] == self.base[end:], f"{self.generation}: outside the region"
        region = bytearray(self.base[W_OFF:end])
        want = restored[W_OFF:end]
        matches = []
        for k in range(len(self.log) + 1):
            if region == want:
                matches.append(k)
            if k < len(self.log):
                off, data = self.log[k]
                region[off - W_OFF : off - W_OFF + 4096] = data
        assert matches, f"{self.generation}: no prefix of the {len(self.log)} writes matches"
        k = matches[-1]
        assert self.n0 <= k < len(self.log), (self.generation, self.n0, k, len(self.log))
        self.k = k
        self.digest = sha(self.content())
        self.touched_after = {off // CHUNK for off, _ in self.log[k:]}

    def content(self) -> bytes:
        data = bytearray(self.base)
        for off, piece in self.log[: self.k]:
            data[off : off + 4096] = piece
        return bytes(data)


# --- fixtures -----------------------------------------------------------------------------


@dataclass
class World:
    volumes: dict[str, str]  # name -> device
    pool_disks: list[str]
    targets: dict[str, str]  # volume name -> a loop device to restore into


@pytest.fixture
def world(pool_disks: list[str], loopdev) -> Iterator[World]:
    """A VG with a thick LV and a thin LV (thin pool with 64 KiB blocks), restore targets;
    afterwards every dm device the daemon made is taken apart and both VGs removed."""
    pv = loopdev(80 * MiB, "vg.img")
    targets = {v: loopdev(SIZE, f"target-{v}.img") for v in VOLS}
    sh("lvm", "pvcreate", "-qq", pv)
    sh("lvm", "vgcreate", "-qq", VG, pv)
    try:
        sh("lvm", "lvcreate", "-qq", "-y", "-L", f"{SIZE >> 20}M", "-n", "thick", VG)
        sh("lvm", "lvcreate", "-qq", "-y", "--type", "thin-pool", "-L", "40M", "-c", "64k",
           "-n", "tp", VG)  # fmt: skip
        sh("lvm", "lvcreate", "-qq", "-y", "-V", f"{SIZE >> 20}M", "-T", f"{VG}/tp", "-n", "thin")
        yield World({v: f"/dev/{VG}/{v}" for v in VOLS}, pool_disks, targets)
    finally:
        # The era device is the LV's own (interposed): remove it, its copy layers and its
        # inner device; LVM then removes the rest.
        resume_suspended()
        names = dm_names()
        remove_dm(
            [f"{VG}-thick"]
            + [n for n in names if n.startswith("blockguard-")]
            + [n for n in names if n.startswith(f"{POOL_VG}-s")]
        )
        for vg in (VG, POOL_VG):
            lp.forget_vg(vg)
        sh("lvm", "pvremove", "-ff", "-y", pv, check=False)


@pytest.fixture
def engine(world: World, tmp_path: Path) -> Iterator[EngineHarness]:
    """Torn down before ``world``: the daemons stop before the devices go."""
    results = Path(__file__).resolve().parents[2] / "results" / "engine-guest"
    with engine_on_private_bus(tmp_path, results) as harness:
        yield harness


# --- D-Bus steps ----------------------------------------------------------------------------


def wait_jobs(client: Client, jobs: dict[str, str], timeout: float = 60) -> dict[str, dict]:
    """Poll jobs (volume -> job path) until all are done or failed."""
    final: dict[str, dict] = {}
    deadline = time.monotonic() + scaled(timeout)
    while len(final) < len(jobs):
        assert time.monotonic() < deadline, f"jobs {jobs} did not finish"
        for vol, path in jobs.items():
            if vol not in final:
                props = client.properties(path, JOB)
                if props["State"] in ("done", "failed"):
                    final[vol] = props
        time.sleep(0.05)
    return final


def back_up(
    client: Client, world: World, expect: dict[str, str | None], seed: int
) -> dict[str, Point]:
    """Back up the volumes in ``expect`` at once, a writer running on each during its job;
    the method must be the one expected (None: any) and the one Plan announced."""
    planned = {}
    for vol, method in expect.items():
        plan = plain(client.call("Plan", "s", vol))
        assert method is None or plan["method"] == method, (vol, plan["reasons"])
        planned[vol] = plan["method"]
    bases = {vol: read_all(world.volumes[vol]) for vol in expect}
    writers = {vol: Writer(world.volumes[vol], seed + i) for i, vol in enumerate(expect)}
    for w in writers.values():
        w.start()
    try:
        n0 = {vol: w.wait_writes(2) for vol, w in writers.items()}
        jobs = {vol: client.call("BackupNow", "s", vol) for vol in expect}
        final = wait_jobs(client, jobs)
    finally:
        logs = {vol: w.finish() for vol, w in writers.items()}
    points = {}
    for vol, props in final.items():
        assert props["State"] == "done", (vol, props["Error"])
        result = props["Result"]
        assert result["method"] == planned[vol], (vol, result["reasons"])
        points[vol] = Point(vol, result["generation"], result["method"], bases[vol],
                            logs[vol], n0[vol])  # fmt: skip
    return points


def restore(client: Client, world: World, gens: dict[str, str], mode: str = "copy") -> dict:
    """Restore one generation per volume at once (copy: to the volume's target)."""
    jobs = {
        vol: client.call("Restore", "ssssb", vol, gen, mode,
                         world.targets[vol] if mode == "copy" else "", False)
        for vol, gen in gens.items()
    }  # fmt: skip
    final = wait_jobs(client, jobs)
    for vol, props in final.items():
        assert props["State"] == "done", (vol, props["Error"])
    return {vol: props["Result"] for vol, props in final.items()}


def resolve(client: Client, world: World, points: list[dict[str, Point]]) -> None:
    """Restore every generation and find its point (module docstring)."""
    for batch in points:
        restore(client, world, {vol: p.generation for vol, p in batch.items()})
        for vol, p in batch.items():
            p.resolve(read_all(world.targets[vol]))


def pool_lvs() -> set[str]:
    out = sh("lvm", "lvs", "--noheadings", "-o", "lv_name", POOL_VG, check=False)
    return {x.strip() for x in out.splitlines() if x.strip()}


def dm_type(name: str) -> str:
    return sh("dmsetup", "table", name).split()[2]


# --- the test -------------------------------------------------------------------------------


def test_lvm_pool_era_and_thin_over_dbus(world: World, engine: EngineHarness) -> None:
    t0 = time.monotonic()
    env = {"BLOCKGUARD_DEFAULT_SPEED": SPEED}
    daemon = engine.start(**env)
    history: list[dict[str, Point]] = []
    with Client(daemon.address) as client:
        pool = client.call("CreatePool", "ssasb", "p1", "lvm", world.pool_disks, False)
        assert client.properties(pool, POOL)["Backend"] == "lvm"
        for vol in VOLS:
            path = client.call("Protect", "sstssa{sv}", world.volumes[vol], vol, CHUNK, "", "", {})
            props = client.properties(path, VOLUME)
            assert props["Backend"] == {"thick": "era", "thin": "thin"}[vol], props
            assert props["Device"] == world.volumes[vol]
            client.call("SetObjectives", "sa{sv}", vol,
                        {"rto": variant("2s"), "restore_mode": variant("swap-in"),
                         "generations": variant(10)})  # fmt: skip
        # Interposed: the LV keeps its path and device; its own table is now dm-era, with
        # the metadata on an LV of the pool.
        assert dm_type(f"{VG}-thick") == "era"
        assert "era-thick" in pool_lvs()

        both = dict.fromkeys(VOLS)
        steps: list[tuple[str, list[tuple[int, int]]]] = [
            ("full", [(0, SIZE)]),  # no full yet
            ("incremental", [A]),  # chain 2.5 MiB: 1.25 s
            ("differential", [A]),  # chain 5 MiB: 2.5 s > 2 s; differential 2.5 MiB
            ("full", [A, B]),  # differential 4.5 MiB and chain 7 MiB: both > 2 s
        ]
        for n, (method, writes) in enumerate(steps):
            for vol in VOLS:
                for i, (off, length) in enumerate(writes):
                    write_span(world.volumes[vol], off, length, seed=1000 * n + 10 * i + len(vol))
            history.append(back_up(client, world, {v: method for v in both}, seed=100 * n))
        resolve(client, world, history)
        for vol in VOLS:
            gens = plain(client.call("ListGenerations", "s", vol))
            assert [g[0] for g in gens] == [h[vol].generation for h in history]
            assert [g[1] for g in gens] == [m for m, _ in steps]
        assert pit_layers() == [] and not {n for n in pool_lvs() if n.startswith("cow-")}
        # Swap-in of the differential: a thin snapshot of its full with the delta applied.
        swapped = restore(client, world, {"thick": history[2]["thick"].generation}, "swap-in")
        assert sha(read_all(swapped["thick"]["target"])) == history[2]["thick"].digest
        verify = wait_jobs(
            client, {"thin": client.call("Verify", "s", history[1]["thin"].generation)}
        )
        assert verify["thin"]["State"] == "done" and verify["thin"]["Result"]["ok"] is True
        t1 = time.monotonic()
        daemon.stop()

    # --- a full exception store, then kill -9 in the middle of two backups -----------------
    # The pause after each extent must outlast what a loaded guest takes between seeing both
    # backups copy and the kill (the thin backup starts seconds after the thick one): with a
    # fixed 1.5 s the thick full committed on the pool before the kill (its job then fails
    # as "daemon restarted" while its generation is there, a different case from this one).
    delay = str(scaled(1.5))
    daemon = engine.start(**env, BLOCKGUARD_TEST_BACKUP_DELAY=delay, BLOCKGUARD_COW_SIZE=str(MiB))
    era_table = sh("dmsetup", "table", f"{VG}-thick")
    with Client(daemon.address) as client:
        for vol in VOLS:
            write_span(world.volumes[vol], *C, seed=7 + len(vol))
        # 12 MiB to copy (two extents, a pause after the first): 4 MiB written then
        # overflow the 1 MiB store; the volume takes every write and the backup fails.
        job = client.call("BackupNow", "s", "thick")
        wait_running(client, {"thick": job})
        write_span(world.volumes["thick"], 0, 4 * MiB, seed=11)
        after_overflow = read_all(world.volumes["thick"])
        props = wait_jobs(client, {"thick": job})["thick"]
        assert props["State"] == "failed"
        assert props["Error"][0] == "org.blockguard1.Error.SnapshotOverflow", props["Error"]
        assert "filled up; the backup was aborted" in props["Error"][1]
        assert read_all(world.volumes["thick"]) == after_overflow
        assert sh("dmsetup", "table", f"{VG}-thick") == era_table
        assert pit_layers() == [] and not {n for n in pool_lvs() if n.startswith("cow-")}
        assert len(plain(client.call("ListGenerations", "s", "thick"))) == len(steps)
        assert client.properties("/org/blockguard1/volume/thick", VOLUME)["TrackerState"] == "exact"

        writers = {vol: Writer(world.volumes[vol], 900 + i) for i, vol in enumerate(VOLS)}
        for w in writers.values():
            w.start()
        try:
            jobs = {vol: client.call("BackupNow", "s", vol) for vol in VOLS}
            wait_running(client, jobs)
            assert len(pit_layers()) == 2  # the thick volume's copy: origin and snapshot
            daemon.kill()
            time.sleep(0.3)  # the volumes keep taking writes with the daemon gone
        finally:
            killed_logs = {vol: w.finish() for vol, w in writers.items()}
    t2 = time.monotonic()

    # --- the next daemon: jobs failed, nothing committed lost, tracking continues ----------
    daemon = engine.start(**env)
    with Client(daemon.address) as client:
        failed = [p for p in client.objects(JOB).values()
                  if p["Kind"] == "backup" and p["State"] == "failed"]  # fmt: skip
        assert len(failed) == 2 and all("daemon restarted" in p["Error"][1] for p in failed)
        # The copy layers were undone (the LV has its era table back), the exception store
        # and the partial generations were collected.
        assert pit_layers() == [] and sh("dmsetup", "table", f"{VG}-thick") == era_table
        committed = {f"g{h[v].generation.split('@', 1)[1]}" for h in history for v in VOLS}
        assert {n for n in pool_lvs() if n.startswith("g")} <= committed
        assert not {n for n in pool_lvs() if n.startswith("cow-")}
        for vol in VOLS:
            gens = plain(client.call("ListGenerations", "s", vol))
            assert [g[0] for g in gens] == [h[vol].generation for h in history]
        # Committed generations restore bit-exact: the newest full, an older incremental.
        kept = {"thick": history[-1]["thick"], "thin": history[1]["thin"]}
        restore(client, world, {v: p.generation for v, p in kept.items()})
        for vol, p in kept.items():
            assert sha(read_all(world.targets[vol])) == p.digest
        # Tracking continued and is exact: the changes since the last backup are exactly
        # the writes after its point (the writer's), C, the overflow's and the killed run's.
        for vol in VOLS:
            props = client.properties(f"/org/blockguard1/volume/{vol}", VOLUME)
            assert props["TrackerState"] == "exact", props
            expected = history[-1][vol].touched_after | chunks(*C)
            expected |= {off // CHUNK for off, _ in killed_logs[vol]}
            if vol == "thick":
                expected |= chunks(0, 4 * MiB)
            plan = plain(client.call("Plan", "s", vol))
            assert plan["changed_bytes_since_backup"] == len(expected) * CHUNK, (vol, plan)
        # The next backups (writes going on) are correct.
        after = back_up(client, world, dict.fromkeys(VOLS), seed=5000)
        resolve(client, world, [after])
        # Unprotect gives the LV its own table back, and the pool its metadata space.
        before = read_all(world.volumes["thick"])
        client.call("Unprotect", "sb", "thick", False)
        assert dm_type(f"{VG}-thick") == "linear" and "era-thick" not in pool_lvs()
        assert not [n for n in dm_names() if n.startswith("blockguard-")]
        assert read_all(world.volumes["thick"]) == before
    assert "Traceback" not in daemon.log()
    t3 = time.monotonic()
    print(f"guest times: history {t1 - t0:.1f}s, overflow+kill {t2 - t1:.1f}s, "
          f"restart {t3 - t2:.1f}s")  # fmt: skip


def wait_running(client: Client, jobs: dict[str, str], timeout: float = 60) -> None:
    """Until every job is copying: running, some but not all bytes done."""
    deadline = time.monotonic() + scaled(timeout)
    pending = set(jobs)
    while pending:
        for vol in list(pending):
            props = client.properties(jobs[vol], JOB)
            assert props["State"] not in ("done", "failed"), (vol, props)
            if props["State"] == "running" and 0 < props["BytesDone"] < props["BytesTotal"]:
                pending.discard(vol)
        assert time.monotonic() < deadline, f"jobs {pending} never got going"
        time.sleep(0.02)
