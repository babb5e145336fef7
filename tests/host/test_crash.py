"""A backup killed at any point: committed generations survive, the partial one vanishes.

A child Python process runs the backup and is SIGKILLed either at a named point of the
commit protocol (``BLOCKGUARD_TEST_CRASH_AT``) or after a random delay. After each kill
the pool is opened again (which collects garbage) and checked: no uncommitted directory
is left, every committed generation still verifies, and the same backup run again is
correct. At the end every generation restores bit-exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroaring import BitMap

from blockguard.core.retention import GenerationRef, select_for_deletion
from blockguard.storage.backup import run_backup
from blockguard.storage.manifest import MANIFEST_NAME, VolumeIdentity, bitmap_to_text
from blockguard.storage.pool.dirpool import DirPool
from blockguard.storage.restore import restore_to_device, verify

MiB = 1 << 20
CHUNK = 64 << 10
SIZE = 16 * MiB
NCHUNKS = SIZE // CHUNK
EXTENT = 256 << 10  # small extents: many "chunks-written" points per backup
REPO = Path(__file__).resolve().parents[2]

CHILD = """
import json, sys
from pyroaring import BitMap
from blockguard.storage.backup import run_backup
from blockguard.storage.manifest import VolumeIdentity, bitmap_from_text
from blockguard.storage.pool.dirpool import DirPool

a = json.load(open(sys.argv[1]))
pool = DirPool.open(a["pool"], a["devices"], a["mount_root"])
changed = bitmap_from_text(a["changed"]) if a["changed"] is not None else None
print("ready", flush=True)
r = run_backup(pool, VolumeIdentity(a["volume"], a["size"]), a["source"], a["kind"], changed,
               chunk_size=a["chunk"], base_id=a["base_id"], parent_id=a["parent_id"],
               keep=a["keep"], extent_bytes=a["extent"])
print(r.manifest.generation_id, flush=True)
"""

# (kind, crash point or None for a random delay, keep)
PLAN: list[tuple[str, str | None, int | None]] = [
    ("incremental", "chunks-written@1", None),
    ("incremental", "chunks-written@3", None),
    ("differential", "chunks-written@2", None),
    ("full", "after-clone", None),
    ("full", "chunks-written@1", None),
    ("full", "chunks-written@4", None),
    ("incremental", "before-commit", None),
    ("incremental", "before-checksums", None),
    ("incremental", "after-checksums", None),
    ("differential", "before-manifest", None),
    ("differential", "atomic-manifest.json", None),
    ("incremental", "after-manifest", None),
    ("full", "before-manifest", None),
    ("full", "after-manifest", None),
    ("incremental", "remove-renamed", 4),
    ("incremental", "remove-renamed@2", 3),
    ("full", "chunks-written@6", None),
    ("differential", "after-manifest", None),
    ("incremental", "chunks-written@5", None),
    ("full", "after-checksums", None),
    ("incremental", None, None),
    ("differential", None, None),
    ("full", None, None),
    ("incremental", None, 3),
    ("incremental", None, None),
    ("full", None, None),
]


@pytest.fixture
def setup(loopdev, tmp_path: Path) -> Iterator[tuple[DirPool, str, str, str, Path]]:
    pooldev = loopdev(512 * MiB, "pool.img")
    mount_root = tmp_path / "mnt"
    pool = DirPool.create("crashpool", pooldev, mount_root)
    try:
        yield pool, pooldev, loopdev(SIZE, "vol.img"), loopdev(SIZE, "snap.img"), mount_root
    finally:
        pool.close()


def snapshot(rng: random.Random, vol: str, snap: str, events: list[int]) -> str:
    with open(vol, "r+b") as f:
        for _ in range(rng.randrange(12, 40)):
            chunk = rng.randrange(NCHUNKS)
            f.seek(chunk * CHUNK + rng.randrange(16) * 4096)
            f.write(rng.randbytes(4096))
            events.append(chunk)
        f.flush()
        os.fsync(f.fileno())
        f.seek(0)
        data = f.read()
    with open(snap, "r+b") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def sha_of(dev: str) -> str:
    with open(dev, "rb") as f:
        return hashlib.sha256(f.read(SIZE)).hexdigest()


def no_garbage(mount_root: Path) -> None:
    for gen in mount_root.glob("crashpool/area-*/volumes/*/*"):
        assert (gen / MANIFEST_NAME).exists(), f"uncommitted generation left: {gen}"
        assert not gen.name.endswith(".deleted"), f"half-removed generation left: {gen}"
        assert not (gen / ".writing").exists()
        assert not list(gen.glob(".*.tmp"))


def test_kill_at_random_points(setup, tmp_path: Path) -> None:
    pool, pooldev, vol, snap, mount_root = setup
    rng = random.Random(20261125)
    ident = VolumeIdentity("cv", SIZE)
    events: list[int] = []
    marks: dict[str, int] = {}
    shas: dict[str, str] = {}

    sha = snapshot(rng, vol, snap, events)
    first = run_backup(pool, ident, snap, "full", None, chunk_size=CHUNK).manifest
    marks[first.generation_id], shas[first.generation_id] = len(events), sha

    killed_at: list[str] = []
    for i, (kind, point, keep) in enumerate(PLAN):
        gens = pool.generations("cv")
        last, last_full = gens[-1], next(m for m in reversed(gens) if m.is_full)
        ref = last if kind == "incremental" else last_full
        sha = snapshot(rng, vol, snap, events)
        mark = len(events)
        changed = BitMap(events[marks[ref.generation_id] :])
        args = {
            "pool": "crashpool",
            "devices": [pooldev],
            "mount_root": str(mount_root),
            "volume": "cv",
            "size": SIZE,
            "source": snap,
            "kind": kind,
            "changed": bitmap_to_text(changed),
            "chunk": CHUNK,
            "base_id": None if kind == "incremental" else ref.generation_id,
            "parent_id": ref.generation_id if kind == "incremental" else None,
            "keep": keep,
            "extent": EXTENT,
        }
        argfile = tmp_path / f"args{i}.json"
        argfile.write_text(json.dumps(args))
        script = tmp_path / "child.py"
        script.write_text(CHILD)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        if point:
            env["BLOCKGUARD_TEST_CRASH_AT"] = point
        before = {m.generation_id for m in gens}
        child = subprocess.Popen(
            [sys.executable, str(script), str(argfile)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        delay = rng.uniform(0.0, 0.04)
        if point is None:
            # Aim into the backup itself, not into Python's start-up.
            assert child.stdout is not None
            assert child.stdout.readline() == b"ready\n"
            time.sleep(delay)
            child.send_signal(signal.SIGKILL)
        _, err = child.communicate(timeout=120)
        if point is not None:
            assert child.returncode == -signal.SIGKILL, f"{point}: {err.decode()}"
        how = point or f"after {delay * 1000:.1f} ms (rc {child.returncode})"
        killed_at.append(f"{kind}:{how}")

        reopened = DirPool.open("crashpool", [pooldev], mount_root)
        try:
            no_garbage(mount_root)
            after = {m.generation_id: m for m in reopened.generations("cv")}
            new = set(after) - before
            assert len(new) <= 1
            for gid in new:  # committed before the kill (after-manifest and later)
                marks[gid], shas[gid] = mark, sha
            lost = before - set(after)
            if lost:
                # Only retention may remove, and only what it selects.
                refs = [
                    GenerationRef(m.generation_id, m.kind.value, m.base_id, m.parent_id, m.created)
                    for m in [*gens, *(after[g] for g in new)]
                ]
                assert keep is not None and lost <= set(select_for_deletion(refs, keep))
            for gid in new | {last.generation_id}:
                if gid in after:
                    verify(reopened, "cv", gid)
            # The same backup, run again, is correct.
            if not new:
                ref_id = ref.generation_id
                if ref_id not in after:  # retention removed the reference: start a full
                    kind, ref_id, changed = "full", None, None
                r = run_backup(
                    reopened,
                    ident,
                    snap,
                    kind,
                    changed,
                    chunk_size=CHUNK,
                    base_id=None if kind == "incremental" else ref_id,
                    parent_id=ref_id if kind == "incremental" else None,
                    keep=keep,
                    extent_bytes=EXTENT,
                )
                gid = r.manifest.generation_id
                marks[gid], shas[gid] = mark, sha
                verify(reopened, "cv", gid)
        finally:
            reopened.close()

    print("\n".join(killed_at))
    assert len(set(killed_at)) >= 20, killed_at
    target = snap  # free now: the last snapshot is no longer needed
    gens = pool.generations("cv")
    assert len(gens) >= 3
    for m in gens:
        restore_to_device(pool, "cv", m.generation_id, target)
        assert sha_of(target) == shas[m.generation_id], f"{m.kind} {m.generation_id}"
