"""Import of an lvm pool after the catalog was lost, in the guest (device-mapper).

The real daemon on a private bus: an lvm pool on the harness's two disks, one volume
(scan tracking, kept small), three generations. The catalog is deleted; the daemon
refuses to start until told, then ``ImportPool`` rebuilds it from the VG's metadata LV
and every generation restores bit-exact onto a scratch loop device.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockguard.cli.client import VOLUME, Client, plain
from tests.guest import test_lvmpool as lp
from tests.guest.daemon_fixture import EngineHarness, engine_on_private_bus, sh
from tests.support.daemon import ENGINE, ENGINE_ENV, start_daemon

pytestmark = pytest.mark.guest
pool_disks = lp.pool_disks

MiB = 1 << 20
SIZE = 16 * MiB
POOL_VG = "bg_p1"


def sha_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(SIZE)).hexdigest()


def write(path: str, offset: int, length: int, seed: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(random.Random(seed).randbytes(length))
        f.flush()
        os.fsync(f.fileno())


@pytest.fixture
def engine(pool_disks: list[str], tmp_path: Path) -> Iterator[EngineHarness]:
    results = Path(__file__).resolve().parents[2] / "results" / "import-guest"
    try:
        with engine_on_private_bus(tmp_path, results) as harness:
            yield harness
    finally:
        lp.forget_vg(POOL_VG)


def test_lvm_pool_import_after_the_catalog_is_lost(
    engine: EngineHarness, pool_disks: list[str], loopdev: object
) -> None:
    volume = loopdev(SIZE, "vol.img")  # type: ignore[operator]
    scratch = loopdev(SIZE, "scratch.img")  # type: ignore[operator]
    # What the disks look like when the test starts (shown only if it fails).
    for argv in (
        ["lsblk", "-o", "NAME,TYPE,SIZE,FSTYPE,MOUNTPOINT"],
        ["lvm", "pvs", "-a"],
        ["lvm", "vgs"],
    ):
        print("$", " ".join(argv), "\n", sh(*argv, check=False))
    daemon = engine.start()
    points: dict[str, str] = {}
    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "lvm", pool_disks, False)
        client.call("Protect", "sstssa{sv}", volume, "v", 0, "scan", "", {})
        for n, (offset, length) in enumerate([(0, SIZE), (MiB, 2 * MiB), (8 * MiB, MiB)]):
            write(volume, offset, length, seed=n)
            job = client.call("BackupNow", "s", "v")
            props = client.wait_job(job, interval=0.2, timeout=600)
            assert props["State"] == "done", props["Error"]
            points[str(props["Result"]["generation"])] = sha_of(volume)
        before = plain(client.call("ListGenerations", "s", "v"))
    assert daemon.stop(60) == 0

    state = daemon.state_dir
    for suffix in ("", "-wal", "-shm"):
        Path(f"{state}/catalog.db{suffix}").unlink(missing_ok=True)
    refused = start_daemon(
        engine.bus, engine.tmp_path, engine.notify, "--service", ENGINE, env=ENGINE_ENV,
        wait_ready=False,
    )  # fmt: skip
    engine.daemons.append(refused)
    assert refused.process.wait(300) == 7, refused.log()
    assert "pool import" in refused.log()

    daemon = engine.start(BLOCKGUARD_ALLOW_EMPTY_CATALOG="1")
    with Client(daemon.address) as client:
        assert client.call("ImportPool", "as", pool_disks) == "p1"
        assert plain(client.call("ListGenerations", "s", "v")) == before
        props = client.properties("/org/blockguard1/volume/v", VOLUME)
        assert props["Device"] == volume and props["TrackerState"] != "detached", props
        for gen, digest in points.items():
            job = client.call("Restore", "ssssb", "v", gen, "copy", scratch, False)
            result = client.wait_job(job, interval=0.2, timeout=600)
            assert result["State"] == "done", (gen, result["Error"])
            assert sha_of(scratch) == digest, gen
    assert daemon.stop(60) == 0
    assert "Traceback" not in daemon.log()
