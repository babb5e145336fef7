"""Data-path figures of the dir pool, as ratios measured in one run (issue 4).

Run as root: ``.venv/bin/python bench/bench_datapath.py [--size-mib N] [--chunk-kib N]
[--repeat N]``.

Loop devices with ``--direct-io=on`` over sparse files in a temporary directory stand for
the source volume, the pool disk and the restore target. The baselines are fio
sequential read/write (or, without fio, the project's own dd-style ``O_DIRECT`` loop) of
the raw devices, measured in the same run. Printed, never asserted:

- backup of a full (every chunk changed) vs min(source read, pool write), target >= 0.9;
- restore of it vs min(pool read, target write), target >= 0.9;
- an incremental of 1 % changed chunks vs the full's time, target <= 3 %;
- an incremental of 10 % scattered chunks vs the full's time, target <= 20 % (issue 16),
  with the CPU it took;
- scattered restores: chains of a full and 2, 4, 8 incrementals of 1 % random 64 KiB
  writes, restored to a device, vs min(pool random read at the restore's queue depth,
  target write), target >= 0.8; the pool's read is measured on the full's image (where
  the data is) in chunk requests and in window requests (the restore's own size); and
  vs the lone full's restore. Each is the median of ``--repeat`` restores, with its CPU.
  The loop files share one disk here, so the copy's real ceiling is "both at once" (fio
  reading the image and writing the target at the same time), also printed: one stream
  each, and in the restore's own shape (window requests, the restore's readers in flight
  at random offsets of the image, one sequential writer of the target).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import statistics
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
from blockguard.storage.copyengine import DEFAULT_EXTENT_BYTES
from blockguard.storage.manifest import VolumeIdentity
from blockguard.storage.pool.dirpool import DirPool
from blockguard.storage.restore import RESTORE_READERS, restore_to_device

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


def random_read(dev: str | Path, size: int, bs: int, depth: int) -> float | None:
    """Random read throughput (bytes/s) in ``bs`` requests, ``depth`` in flight (fio only).

    Give it a file that holds data (a generation's image in the pool), not the pool's
    raw loop device: most of that is holes of its sparse backing file, which read at
    memory speed and made the restore look slow against a ceiling no disk has.
    """
    if not shutil.which("fio"):
        return None
    argv = [
        "fio",
        "--output-format=json",
        "--name=randread",
        f"--filename={dev}",
        "--rw=randread",
        f"--bs={bs}",
        "--direct=1",
        "--ioengine=psync",
        f"--numjobs={depth}",
        "--group_reporting",
        f"--size={size}",
        "--runtime=10",
        "--time_based=0",
    ]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=600).stdout
    return float(json.loads(out)["jobs"][0]["read"]["bw_bytes"])


def scribble(dev: str, chunks: BitMap, chunk: int) -> None:
    """Write random data over ``chunks`` of ``dev`` (a workload's scattered writes)."""
    block = aligned_buffer(chunk)
    with BlockDevice(dev, write=True, direct=True) as bd:
        for c in chunks:
            block[:] = random.randbytes(chunk)
            bd.pwrite_all(memoryview(block), c * chunk)
        bd.flush()


def together(read: str | Path, write: str, size: int) -> float | None:
    """min(read, write) when both run at once (fio only): the ceiling of a copy whose
    two devices share one physical disk, as loop files in one directory do."""
    if not shutil.which("fio"):
        return None
    return min(fio((str(read), "read"), (write, "write"), size=size))


def together_at_depth(
    image: Path, target: str, size: int, bs: int, depth: int
) -> tuple[float, float] | None:
    """(read, write) bytes/s of the restore's own I/O shape run at once (fio only):
    ``depth`` readers of ``bs`` requests at random offsets of ``image`` (as the restore's
    windows read the full) while one stream writes ``target`` sequentially in ``bs``
    requests (as the restore writes a window); the read side summed over its readers.

    The loop files share one disk, so the disk doing both at once is the honest ceiling
    of a restore. fio does not keep the two sides at one rate as a copy must (its readers
    starve the writer), so the copy's ceiling is half of what the disk moved in all,
    ``(read + write) / 2``: each byte restored is read once and written once."""
    if not shutil.which("fio"):
        return None
    argv = ["fio", "--output-format=json"]
    for name, path, rw, jobs in (("read", image, "randread", depth), ("write", target, "write", 1)):
        argv += [
            f"--name={name}",
            f"--filename={path}",
            f"--rw={rw}",
            f"--bs={bs}",
            "--direct=1",
            "--ioengine=psync",
            f"--numjobs={jobs}",
            f"--size={size}",
            # Both sides busy for the whole run: sized runs would leave the readers
            # (4x the bytes) alone on the disk once the writer is done.
            "--time_based",
            "--runtime=5",
        ]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=600).stdout
    jobs = json.loads(out)["jobs"]
    read = sum(float(j["read"]["bw_bytes"]) for j in jobs if j["jobname"] == "read")
    write = sum(float(j["write"]["bw_bytes"]) for j in jobs if j["jobname"] == "write")
    return read, write


def fill_random(dev: str, size: int) -> None:
    block = aligned_buffer(BS)
    with BlockDevice(dev, write=True, direct=True) as bd:
        for off in range(0, size, BS):
            block[:] = random.randbytes(BS)
            bd.pwrite_all(memoryview(block), off)
        bd.flush()


def cpu_seconds() -> float:
    """CPU time of this process so far, every thread, user and system."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def gbs(rate: float) -> str:
    return f"{rate / 1e9:6.2f} GB/s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="volume size (MiB)")
    ap.add_argument("--chunk-kib", type=int, default=64, help="chunk size (KiB)")
    ap.add_argument("--tmp", default="/var/tmp", help="where the backing files go")
    ap.add_argument(
        "--repeat", type=int, default=3, help="restores of each scattered chain (median)"
    )
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

        # Scattered restores: the chain grows by 1 % incrementals; restore at 2, 4 and 8.
        scattered: list[tuple[int, float, float]] = []
        parent = incr.manifest.generation_id
        for length in range(2, 9):
            changed = BitMap(random.sample(range(nchunks), max(1, nchunks // 100)))
            scribble(src, changed, chunk)
            gen = run_backup(
                pool, ident, src, "incremental", changed, chunk_size=chunk, parent_id=parent
            )
            parent = gen.manifest.generation_id
            if length in (2, 4, 8):
                runs = []
                for _ in range(args.repeat):
                    cpu = cpu_seconds()
                    r = restore_to_device(pool, "benchvol", parent, target)
                    runs.append((r.duration, cpu_seconds() - cpu, r.bytes_written))
                seconds, cpu, nbytes = statistics.median_low(runs)
                scattered.append((length, nbytes / seconds, seconds, cpu))
        # A scattered incremental of 10 % (issue 16: about 10 % of a full, <= 20 %).
        changed10 = BitMap(random.sample(range(nchunks), max(1, nchunks // 10)))
        scribble(src, changed10, chunk)
        cpu10 = cpu_seconds()
        incr10 = run_backup(
            pool, ident, src, "incremental", changed10, chunk_size=chunk, parent_id=parent
        )
        cpu10 = cpu_seconds() - cpu10
        # The ceilings of the scattered restore, measured where its data is (the full's
        # image, through the pool's file system) at the restore's queue depth: in chunk
        # requests (the "random read") and in window requests (what a restore
        # issues for the full, which is most of its bytes: the stricter one).
        pool_random = random_read(image, size, chunk, RESTORE_READERS)
        pool_windows = random_read(image, size, DEFAULT_EXTENT_BYTES, RESTORE_READERS)
        at_depth = together_at_depth(image, target, size, DEFAULT_EXTENT_BYTES, RESTORE_READERS)

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
        f"incremental of {len(changed10)} scattered chunks (10 %) took "
        f"{incr10.duration * 1000:.1f} ms (CPU {cpu10 * 1000:.0f} ms) = "
        f"{100 * incr10.duration / full.duration:.1f} % of the full (target <= 20 %)"
    )
    print(
        f"incremental of {len(changed)} chunks (1 %) took {incr.duration * 1000:.1f} ms = "
        f"{100 * incr.duration / full.duration:.1f} % of the full (target <= 3 %)"
    )
    window_mib = DEFAULT_EXTENT_BYTES // MiB
    if pool_random and pool_windows:
        print(
            f"pool random read of the full's image, {RESTORE_READERS} in flight: "
            f"{args.chunk_kib} KiB {gbs(pool_random)}, {window_mib} MiB {gbs(pool_windows)}"
        )
    shared = None
    if at_depth:
        shared = sum(at_depth) / 2
        print(
            f"pool random read {window_mib} MiB x {RESTORE_READERS} in flight and target "
            f"write at the same time (the restore's shape): read {gbs(at_depth[0])}, write "
            f"{gbs(at_depth[1])}; a copy's ceiling on the shared disk (read + write) / 2: "
            f"{gbs(shared)}"
        )
    base = min(pool_random or pool_read, target_write)
    strict = min(pool_windows or pool_read, target_write)
    for length, rate, seconds, cpu in scattered:
        print(
            f"restore of full + {length} incrementals of 1 %: {gbs(rate)} in {seconds:.3f} s "
            f"(CPU {cpu:.3f} s): "
            f"ratio {rate / base:.2f} vs min(pool random read {args.chunk_kib} KiB, target "
            f"write) (target >= 0.8); {rate / strict:.2f} vs min(pool read {window_mib} MiB, "
            f"target write); {rate / restore_rate:.2f} of the lone full's restore"
            + (f"; {rate / restore_ceiling:.2f} vs both at once" if restore_ceiling else "")
            + (f"; {rate / shared:.2f} vs the shared disk's copy ceiling" if shared else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
