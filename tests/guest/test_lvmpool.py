"""The lvm pool in the real kernel: histories through point-in-time copies, every restore
mode bit-exact, retention, flipped bytes, garbage, capacity, and registration refusals.

The pool lives on the harness's two virtio disks when ``BLOCKGUARD_VM_DISKS`` names them
(wiped before and after), else on loop devices. The protected volumes are LVs in a VG of
their own on a loop device.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blockguard.core.vocab import GenerationKind
from blockguard.errors import (
    ChecksumMismatch,
    DeviceInUse,
    DeviceTooSmall,
    PoolSpaceLow,
    ProtectedDevice,
)
from blockguard.storage.backup import run_backup
from blockguard.storage.blockdev import BlockDevice, aligned_buffer
from blockguard.storage.manifest import MANIFEST_NAME, VolumeIdentity
from blockguard.storage.pool.base import GenerationSpec, SpaceAlert
from blockguard.storage.pool.lvmgen import lv_name_of
from blockguard.storage.pool.lvmpool import META_LV, LvmPool
from blockguard.storage.restore import restore_in_place, restore_to_device, swap_in, verify
from blockguard.storage.snapshot import (
    PREFIX,
    DmSnapshotPointInTime,
    PointInTime,
    ThinPointInTime,
    backup_point_in_time,
)
from blockguard.storage.tracking.era import EraTracker
from blockguard.storage.tracking.thin import ThinTracker
from tests.fsutil import frozen
from tests.guest.workload import random_writes

pytestmark = pytest.mark.guest

MiB = 1 << 20
CHUNK = 64 << 10
SIZE = 8 * MiB
VOLVG = "bglvol"
KINDS = [
    "full", "incremental", "incremental", "differential", "incremental",
    "full", "incremental", "differential", "incremental", "incremental",
]  # fmt: skip


def sh(*argv: str, check: bool = True) -> str:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=300).stdout


def sha256_of(path: str, size: int = SIZE) -> str:
    h = hashlib.sha256()
    with BlockDevice(path) as dev, open(f"/proc/self/fd/{dev.fd}", "rb", buffering=0) as f:
        left = size
        while left:
            block = f.read(min(4 * MiB, left))
            assert block, f"{path} ended early"
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def lv_names(vg: str) -> set[str]:
    out = sh("lvm", "lvs", "--noheadings", "-o", "lv_name", vg, check=False)
    return {x.strip() for x in out.splitlines() if x.strip()}


def pit_layers() -> list[str]:
    return [x.split()[0] for x in sh("dmsetup", "ls").splitlines() if x.startswith(PREFIX)]


def wipe(dev: str) -> None:
    sh("wipefs", "-a", "-q", dev, check=False)
    with BlockDevice(dev, write=True) as d:
        d.pwrite_all(bytes(MiB), 0)
        d.flush()


@pytest.fixture
def pool_disks(loopdev) -> Iterator[list[str]]:
    """Two pool disks: the harness's throwaway virtio disks, or loop devices."""
    disks = [d for d in os.environ.get("BLOCKGUARD_VM_DISKS", "").split() if "/dev/vd" in d]
    if len(disks) < 2:
        disks = [loopdev(768 * MiB, "pool0.img"), loopdev(768 * MiB, "pool1.img")]
    disks = disks[:2]
    for d in disks:
        release(d)
    try:
        yield disks
    finally:
        for d in disks:
            release(d)


def holders(dev: str) -> list[str]:
    base = Path("/sys/class/block") / Path(os.path.realpath(dev)).name / "holders"
    return sorted(p.name for p in base.iterdir()) if base.exists() else []


def forget_vg(vg: str) -> None:
    """Remove a VG a test made, and the /dev/VG directory lvm leaves behind without udev.

    LVs whose dm devices were taken apart with dmsetup keep their /dev/VG/LV symlinks (lvm
    makes them itself when no udev runs, and only removes those it deactivates); a later
    ``vgcreate`` of the same name then fails with "/dev/VG: already exists in filesystem".
    Only dangling symlinks are removed, and the directory only once it is empty.
    """
    sh("lvm", "vgremove", "-ff", "-y", vg, check=False)
    top = Path("/dev") / vg
    if top.is_dir() and not top.is_symlink():
        for link in top.iterdir():
            if link.is_symlink() and not link.exists():
                link.unlink()
        with contextlib.suppress(OSError):
            top.rmdir()


def release(dev: str) -> None:
    """Give a pool disk back blank: remove the VG on it (named by the disk's own PV label,
    so only what a test made there), its PV label and the first MiB. A disk still held by a
    device-mapper device afterwards fails here, naming the holder, not later in vgcreate."""
    vg = sh("lvm", "pvs", "--noheadings", "-o", "vg_name", dev, check=False).strip()
    if vg:
        for mnt in sh("findmnt", "-rn", "-o", "TARGET", "-S", f"/dev/mapper/{vg}-{META_LV}",
                      check=False).split():  # fmt: skip
            sh("umount", "-l", mnt, check=False)
        forget_vg(vg)
    sh("lvm", "pvremove", "-ff", "-y", dev, check=False)
    wipe(dev)
    left = holders(dev)
    assert not left, f"{dev} is still held by {left} (a device an earlier test left behind)"


@pytest.fixture
def make_pool(pool_disks: list[str], tmp_path: Path) -> Iterator[Callable[..., LvmPool]]:
    made: list[LvmPool] = []

    def make(name: str = "lvp", **kw: object) -> LvmPool:
        pool = LvmPool.create(name, pool_disks, tmp_path / "mnt", **kw)  # type: ignore[arg-type]
        made.append(pool)
        return pool

    try:
        yield make
    finally:
        for p in made:
            p.destroy()


@pytest.fixture
def volvg(loopdev) -> Iterator[str]:
    """A VG for the protected volumes (a thin pool and room for thick LVs)."""
    pv = loopdev(112 * MiB, "volvg.img")
    sh("lvm", "pvcreate", "-qq", pv)
    sh("lvm", "vgcreate", "-qq", VOLVG, pv)
    try:
        yield VOLVG
    finally:
        for name in pit_layers():
            sh("dmsetup", "remove", "--retry", name, check=False)
        sh("lvm", "vgremove", "-ff", "-y", VOLVG, check=False)
        sh("lvm", "pvremove", "-ff", "-y", pv, check=False)


@pytest.fixture
def era_volume(volvg: str, tmp_path: Path) -> Iterator[EraTracker]:
    """A thick LV under dm-era (interposed: the LV keeps its path)."""
    sh("lvm", "lvcreate", "-qq", "-y", "-L", f"{SIZE >> 20}M", "-n", "data", volvg)
    sh("lvm", "lvcreate", "-qq", "-y", "-L", "4M", "-n", "eram", volvg)
    t = EraTracker.protect(f"/dev/{volvg}/data", f"/dev/{volvg}/eram", tmp_path / "era", CHUNK)
    try:
        yield t
    finally:
        t.detach()


class Writer(threading.Thread):
    """Keeps writing 4 KiB blocks (O_DIRECT) to the volume while a backup runs, to its
    first eighth (throttled: the volume keeps changing, but not all of it)."""

    def __init__(self, path: str, seed: int) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.writes = 0

    def run(self) -> None:
        buf = aligned_buffer(4096)
        with BlockDevice(self.path, write=True, direct=True) as dev:
            while not self.stop.wait(0.03):
                buf[:] = self.rng.randbytes(4096)
                dev.pwrite_all(memoryview(buf), self.rng.randrange(SIZE // 4096 // 8) * 4096)
                self.writes += 1

    def __enter__(self) -> Writer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.join()


def make_history(
    pool: LvmPool,
    volume: str,
    new_pit: Callable[[str], PointInTime],
    kinds: list[str],
    seed: int,
    keep: int | None = None,
) -> list[tuple[str, str]]:
    """Back up ``volume`` once per kind, writing before and during each backup;
    returns [(generation id, sha256 of the point-in-time copy it was taken from)]."""
    rng = random.Random(seed)
    ident = VolumeIdentity("vol", SIZE)
    history: list[tuple[str, str]] = []
    refs: dict[str, str] = {}
    last = last_full = None
    for i, kind in enumerate(kinds):
        t0 = time.monotonic()
        random_writes(volume, SIZE, CHUNK, rng, rng.randrange(3, 15))
        ref = last if kind == "incremental" else last_full
        with new_pit(f"b{i}") as pit:
            sha = sha256_of(pit.source)
            changed = pit.changed_since(refs[ref]).chunks if ref else None
            with Writer(volume, seed + i) as w:
                r = backup_point_in_time(
                    pit,
                    pool,
                    ident,
                    kind,
                    changed,
                    chunk_size=CHUNK,
                    base_id=ref if kind != "incremental" else None,
                    parent_id=ref if kind == "incremental" else None,
                    keep=keep,
                    extent_bytes=2 * MiB,
                )
            assert w.writes > 0, "the volume was not written during the backup"
            assert sha256_of(pit.source) == sha, "the point-in-time copy changed"
            assert sha256_of(volume) != sha
        print(f"{kind}: {time.monotonic() - t0:.1f} s, backup {r.duration:.1f} s")
        gid = r.manifest.generation_id
        refs[gid] = f"b{i}"
        history.append((gid, sha))
        last = gid
        if kind == "full":
            last_full = gid
    return history


def restore_every_mode(pool: LvmPool, volume: str, target: str, gid: str, sha: str) -> None:
    t0 = time.monotonic()
    r = restore_to_device(pool, "vol", gid, target)
    assert sha256_of(target) == sha, f"restore to a new device of {gid}"
    assert r.bytes_written == SIZE and pool.manifest("vol", r.chain[0]).is_full
    restore_in_place(pool, "vol", gid, volume, force=True)
    assert sha256_of(volume) == sha, f"in-place restore of {gid}"
    r = swap_in(pool, "vol", gid)
    try:
        assert r.swap is not None and r.swap.image and r.swap.image.startswith(pool.vg + "/s-")
        assert sha256_of(r.target) == sha, f"swap-in of {gid}"
        # Listed with its device, and released by name (as ReleaseSwapIn does).
        assert pool.swap_in_devices() == [(r.swap.image, r.target)]
        pool.release_swap_in(r.swap.image)
        assert pool.swap_ins() == []
    finally:
        assert r.swap is not None
        if pool.swap_ins():
            r.swap.release()
    verify(pool, "vol", gid)
    print(f"restores of {gid}: {time.monotonic() - t0:.1f} s")


def test_era_thick_lv_history_restores_by_every_mode(
    make_pool, pool_disks: list[str], era_volume: EraTracker, loopdev
) -> None:
    fast, slow = pool_disks
    pool = make_pool(thin_device=fast)
    pool.preferred_device = slow  # deltas here, fulls in the thin pool on the other disk
    volume = era_volume.device
    top_table = sh("dmsetup", "table", f"{VOLVG}-data")

    # One exception store, kept for the volume's next copy (as the daemon would).
    cow = pool.cow_store(4 * MiB, "vol")

    def new_pit(name: str) -> PointInTime:
        return DmSnapshotPointInTime(volume, cow, tracker=era_volume, name=name, keep_cow=True)

    history = make_history(pool, volume, new_pit, KINDS[:8], seed=40)
    cow.release()
    gens = pool.generations("vol")
    assert [m.kind.value for m in gens] == KINDS[:8]
    assert [m.generation_id for m in gens] == [g for g, _ in history]
    # Fulls: thin LVs; the second a thin snapshot of the first plus the changed chunks.
    assert gens[5].cloned_from == gens[0].generation_id
    assert gens[5].bytes_stored == len(gens[5].changed) * CHUNK < SIZE
    for m in gens:
        where = pool.lv_devices(m)
        assert where == ([] if not m.changed else [fast] if m.is_full else [slow]), m.kind
    # The point-in-time layers are gone and the era table is back, still exact.
    assert pit_layers() == []
    assert sh("dmsetup", "table", f"{VOLVG}-data") == top_table
    assert not any(n.startswith("cow-") for n in lv_names(pool.vg))
    assert era_volume.state().is_exact
    target = loopdev(SIZE, "target.img")
    for gid, sha in history:
        restore_every_mode(pool, volume, target, gid, sha)
    assert pool.swap_ins() == []


def test_thin_volume_history_keep_three(make_pool, volvg: str, loopdev, tmp_path: Path) -> None:
    """Keep 3 after every commit over 10 generations; every kept one restores."""
    pool = make_pool()
    sh("lvm", "lvcreate", "-qq", "-y", "--type", "thin-pool", "-L", "64M", "-c", "64k",
       "-n", "tp", volvg)  # fmt: skip
    sh("lvm", "lvcreate", "-qq", "-y", "-V", f"{SIZE >> 20}M", "-T", f"{volvg}/tp", "-n", "thin")
    tracker = ThinTracker.protect(volvg, "thin", tmp_path / "thin", CHUNK)
    volume = f"/dev/{volvg}/thin"
    history = make_history(
        pool, volume, lambda n: ThinPointInTime(tracker, n), KINDS, seed=50, keep=3
    )
    kept = pool.generations("vol")
    shas = dict(history)
    assert 3 <= len(kept) < len(KINDS)
    assert [m.generation_id for m in kept[-3:]] == [g for g, _ in history[-3:]]
    stored = {lv_name_of(m.generation_id) for m in kept if m.storage.get("lv")}
    assert {n for n in lv_names(pool.vg) if n.startswith("g")} == stored, "freed LVs remain"
    target = loopdev(SIZE, "target.img")
    for m in kept:
        assert pool.chain("vol", m.generation_id)[0].is_full
        restore_every_mode(pool, volume, target, m.generation_id, shas[m.generation_id])


def flip_byte(pool: LvmPool, gid: str, chunk: int) -> None:
    m = pool.manifest("vol", gid)
    offset = m.checksum_slot(chunk) * m.chunk_size + 1234
    buf = aligned_buffer(4096)
    with BlockDevice(pool._lv_device(m.storage["lv"]), write=True, direct=True) as dev:
        base = offset // 4096 * 4096
        dev.pread_into(memoryview(buf), base)
        buf[offset - base] ^= 0x40
        dev.pwrite_all(memoryview(buf), base)
        dev.flush()


def test_flipped_byte_caught_by_restore_verify_and_swap_in(make_pool, loopdev) -> None:
    pool = make_pool()
    vol, target = loopdev(SIZE, "vol.img"), loopdev(SIZE, "target.img")
    rng = random.Random(9)
    ident = VolumeIdentity("vol", SIZE)
    random_writes(vol, SIZE, CHUNK, rng, 40)
    full = run_backup(pool, ident, vol, "full", None, chunk_size=CHUNK).manifest
    changed = random_writes(vol, SIZE, CHUNK, rng, 20)
    incr = run_backup(
        pool, ident, vol, "incremental", changed, chunk_size=CHUNK, parent_id=full.generation_id
    ).manifest
    bad = sorted(incr.changed)[len(incr.changed) // 2]
    flip_byte(pool, incr.generation_id, bad)
    expected = f"generation {incr.generation_id} at chunk {bad}"
    for action in (
        lambda: verify(pool, "vol", incr.generation_id),
        lambda: restore_to_device(pool, "vol", incr.generation_id, target),
        lambda: swap_in(pool, "vol", incr.generation_id),
    ):
        with pytest.raises(ChecksumMismatch, match=expected):
            action()
    assert pool.swap_ins() == []  # a failed swap-in leaves nothing behind
    bad = next(c for c in range(SIZE // CHUNK) if c not in incr.changed)
    flip_byte(pool, full.generation_id, bad)
    expected = f"generation {full.generation_id} at chunk {bad}"
    for action in (
        lambda: verify(pool, "vol", full.generation_id),
        lambda: restore_to_device(pool, "vol", full.generation_id, target),
        lambda: swap_in(pool, "vol", full.generation_id),  # the clone's own chunks are read
    ):
        with pytest.raises(ChecksumMismatch, match=expected):
            action()
    assert pool.swap_ins() == []


def test_reopen_removes_garbage_capacity_and_alert(make_pool, loopdev, tmp_path: Path) -> None:
    alerts: list[SpaceAlert] = []
    pool = make_pool(alert=alerts.append)
    disks = [d.path for d in pool.devices()]
    vol = loopdev(SIZE, "vol.img")
    ident = VolumeIdentity("vol", SIZE)
    written = random_writes(vol, SIZE, CHUNK, random.Random(1), 30)
    before = pool.capacity()
    assert before.total >= sum(d.size for d in pool.devices()) * 0.95
    full = run_backup(pool, ident, vol, "full", None, chunk_size=CHUNK).manifest
    keep = run_backup(pool, ident, vol, "full", None, chunk_size=CHUNK).manifest
    # Each new full maps a thin block per chunk with data; its zero chunks stay unmapped.
    used = before.free - pool.capacity().free
    assert 2 * len(written) * CHUNK <= used < 2 * SIZE
    # Garbage 1: a writer that died after writing chunks (its lock is gone with it).
    w = pool.begin_generation(GenerationSpec(
        ident, GenerationKind.INCREMENTAL, CHUNK, random_writes(vol, SIZE, CHUNK,
        random.Random(2), 5), base_id=full.generation_id, parent_id=full.generation_id,
    ))  # fmt: skip
    assert w.lv in lv_names(pool.vg)
    w.data.target.close()  # type: ignore[union-attr]
    os.close(w._lock_fd)  # type: ignore[attr-defined]
    w._lock_fd = -1  # type: ignore[attr-defined]
    dead = w.draft.generation_id
    # Garbage 2: an interrupted removal; 3: an exception store nobody holds.
    gen_dir = pool._gen_dir("vol", full.generation_id)
    os.rename(gen_dir, gen_dir.with_name(gen_dir.name + ".deleted"))
    pool.cow_store(MiB, "stray")
    pool.close()

    pool = LvmPool.open("lvp", disks, tmp_path / "mnt")
    try:
        assert [m.generation_id for m in pool.generations("vol")] == [keep.generation_id]
        names = lv_names(pool.vg)
        assert {n for n in names if n.startswith(("g", "cow-"))} == {lv_name_of(keep.generation_id)}
        assert lv_name_of(dead) not in names
        dirs = [p.name for p in (pool.meta_dir / "volumes" / "vol").iterdir()]
        assert dirs == [keep.generation_id]
        assert (pool.meta_dir / "volumes" / "vol" / dirs[0] / MANIFEST_NAME).exists()
        restore_to_device(pool, "vol", keep.generation_id, loopdev(SIZE, "t.img"))
        # The space alert, and a refusal that leaves nothing behind.
        free = pool.capacity().free
        pool.alert = alerts.append
        assert pool.check_space(free + 1, "vol") is not None
        assert alerts and alerts[-1].needed == free + 1 and alerts[-1].volume == "vol"
        huge = VolumeIdentity("huge", 64 << 30)
        with pytest.raises(PoolSpaceLow):
            pool.begin_generation(GenerationSpec(huge, GenerationKind.FULL, CHUNK))
        assert pool.generations("huge") == []
        assert {n for n in lv_names(pool.vg) if n.startswith("g")} == {
            lv_name_of(keep.generation_id)
        }
    finally:
        pool.close()


# --- registration refusals ---------------------------------------------------------------


def head_sha(dev: str) -> str:
    with BlockDevice(dev) as d:
        return hashlib.sha256(os.pread(d.fd, 4 * MiB, 0)).hexdigest()


def assert_refused(devs: list[str], root: Path, match: str, error=DeviceInUse, **kw) -> None:
    before = [head_sha(d) for d in devs]
    with pytest.raises(error, match=match):
        LvmPool.create("refused", devs, root, **kw)
    assert [head_sha(d) for d in devs] == before, "a refused registration changed a disk"
    assert "bg_refused" not in sh("lvm", "vgs", "--noheadings", "-o", "vg_name", check=False)


def test_registration_refuses_each_in_use_case(loopdev, tmp_path: Path) -> None:
    root = tmp_path / "mnt"
    good = loopdev(160 * MiB, "good.img")
    made: list[LvmPool] = []
    try:
        # Mounted.
        dev = loopdev(160 * MiB, "mounted.img")
        sh("mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
        (tmp_path / "m").mkdir()
        sh("mount", dev, str(tmp_path / "m"))
        try:
            # Frozen: a mounted ext4 writes its journal on its own (see tests/fsutil.py).
            with frozen(tmp_path / "m"):
                assert_refused([good, dev], root, f"it is mounted on {tmp_path / 'm'}", force=True)
        finally:
            sh("umount", str(tmp_path / "m"))
        # Held: a dm device is built on it.
        dev = loopdev(160 * MiB, "held.img")
        sh("dmsetup", "create", "bgtest-holder", "--table", f"0 2048 linear {dev} 0")
        try:
            assert_refused([dev], root, r"it is held by dm-\d+", force=True)
        finally:
            sh("dmsetup", "remove", "--retry", "bgtest-holder")
        # Partitions (a DOS label with one partition; the kernel reads it).
        img = tmp_path / "parted.img"
        dev = loopdev(160 * MiB, "parted.img")
        sh("losetup", "-d", dev)
        loopdev.devices.remove(dev)
        entry = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little")
        entry += (65536).to_bytes(4, "little")
        with open(img, "r+b") as f:
            f.seek(446)
            f.write(entry + bytes(48) + b"\x55\xaa")
        dev = sh("losetup", "--find", "--show", "-P", str(img)).strip()
        loopdev.devices.append(dev)
        assert_refused([dev], root, r"it has partitions \(.*p1\).*force would overwrite")
        # An LVM physical volume, a file system.
        pv = loopdev(160 * MiB, "pv.img")
        sh("lvm", "pvcreate", "-qq", pv)
        assert_refused([pv], root, "it is an LVM physical volume.*force would overwrite")
        fs = loopdev(160 * MiB, "fs.img")
        sh("mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", fs)
        assert_refused([fs], root, "it contains a ext4 signature.*force would overwrite")
        # Protected, too small: not even with force.
        assert_refused([good], root, f"it is {good}, the device of protected volume",
                       ProtectedDevice, protected=[good], force=True)  # fmt: skip
        assert_refused([loopdev(64 * MiB, "small.img")], root, "too small", DeviceTooSmall,
                       force=True)  # fmt: skip
        # Forced, the "has data" cases are taken over.
        pool = LvmPool.create("forced", [dev, pv, fs], root, force=True)
        made.append(pool)
        assert len(pool.devices()) == 3
        assert not Path(f"/sys/class/block/{os.path.basename(dev)}p1").exists()
        assert pool.capacity().free > 200 * MiB
    finally:
        for p in made:
            p.destroy()


def test_damage_is_reported_and_verify_reads_the_whole_chain(make_pool, loopdev) -> None:
    from blockguard.storage.restore import verify

    pool = make_pool()
    vol = loopdev(SIZE, "vol.img")
    rng = random.Random(11)
    ident = VolumeIdentity("vol", SIZE)
    random_writes(vol, SIZE, CHUNK, rng, 40)
    gens = [run_backup(pool, ident, vol, "full", None, chunk_size=CHUNK).manifest]
    for _ in range(2):
        changed = random_writes(vol, SIZE, CHUNK, rng, 10)
        gens.append(
            run_backup(
                pool, ident, vol, "incremental", changed, chunk_size=CHUNK,
                parent_id=gens[-1].generation_id,
            ).manifest
        )  # fmt: skip
    assert verify(pool, "vol", gens[2].generation_id, whole_chain=True).chain == tuple(
        m.generation_id for m in gens
    )
    bad = next(c for c in range(SIZE // CHUNK) if c not in gens[1].changed | gens[2].changed)
    flip_byte(pool, gens[0].generation_id, bad)
    with pytest.raises(ChecksumMismatch, match=f"generation {gens[0].generation_id} at chunk"):
        verify(pool, "vol", gens[2].generation_id, whole_chain=True)

    assert pool.mark_damaged("vol", gens[0].generation_id, "a bad chunk", bad)
    manifest = pool._gen_dir("vol", gens[1].generation_id) / MANIFEST_NAME
    manifest.write_bytes(manifest.read_bytes()[:64])
    scan = pool.scan("vol")
    assert [m.generation_id for m in scan.manifests] == [gens[2].generation_id]
    found = {d.generation_id: d for d in scan.damaged}
    assert set(found) == {gens[0].generation_id, gens[1].generation_id}
    assert found[gens[0].generation_id].found_on_use and found[gens[0].generation_id].chunk == bad
    assert found[gens[1].generation_id].manifest is None
    pool.clear_damaged("vol", gens[0].generation_id)
    assert [d.generation_id for d in pool.scan("vol").damaged] == [gens[1].generation_id]
