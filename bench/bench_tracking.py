#!/usr/bin/env python3
"""Change-tracking figures, measured in the guest kernel (ratios within one run).

    scripts/vm run --disk 1G --disk 3G -- .venv/bin/python bench/bench_tracking.py

1. dm-era write overhead: fio 4 KiB random writes (O_DIRECT) through the era device vs
   the raw device, alternated, same region, same run. Target: overhead <= 10 %.
2. Thin polling: changed_bytes() on a 1 TiB thin volume with 20,000 scattered changed
   chunks. Target: under 1 s.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blockguard.storage.blockdev import BlockDevice, aligned_buffer
from blockguard.storage.tracking.era import EraTracker
from blockguard.storage.tracking.thin import ThinTracker

CHUNK = 64 * 1024


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def fio_randwrite(dev: str, seconds: int, region: str) -> float:
    out = sh(
        "fio", "--name=w", f"--filename={dev}", "--rw=randwrite", "--bs=4k", "--direct=1",
        "--ioengine=libaio", "--iodepth=16", f"--size={region}", f"--runtime={seconds}",
        "--time_based", "--output-format=json", "--randrepeat=0",
    )  # fmt: skip
    return json.loads(out)["jobs"][0]["write"]["iops"]


def era_overhead(disk: str, workdir: Path) -> None:
    meta_img = workdir / "era-meta.img"
    with open(meta_img, "wb") as f:
        f.truncate(64 << 20)
    meta = sh("losetup", "--find", "--show", str(meta_img)).strip()
    tracker = EraTracker.protect(disk, meta, workdir / "era-state", CHUNK, name="bench")
    try:
        tracker.add_reference("r0")
        era_dev = tracker.device
        # First pass through era: every chunk is new in the era (metadata commits).
        first = fio_randwrite(era_dev, 5, "256M")
        raw, era = [], []
        for _ in range(3):
            era.append(fio_randwrite(era_dev, 5, "256M"))
            raw.append(fio_randwrite(disk, 5, "256M"))
        r, e = statistics.median(raw), statistics.median(era)
        print(f"era  4 KiB randwrite iops: raw {r:.0f}, through dm-era {e:.0f} "
              f"(first pass, new blocks: {first:.0f})")  # fmt: skip
        print(f"era  write overhead: {100 * (1 - e / r):.1f} % (target <= 10 %); "
              f"ratio era/raw {e / r:.3f}; first-pass ratio {first / r:.3f}")  # fmt: skip
    finally:
        tracker.detach()
        sh("losetup", "-d", meta)


def thin_polling(disk: str, workdir: Path) -> None:
    vg = "bgbench"
    sh("lvm", "pvcreate", "-qq", disk)
    sh("lvm", "vgcreate", "-qq", vg, disk)
    try:
        sh("lvm", "lvcreate", "-qq", "--type", "thin-pool", "-L", "2560M", "-c", "64k",
           "-n", "pool", vg)  # fmt: skip
        sh("lvm", "lvcreate", "-qq", "-V", "1T", "-T", f"{vg}/pool", "-n", "vol")
        t = ThinTracker.protect(vg, "vol", workdir / "thin-state", CHUNK)
        t.add_reference("r0")
        rng = random.Random(3)
        chunks = rng.sample(range((1 << 40) // CHUNK), 20_000)
        buf = aligned_buffer(CHUNK)
        buf[:] = os.urandom(CHUNK)
        with BlockDevice(f"/dev/{vg}/vol", write=True, direct=True) as dev:
            for c in chunks:
                dev.pwrite_all(memoryview(buf), c * CHUNK)
            dev.flush()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            n = t.changed_bytes("r0")
            times.append(time.perf_counter() - t0)
        assert n == 20_000 * CHUNK, n
        print(f"thin changed_bytes on 1 TiB with 20,000 scattered chunks: "
              f"{min(times):.3f} s best, {statistics.median(times):.3f} s median "
              f"(target < 1 s; {n} bytes reported)")  # fmt: skip
    finally:
        subprocess.run(["lvm", "vgremove", "-ff", "-y", vg], capture_output=True)
        subprocess.run(["lvm", "pvremove", "-ff", "-y", disk], capture_output=True)


def main() -> int:
    if os.environ.get("BLOCKGUARD_GUEST") != "1":
        print("run inside the guest: scripts/vm run --disk 1G --disk 3G -- "
              ".venv/bin/python bench/bench_tracking.py", file=sys.stderr)  # fmt: skip
        return 2
    disks = os.environ.get("BLOCKGUARD_VM_DISKS", "").split()
    if len(disks) < 2:
        print("needs two --disk (1G and 3G)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as d:
        era_overhead(disks[0], Path(d))
        thin_polling(disks[1], Path(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
