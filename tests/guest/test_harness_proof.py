"""Proof that the guest harness gives real device-mapper: dm-era, thin pools, dm-snapshot.

Each test goes through the kernel for real; removing its device-mapper step (the
checkpoint, the thin snapshot, the snapshot target) makes it fail.
"""

from __future__ import annotations

import hashlib
import os
import stat
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import pytest

from blockguard.storage.blockdev import BlockDevice, aligned_buffer
from blockguard.storage.runner import Runner

pytestmark = pytest.mark.guest

CHUNK = 64 * 1024
SECTORS_PER_CHUNK = CHUNK // 512
RUN = Runner()


def dmsetup(*args: str) -> str:
    return RUN.run(["dmsetup", *args], timeout=60).stdout


def assert_block_device(path: str) -> None:
    st = os.stat(path)
    assert stat.S_ISBLK(st.st_mode), f"{path} is not a block device node"


def write_chunks(path: str, chunks: list[int], fill: bytes) -> None:
    """Write whole chunks with O_DIRECT so the writes reach the device before we look."""
    buf = aligned_buffer(CHUNK)
    buf[:] = fill * (CHUNK // len(fill))
    with BlockDevice(path, write=True, direct=True) as dev:
        for c in chunks:
            dev.pwrite_all(memoryview(buf), c * CHUNK)


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with BlockDevice(path) as dev, open(f"/proc/self/fd/{dev.fd}", "rb", buffering=0) as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@pytest.fixture
def dm_names() -> Iterator[list[str]]:
    """Names of dm devices a test creates; removed (in reverse) even when it fails."""
    names: list[str] = []
    yield names
    for name in reversed(names):
        RUN.run(["dmsetup", "remove", "--retry", name], timeout=60, check=False)


# --- dm-era -----------------------------------------------------------------------


def era_written_since(metadata_dev: str, era: int) -> set[int]:
    out = RUN.run(
        ["era_invalidate", "--written-since", str(era), "--metadata-snapshot", metadata_dev],
        timeout=60,
    ).stdout
    blocks: set[int] = set()
    for el in ET.fromstring(out):
        if el.tag == "block":
            blocks.add(int(el.get("block", "")))
        elif el.tag == "range":  # half-open [begin, end)
            blocks.update(range(int(el.get("begin", "")), int(el.get("end", ""))))
    return blocks


def era_status(name: str) -> list[str]:
    # "0 SECTORS era <md block size> <used>/<total> <current era> <held root or ->"
    return dmsetup("status", name).split()


def test_dm_era_names_exactly_the_blocks_written_per_era(loopdev, dm_names) -> None:
    origin, meta = loopdev(16 << 20), loopdev(4 << 20)
    RUN.run(["dd", "if=/dev/zero", f"of={meta}", "bs=4096", "count=1", "oflag=direct"], timeout=30)
    name = "bgtest-era"
    sectors = (16 << 20) // 512
    dmsetup("create", name, "--table", f"0 {sectors} era {meta} {origin} {SECTORS_PER_CHUNK}")
    dm_names.append(name)
    dev = f"/dev/mapper/{name}"
    assert_block_device(dev)

    first_era = int(era_status(name)[5])
    write_chunks(dev, [10, 11], b"A")
    dmsetup("message", name, "0", "checkpoint")
    write_chunks(dev, [100], b"B")
    dmsetup("message", name, "0", "checkpoint")
    write_chunks(dev, [200], b"C")
    assert int(era_status(name)[5]) == first_era + 2, "checkpoint did not advance the era"

    dmsetup("message", name, "0", "take_metadata_snap")
    try:
        assert era_status(name)[6] != "-", "no metadata snapshot is held"
        assert era_written_since(meta, first_era) == {10, 11, 100, 200}
        assert era_written_since(meta, first_era + 1) == {100, 200}
        assert era_written_since(meta, first_era + 2) == {200}
        assert era_written_since(meta, first_era + 3) == set()
    finally:
        dmsetup("message", name, "0", "drop_metadata_snap")


# --- LVM thin pool + thin_delta ------------------------------------------------------


def lvm(*args: str) -> str:
    return RUN.run(["lvm", *args], timeout=120).stdout


@pytest.fixture
def vg(loopdev) -> Iterator[str]:
    pv = loopdev(96 << 20)
    name = "bgtestvg"
    lvm("pvcreate", "-qq", pv)
    lvm("vgcreate", "-qq", name, pv)
    try:
        yield name
    finally:
        RUN.run(["lvm", "vgremove", "-ff", "-y", name], timeout=120, check=False)
        RUN.run(["lvm", "pvremove", "-ff", "-y", pv], timeout=120, check=False)


def thin_id(vg: str, lv: str) -> int:
    return int(lvm("lvs", "--noheadings", "-o", "thin_id", f"{vg}/{lv}").strip())


def thin_delta(vg: str, pool: str, snap1: int, snap2: int) -> set[int]:
    tpool = f"{vg}-{pool}-tpool"
    tmeta = f"/dev/mapper/{vg}-{pool}_tmeta"
    assert_block_device(tmeta)
    dmsetup("message", tpool, "0", "reserve_metadata_snap")
    try:
        out = RUN.run(
            ["thin_delta", "--metadata-snap", "--snap1", str(snap1), "--snap2", str(snap2), tmeta],
            timeout=60,
        ).stdout
    finally:
        dmsetup("message", tpool, "0", "release_metadata_snap")
    changed: set[int] = set()
    for el in ET.fromstring(out).iter():
        if el.tag in ("different", "left_only", "right_only"):
            begin, length = int(el.get("begin", "")), int(el.get("length", ""))
            changed.update(range(begin, begin + length))
    return changed


def test_thin_delta_reports_exactly_the_chunks_written_between_snapshots(vg) -> None:
    lvm("lvcreate", "-qq", "--type", "thin-pool", "-L", "64M", "-c", "64k", "-n", "pool", vg)
    lvm("lvcreate", "-qq", "-V", "128M", "-T", f"{vg}/pool", "-n", "vol")
    vol = f"/dev/{vg}/vol"
    assert_block_device(vol)
    write_chunks(vol, [0, 1, 2, 50, 51, 300], b"o")  # provisioned before the first snapshot
    lvm("lvcreate", "-qq", "-s", f"{vg}/vol", "-n", "snap1")
    written = [1, 51, 52, 700, 1000, 1001]  # overwrites of shared chunks and new ones
    write_chunks(vol, written, b"n")
    lvm("lvcreate", "-qq", "-s", f"{vg}/vol", "-n", "snap2")
    assert thin_delta(vg, "pool", thin_id(vg, "snap1"), thin_id(vg, "snap2")) == set(written)


# --- dm-snapshot --------------------------------------------------------------------


def test_dm_snapshot_keeps_its_point_in_time(loopdev, dm_names) -> None:
    size = 16 << 20
    origin, cow = loopdev(size), loopdev(8 << 20)
    write_chunks(origin, list(range(size // CHUNK)), b"0123456789abcdef")
    before = sha256_of(origin)
    sectors = size // 512
    dmsetup("create", "bgtest-origin", "--table", f"0 {sectors} snapshot-origin {origin}")
    dm_names.append("bgtest-origin")
    # As LVM does: the origin is suspended while the snapshot is added, and its resume makes
    # snapshot-origin learn the snapshot's chunk size (its split boundary). Without it, a
    # bio spanning several chunks copies only its first chunk out.
    dmsetup("suspend", "bgtest-origin")
    try:
        dmsetup("create", "bgtest-snap", "--table", f"0 {sectors} snapshot {origin} {cow} P 16")
        dm_names.append("bgtest-snap")
    finally:
        dmsetup("resume", "bgtest-origin")
    for node in ("/dev/mapper/bgtest-origin", "/dev/mapper/bgtest-snap"):
        assert_block_device(node)
    assert sha256_of("/dev/mapper/bgtest-snap") == before

    write_chunks("/dev/mapper/bgtest-origin", [0, 7, 100, 255], b"changed!")
    assert sha256_of("/dev/mapper/bgtest-origin") != before
    assert sha256_of("/dev/mapper/bgtest-snap") == before
