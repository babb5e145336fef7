#!/usr/bin/env python3
"""Idle CPU of blockguardd with three protected volumes and no backup due (host, root).

    .venv/bin/python bench/bench_idle.py [--seconds 600]

A real daemon on a private bus (tests/support) with the production scheduler settings
(looks at most every 30 s, an idle amount trigger every 300 s), a dir pool on a loop
device and three loop volumes: ``quiet`` (no objectives), ``hourly`` (RPO every 6h: after
its first full nothing is due for hours) and ``amount`` (RPO changed 1GiB, never reached
here). After the first fulls, the daemon process's CPU time (psutil, user + system, its
finished children included) is measured over ``--seconds``; the commands it ran in that
time are counted from its log (the runner logs each at DEBUG) and from sampling its
children. Prints figures, asserts nothing. Acceptance (issue 16): CPU < 0.5 % over 600 s.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blockguard.cli.client import JOB, Client, plain, variant
from tests.support.bus import PERMISSIVE, NotifyListener, start_bus
from tests.support.daemon import ENGINE, ENGINE_ENV, start_daemon
from tests.support.devices import LoopFactory, MiB, unmount_under

SIZE = 64 * MiB
#: The production defaults of the scheduler (the test harness makes them faster).
PRODUCTION = {
    "BLOCKGUARD_SCHEDULER_INTERVAL": "30",
    "BLOCKGUARD_SCHEDULER_MAX_INTERVAL": "300",
}


def wait_idle(client: Client, names: list[str], timeout: float = 120) -> None:
    """Until every volume of ``names`` has a generation and no job runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = [len(plain(client.call("ListGenerations", "s", n))) for n in names]
        running = [p for p in client.objects(JOB).values() if p["State"] in ("queued", "running")]
        if all(counts) and not running:
            return
        time.sleep(0.2)
    raise SystemExit(f"the first fulls did not finish within {timeout}s")


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def measure(pid: int, seconds: float, sample: float = 0.5) -> tuple[float, float, set[int]]:
    """CPU seconds used by ``pid`` over ``seconds`` of wall time, and the child PIDs seen."""
    proc = psutil.Process(pid)
    children: set[int] = set()
    start_cpu, start = cpu_seconds(proc), time.monotonic()
    while time.monotonic() - start < seconds:
        with contextlib.suppress(psutil.Error):  # a child gone while listed
            children.update(c.pid for c in proc.children(recursive=True))
        time.sleep(sample)
    return cpu_seconds(proc) - start_cpu, time.monotonic() - start, children


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="measured period")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bg-bench-idle-"))
    work.chmod(0o755)
    loops = LoopFactory(work)
    notify = NotifyListener(str(work / "notify"), str(work / "notify"))
    daemon = None
    try:
        with start_bus(work, PERMISSIVE) as bus:
            pool_disk = loops(400 * MiB, "pool.img")
            devices = {n: loops(SIZE, f"{n}.img") for n in ("quiet", "hourly", "amount")}
            daemon = start_daemon(
                bus, work, notify, "--service", ENGINE, env={**ENGINE_ENV, **PRODUCTION}
            )
            with Client(daemon.address) as client:
                client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
                for name, device in devices.items():
                    client.call("Protect", "sstssa{sv}", device, name, 0, "", "", {})
                client.call("SetObjectives", "sa{sv}", "hourly", {"rpo": variant("every 6h")})
                client.call("SetObjectives", "sa{sv}", "amount", {"rpo": variant("changed 1GiB")})
                wait_idle(client, ["hourly", "amount"])
            time.sleep(2)  # the last job's aftermath (refresh, health) settles
            before = len(daemon.log())
            used, wall, children = measure(daemon.process.pid, args.seconds)
            window = daemon.log()[before:]
            commands = sum(1 for line in window.splitlines() if " run: [" in line)
            looks = {n: window.count(f"looking at {n} [") for n in devices}
            print(f"measured {wall:.0f} s of an idle daemon (pid {daemon.process.pid})")
            print(f"daemon CPU: {used:.3f} s = {100 * used / wall:.3f} % of one CPU")
            print(
                f"commands run (log): {commands}; child processes seen (sampled): {len(children)}"
            )
            print("scheduler looks: " + ", ".join(f"{n} {c}" for n, c in looks.items()))
    finally:
        if daemon is not None:
            daemon.stop()
        unmount_under(work)
        loops.cleanup()
        notify.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
