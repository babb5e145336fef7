"""The project's throughput probe next to fio, per test and queue depth (issue 5, point 3).

Run as root: ``.venv/bin/python bench/bench_probe.py [--size-mib N] [--duration S]
[--depths 1,4,8] [--chunk-kib 64] [--rounds 3] [--throttle-mib N]``, or in the guest on a
scratch disk: ``... --disk /dev/vdb [--write-ok]``.

Without ``--disk`` a loop device with ``--direct-io=on`` over a sparse file in a temporary
directory is created, filled once, measured and detached. ``--disk`` measures reads only
unless ``--write-ok`` says the whole disk may be overwritten. ``--throttle-mib`` runs both
tools inside a blkio-throttled cgroup (see ``blockguard/storage/cgroup.py``).

fio is configured like the probe: ``direct=1``, ``ioengine=psync`` with ``numjobs`` = depth
(one thread per request in flight), each job its own slice (``offset_increment``) so no two
requests touch the same blocks, and ``scramble_buffers=0`` (fio's default rewrites every
512-byte sector of the buffer before each write; the probe stamps once per 4 KiB). The
column ``fio-scr`` shows write figures with fio's default scrambling, for reference.
Medians of ``--rounds`` alternating runs are printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blockguard.core.perftable import SpeedKind
from blockguard.core.units import KiB, MiB, format_rate
from blockguard.errors import CommandNotFound
from blockguard.storage import cgroup
from blockguard.storage.blockdev import BlockDevice, aligned_buffer, device_rdev
from blockguard.storage.devinfo import describe_device
from blockguard.storage.probe import (
    SEQ_BLOCK,
    WRITE_KINDS,
    WritableRegion,
    probe_device,
)
from blockguard.storage.runner import Runner

FIO_RW = {
    SpeedKind.SEQ_READ: "read",
    SpeedKind.SEQ_WRITE: "write",
    SpeedKind.RAND_READ: "randread",
    SpeedKind.RAND_WRITE: "randwrite",
}


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


def fill(dev: str) -> None:
    block = 4 * MiB
    buf = aligned_buffer(block)
    buf[:] = hashlib.shake_256(b"bench").digest(block)
    with BlockDevice(dev, write=True, direct=True) as bd:
        for offset in range(0, bd.size - bd.size % block, block):
            bd.pwrite_all(memoryview(buf), offset)
        bd.flush()
    buf.close()


def fio_rate(
    dev: str, kind: SpeedKind, block: int, depth: int, duration: float, size: int, scramble: bool
) -> float:
    part = size // depth // block * block
    argv = [
        "fio",
        "--name=bench-probe",
        f"--filename={dev}",
        "--direct=1",
        f"--rw={FIO_RW[kind]}",
        f"--bs={block}",
        "--ioengine=psync",
        f"--numjobs={depth}",
        f"--size={part}",
        f"--offset_increment={part}",
        "--thread",
        "--group_reporting",
        "--time_based",
        f"--runtime={round(duration * 1000)}ms",  # fio truncates "0.75s" to 0
        "--output-format=json",
        f"--scramble_buffers={int(scramble)}",
    ]
    if kind in (SpeedKind.RAND_READ, SpeedKind.RAND_WRITE):
        argv.append("--randrepeat=0")
    job = json.loads(Runner().run(argv, timeout=duration * 10 + 60).stdout)["jobs"][0]
    return float(job["write" if kind in WRITE_KINDS else "read"]["bw_bytes"])


def probe_rate(
    dev: str,
    kind: SpeedKind,
    depth: int,
    duration: float,
    chunk: int,
    writable: WritableRegion | None,
) -> float:
    result = probe_device(
        dev, kinds=[kind], depths=(depth,), duration=duration, chunk_size=chunk, writable=writable
    )
    return result.rate(kind)


def run(args: argparse.Namespace, dev: str, writable: WritableRegion | None) -> None:
    call: Callable[..., Any] = lambda fn, *a: fn(*a)  # noqa: E731 - swapped for the cgroup
    with contextlib.ExitStack() as stack:
        if args.throttle_mib:
            rdev = device_rdev(dev)
            bps = args.throttle_mib * MiB
            group = stack.enter_context(
                cgroup.throttled_cgroup(
                    {f"{os.major(rdev)}:{os.minor(rdev)}": cgroup.Limit(bps, bps)}
                )
            )
            call = group.call
            print(f"throttled to {args.throttle_mib} MiB/s in {group.path}")
        measure(args, dev, writable, call)


def measure(
    args: argparse.Namespace,
    dev: str,
    writable: WritableRegion | None,
    call: Callable[..., Any],
) -> None:
    desc = describe_device(dev)
    print(
        f"{dev}: {desc.device_id}, {desc.capacity // MiB} MiB, {desc.transport.value}, "
        f"{'rotational' if desc.rotational else 'non-rotational'}, {desc.layout}"
    )
    have_fio = True
    try:
        Runner().resolve("fio")
    except CommandNotFound:
        have_fio = False
        print("fio is not installed: probe figures only")
    chunk = args.chunk_kib * KiB
    with BlockDevice(dev) as bd:
        size = bd.size
    kinds = [k for k in SpeedKind if writable is not None or k not in WRITE_KINDS]
    print(f"{'test':<11} {'qd':>3} {'probe':>12} {'fio':>12} {'ratio':>6} {'fio-scr':>12}")
    for kind in kinds:
        block = SEQ_BLOCK if kind in (SpeedKind.SEQ_READ, SpeedKind.SEQ_WRITE) else chunk
        for depth in args.depths:
            probe: list[float] = []
            fio: list[float] = []
            scrambled: list[float] = []
            for round_ in range(args.rounds):
                steps = ["probe", "fio"] if round_ % 2 == 0 else ["fio", "probe"]
                for step in steps:
                    if step == "probe":
                        probe.append(
                            call(probe_rate, dev, kind, depth, args.duration, chunk, writable)
                        )
                    elif have_fio:
                        fio.append(
                            call(fio_rate, dev, kind, block, depth, args.duration, size, False)
                        )
                        if kind in WRITE_KINDS:
                            scrambled.append(
                                call(fio_rate, dev, kind, block, depth, args.duration, size, True)
                            )
            p = statistics.median(probe)
            f = statistics.median(fio) if fio else None
            s = statistics.median(scrambled) if scrambled else None
            # Median of the back-to-back pairs' ratios: cancels the drift of the machine's load.
            r = statistics.median(a / b for a, b in zip(probe, fio, strict=True)) if fio else None
            print(
                f"{kind.value:<11} {depth:>3} {format_rate(p):>12} "
                f"{format_rate(f) if f else '-':>12} {f'{r:.2f}' if r else '-':>6} "
                f"{format_rate(s) if s else '-':>12}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--disk", help="measure this device instead of a loop device")
    parser.add_argument(
        "--write-ok", action="store_true", help="with --disk: the whole disk may be overwritten"
    )
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--duration", type=float, default=1.0)
    parser.add_argument("--depths", default="1,4,8")
    parser.add_argument("--chunk-kib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--throttle-mib", type=int, default=0)
    args = parser.parse_args()
    args.depths = [int(d) for d in args.depths.split(",")]
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    if args.disk:
        writable = None
        if args.write_ok:
            with BlockDevice(args.disk) as bd:
                writable = WritableRegion(0, bd.size - bd.size % MiB)
        run(args, args.disk, writable)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-probe-", dir="/var/tmp") as tmp:
        size = args.size_mib * MiB
        with loop_device(Path(tmp) / "disk.img", size) as dev:
            fill(dev)
            run(args, dev, WritableRegion(0, size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
