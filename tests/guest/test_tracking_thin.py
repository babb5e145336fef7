"""Thin-snapshot tracking against the real kernel: exact sets per reference, faults."""

from __future__ import annotations

import hashlib
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroaring import BitMap

from blockguard.errors import EnvironmentProblem, TrackingLost
from blockguard.storage.blockdev import BlockDevice
from blockguard.storage.tracking.thin import ThinTracker
from tests.guest.workload import random_writes

pytestmark = pytest.mark.guest

CHUNK = 64 * 1024
SIZE = 32 << 20
VG = "bgthin"


def lvm(*args: str) -> str:
    return subprocess.run(["lvm", *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def thin_lv(loopdev) -> Iterator[str]:
    pv = loopdev(128 << 20)
    lvm("pvcreate", "-qq", pv)
    lvm("vgcreate", "-qq", VG, pv)
    lvm("lvcreate", "-qq", "--type", "thin-pool", "-L", "64M", "-c", "64k", "-n", "pool", VG)
    lvm("lvcreate", "-qq", "-V", f"{SIZE >> 20}M", "-T", f"{VG}/pool", "-n", "vol")
    try:
        yield "vol"
    finally:
        subprocess.run(["lvm", "vgremove", "-ff", "-y", VG], capture_output=True)
        subprocess.run(["lvm", "pvremove", "-ff", "-y", pv], capture_output=True)


def sha256_of(path: str) -> str:
    with BlockDevice(path) as dev, open(f"/proc/self/fd/{dev.fd}", "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def test_thin_sets_equal_writes_per_reference(thin_lv: str, tmp_path: Path) -> None:
    rng = random.Random(11)
    t = ThinTracker.protect(VG, thin_lv, tmp_path / "st", CHUNK)
    dev = f"/dev/{VG}/{thin_lv}"
    random_writes(dev, SIZE, CHUNK, rng, 30)  # some data before the first reference
    expected: dict[str, BitMap] = {}
    content: dict[str, str] = {}
    round_writes: list[BitMap] = []
    for rnd in range(4):
        ref = f"r{rnd}"
        t.add_reference(ref)
        content[ref] = sha256_of(dev)
        expected[ref] = BitMap()
        written = random_writes(dev, SIZE, CHUNK, rng, rng.randrange(5, 40))
        round_writes.append(written)
        for bm in expected.values():
            bm |= written
        if rnd == 2:
            t.drop_reference("r1")
            del expected["r1"], content["r1"]
        got = t.changed_many(list(expected))
        assert t.changed_many([]) == {}
        for name, bm in expected.items():
            assert got[name].chunks == bm, f"round {rnd}, reference {name}"
    assert t.state().is_exact
    # The reference snapshot is the point-in-time copy source: content as it was then.
    assert sha256_of(t.reference_device("r0")) == content["r0"]
    # Only the snapshots a reference needs are kept.
    snaps = [x.split()[0] for x in lvm("lvs", "--noheadings", "-o", "lv_name", VG).splitlines()]
    assert sorted(s for s in snaps if s.startswith("bgref-")) == sorted(t._s.references.values())
    # After a restart, from saved state; and between two references' snapshots exactly:
    # what round 2 wrote (r2's set minus r3's is not it: round 3 may rewrite those chunks).
    reopened = ThinTracker.open(tmp_path / "st")
    assert reopened.changed("r3").chunks == expected["r3"]
    assert reopened.changed_between("r2", "r3").chunks == round_writes[2]


def test_missing_snapshot_makes_state_unknown(thin_lv: str, tmp_path: Path) -> None:
    t = ThinTracker.protect(VG, thin_lv, tmp_path / "st", CHUNK)
    t.add_reference("last-backup")
    lvm("lvremove", "-qq", "-f", f"{VG}/{t._s.references['last-backup']}")
    state = t.state()
    assert not state.is_exact and "is missing" in state.reason
    with pytest.raises(TrackingLost, match="missing"):
        t.changed("last-backup")


def test_snapshot_refused_when_pool_nearly_full(thin_lv: str, tmp_path: Path) -> None:
    t = ThinTracker.protect(VG, thin_lv, tmp_path / "st", CHUNK)
    # Fill the 64 MiB pool past 90 % through a second thin volume.
    lvm("lvcreate", "-qq", "-V", "64M", "-T", f"{VG}/pool", "-n", "filler")
    with BlockDevice(f"/dev/{VG}/filler", write=True) as f:
        for i in range(60):
            f.pwrite_all(b"\xff" * (1 << 20), i << 20)
        f.flush()
    before = lvm("lvs", "--noheadings", "-o", "lv_name", VG)
    with pytest.raises(EnvironmentProblem, match="too full for another snapshot"):
        t.add_reference("r0")
    assert lvm("lvs", "--noheadings", "-o", "lv_name", VG) == before
    assert t.references() == []


def test_stopping_tracking_removes_its_snapshots_and_nothing_else(
    thin_lv: str, tmp_path: Path
) -> None:
    """Unprotect (VolumeTracking.remove) takes the tracker's snapshots with it; an LV
    with a look-alike name stays."""
    from blockguard.engine.tracking import VolumeTracking
    from blockguard.storage.runner import default_runner

    t = ThinTracker.protect(VG, thin_lv, tmp_path / "vol", CHUNK)
    t.add_reference("r0")
    t.add_reference("r1")
    lvm("lvcreate", "-qq", "-s", "-n", "bgref-vol-99", f"{VG}/{thin_lv}")
    VolumeTracking(tmp_path / "vol", t, default_runner()).remove()
    snaps = [x.split()[0] for x in lvm("lvs", "--noheadings", "-o", "lv_name", VG).splitlines()]
    assert sorted(s for s in snaps if s.startswith("bgref-")) == ["bgref-vol-99"]
    assert thin_lv in snaps and not (tmp_path / "vol").exists()
