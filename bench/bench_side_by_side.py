#!/usr/bin/env python3
"""blockguard against dd in one guest boot: the table of issue 16 (item 6).

    scripts/vm run --timeout 2400 --mem 2048 --disk 1G --disk 1G --disk 1G --disk 1G -- \\
        .venv/bin/python bench/bench_side_by_side.py [--size-mib 512]

Disks: the first two are the daemon's LVM pool, the third holds the protected thin LV (a
thin pool with 64 KiB blocks; half random data, half zeros, every block mapped), the fourth
is the restore target. Each tool has its own disk, as in the issue's measurement.

The peer: wyng-backup has no public release this bench can install here (it is published
on GitHub only, which this machine cannot reach, and not on PyPI), so the rows compare
against ``dd`` alone, the physical reference: ``dd`` copying the LV to the restore disk
(``bs=1M``, direct I/O both sides) is the reference of both the full backup and the
restore, since each must read the whole volume and write a copy of it; ``dd`` reading the
LV alone is printed beside it (the floor no copy reaches; the issue's first table used
it for the full). Every blockguard figure is the wall of the D-Bus job the admin
waits for (``BackupNow`` / ``Restore`` to the job's end; the client's start-up is
measured by ``bench/bench_client.py``). Nothing runs beside the timed step. Printed,
never asserted; the issue's targets are in the table.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_backup_fixed import CHUNK, MiB, fill, scatter, sh
from blockguard.cli.client import Client, plain, variant
from tests.guest import test_lvmpool as lp
from tests.guest.daemon_fixture import engine_on_private_bus, remove_dm, resume_suspended

VG = "bgside"


def timed(argv: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, timeout=1200)
    return time.monotonic() - t0


def digest(dev: str, size: int) -> str:
    h = hashlib.sha256()
    with open(dev, "rb", buffering=0) as f:
        left = size
        while left:
            block = f.read(min(left, 4 * MiB))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.hexdigest()


class Bench:
    def __init__(self, client: Client) -> None:
        self.client = client
        self.rows: dict[str, float] = {}
        self.bytes: dict[str, int] = {}

    def job(self, label: str, method: str, sig: str, *args: object) -> dict:
        t0 = time.monotonic()
        props = self.client.wait_job(
            self.client.call(method, sig, *args), interval=0.05, timeout=1800
        )
        self.rows[label] = time.monotonic() - t0
        if props["State"] != "done":
            sys.exit(f"{label}: {props['State']}: {props['Error']}")
        result = plain(props["Result"])
        self.bytes[label] = int(result.get("bytes", 0) or 0)
        print(f"{label}: {self.rows[label]:.2f} s, {result.get('method', '')} "
              f"{self.bytes[label]} bytes", flush=True)  # fmt: skip
        return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=512)
    args = parser.parse_args()
    size = args.size_mib * MiB
    disks = os.environ.get("BLOCKGUARD_VM_DISKS", "").split()
    if len(disks) < 4:
        sys.exit("needs four disks: scripts/vm run --disk 1G --disk 1G --disk 1G --disk 1G -- ...")
    pool_disks, vol_disk, target = disks[:2], disks[2], disks[3]
    for d in (*pool_disks, target):
        lp.release(d)
    sh("lvm", "pvcreate", "-qq", vol_disk)
    sh("lvm", "vgcreate", "-qq", VG, vol_disk)
    dev = f"/dev/{VG}/vol"
    ref: dict[str, float] = {}
    written: dict[str, int] = {}
    try:
        tp = args.size_mib * 5 // 4 + 64
        sh("lvm", "lvcreate", "-qq", "-y", "--type", "thin-pool", "-L", f"{tp}M",
           "-c", "64k", "-n", "tp", VG)  # fmt: skip
        sh("lvm", "lvcreate", "-qq", "-y", "-V", f"{args.size_mib}M", "-T", f"{VG}/tp", "-n", "vol")
        fill(dev, size)
        ref["dd read"] = timed(["dd", f"if={dev}", "of=/dev/null", "bs=1M", "iflag=direct"])
        with tempfile.TemporaryDirectory() as tmp, engine_on_private_bus(Path(tmp)) as harness:
            daemon = harness.start()
            with Client(daemon.address) as client:
                b = Bench(client)
                client.call("CreatePool", "ssasb", "p1", "lvm", pool_disks, False)
                client.call("Protect", "sstssa{sv}", dev, "vol", CHUNK, "", "", {})
                client.call("SetObjectives", "sa{sv}", "vol", {"generations": variant(10)})
                b.job("full", "BackupNow", "s", "vol")
                b.job("no-change", "BackupNow", "s", "vol")
                written["1 %"] = scatter(dev, size, 0.01, 1) * CHUNK
                b.job("1 %", "BackupNow", "s", "vol")
                written["10 %"] = scatter(dev, size, 0.10, 2) * CHUNK
                b.job("10 %", "BackupNow", "s", "vol")
                want = digest(dev, size)
                b.job("restore (copy)", "Restore", "ssssb", "vol", "", "copy", target, False)
                restored = digest(target, size)
            daemon.stop()
        ref["dd copy"] = timed(["dd", f"if={dev}", f"of={target}", "bs=1M", "iflag=direct",
                                "oflag=direct"])  # fmt: skip
    finally:
        resume_suspended()
        remove_dm([n for n in sh("dmsetup", "ls").split() if n.startswith("blockguard-")])
        lp.forget_vg(VG)
        subprocess.run(["lvm", "pvremove", "-ff", "-y", vol_disk], capture_output=True)
        for d in (*pool_disks, target):
            lp.release(d)
    r, full = b.rows, b.rows["full"]
    print(f"\nrestored bytes equal the volume's: {restored == want}")
    print("\npeer: wyng-backup not installable from a public release here (GitHub unreachable,")
    print("not on PyPI): compared against dd only.\n")
    head = f"{args.size_mib} MiB thin LV, one guest boot"
    print(f"| {head} | dd, s | blockguard, s | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| full backup (against dd copy) | {ref['dd copy']:.2f} | {full:.2f} | "
          f"{full / ref['dd copy']:.2f} x dd | <= 1.3 x dd |")  # fmt: skip
    print(f"| full backup (against dd read) | {ref['dd read']:.2f} | {full:.2f} | "
          f"{full / ref['dd read']:.2f} x dd | |")  # fmt: skip
    for label, target_text in (("1 %", "<= 0.05 x full"), ("10 %", "<= 0.20 x full")):
        print(f"| incremental after {label} random 64 KiB writes | | {r[label]:.2f} | "
              f"{r[label] / full:.3f} x full | {target_text} |")  # fmt: skip
    print(f"| backup with nothing changed | | {r['no-change']:.2f} | | <= 2 s |")
    print(f"| restore (copy) | {ref['dd copy']:.2f} | {r['restore (copy)']:.2f} | "
          f"{r['restore (copy)'] / ref['dd copy']:.2f} x dd | <= 1.3 x dd |")  # fmt: skip
    for label in ("1 %", "10 %"):
        print(f"| stored / written bytes, {label} | | {b.bytes[label] / written[label]:.2f} | | |")


if __name__ == "__main__":
    main()
