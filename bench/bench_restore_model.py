#!/usr/bin/env python3
"""Predicted vs measured restore time on real restores (issue 5), in one run.

Run as root on the host: ``.venv/bin/python bench/bench_restore_model.py [--size-mib N]``;
in the guest, with a second pool disk slowed by dm-delay: ``scripts/vm run --disk 1G
--disk 1G --disk 128M --disk 1G -- .venv/bin/python bench/bench_restore_model.py
--size-mib 128 --devices /dev/vda /dev/vdb /dev/vdc --slow-device /dev/vdd --slow-ms 20``;
on the host, which has no device-mapper, the second pool disk is a loop device that a blkio
cgroup holds to a bandwidth (``storage/cgroup.py``; the run on it is a child process in the
group, the source and the restore target unthrottled): ``.venv/bin/python
bench/bench_restore_model.py --size-mib 128 --drill-mib 64 --slow-mbps 100``. That slow disk
is slow by bandwidth, not by latency as dm-delay's is.

The pool disk and the restore target are loop devices (``--direct-io=on``); both are
measured first by the project's probe (the pool disk before its file system is made, so
writing to it harms nothing). Then a chain of generations is backed up (full, incrementals
and a differential of scattered chunks) and, after each backup, the newest generation is
restored for real — copied to the target, and swapped in — and the restore-time model's
prediction is compared with the measured time. Printed per case: predicted, measured,
measured/predicted; then the median error, raw and with the model's correction learnt from
the cases before (the old daemon's way), and — issue 14 — of the model calibrated by a
restore drill on the same pool before the first restore (``storage/drill.py``; its copy
restores go into the restore target, a plain device, so they measure the copy's writes as
the path overlaps them; no earlier restore is learnt from), with the share of restores
within its upper estimate. Targets: median error <= 15 %, measured <= upper in >= 95 %.
Nothing is asserted.

Figures in the guest (issue 14; 128 MiB volume, the slow disk behind dm-delay 20 ms;
after double14's catalog v4 write rate and drill14's drills into scratch), drill-calibrated,
median |error| and measured <= upper, overall and by pool disk and mode (12 restores each):

    run                                   overall  fast copy  fast swap  slow copy  slow swap
    main 2e2a04f, --drill-mib 32, 2 CPUs  23.2 %   56.7 %     174 %      11.9 %     11.8 %
      measured <= upper                   44/48    12/12      12/12      9/12       12/12
    main 2e2a04f, --drill-mib 64, 1 CPU   11.8 %   16.2 %     6.6 %      11.1 %     9.5 %
      measured <= upper                   46/48    12/12      10/12      12/12      12/12
    rto14b 4936947, --drill-mib 32, 1 CPU 19.5 %   28.1 %     12.1 %     29.1 %     10.0 %
      measured <= upper                   47/48    12/12      11/12      12/12      12/12

("1 CPU": the guest got one, the host being loaded; 64 MiB is the daemon's drill size;
rto14b reads a window's generations at once and verifies in vectored batches.)

With the 32 MiB drill the error is the fast disk's, and it is an over-estimate (signed
median -57 % copy, -174 % swap-in): the slow disk is within target in both modes. The
term most off is the fast disk's swap-in ``per_extent``: the 32 MiB drill fitted 11.0 ms
per scattered extent, where the 128 MiB restores imply about 2 ms (a differential of 508
chunks swapped in took 1.61 s against 0.52 s for the full) and the 64 MiB drill fitted
2.9 ms; a "fast incr 204 ch, 5 deltas" swap-in was estimated at 4.6 s and took 2.0 s.
Next is the fast disk's copy ``per_byte``: 3.6 ns/B from the 32 MiB drill (2.9 from the
64 MiB one) where the 128 MiB restores run at about 2.6 ns/B past the fixed cost. A 32 MiB
drill is too small for both: its volume is 4 of the restore's 8 MiB windows, all in
flight at once with 4 readers, so its per-byte slope (16 vs 32 MiB) holds reads and writes
that a longer restore overlaps; its incrementals hold 5 chunks each, so only the
differential tells a generation's cost from an extent's, and the guest's noise (one
"half full+4" swap-in took 1.62 s, its repeat 0.52 s) decides the split. The daemon
drills 64 MiB (``Settings.drill_bytes``), which met both targets here.

On rto14b (a window's generations read at once) the 32 MiB drill's swap-in terms came out
right (fast per_extent 2.5 ms, error 12.1 %); what is left is copy mode's ``per_byte``, an
over-estimate on both disks (signed median -28 % fast, -29 % slow): 4.0 ns/B fitted on the
fast disk (drill restores of 16 and 32 MiB took 0.105-0.111 and 0.162-0.171 s), where the
128 MiB full restored in 0.383 s against 0.579 s estimated. Both drill sizes are at most
as many windows as the restore has readers (2 and 4 of 4), so none of its restores reaches
the steady state of a longer one, where a window's writes overlap the next ones' reads:
a drill of 64 MiB (4 and 8 windows) or more measures that slope.

Figures on the host (issue 14; rto14c, 128 MiB volume, --drill-mib 64, loop devices with
direct I/O over files on one shared disk, the machine loaded by other sessions: load 4-5
on 2 CPUs), drill-calibrated, median |error| and measured <= upper (12 restores a cell):

    run                         overall       fast copy     fast swap     slow copy   slow swap
    main 8255df0, 1             15.6 % 16/24  6.0 % 9/12    31.9 % 7/12
    main 8255df0, 2             11.2 % 15/24  8.0 % 10/12   26.1 % 5/12
    main, --drill-mib 128       10.9 % 18/24  7.8 % 10/12   19.0 % 8/12
    rto14c 1 (upper by shape)   20.8 % 22/24  21.5 % 11/12  7.9 % 11/12
    rto14c 2                    14.8 % 24/24  11.8 % 12/12  20.0 % 12/12
    rto14c 3                    20.9 % 23/24  9.5 % 12/12   33.4 % 11/12
    rto14c 4, --slow-mbps 100   6.0 % 43/48   7.5 % 12/12   30.7 % 11/12  5.1 % 8/12  3.5 % 12/12
    rto14c 5, --slow-mbps 100   12.8 % 36/48  53.2 % 12/12  36.3 % 7/12   1.6 % 11/12 8.4 % 6/12

(Run 5 at load 8-9: the target's write probe fell to 0.30 GB/s and the fast disk's drill
copies took 0.15-0.33 s for what took 0.10-0.12 s in quieter runs; the slow disk's
swap-ins missed their upper by 0.3-86 % (6 of 12), one taking 2.9 s against 1.3-1.7 s for its
neighbours.)

The term that misses on the host is the fast disk's swap-in: a swap-in writes its deltas
into a reflinked clone of the full (copy-on-write in XFS, in a loop file, on an XFS in a
loop file) and that stack stalls now and then on the shared disk: a swap-in of the same
chain took 0.23, 0.37 and 2.0 s in a row (5.6, 0.41 and 0.36 s with 512 scattered chunks),
in drills as in restores, so its per-extent cost (0.2-0.8 ms fitted, 0.2-0.6 ms measured
by differentials of 5-50 % of a 128 MiB volume, not growing with their size) is the fit of
noise. The upper estimate was the 0.9 quantile of leave-one-out ratios; a drill restores
each shape twice, so the twin left in vouched for the one left out (upper factors 1.05-1.24,
15-18 of 24 within). Judged leave-one-shape-out it says 1.17-2.36 on this host and covers
79-100 % of the fast disk's restores (92-100 % in runs 1-4). The slow disk is
bandwidth-bound and steadier: median errors 1.6-8.4 %, its misses of the upper a few per
cent (upper factors 1.07-1.16: its drill's restores agree with each other) but for the
stalls of run 5. Not met on this host: the median error of the fast disk's swap-ins,
and >= 95 % within the upper on a machine at load 8-9.

Issue 14, branch rto14 (2026-12-03): why the fast disk's swap-ins missed, and two fixes.
Timed by phase (a swap-in is a reflink clone, its delta extents written one at a time,
each a synchronous copy-on-write write, then the clone read back), the fast loop disk's
delta writes took 0.4-0.8 ms an extent (0.03 s for 79, 0.25-0.60 s for 692) and the
read-back of 128 MiB 0.11-0.26 s. The term is ``per_extent``; the drill barely measured
it: its largest shape had ~117 extents (a 10 % random differential of 1024 chunks is ~92
runs), ~50 ms inside restores whose two repeats differ by 15-27 % (median |a-b|/(a+b),
now printed), while the bench restores 400-700. The fit gave it 0.94 ms in one run and 0
in the next; the many-extent swap-ins were under-estimated by 24-44 %. The drill's
differential now holds 30 % (~215 runs), and ``per_extent`` came out 0.25-0.51 ms
(1.5 ms in the last run; guest: 6.8 ms fast, 40 ms on the 20 ms dm-delay disk, two
delayed I/Os a copy-on-write write). Second, ``per_byte`` is held to the pool disk's
probed sequential read rate (``fit_terms(min_per_byte=)``): the throttled disk's drill
once fitted 0.24 s + 5.8 ns/B (faster than its 100 MB/s) and every 128 MiB swap-in then
missed its upper. Host runs (``--size-mib 128 --drill-mib 64 --slow-mbps 100`` but run 1;
load at start-end on 2 CPUs), median |error| and measured <= upper per cell:

    run (load)                  overall       fast copy     fast swap     slow copy     slow swap
    main, no slow (0.5-1.7)     23.8 % 14/24  26.1 % 4/12   20.2 % 10/12
    main (2.0-4.7)              9.7 % 46/48   13.6 % 12/12  26.4 % 12/12  9.4 % 10/12   6.9 % 12/12
    diff 30 % (1.8-8.9)         7.8 % 43/48   15.9 % 11/12  18.8 % 12/12  3.2 % 12/12   6.8 % 8/12
    diff 30 % (9.0-9.0)         9.7 % 39/48   19.8 % 11/12  20.1 % 9/12   1.7 % 12/12   7.9 % 7/12
    diff 30 % (6.7-9.4)         8.9 % 47/48   14.9 % 12/12  27.2 % 11/12  4.1 % 12/12   4.7 % 12/12
    diff 30 % (7.2-10.0)        22.4 % 29/48  25.4 % 6/12   29.1 % 10/12  7.1 % 12/12   24.7 % 1/12
    + floor (6.9-7.0)           20.7 % 31/48  31.3 % 8/12   59.8 % 4/12   4.7 % 11/12   4.4 % 8/12
    + floor (2.4-10.2)          14.2 % 46/48  27.5 % 12/12  17.2 % 12/12  12.5 % 12/12  4.4 % 10/12

The fast disk's remaining error on this host is noise the drill cannot foresee: the same
swap-in took 0.25 s in one run and 1.1 s in the next (a full and 8 incrementals), as other
sessions' tests came and went; the slow disk, bandwidth-bound, errs 2-12 %. Guest (scripts/vm
run --timeout 2700 --mem 2048 --disk 1G --disk 1G --disk 128M --disk 1G -- .venv/bin/python
bench/bench_restore_model.py --size-mib 128 --drill-mib 64 --devices /dev/vda /dev/vdb
/dev/vdc --slow-device /dev/vdd --slow-ms 20; 1 guest CPU, host load 7-9; diff 30 %, no
floor, which the guest's fits were 2-4x above): 22.4 % overall, 43/48 within the upper;
fast copy 13.1 % 7/12, fast swap-in 18.0 % 12/12, slow copy 54.0 % 12/12 (over-estimates:
the drill's copies of the delayed disk took 0.28-0.69 s for the same 32 MiB, 0.56-1.09 s
for 64 MiB, and fitted 45 ms a generation), slow swap-in 22.5 % 12/12 (over-estimates:
40 ms an extent drilled, 31-39 ms implied by the 128 MiB restores). Again on 873c884
(diff 30 % and the floor; the same command with --timeout 1800; 1 guest CPU, host load
4-6): 11.5 % overall, 46/48 within the upper (96 %); fast copy 23.0 % 11/12 (signed -20 %,
over-estimated), fast swap-in 16.7 % 12/12 (signed +17 %), slow copy 17.0 % 11/12, slow
swap-in 5.7 % 12/12 (37 ms an extent drilled). Both targets met overall, not in every cell.

Branch rto14c (issue 14's structural fixes): estimates now count the restore plan's merged
shape (each delta chunk once, adjacent chunks of different generations one run: this bench
sets ``Chain.merged`` from the manifests as the daemon does; its random deltas rarely
overlap, so the shapes barely change here), a borrowing disk's per-extent term is scaled
by the disks' random reads (not exercised here: each pool is drilled itself), and a
swap-in writes its scattered delta windows 4 at once. Host, the command above with
``--slow-mbps 100``, load 5.3 at start, 9.7 at the end (2 CPUs, a guest of another session
running): 18.5 % overall, 44/48 within the upper; fast copy 16.5 % 11/12, fast swap-in
36.2 % 9/12 (under-estimates: the drill ran at the lower load, 0.08-0.28 s for 64 MiB
swap-ins, the 128 MiB ones took 0.26-1.25 s), slow copy 9.7 % 12/12, slow swap-in 15.7 %
12/12 (over-estimates: with parallel writes its swap-ins took 1.23-1.48 s whatever their
extents, 20-508 chunks, where the drill fitted 0.8 ms an extent). Guest, the guest command
above with --timeout 2700, in one boot after tests/guest/test_rto_promise.py and
test_drill_scratch_lvm.py (both passed); 1 guest CPU, host load 1.2 at start: 19.3 %
overall, 46/48 within the upper (96 %); fast copy 15.5 % 11/12, fast swap-in 18.2 % 11/12,
slow copy 51.0 % 12/12 (over-estimates, the copy path is unchanged: the drill's copies of
the delayed disk took 0.19-0.81 s, the 128 MiB ones 0.67-1.28 s), slow swap-in 8.6 % 12/12.
The dm-delay disk's swap-in per-extent cost drilled 21 ms with 4 writers (37-40 ms one at a
time, two delayed I/Os a copy-on-write write); the fast disk's 6.5 ms (6.8 ms before) did
not shrink on one CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import stat
import statistics
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pyroaring import BitMap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_datapath import fill_random, loop_device
from blockguard.core.perftable import DeviceSpeed
from blockguard.core.restore_model import (
    Chain,
    RestoreSample,
    correction_factor,
    estimate_chain,
)
from blockguard.core.restore_terms import PathSample, RestoreShape, fit_terms
from blockguard.core.vocab import GenerationKind, RestoreMode
from blockguard.engine.planning import runs
from blockguard.storage.backup import run_backup
from blockguard.storage.blockdev import BlockDevice
from blockguard.storage.cgroup import Limit, throttled_cgroup
from blockguard.storage.drill import run_drill
from blockguard.storage.manifest import VolumeIdentity
from blockguard.storage.pool.dirpool import DirPool
from blockguard.storage.probe import WritableRegion, probe_device
from blockguard.storage.restore import merged_deltas, restore_to_device, swap_in

MiB = 1 << 20
# (kind, fraction of chunks changed since the previous backup): chains of 1-8
# incrementals of scattered chunks, then a differential and incrementals on it.
HISTORY = [
    ("incremental", 0.01),
    ("incremental", 0.02),
    ("incremental", 0.05),
    ("incremental", 0.01),
    ("incremental", 0.10),
    ("incremental", 0.01),
    ("incremental", 0.04),
    ("incremental", 0.01),
    ("differential", 0.03),
    ("incremental", 0.02),
    ("incremental", 0.06),
]


def write_random_chunks(dev: str, chunks: BitMap, chunk: int) -> None:
    with BlockDevice(dev, write=True) as d:
        for c in chunks:
            d.pwrite_all(os.urandom(chunk), c * chunk)
        d.flush()


def repeat_spread(samples: list) -> float | None:
    """Median over the drill's shapes of |a - b| / (a + b) of two restores of one shape:
    how far one restore lies from the mean of two, the noise a model cannot fit."""
    times: dict[str, list[float]] = {}
    for s in samples:
        times.setdefault(s.shape, []).append(s.seconds)
    pairs = [abs(t[0] - t[1]) / (t[0] + t[1]) for t in times.values() if len(t) >= 2]
    return statistics.median(pairs) if pairs else None


def load() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def speed_of(path: str, chunk: int, duration: float):
    with BlockDevice(path) as d:
        size = d.size
    return probe_device(
        path, chunk_size=chunk, writable=WritableRegion(0, size), duration=duration
    ).speed()


@dataclass
class Results:
    #: (label, model's estimate, measured) for the model alone and with a learnt correction
    cases: list[tuple[str, float, float]] = field(default_factory=list)
    #: (label, calibrated estimate, its upper estimate, measured)
    calibrated: list[tuple[str, float, float, float]] = field(default_factory=list)


def run_pool(
    name: str,
    pooldev: str,
    src: str,
    target: str,
    target_speed: DeviceSpeed,
    args: argparse.Namespace,
    tmp: Path,
    out: Results,
) -> None:
    """On one pool disk: probe it, calibrate by a drill, back up the history and restore
    every generation in both modes, each compared with its estimates."""
    size, chunk = args.size_mib * MiB, args.chunk_kib * 1024
    nchunks = size // chunk
    rng = random.Random(5)
    with contextlib.ExitStack() as stack:
        # Sparse files read holes at memory speed; real disks have data everywhere.
        with BlockDevice(pooldev) as d:
            fill_random(pooldev, d.size - d.size % (8 * MiB))
        pool_speed = speed_of(pooldev, chunk, args.probe_seconds)
        speeds = {"pool": pool_speed}
        print(f"{name}: pool {pool_speed}")
        fill_random(src, size)
        pool = DirPool.create(f"bench-{name}", pooldev, tmp / f"mnt-{name}", force=True)
        stack.callback(pool.close)
        ident = VolumeIdentity("benchvol", size)
        # Copy mode drills into the restore target (not yet written by any restore): a
        # plain device, so the samples hold the copy path's writes as it overlaps them.
        drill = run_drill(pool, volume_bytes=args.drill_mib * MiB, seed=14, copy_scratch=target)
        terms = {}
        for mode in ("copy", "swap-in"):
            fitted = fit_terms(
                [
                    PathSample(
                        RestoreShape(s.generations, s.chunks, s.extents, s.nbytes), s.seconds
                    )
                    for s in drill.samples
                    if s.mode == mode
                ],
                # As the engine fits: no faster than the pool disk's probed reads.
                min_per_byte=1.0 / pool_speed.read(False),
            )
            if fitted is not None:
                if mode == "copy":
                    fitted = dataclasses.replace(fitted, write_rate=target_speed.write(False))
                terms["pool", mode] = fitted
                print(f"{name}: drill {mode}: {fitted}")
        print(f"{name}: drill took {drill.duration:.2f} s for {len(drill.samples)} restores")
        for mode in ("copy", "swap-in"):
            print(f"{name}: drill {mode} samples (shape: seconds): " + ", ".join(
                f"{s.shape} {s.seconds:.3f}" for s in drill.samples if s.mode == mode
            ))  # fmt: skip
            if spread := repeat_spread([s for s in drill.samples if s.mode == mode]):
                # No model can be nearer a single restore than its repeats are to each other.
                print(f"{name}: drill {mode} repeats: median |a - b| / (a + b) "
                      f"{100 * spread:.1f} %")  # fmt: skip

        full = run_backup(pool, ident, src, "full", None, chunk_size=chunk)
        full_id = parent = full.manifest.generation_id
        chain = Chain(size, "pool")
        since_full = BitMap()

        def measure(label: str, chain: Chain) -> None:
            gen = parent
            for mode in (RestoreMode.COPY, RestoreMode.SWAP_IN):
                est = estimate_chain(chain, speeds, mode, copy_target=target_speed)
                cal = estimate_chain(chain, speeds, mode, target_speed, 1.0, terms)
                if mode is RestoreMode.COPY:
                    res = restore_to_device(pool, "benchvol", gen, target)
                else:
                    # As the daemon swaps in: the clone's other chunks are read back.
                    res = swap_in(pool, "benchvol", gen)
                    if res.swap is not None:
                        res.swap.release()
                label_mode = f"{name} {label:<26} {mode.value:<8}"
                if est.seconds > 0:  # a full swapped in is a clone: nothing to predict
                    out.cases.append((label_mode, est.seconds, res.duration))
                out.calibrated.append((label_mode, cal.seconds, cal.upper_seconds, res.duration))

        measure("full", chain)
        for kind, fraction in HISTORY:
            changed = BitMap(rng.sample(range(nchunks), max(1, int(nchunks * fraction))))
            write_random_chunks(src, changed, chunk)
            since_full |= changed
            copy_set = since_full if kind == "differential" else changed
            res = run_backup(
                pool, ident, src, kind, BitMap(copy_set), chunk_size=chunk,
                base_id=full_id, parent_id=full_id if kind == "differential" else parent,
            )  # fmt: skip
            parent = res.manifest.generation_id
            chain = chain.with_backup(
                GenerationKind(kind), len(copy_set) * chunk, "pool", extents=runs(BitMap(copy_set))
            )
            # As the daemon's restore estimate (engine/restores.py): the restore plan's
            # distinct chunks and merged runs, from the manifests.
            chain = dataclasses.replace(chain, merged=merged_deltas(pool.chain("benchvol", parent)))
            label = f"{kind[:4]} {len(copy_set)} ch, {len(chain.restore_deltas())} deltas"
            measure(label, chain)


@contextlib.contextmanager
def delayed(device: str, ms: int) -> Iterator[str]:
    """``device`` behind dm-delay: every read and write waits ``ms`` (guest kernel only)."""
    with BlockDevice(device) as d:
        sectors = d.size // 512
    name = f"bench-slow-{os.getpid()}"
    table = f"0 {sectors} delay {device} 0 {ms} {device} 0 {ms}"
    subprocess.run(["dmsetup", "create", name, "--table", table], check=True, timeout=60)
    path = f"/dev/mapper/{name}"
    try:
        # Without udev the node may be missing: a write to the path would fill a file.
        if not Path(path).exists() or not stat.S_ISBLK(os.stat(path).st_mode):
            subprocess.run(["dmsetup", "mknodes", name], check=True, timeout=60)
        if not stat.S_ISBLK(os.stat(path).st_mode):
            raise SystemExit(f"{path} is not a block device")
        yield path
    finally:
        subprocess.run(["dmsetup", "remove", name], timeout=60, check=False)


def run_pool_throttled(
    name: str,
    pooldev: str,
    bps: int,
    src: str,
    target: str,
    target_speed: DeviceSpeed,
    args: argparse.Namespace,
    tmp: Path,
) -> Results:
    """:func:`run_pool` in a child process whose I/O to ``pooldev`` a blkio cgroup holds
    to ``bps`` bytes/s each way (the host has no dm-delay: a slow pool disk by bandwidth,
    not by latency). The source and the restore target stay unthrottled."""
    with BlockDevice(pooldev) as d:
        devno = f"{os.major(d.rdev)}:{os.minor(d.rdev)}"

    def child() -> Results:
        out = Results()
        try:
            run_pool(name, pooldev, src, target, target_speed, args, tmp, out)
        except Exception:
            # The project's errors do not unpickle: send the parent the traceback.
            raise RuntimeError(traceback.format_exc()) from None
        finally:
            sys.stdout.flush()
        return out

    with throttled_cgroup({devno: Limit(bps, bps)}) as group:
        return group.call(child, timeout=3600)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--chunk-kib", type=int, default=64)
    ap.add_argument("--probe-seconds", type=float, default=1.0)
    ap.add_argument("--tmp", default="/var/tmp")
    ap.add_argument("--drill-mib", type=int, default=64, help="size of the calibration drill")
    ap.add_argument(
        "--devices",
        nargs=3,
        metavar=("POOL", "TARGET", "SOURCE"),
        help="use these block devices (wiped!) as pool disk, restore target and source "
        "volume instead of loop devices; in the guest: --devices /dev/vda /dev/vdb /dev/vdc",
    )
    ap.add_argument(
        "--slow-device",
        help="a second pool disk (wiped!), run again behind dm-delay (needs device-mapper)",
    )
    ap.add_argument("--slow-ms", type=int, default=20, help="dm-delay of the slow disk (ms)")
    ap.add_argument(
        "--slow-mbps",
        type=int,
        help="host: run again on a second pool disk (a loop device) throttled to this many "
        "MB/s each way by a blkio cgroup (no device-mapper needed)",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (loop devices, mkfs, mount)", file=sys.stderr)
        return 2
    size, chunk = args.size_mib * MiB, args.chunk_kib * 1024
    out = Results()
    print(f"start: {load()} on {os.cpu_count()} CPUs")
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.tmp)))
        if args.devices:
            pooldev, target, src = args.devices
        else:
            src = stack.enter_context(loop_device(tmp / "source.img", size))
            pooldev = stack.enter_context(loop_device(tmp / "pool.img", 3 * size + 512 * MiB))
            target = stack.enter_context(loop_device(tmp / "target.img", size))
        fill_random(target, size)
        target_speed = speed_of(target, chunk, args.probe_seconds)
        print(f"target {target_speed}")
        run_pool("fast", pooldev, src, target, target_speed, args, tmp, out)
        if args.slow_device:
            slow = stack.enter_context(delayed(args.slow_device, args.slow_ms))
            run_pool(f"slow{args.slow_ms}ms", slow, src, target, target_speed, args, tmp, out)
        if args.slow_mbps:
            slowdev = stack.enter_context(loop_device(tmp / "slowpool.img", 3 * size + 512 * MiB))
            bps = args.slow_mbps * 10**6
            slow_out = run_pool_throttled(
                f"slow{args.slow_mbps}MBps", slowdev, bps, src, target, target_speed, args, tmp
            )
            out.cases += slow_out.cases
            out.calibrated += slow_out.calibrated
    cases, calibrated = out.cases, out.calibrated

    print(f"\n{'case':<48} {'predicted':>10} {'measured':>10} {'ratio':>7} {'corrected':>10}")
    raw_err, corr_err = [], []
    # The correction is learnt per restore mode: copying back and swapping in err
    # differently (a swap-in writes onto a reflinked clone, copy-on-write in the pool).
    samples: dict[str, list[RestoreSample]] = {}
    for label, predicted, measured in cases:
        mode = label.split()[-1]
        seen = samples.setdefault(mode, [])
        corr = correction_factor(seen) if seen else 1.0
        corrected = predicted * corr
        raw_err.append(abs(measured - predicted) / measured)
        if seen:  # the first restore of a mode has nothing to learn from yet
            corr_err.append(abs(measured - corrected) / measured)
        seen.append(RestoreSample(predicted, measured))
        print(f"{label:<48} {predicted:>9.3f}s {measured:>9.3f}s {measured / predicted:>7.2f} "
              f"{corrected:>9.3f}s")  # fmt: skip
    print(f"\nmedian error, model alone:          {100 * statistics.median(raw_err):.1f} %")
    print(f"median error, with learnt correction: {100 * statistics.median(corr_err):.1f} % "
          f"over {len(corr_err)} cases after the first of each mode (target <= 15 %)")  # fmt: skip
    print(f"\ncalibrated by the drill\n{'case':<48} {'estimate':>10} {'upper':>10} "
          f"{'measured':>10} {'error':>7}")  # fmt: skip
    cal_err, within = [], 0
    for label, estimate, upper, measured in calibrated:
        cal_err.append(abs(measured - estimate) / measured)
        within += measured <= upper
        print(f"{label:<48} {estimate:>9.3f}s {upper:>9.3f}s {measured:>9.3f}s "
              f"{100 * cal_err[-1]:>6.1f}%")  # fmt: skip
    share = 100 * within / len(cal_err)
    print(f"median error, drill-calibrated: {100 * statistics.median(cal_err):.1f} % over "
          f"{len(cal_err)} restores (target <= 15 %); measured <= upper in "
          f"{within}/{len(cal_err)} ({share:.0f} %, target >= 95 %)")  # fmt: skip
    cells: dict[str, list[tuple[float, bool]]] = {}
    for (label, _, upper, measured), err in zip(calibrated, cal_err, strict=True):
        key = f"{label.split()[0]} {label.split()[-1]}"
        cells.setdefault(key, []).append((err, measured <= upper))
    for key, rows in cells.items():
        print(f"  {key:<24} median error {100 * statistics.median(e for e, _ in rows):5.1f} %, "
              f"measured <= upper {sum(w for _, w in rows)}/{len(rows)}")  # fmt: skip
    print(f"end: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
