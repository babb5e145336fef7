#!/usr/bin/env python3
"""Where a full backup's and a restore's copy time goes, in the guest kernel (issue 16).

    scripts/vm run --timeout 1800 --mem 2048 --disk 1G --disk 1G --disk 1G --disk 1G -- \\
        .venv/bin/python bench/bench_full_copy.py [--size-mib 512]

The storage layer alone (no daemon, no snapshot, no tracking: the fixed costs are
``bench_backup_fixed.py``'s): an lvm pool on the first two disks, the protected thin LV
(half random, half zeros, every block mapped) on the third, the restore target the
fourth. Printed, never asserted, in one boot so that the ratios compare:

- ``dd`` reading the LV, ``dd`` copying it to the raw target disk and to a new thin LV of
  the pool's thin pool (what a full backup writes into): the physical references;
- xxh3_64 over the volume's bytes in memory, per chunk (the checksum's CPU alone);
- the copy engine reading and hashing the LV with nothing written;
- ``run_backup`` of a full into the pool, with the writer's time (writes, flush) and
  the commit apart, and ``restore_to_device`` of that full to the target (smeared with
  0xAA first, its bytes compared with the volume's after): four times, the zero chunks
  of the new full skipped and written alternately (:func:`zero_skip`): before and after
  in one boot.

What it showed (512 MiB, 1 guest CPU, loaded host): dd copy 1.85 s; the full's copy
2.45-2.81 s (1.3-1.5 x dd copy), of which the writer's calls 2.2-2.7 s while the
readers hash ahead; reading and hashing alone 1.64 s, xxh3 in memory 0.95 s. Under TCG
the checksum costs about what the read does and the guest is CPU-bound, so the copy is
near its ceiling; a daemon full's wall beyond it is the per-backup fixed cost.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import xxhash

from bench.bench_backup_fixed import CHUNK, MiB, fill, sh
from bench.bench_side_by_side import digest
from blockguard.storage import backup
from blockguard.storage.backup import run_backup
from blockguard.storage.blockdev import BlockDevice, aligned_buffer
from blockguard.storage.copyengine import CopyItem, DeviceSource, copy_chunks, discard_sink
from blockguard.storage.manifest import VolumeIdentity
from blockguard.storage.pool.lvmpool import LvmPool
from blockguard.storage.pool.store import StagedGenerationWriter
from blockguard.storage.restore import restore_to_device
from tests.guest import test_lvmpool as lp

VG = "bgcopy"


def timed(argv: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, timeout=1200)
    return time.monotonic() - t0


class WriterClock:
    """Time spent copying (``_copy_into``), in the pool writer's ``write_chunks`` and in
    its ``commit`` (patched in)."""

    def __init__(self) -> None:
        self.write = self.commit = 0.0
        self._w = StagedGenerationWriter.write_chunks
        self._c = StagedGenerationWriter.commit
        clock = self

        def write_chunks(self, first, view, digests):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            try:
                return clock._w(self, first, view, digests)
            finally:
                clock.write += time.perf_counter() - t0

        def commit(self, checksums):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            try:
                return clock._c(self, checksums)
            finally:
                clock.commit += time.perf_counter() - t0

        self.copy = 0.0
        self._copy = backup._copy_into

        def copy_into(*args):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            try:
                return clock._copy(*args)
            finally:
                clock.copy += time.perf_counter() - t0

        backup._copy_into = copy_into  # type: ignore[assignment]
        StagedGenerationWriter.write_chunks = write_chunks  # type: ignore[method-assign]
        StagedGenerationWriter.commit = commit  # type: ignore[method-assign]


def smear(dev: str, size: int) -> None:
    """Fill ``dev`` with 0xAA, so that a restore that skipped a chunk shows."""
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    buf = aligned_buffer(4 * MiB)
    buf[:] = b"\xaa" * (4 * MiB)
    try:
        for off in range(0, size, 4 * MiB):
            os.pwrite(fd, buf, off)
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def zero_skip(on: bool) -> Iterator[None]:
    """Turn the writer's skipping of a new full's zero chunks off (``on`` False) for
    the block: the figures before and after it in one boot."""
    make = LvmPool._make_data

    def made(self, draft, gen_dir, source):  # type: ignore[no-untyped-def]
        data = make(self, draft, gen_dir, source)
        data.zeroed = data.zeroed and on
        return data

    LvmPool._make_data = made  # type: ignore[method-assign]
    try:
        yield
    finally:
        LvmPool._make_data = make  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=512)
    args = parser.parse_args()
    size = args.size_mib * MiB
    disks = os.environ.get("BLOCKGUARD_VM_DISKS", "").split()
    if len(disks) < 4:
        sys.exit("needs four disks")
    pool_disks, vol_disk, target = disks[:2], disks[2], disks[3]
    for d in (*pool_disks, target):
        lp.release(d)
    sh("lvm", "pvcreate", "-qq", vol_disk)
    sh("lvm", "vgcreate", "-qq", VG, vol_disk)
    dev = f"/dev/{VG}/vol"
    rows: dict[str, float] = {}
    pool = None
    print(f"guest cpus: {os.cpu_count()}", flush=True)
    try:
        tp = args.size_mib * 5 // 4 + 64
        sh("lvm", "lvcreate", "-qq", "-y", "--type", "thin-pool", "-L", f"{tp}M",
           "-c", "64k", "-n", "tp", VG)  # fmt: skip
        sh("lvm", "lvcreate", "-qq", "-y", "-V", f"{args.size_mib}M", "-T", f"{VG}/tp", "-n", "vol")
        fill(dev, size)
        rows["dd read LV"] = timed(["dd", f"if={dev}", "of=/dev/null", "bs=1M", "iflag=direct"])
        rows["dd copy LV -> raw disk"] = timed(
            ["dd", f"if={dev}", f"of={target}", "bs=1M", "iflag=direct", "oflag=direct"]
        )
        buf = memoryview(aligned_buffer(8 * MiB))
        buf[:] = os.urandom(8 * MiB)
        t0 = time.perf_counter()
        for _ in range(size // (8 * MiB)):
            for off in range(0, 8 * MiB, CHUNK):
                xxhash.xxh3_64_intdigest(buf[off : off + CHUNK])
        rows["xxh3 per chunk, in memory"] = time.perf_counter() - t0
        with BlockDevice(dev, direct=True) as src:
            reader = DeviceSource(src, CHUNK)
            per = 8 * MiB // CHUNK
            items = (CopyItem(reader, f, per) for f in range(0, size // CHUNK, per))
            t0 = time.perf_counter()
            copy_chunks(items, discard_sink, chunk_size=CHUNK, volume_size=size, readers=4)
            rows["engine read + hash, no write"] = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            pool = LvmPool.create("pcopy", pool_disks, Path(tmp) / "mnt")
            sh("lvm", "lvcreate", "-qq", "-y", "-V", f"{args.size_mib}M", "-T",
               f"{pool.vg}/tpool", "-n", "ddthin")  # fmt: skip
            rows["dd copy LV -> new thin LV of the pool"] = timed(
                [
                    "dd",
                    f"if={dev}",
                    f"of=/dev/{pool.vg}/ddthin",
                    "bs=1M",
                    "iflag=direct",
                    "oflag=direct",
                    "conv=fsync",
                ]
            )
            sh("lvm", "lvremove", "-qq", "-y", f"{pool.vg}/ddthin")
            clock = WriterClock()
            volume = VolumeIdentity("vol", size)
            want = digest(dev, size)
            # Alternated, twice each: the first full also pays for growing the thin pool.
            for n, skip in enumerate((True, False, True, False)):
                label = f"{'zero chunks skipped' if skip else 'zeros written'}, #{n + 1}"
                clock.write = clock.commit = clock.copy = 0.0
                with zero_skip(skip):
                    t0 = time.perf_counter()
                    res = run_backup(pool, volume, dev, "full", None, chunk_size=CHUNK, keep=1)
                    rows[f"run_backup full, {label}"] = time.perf_counter() - t0
                rows[f"  of which the copy: read, hash, write ({label})"] = clock.copy
                rows[f"  of which writer.write_chunks ({label})"] = clock.write
                rows[f"  of which writer.commit: flush, checksums, manifest ({label})"] = (
                    clock.commit
                )
                gid = res.manifest.generation_id
                smear(target, size)
                t0 = time.perf_counter()
                restore_to_device(pool, "vol", gid, target)
                rows[f"restore_to_device of that full ({label})"] = time.perf_counter() - t0
                same = digest(target, size) == want
                print(f"{label}: restored bytes equal the volume's: {same}", flush=True)
                for k, v in rows.items():
                    print(f"  {k}: {v:.2f}", flush=True)
            pool.destroy()
            pool = None
    finally:
        if pool is not None:
            pool.destroy()
        lp.forget_vg(VG)
        subprocess.run(["lvm", "pvremove", "-ff", "-y", vol_disk], capture_output=True)
        for d in (*pool_disks, target):
            lp.release(d)
    print(f"\n| {args.size_mib} MiB, one guest boot | s |\n|---|---|")
    for label, secs in rows.items():
        print(f"| {label} | {secs:.2f} |")


if __name__ == "__main__":
    main()
