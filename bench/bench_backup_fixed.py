#!/usr/bin/env python3
"""Fixed cost per backup and scattered incrementals, in the guest kernel (issue 16 item 1).

    scripts/vm run --timeout 1800 --mem 2048 --disk 1G --disk 1G --disk 1G -- \\
        .venv/bin/python bench/bench_backup_fixed.py [--size-mib 256]

The first two virtio disks are the daemon's LVM pool; the third holds the protected thin
LV (a thin pool with 64 KiB blocks), half random data, half zeros. The daemon is the real
one (debug log, on a private bus); every wall is a D-Bus job's, from ``BackupNow`` to the
job's final state, the client's start-up not included. Printed, never asserted:

- full backup wall, and ``dd`` reading the same LV (``bs=1M iflag=direct`` to /dev/null);
- a backup with nothing changed (target <= 2 s);
- incrementals after 1 % and 10 % random 64 KiB writes, as walls and as ratios to the
  full (targets <= 5 % and <= 20 %);
- with a fourth disk, a restore (copy) of the newest generation to it, and ``dd`` copying
  the LV there (``iflag=direct oflag=direct``);
- for each job, every external command the daemon ran and its time (the runner's
  ``rc=N in S: argv`` debug lines), the pool's ``delta-*`` LVs before it (spare delta
  areas, and generations written to one), and the daemon's CPU time over the job (its own and
  its finished children's: under TCG with one guest CPU, nearly all of the wall); the
  commands run between two jobs (the last one's background aftermath) are listed too;
- ``--pause-seconds N`` waits N s after each job (the spare delta area is made once the
  pool was idle for the daemon's ``idle_quiet``, ``--idle-quiet``); 0 runs the jobs back
  to back, as the rows of main were measured;
- the idle daemon's CPU over ``--idle-seconds`` after the backups: with only a number
  of generations set (nothing ever due), then with an RPO of every 6 h (not due for
  hours) and one of changed 1 GiB (never reached: the amount trigger polls).
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blockguard.cli.client import Client, plain, variant
from tests.guest import test_lvmpool as lp
from tests.guest.daemon_fixture import engine_on_private_bus, remove_dm, resume_suspended

MiB = 1 << 20
CHUNK = 64 << 10
VG = "bgbench"
#: where the last job's commands ended in the daemon's log
_last_end = [0]
#: seconds to wait after each job (--pause-seconds)
_pause = [0.0]
#: the pool's VG (its delta-* LVs are the spare delta areas)
POOL_VG = "bg_p1"
RUN_LINE = re.compile(r"rc=(-?\d+) in ([0-9.]+)s: \[(.*)\]")


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=600).stdout


def fill(dev: str, size: int) -> None:
    """First half random, second half zeros (written, so the thin LV maps every block)."""
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4 * MiB)
    try:
        for off in range(0, size, 4 * MiB):
            buf[:] = os.urandom(4 * MiB) if off < size // 2 else bytes(4 * MiB)
            os.pwrite(fd, buf, off)
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()


def scatter(dev: str, size: int, fraction: float, seed: int) -> int:
    """Random 64 KiB writes over ``fraction`` of the volume; the chunks written."""
    rng = random.Random(seed)
    chunks = rng.sample(range(size // CHUNK), max(1, int(size // CHUNK * fraction)))
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, CHUNK)
    try:
        for c in chunks:
            buf[:] = rng.randbytes(CHUNK)
            os.pwrite(fd, buf, c * CHUNK)
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()
    return len(chunks)


def commands(log: Path, start: int) -> tuple[list[tuple[float, str]], int]:
    """The commands the daemon logged since byte ``start`` of its log, and the new end."""
    with open(log, "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
        end = f.tell()
    found = []
    for m in RUN_LINE.finditer(text):
        argv = [a.strip().strip("'") for a in m.group(3).split(",")]
        found.append((float(m.group(2)), " ".join(argv)))
    return found, end


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def idle(proc: psutil.Process, log: Path, seconds: float, label: str) -> None:
    """The daemon's CPU and the commands it ran over ``seconds`` with nothing due."""
    _, mark = commands(log, 0)
    cpu0, t0 = cpu_seconds(proc), time.monotonic()
    time.sleep(seconds)
    used, wall = cpu_seconds(proc) - cpu0, time.monotonic() - t0
    cmds, _ = commands(log, mark)
    print(
        f"\nidle, {label}: {used:.2f} s CPU in {wall:.0f} s = {100 * used / wall:.2f} % of a "
        f"vCPU; {len(cmds)} commands: {sorted({a.split()[1] if ' ' in a else a for _, a in cmds})}",
        flush=True,
    )


def backup(
    client: Client,
    vol: str,
    log: Path,
    label: str,
    figures: dict[str, float],
    proc: psutil.Process,
    restore_to: str | None = None,
) -> None:
    """A backup job of ``vol`` (a restore of its newest generation to ``restore_to``)."""
    spares = sorted(n for n in lp.lv_names(POOL_VG) if n.startswith("delta-"))
    between, mark = commands(log, _last_end[0])
    for seconds, argv in between:  # the last job's aftermath (tidy, a delta area made ahead)
        print(f"  between jobs, in the background: {seconds:7.3f} s  {argv[:200]}", flush=True)
    cpu0 = cpu_seconds(proc)
    t0 = time.monotonic()
    if restore_to is None:
        job = client.call("BackupNow", "s", vol)
    else:
        job = client.call("Restore", "ssssb", vol, "", "copy", restore_to, False)
    props = client.wait_job(job, interval=0.05, timeout=1200)
    wall = time.monotonic() - t0
    cpu = cpu_seconds(proc) - cpu0
    assert props["State"] == "done", props["Error"]
    result = plain(props["Result"])
    cmds, _last_end[0] = commands(log, mark)
    figures[label] = wall
    print(
        f"\n{label}: {wall:.2f} s wall, {cpu:.2f} s daemon CPU, method {result.get('method')}, "
        f"{result.get('bytes', '?')} bytes copied; {len(cmds)} commands, "
        f"{sum(s for s, _ in cmds):.2f} s in them; delta-* LVs before it: {spares or 'none'}:",
        flush=True,
    )
    for seconds, argv in cmds:
        print(f"  {seconds:7.3f} s  {argv[:300]}", flush=True)
    if _pause[0] > 0:
        time.sleep(_pause[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument(
        "--pause-seconds", type=float, default=0.0,
        help="seconds to wait after each job before the next step (0: back to back)",
    )  # fmt: skip
    parser.add_argument(
        "--idle-quiet", type=float, default=None,
        help="the daemon's idle_quiet (BLOCKGUARD_IDLE_QUIET; default: the daemon's)",
    )  # fmt: skip
    args = parser.parse_args()
    _pause[0] = args.pause_seconds
    quiet = {} if args.idle_quiet is None else {"BLOCKGUARD_IDLE_QUIET": str(args.idle_quiet)}
    print(
        f"jobs {'back to back' if args.pause_seconds <= 0 else f'{args.pause_seconds:g} s apart'}"
        f", daemon idle_quiet {args.idle_quiet if args.idle_quiet is not None else 'default'}",
        flush=True,
    )
    size = args.size_mib * MiB
    disks = os.environ.get("BLOCKGUARD_VM_DISKS", "").split()
    if len(disks) < 3:
        sys.exit("needs three disks: scripts/vm run --disk 1G --disk 1G --disk 1G -- ...")
    pool_disks, vol_disk = disks[:2], disks[2]
    target = disks[3] if len(disks) > 3 else None
    for d in (*pool_disks, *([target] if target else [])):
        lp.release(d)
    sh("lvm", "pvcreate", "-qq", vol_disk)
    sh("lvm", "vgcreate", "-qq", VG, vol_disk)
    dev = f"/dev/{VG}/vol"
    figures: dict[str, float] = {}
    try:
        sh("lvm", "lvcreate", "-qq", "-y", "--type", "thin-pool", "-L", f"{args.size_mib * 2}M",
           "-c", "64k", "-n", "tp", VG)  # fmt: skip
        sh("lvm", "lvcreate", "-qq", "-y", "-V", f"{args.size_mib}M", "-T", f"{VG}/tp", "-n", "vol")
        fill(dev, size)
        t0 = time.monotonic()
        sh("dd", f"if={dev}", "of=/dev/null", "bs=1M", "iflag=direct")
        figures["dd"] = time.monotonic() - t0
        with tempfile.TemporaryDirectory() as tmp, engine_on_private_bus(Path(tmp)) as harness:
            # The production scheduler (the test harness's never looks): the idle figures.
            daemon = harness.start(
                BLOCKGUARD_SCHEDULER_INTERVAL="30", BLOCKGUARD_SCHEDULER_MAX_INTERVAL="300", **quiet
            )
            proc = psutil.Process(daemon.process.pid)
            with Client(daemon.address) as client:
                client.call("CreatePool", "ssasb", "p1", "lvm", pool_disks, False)
                client.call("Protect", "sstssa{sv}", dev, "vol", CHUNK, "", "", {})
                client.call("SetObjectives", "sa{sv}", "vol", {"generations": variant(10)})
                backup(client, "vol", daemon.log_path, "full", figures, proc)
                backup(client, "vol", daemon.log_path, "no-change", figures, proc)
                scatter(dev, size, 0.01, 1)
                backup(client, "vol", daemon.log_path, "1 %", figures, proc)
                scatter(dev, size, 0.10, 2)
                backup(client, "vol", daemon.log_path, "10 %", figures, proc)
                backup(client, "vol", daemon.log_path, "no-change again", figures, proc)
                if target is not None:
                    backup(client, "vol", daemon.log_path, "restore", figures, proc, target)
                for label, rpo in (("generations only", None), ("rpo every 6h", "every 6h"),
                                   ("rpo changed 1GiB", "changed 1GiB")):  # fmt: skip
                    if args.idle_seconds <= 0:
                        break
                    if rpo is not None:
                        given = {"rpo": variant(rpo), "generations": variant(10)}
                        client.call("SetObjectives", "sa{sv}", "vol", given)
                    time.sleep(3)  # the last call's aftermath (tidy, health) settles
                    idle(proc, daemon.log_path, args.idle_seconds, label)
            daemon.stop()
        if target is not None:
            t0 = time.monotonic()
            sh("dd", f"if={dev}", f"of={target}", "bs=1M", "iflag=direct", "oflag=direct")
            figures["dd copy"] = time.monotonic() - t0
    finally:
        resume_suspended()
        remove_dm([n for n in sh("dmsetup", "ls").split() if n.startswith("blockguard-")])
        lp.forget_vg(VG)
        subprocess.run(["lvm", "pvremove", "-ff", "-y", vol_disk], capture_output=True)
        for d in (*pool_disks, *([target] if target else [])):
            lp.release(d)
    full = figures["full"]
    pause = "back to back" if args.pause_seconds <= 0 else f"{args.pause_seconds:g} s apart"
    print(f"\n| {args.size_mib} MiB thin LV, D-Bus job walls ({pause}) | s | / full | target |")
    print("|---|---|---|---|")
    print(f"| dd read (bs=1M iflag=direct) | {figures['dd']:.2f} | {figures['dd'] / full:.2f} | |")
    print(f"| full | {full:.2f} | 1.00 | <= 1.3 x dd |")
    for label, goal in (("no-change", "<= 2 s"), ("1 %", "<= 0.05"), ("10 %", "<= 0.20"),
                        ("no-change again", "<= 2 s")):  # fmt: skip
        if label in figures:
            print(f"| {label} | {figures[label]:.2f} | {figures[label] / full:.3f} | {goal} |")
    if "restore" in figures:
        ratio = figures["restore"] / figures["dd copy"]
        print(f"| dd copy (iflag=direct oflag=direct) | {figures['dd copy']:.2f} | | |")
        print(f"| restore (copy) | {figures['restore']:.2f} | {ratio:.2f} x dd copy | <= 1.3 |")


if __name__ == "__main__":
    main()
