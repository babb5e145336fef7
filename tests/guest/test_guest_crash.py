"""An lvm-pool backup killed at any point: committed generations survive, the partial one
leaves no garbage after the next open, and the same backup run again is correct.

Every other step has a spare delta area that fits it (the rest make LVs of their own), and
some steps kill the making of a spare: the next open keeps at most one spare.

Each backup runs in a forked child (its own process group, as the daemon's service would
be) that opens the pool and is SIGKILLed — with whatever lvm command it was running —
either at a named point of the commit protocol (``BLOCKGUARD_TEST_CRASH_AT``) or after a
random delay. The source is a stable copy of the volume made by the parent, so every
point of the plan is the pool's, not the copy's.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import time
import traceback
from pathlib import Path

import pytest
from pyroaring import BitMap

from blockguard.core.retention import GenerationRef, select_for_deletion
from blockguard.storage import manifest as manifest_module
from blockguard.storage.backup import run_backup
from blockguard.storage.blockdev import BlockDevice
from blockguard.storage.manifest import MANIFEST_NAME, VolumeIdentity
from blockguard.storage.pool.gendir import LOCK
from blockguard.storage.pool.lvmpool import LvmPool
from blockguard.storage.pool.lvmspare import AREA_PREFIX
from blockguard.storage.restore import restore_to_device, verify
from tests.guest import test_lvmpool as lp
from tests.guest.test_lvmpool import lv_names

pytestmark = pytest.mark.guest
pool_disks, make_pool = lp.pool_disks, lp.make_pool

MiB = 1 << 20
CHUNK = 64 << 10
SIZE = 8 * MiB
NCHUNKS = SIZE // CHUNK
EXTENT = 128 << 10  # small extents: many "chunks-written" points per backup

# (kind, crash point or None for a random delay, keep)
PLAN: list[tuple[str, str | None, int | None]] = [
    ("incremental", "area-claimed", None),  # even steps have a spare that fits
    ("incremental", "lv-created", None),
    ("incremental", "chunks-written@1", None),
    ("differential", "chunks-written@2", None),
    ("full", "after-clone", None),
    ("full", "chunks-written@5", None),
    ("incremental", "before-commit", None),
    ("incremental", "before-checksums", None),
    ("incremental", "after-checksums", None),
    ("differential", "before-manifest", None),
    ("differential", "atomic-manifest.json", None),
    ("incremental", "after-manifest", None),
    ("ahead", None, None),
    ("full", "lv-created", None),
    ("full", "before-manifest", None),
    ("full", "after-manifest", None),
    ("incremental", "remove-renamed", 4),
    ("incremental", "remove-renamed@2", 3),
    ("differential", "after-manifest", None),
    ("ahead", None, None),
    ("full", "after-checksums", None),
    ("ahead", None, None),
    ("incremental", None, None),
    ("differential", None, None),
    ("full", None, None),
]


def snapshot(rng: random.Random, vol: str, snap: str, events: list[int]) -> str:
    """Write to the volume, then copy it to ``snap``; returns the copy's sha256."""
    with BlockDevice(vol, write=True) as v:
        for _ in range(rng.randrange(8, 30)):
            chunk = rng.randrange(NCHUNKS)
            v.pwrite_all(rng.randbytes(4096), chunk * CHUNK + rng.randrange(16) * 4096)
            events.append(chunk)
        v.flush()
        data = os.pread(v.fd, SIZE, 0)
    with BlockDevice(snap, write=True) as s:
        s.pwrite_all(data, 0)
        s.flush()
    return hashlib.sha256(data).hexdigest()


def sha_of(dev: str) -> str:
    with BlockDevice(dev) as d:
        return hashlib.sha256(os.pread(d.fd, SIZE, 0)).hexdigest()


def no_garbage(pool: LvmPool) -> None:
    committed = {m.generation_id for m in pool.generations()}
    for gen in (pool.meta_dir / "volumes").glob("*/*"):
        assert (gen / MANIFEST_NAME).exists(), f"uncommitted generation left: {gen}"
        assert not gen.name.endswith(".deleted"), f"half-removed generation left: {gen}"
        assert not (gen / LOCK).exists() and not list(gen.glob(".*.tmp"))
    stored = {m.storage["lv"] for m in pool.generations() if m.storage.get("lv")}
    lvs = {n for n in lv_names(pool.vg) if n.startswith(("g", "cow-", AREA_PREFIX))}
    spare = {pool.spare.name} if pool.spare.name else set()
    assert lvs == stored | spare, f"stray LVs: {lvs - stored}; committed {sorted(committed)}"
    assert not spare & stored, "a generation's LV taken for the spare"


def run_child(args: dict, point: str | None, delay: float) -> int:
    """Fork a backup; returns its wait status."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: open the pool, back up, exit
        status = 1
        try:
            os.setpgid(0, 0)
            os.close(r)
            if point:
                os.environ["BLOCKGUARD_TEST_CRASH_AT"] = point
            manifest_module._crash_hits.clear()
            pool = LvmPool.open(args["pool"], args["devices"], args["mount_root"])
            os.write(w, b"r")
            if args["kind"] == "ahead":  # replace the spare (lvremove, lvcreate)
                pool.spare.make(pool.spare.size + (1 << 20))
                os._exit(0)
            run_backup(pool, args["ident"], args["source"], args["kind"], args["changed"],
                       chunk_size=CHUNK, base_id=args["base_id"], parent_id=args["parent_id"],
                       keep=args["keep"], extent_bytes=EXTENT)  # fmt: skip
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    os.close(w)
    if point is None:
        assert os.read(r, 1) == b"r"
        time.sleep(delay)
        # The whole group: an lvm command the backup runs dies with it.
        os.killpg(pid, signal.SIGKILL)
    status = os.waitpid(pid, 0)[1]
    os.close(r)
    return status


def test_kill_backup_at_many_points(make_pool, loopdev, tmp_path: Path) -> None:
    pool = make_pool("crash")
    disks = [d.path for d in pool.devices()]
    mount_root = tmp_path / "mnt"
    vol, snap = loopdev(SIZE, "vol.img"), loopdev(SIZE, "snap.img")
    rng = random.Random(20261125)
    ident = VolumeIdentity("cv", SIZE)
    events: list[int] = []
    marks: dict[str, int] = {}
    shas: dict[str, str] = {}
    sha = snapshot(rng, vol, snap, events)
    first = run_backup(pool, ident, snap, "full", None, chunk_size=CHUNK).manifest
    marks[first.generation_id], shas[first.generation_id] = len(events), sha

    killed_at: list[str] = []
    for step, (kind, point, keep) in enumerate(PLAN):
        gens = pool.generations("cv")
        if kind == "ahead":
            delay = rng.uniform(0.0, 1.5)
            args = {"pool": "crash", "devices": disks, "mount_root": mount_root, "kind": kind}
            run_child(args, None, delay)
            killed_at.append(f"ahead:after {delay:.2f} s")
            pool = LvmPool.open("crash", disks, mount_root)
            no_garbage(pool)
            assert [m.generation_id for m in pool.generations("cv")] == [
                m.generation_id for m in gens
            ]
            continue
        last, last_full = gens[-1], next(m for m in reversed(gens) if m.is_full)
        ref = last if kind == "incremental" else last_full
        sha = snapshot(rng, vol, snap, events)
        mark = len(events)
        changed = BitMap(events[marks[ref.generation_id] :])
        args = {
            "pool": "crash", "devices": disks, "mount_root": mount_root, "ident": ident,
            "source": snap, "kind": kind, "changed": changed, "keep": keep,
            "base_id": None if kind == "incremental" else ref.generation_id,
            "parent_id": ref.generation_id if kind == "incremental" else None,
        }  # fmt: skip
        before = {m.generation_id for m in gens}
        # The child's open adopts the spare the parent leaves (or finds none).
        pool.spare.give_way()
        if step % 2 == 0 and kind != "full":
            pool.spare.make(len(changed) * CHUNK)
        delay = rng.uniform(0.0, 1.5)
        status = run_child(args, point, delay)
        if point is not None:
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, point
        killed_at.append(f"{kind}:{point or f'after {delay:.2f} s'}")

        # The next open (the metadata stays mounted by the first pool object).
        pool = LvmPool.open("crash", disks, mount_root)
        no_garbage(pool)
        after = {m.generation_id: m for m in pool.generations("cv")}
        new = set(after) - before
        assert len(new) <= 1
        for gid in new:  # committed before the kill
            marks[gid], shas[gid] = mark, sha
        lost = before - set(after)
        if lost:  # only retention removes, and only what it selects
            refs = [
                GenerationRef(m.generation_id, m.kind.value, m.base_id, m.parent_id, m.created)
                for m in [*gens, *(after[g] for g in new)]
            ]
            assert keep is not None and lost <= set(select_for_deletion(refs, keep))
        for gid in new | ({last.generation_id} & set(after)):
            verify(pool, "cv", gid)
        if not new:  # the same backup, run again, is correct
            ref_id: str | None = ref.generation_id
            if ref_id not in after:
                kind, ref_id, changed = "full", None, None
            r = run_backup(
                pool, ident, snap, kind, changed, chunk_size=CHUNK,
                base_id=None if kind == "incremental" else ref_id,
                parent_id=ref_id if kind == "incremental" else None,
                keep=keep, extent_bytes=EXTENT,
            )  # fmt: skip
            marks[r.manifest.generation_id], shas[r.manifest.generation_id] = mark, sha
            verify(pool, "cv", r.manifest.generation_id)

    print("\n".join(killed_at))
    assert len(set(killed_at)) >= 20, killed_at
    no_garbage(pool)
    gens = pool.generations("cv")
    assert len(gens) >= 3
    for m in gens:
        restore_to_device(pool, "cv", m.generation_id, snap)
        assert sha_of(snap) == shas[m.generation_id], f"{m.kind} {m.generation_id}"
