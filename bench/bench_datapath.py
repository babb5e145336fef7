"""Data-path figures of the dir pool, as ratios measured in one run (issue 4).

Run as root: ``.venv/bin/python bench/bench_datapath.py [--size-mib N] [--chunk-kib N]``.

Loop devices with ``--direct-io=on`` over sparse files in a temporary directory stand for
the source volume, the pool disk and the restore target. The baselines are fio
sequential read/write (or, without fio, the project's own dd-style ``O_DIRECT`` loop) of
the raw devices, measured in the same run. Printed, never asserted:

- backup of a full (every chunk changed) vs min(source read, pool write), target >= 0.9;
- restore of it vs min(pool read, target write), target >= 0.9;
- an incremental of 1 % changed chunks vs the full's time, target <= 3 %.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from pyroaring import BitMap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blockguard.storage.backup import run_backup
from blockguard.storage.blockdev import BlockDevice, aligned_buffer
from blockguard.storage.manifest import VolumeIdentity
from blockguard.storage.pool.dirpool import DirPool
from blockguard.storage.restore import restore_to_device

MiB = 1 << 20
BS = 8 * MiB


@contextlib.contextmanager
def loop_device(path: Path, size: int) -> Iterator[str]:
    with open(path, "wb") as f:
        f.truncate(size)
    dev = subprocess.run(
        ["losetup", "--find", "--show", "--direct-io=on", str(path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=60)


def fio(*jobs: tuple[str, str], size: int) -> list[float]:
    """Sequential throughput (bytes/s) of fio jobs run at the same time.

    :param jobs: ``(path, "read"|"write")``; O_DIRECT, 8 MiB blocks, one stream each.
    """
    argv = ["fio", "--output-format=json"]
    for n, (path, rw) in enumerate(jobs):
        argv += [
            f"--name=job{n}",
            f"--filename={path}",
            f"--rw={rw}",
            f"--bs={BS}",
            "--direct=1",
            "--ioengine=psync",
            f"--size={size}",
        ]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=600).stdout
    result = json.loads(out)["jobs"]
    return [float(j[rw]["bw_bytes"]) for j, (_, rw) in zip(result, jobs, strict=True)]


def dd_style(dev: str, rw: str, size: int) -> float:
    """The fallback probe: one O_DIRECT stream of 8 MiB requests."""
    buf = aligned_buffer(BS)
    view = memoryview(buf)
    if rw == "write":
        view[:] = os.urandom(BS)
    with BlockDevice(dev, write=rw == "write", direct=True) as bd:
        t0 = time.perf_counter()
        for off in range(0, size, BS):
            if rw == "write":
                bd.pwrite_all(view, off)
            else:
                bd.pread_into(view, off)
        if rw == "write":
            bd.flush()
        return size / (time.perf_counter() - t0)


def seq(dev: str | Path, rw: str, size: int) -> float:
    if shutil.which("fio"):
        return fio((str(dev), rw), size=size)[0]
    return dd_style(str(dev), rw, size)


def together(read: str | Path, write: str, size: int) -> float | None:
    """min(read, write) when both run at once (fio only): the ceiling of a copy whose
    two devices share one physical disk, as loop files in one directory do."""
    if not shutil.which("fio"):
        return None
    return min(fio((str(read), "read"), (write, "write"), size=size))


def fill_random(dev: str, size: int) -> None:
    block = aligned_buffer(BS)
    with BlockDevice(dev, write=True, direct=True) as bd:
        for off in range(0, size, BS):
            block[:] = random.randbytes(BS)
            bd.pwrite_all(memoryview(block), off)
        bd.flush()


def gbs(rate: float) -> str:
    return f"{rate / 1e9:6.2f} GB/s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="volume size (MiB)")
    ap.add_argument("--chunk-kib", type=int, default=64, help="chunk size (KiB)")
    ap.add_argument("--tmp", default="/var/tmp", help="where the backing files go")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (loop devices, mkfs, mount)", file=sys.stderr)
        return 2
    size, chunk = args.size_mib * MiB, args.chunk_kib * 1024
    nchunks = size // chunk
    probe = "fio" if shutil.which("fio") else "dd-style O_DIRECT probe"
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.tmp)))
        src = stack.enter_context(loop_device(tmp / "source.img", size))
        pooldev = stack.enter_context(loop_device(tmp / "pool.img", 3 * size + 512 * MiB))
        target = stack.enter_context(loop_device(tmp / "target.img", size))
        print(f"volume {args.size_mib} MiB, chunk {args.chunk_kib} KiB, baselines by {probe}")
        fill_random(src, size)

        src_read = seq(src, "read", size)
        pool_write = seq(pooldev, "write", size)
        target_write = seq(target, "write", size)
        copy_ceiling = together(src, pooldev, size)
        pool = DirPool.create("bench", pooldev, tmp / "mnt", force=True)
        stack.callback(pool.close)
        ident = VolumeIdentity("benchvol", size)

        full = run_backup(pool, ident, src, "full", None, chunk_size=chunk)
        backup_rate = size / full.duration
        image = Path(pool.devices()[0].area) / "volumes" / "benchvol"
        image = image / full.manifest.generation_id / full.manifest.storage["data"]
        pool_read = seq(image, "read", size)  # the full's image file, through XFS
        restore_ceiling = together(image, target, size)

        restored = restore_to_device(pool, "benchvol", full.manifest.generation_id, target)
        restore_rate = restored.bytes_written / restored.duration

        changed = BitMap(random.sample(range(nchunks), max(1, nchunks // 100)))
        incr = run_backup(
            pool,
            ident,
            src,
            "incremental",
            changed,
            chunk_size=chunk,
            parent_id=full.manifest.generation_id,
        )

    print(f"source sequential read       {gbs(src_read)}")
    print(f"pool sequential write (raw)  {gbs(pool_write)}")
    print(f"pool sequential read (image) {gbs(pool_read)}")
    print(f"target sequential write      {gbs(target_write)}")
    base = min(src_read, pool_write)
    print(
        f"backup (full, all {nchunks} chunks) {gbs(backup_rate)} in {full.duration:.3f} s: "
        f"ratio {backup_rate / base:.2f} vs min(source read, pool write) (target >= 0.9)"
    )
    if copy_ceiling:
        print(
            f"  source read and pool write at the same time: {gbs(copy_ceiling)} (min); "
            f"ratio {backup_rate / copy_ceiling:.2f} vs that"
        )
    base = min(pool_read, target_write)
    print(
        f"restore to a device          {gbs(restore_rate)} in {restored.duration:.3f} s: "
        f"ratio {restore_rate / base:.2f} vs min(pool read, target write) (target >= 0.9)"
    )
    if restore_ceiling:
        print(
            f"  pool read and target write at the same time: {gbs(restore_ceiling)} (min); "
            f"ratio {restore_rate / restore_ceiling:.2f} vs that"
        )
    print(
        f"incremental of {len(changed)} chunks (1 %) took {incr.duration * 1000:.1f} ms = "
        f"{100 * incr.duration / full.duration:.1f} % of the full (target <= 3 %)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
