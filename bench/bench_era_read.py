#!/usr/bin/env python3
"""Reading dm-era change sets: ``era_invalidate`` (subprocess + XML) vs the direct reader.

    .venv/bin/python bench/bench_era_read.py                     # the real-kernel fixtures
    .venv/bin/python bench/bench_era_read.py --snapshot PATH 1,5  # a metadata file/device
    .venv/bin/python bench/bench_era_read.py --scan-blocks 16777216  # era-array scan cost

For each image both answer "written since N" for every N: era_invalidate once per N (as
the era tracker calls it), the reader once for all N. Best of ``--repeat`` runs; the sets
are compared every time. ``--scan-blocks`` times the reader's worst case, a scan of an era
array of that many entries (a 1 TiB volume at 64 KiB blocks has 16 Mi), on synthetic data.
"""

from __future__ import annotations

import argparse
import json
import lzma
import random
import sys
import tempfile
import time
from array import array
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyroaring import BitMap

from blockguard.storage.runner import default_runner
from blockguard.storage.tracking.era import parse_era_invalidate
from blockguard.storage.tracking.erameta import _u32, bitmap_from_bits, read_written_since

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "era"


def best(repeat: int, fn: Callable[[], object]) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return min(times), result


def via_tool(path: str, eras: list[int], snapshot: bool) -> dict[int, BitMap]:
    run = default_runner()
    out = {}
    for n in eras:
        argv = ["era_invalidate", "--written-since", str(n)]
        argv += ["--metadata-snapshot", path] if snapshot else [path]
        out[n] = parse_era_invalidate(run.run(argv, timeout=600).stdout)
    return out


def compare(label: str, path: str, eras: list[int], snapshot: bool, repeat: int) -> float:
    t_tool, by_tool = best(repeat, lambda: via_tool(path, eras, snapshot))
    t_read, by_reader = best(
        repeat, lambda: read_written_since(path, eras, snapshot, allow_file=True)
    )
    t_full, by_full = best(
        repeat,
        lambda: read_written_since(path, eras, snapshot, allow_file=True, full_scan=True),
    )
    t_all, _ = best(
        repeat,
        lambda: read_written_since(path, eras, snapshot, allow_file=True, checksums="all"),
    )
    if not by_tool == by_reader == by_full:
        raise SystemExit(f"{label}: the reader and era_invalidate disagree")
    blocks = sum(len(b) for b in by_tool.values())  # type: ignore[union-attr]
    print(
        f"{label:<16} eras={len(eras)} blocks={blocks:>6}  era_invalidate {t_tool * 1e3:7.1f} ms"
        f"  reader {t_read * 1e3:6.2f} ms (full scan {t_full * 1e3:6.2f}, "
        f"all checksums {t_all * 1e3:6.2f})  ratio {t_tool / t_read:6.1f}x"
    )
    return t_tool / t_read


def scan_cost(nr_blocks: int, repeat: int) -> None:
    """The era-array scan and the bitset conversion at volume scale, synthetic data."""
    rng = random.Random(1)
    eras = array("I", bytes(4 * nr_blocks))
    for i in rng.sample(range(nr_blocks), nr_blocks // 10):
        eras[i] = rng.randrange(1, 200)
    raw = memoryview(eras.tobytes())
    per_block = 1018  # u32 entries in one 4 KiB array block

    def scan() -> BitMap:
        hits: list[int] = []
        for base in range(0, nr_blocks, per_block):
            values = _u32(raw[4 * base : 4 * min(nr_blocks, base + per_block)])
            hits += [i for i, v in enumerate(values, base) if v >= 150]
        return BitMap(array("I", hits))

    t_scan, found = best(repeat, scan)
    bits = bytearray(nr_blocks // 8)
    for i in rng.sample(range(nr_blocks), nr_blocks // 20):
        bits[i // 8] |= 1 << (i % 8)
    t_bits, _ = best(repeat, lambda: bitmap_from_bits(bits))
    print(
        f"era array scan of {nr_blocks} entries: {t_scan * 1e3:.0f} ms "
        f"({len(found)} hits); one writeset bitset -> BitMap: {t_bits * 1e3:.0f} ms"  # type: ignore[arg-type]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("path", nargs="?", help="metadata device or file (default: fixtures)")
    ap.add_argument("eras", nargs="?", help="comma-separated eras for PATH")
    ap.add_argument("--snapshot", action="store_true", help="read the held snapshot")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--scan-blocks", type=int, default=0)
    args = ap.parse_args()
    if args.scan_blocks:
        scan_cost(args.scan_blocks, args.repeat)
        return
    if args.path:
        eras = [int(e) for e in (args.eras or "1").split(",")]
        compare(Path(args.path).name, args.path, eras, args.snapshot, args.repeat)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for case in ("small", "big"):
            info = json.loads((DATA / f"{case}.json").read_text())
            for image, key, snapshot in (
                ("held", "era_invalidate", True),
                ("offline", "era_invalidate_offline", False),
            ):
                path = Path(tmp) / f"{case}-{image}.img"
                path.write_bytes(lzma.decompress((DATA / f"{path.name}.xz").read_bytes()))
                eras = [int(n) for n in info[key]]
                compare(f"{case}-{image}", str(path), eras, snapshot, args.repeat)
                compare(f"{case}-{image} N=1", str(path), eras[:1], snapshot, args.repeat)


if __name__ == "__main__":
    main()
