"""A good neighbour on a shared thin pool (issue 16 item 4), in the real kernel.

Another process (a shell loop, as an admin's script or a second backup tool would be)
reserves the thin pool's one metadata snapshot, runs ``thin_delta -m`` on it, holds it a
second, releases it, pauses, and again; it counts every command that fails. Beside it the
daemon backs up a thin LV of that pool ten times, with scattered writes between: every
backup after the first must be incremental (tracking was never declared lost), the last
one restores to the volume's bytes, and the other process never failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockguard.cli.client import JOB, Client, plain, variant
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
VG = "bgnvol"
POOL_VG = "bg_p1"
BACKUPS = 10
#: The other process: hold 1 s, then leave it free for 5 s (our listening time is longer).
NEIGHBOUR = r"""
tpool=$1 tmeta=$2 snap1=$3 snap2=$4 stop=$5 out=$6
n=0 fail=0
while [ ! -e "$stop" ]; do
    if dmsetup message "$tpool" 0 reserve_metadata_snap 2>>"$out.err"; then
        thin_delta -m --snap1 "$snap1" --snap2 "$snap2" "$tmeta" >/dev/null 2>>"$out.err" \
            || fail=$((fail + 1))
        sleep 1
        dmsetup message "$tpool" 0 release_metadata_snap 2>>"$out.err" || fail=$((fail + 1))
    else
        fail=$((fail + 1))
    fi
    n=$((n + 1))
    echo "$n $fail" > "$out"
    sleep 5
done
"""


def read_all(path: str, size: int = SIZE) -> bytes:
    buf = aligned_buffer(size)
    with BlockDevice(path, direct=True) as dev:
        dev.pread_into(memoryview(buf), 0)
    return bytes(buf)


def scattered_writes(path: str, rng: random.Random, n: int) -> None:
    """``n`` 64 KiB chunks of random data at random chunk offsets, flushed."""
    buf = aligned_buffer(CHUNK)
    with BlockDevice(path, write=True, direct=True) as dev:
        for _ in range(n):
            buf[:] = rng.randbytes(CHUNK)
            dev.pwrite_all(memoryview(buf), rng.randrange(SIZE // CHUNK) * CHUNK)
        dev.flush()


def thin_id(lv: str) -> str:
    return sh("lvm", "lvs", "--noheadings", "-o", "thin_id", f"{VG}/{lv}").strip()


@pytest.fixture
def thin_volume(pool_disks: list[str], loopdev) -> Iterator[tuple[list[str], str]]:
    """A thin LV in a thin pool with 64 KiB blocks; the pool disks; a restore target."""
    pv = loopdev(80 * MiB, "vg.img")
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


@contextlib.contextmanager
def neighbour(tmp_path: Path) -> Iterator[Path]:
    """The other process's loop (see the module docstring); yields its "RUNS FAILURES" file.

    It compares a thin snapshot of its own with the live volume, as a backup tool would.
    """
    sh("lvm", "lvcreate", "-qq", "-s", f"{VG}/vol", "-n", "other")
    tpool, tmeta = f"{VG}-tp-tpool", f"/dev/mapper/{VG}-tp_tmeta"
    sh("dmsetup", "mknodes", f"{VG}-tp_tmeta")
    stop, out = tmp_path / "neighbour.stop", tmp_path / "neighbour.count"
    proc = subprocess.Popen(
        ["bash", "-c", NEIGHBOUR, "neighbour", tpool, tmeta, thin_id("other"), thin_id("vol"),
         str(stop), str(out)],
    )  # fmt: skip
    try:
        yield out
    finally:
        stop.touch()
        try:
            proc.wait(timeout=scaled(30))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # It may have been stopped between its reserve and its release.
        sh("dmsetup", "message", tpool, "0", "release_metadata_snap", check=False)


def counts(out: Path) -> tuple[int, int]:
    text = out.read_text().split() if out.exists() else ["0", "0"]
    return int(text[0]), int(text[1])


def wait_job(client: Client, job: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + scaled(timeout)
    while True:
        props = client.properties(job, JOB)
        if props["State"] in ("done", "failed"):
            return props
        assert time.monotonic() < deadline, f"job {job} did not finish"
        time.sleep(0.2)


def test_backups_stay_incremental_beside_another_metadata_snapshot_user(
    thin_volume: tuple[list[str], str], tmp_path: Path
) -> None:
    disks, target = thin_volume
    vol = f"/dev/{VG}/vol"
    rng = random.Random(16)
    scattered_writes(vol, rng, 64)
    results = Path(__file__).resolve().parents[2] / "results" / "thin-neighbour"
    env = {"BLOCKGUARD_THIN_METADATA_QUIET": "10", "BLOCKGUARD_THIN_METADATA_WAIT": "120"}
    with (
        engine_on_private_bus(tmp_path, results) as engine,
        neighbour(tmp_path) as count,
    ):
        daemon = engine.start(**env)
        with Client(daemon.address) as client:
            client.call("CreatePool", "ssasb", "p1", "lvm", disks, False)
            client.call("Protect", "sstssa{sv}", vol, "vol", CHUNK, "", "", {})
            client.call("SetObjectives", "sa{sv}", "vol", {"generations": variant(BACKUPS + 2)})
            methods, walls = [], []
            for n in range(BACKUPS):
                if n:
                    scattered_writes(vol, rng, rng.randrange(4, 24))
                t0 = time.monotonic()
                props = wait_job(client, client.call("BackupNow", "s", "vol"))
                walls.append(time.monotonic() - t0)
                assert props["State"] == "done", (n, props["Error"])
                methods.append(props["Result"]["method"])
                assert methods[-1] == ("full" if n == 0 else "incremental"), (
                    n,
                    props["Result"]["reasons"],
                )
            want = hashlib.sha256(read_all(vol)).hexdigest()
            job = client.call("Restore", "ssssb", "vol", props["Result"]["generation"], "copy",
                              target, False)  # fmt: skip
            restored = wait_job(client, job)
            assert restored["State"] == "done", restored["Error"]
            assert hashlib.sha256(read_all(target)).hexdigest() == want
            state = plain(client.call("Plan", "s", "vol"))
        runs, failures = counts(count)
    err = (tmp_path / "neighbour.count.err").read_text() if runs else ""
    print(f"backup walls (s): {[round(w, 1) for w in walls]}; neighbour runs {runs}")
    print(f"plan after: {state.get('method')} {state.get('reasons')}")
    # Polls were skipped while the neighbour was about, yet the status is not stale: the
    # daemon knows its full and plans the next incremental.
    assert state["method"] == "incremental", state
    assert runs >= 2, "the other process did not run beside the backups"
    assert failures == 0, err
